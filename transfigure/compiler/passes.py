"""The Pass protocol and the registry of built-in passes.

A pass is a class with a ``name``, an ``Options`` dataclass (see :mod:`.options`), an ``order`` (lower runs
first) and ``run(graph) -> PassResult``. It edits ``graph.graph`` in place with the torch.fx API and reports
every site it matched: rewritten, or skipped with the reason. Built-in passes are registered with
:func:`register_pass`, which makes them selectable by name in ``options={...}``; user passes are simply
instances given to ``transfigure.backend(passes=[...])``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch.fx as fx

from . import options as options_module


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


@dataclasses.dataclass
class SiteRecord:
    """One matched site: the node, the module it came from, and what happened to it."""

    status: str  # "rewritten" or "skipped"
    node: str
    fqn: str
    detail: str = ""
    target: str = ""


@dataclasses.dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    bytes: int


@dataclasses.dataclass
class PassResult:
    """What a pass did: sites matched (rewritten or skipped with a reason) and tensors it added."""

    pass_name: str = ""
    sites: list[SiteRecord] = dataclasses.field(default_factory=list)
    tensors_added: list[TensorRecord] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)  # shown in the report's summary and logged

    @staticmethod
    def _describe(site: Any) -> tuple[str, str, str]:
        node = site if isinstance(site, fx.Node) else getattr(site, "node", None)
        fqn = getattr(site, "fqn", "") or ""
        if node is None:
            return str(site), fqn, ""
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if not fqn:
            from .graph import GraphView

            fqn = GraphView.module_fqn(node)
        return node.name, fqn, str(target)

    def rewrote(self, site: Any, detail: str = "") -> None:
        name, fqn, target = self._describe(site)
        self.sites.append(SiteRecord("rewritten", name, fqn, detail, target))

    def skip(self, site: Any, reason: str) -> None:
        name, fqn, target = self._describe(site)
        self.sites.append(SiteRecord("skipped", name, fqn, reason, target))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def warn(self, text: str) -> None:
        """Something the user should act on (a rewrite that costs without paying, a likely misconfiguration)."""
        self.warnings.append(text)
        logging.getLogger("transfigure").warning("transfigure %s: %s", self.pass_name or "pass", text)

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "skipped"]

    @property
    def matched(self) -> int:
        return len(self.sites)


class Pass:
    """Base class of every rewrite pass. Subclasses set ``name``, ``Options``, ``order``, ``description``.

    ``Pass(**options)`` or ``Pass(options_instance)`` validates the options immediately (OptionError names the
    bad key as ``"<pass name>.<key>"``).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    order: ClassVar[int] = 100
    description: ClassVar[str] = ""

    def __init__(self, options: Any = None, /, **kwargs: Any):
        if not self.name:
            raise TypeError(f"{type(self).__name__} must set a class attribute 'name'")
        if options is not None and kwargs:
            raise TypeError("give options either as one object or as keywords, not both")
        values = kwargs if options is None else options
        self.options = options_module.parse(self.Options, values, prefix=f"{self.name}.")

    def run(self, graph) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def implied_passes(self) -> list[Pass]:
        """Passes this one needs later in the pipeline (added when not already enabled; ``disable`` still
        removes them by name)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


BUILTIN_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` a built-in pass, enabled by ``options={cls.name: {...}}``."""
    if not cls.name or cls.name in BUILTIN_PASSES and BUILTIN_PASSES[cls.name] is not cls:
        raise ValueError(f"cannot register pass {cls.__name__}: name {cls.name!r} is empty or taken")
    BUILTIN_PASSES[cls.name] = cls
    return cls


def builtin_passes() -> dict[str, type[Pass]]:
    """Every registered built-in pass, sorted by pipeline order.

    Built-ins register when ``transfigure.passes`` is imported (the backends and the package root do that;
    the compiler itself never imports passes, so dependencies keep pointing one way).
    """
    return dict(sorted(BUILTIN_PASSES.items(), key=lambda item: (item[1].order, item[0])))
