"""``transfigure.inspect``: run the pipeline on a model's graphs and return the report, without Inductor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from transfigure.compiler import Pass, Report

from .backend import Backend


def inspect(model: torch.nn.Module, *args: Any, passes: Sequence[Pass] = (), kwargs: dict | None = None, **options: Any) -> Report:
    """Trace ``model(*args, **kwargs)`` with Dynamo, run the passes, and return their :class:`Report`.

    Nothing is compiled to machine code: the rewritten graphs run eagerly once. ``options`` are the same as
    ``torch.compile(..., options=...)``; ``verify`` defaults to True here.
    """
    options.setdefault("verify", True)
    backend = Backend(passes, lowering="eager", **options)
    compiled = torch.compile(model, backend=backend, fullgraph=False)
    with torch.no_grad():
        compiled(*args, **(kwargs or {}))
    return backend.report
