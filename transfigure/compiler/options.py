"""Typed, validated options.

Every pass declares its options as a frozen dataclass whose fields are made with :func:`option`. Parsing a
user mapping checks, before any compilation work, that every key exists, that every value has the declared
type, and that it lies in the declared range or choice set; the first problem raises :class:`OptionError`,
whose message names the full key (``"sparsity.target"``), the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

_MISSING = dataclasses.MISSING


class OptionError(ValueError):
    """A bad transfigure option: unknown key, wrong type or out-of-range value."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"transfigure option {key!r}: {message}")


def load_file(path: Any, **kwargs: Any) -> Any:
    """``torch.load(path, map_location="cpu")`` that returns real tensors even while Dynamo compiles: inside its
    tracing context (where option values given as paths get loaded) torch.load returns meta tensors, ready for
    fake-tensor tracing, and a calibration or trained state read that way has no values."""
    import torch
    from torch._guards import tracing
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with tracing(None), unset_fake_temporarily():
        return torch.load(path, map_location="cpu", **kwargs)


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
):
    """A dataclass field with a help line and optional constraints (choices, or a numeric range)."""
    metadata = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open, "high_open": high_open}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable: use a tuple or a frozen dataclass")
    return dataclasses.field(default=default, metadata=metadata)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple,):
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "tuple"
    if origin in (dict, Mapping):
        return "dict"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise OptionError (no silent lossy conversions)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise OptionError(key, f"got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return _coerce(key, value, arm)
            except OptionError as error:
                errors.append(error)
        raise OptionError(key, f"got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise OptionError(key, f"got {value!r}; expected None")
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise OptionError(key, f"got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) != len(value):
            raise OptionError(key, f"got {value!r}; expected {len(args)} items")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise OptionError(key, f"got {value!r} ({type(value).__name__}); expected a dict")
        return types.MappingProxyType(dict(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise OptionError(key, f"got {value!r} ({type(value).__name__}); expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OptionError(key, f"got {value!r} ({type(value).__name__}); expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise OptionError(key, f"got {value!r} ({type(value).__name__}); expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise OptionError(key, f"got {value!r} ({type(value).__name__}); expected a string")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise OptionError(key, f"got {value!r} ({type(value).__name__}); expected {tp.__name__}")
    return value


def _check_constraints(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None:
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if v not in choices:
                raise OptionError(key, f"got {v!r}; allowed: {', '.join(repr(c) for c in choices)}")
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (low is not None or high is not None):
        too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
        too_high = high is not None and (value >= high if meta.get("high_open") else value > high)
        if too_low or too_high:
            raise OptionError(key, f"got {value!r}; allowed: {describe_range(meta)}")


def describe_range(meta: Mapping[str, Any]) -> str:
    low, high = meta.get("low"), meta.get("high")
    left = "(" if meta.get("low_open") else "["
    right = ")" if meta.get("high_open") else "]"
    return f"a number in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse(cls: type, values: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build ``cls`` (an options dataclass) from a user mapping, validating every key and value."""
    if values is None:
        values = {}
    if dataclasses.is_dataclass(values) and isinstance(values, cls):
        values = {f.name: getattr(values, f.name) for f in dataclasses.fields(cls)}
    if not isinstance(values, Mapping):
        raise OptionError(prefix.rstrip(".") or "options", f"got {values!r}; expected a dict of options")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "(none)"
            raise OptionError(full, f"unknown option{suggest(str(key), fields)}; allowed: {allowed}")
        coerced = _coerce(full, value, hints[key])
        _check_constraints(full, coerced, fields[key].metadata)
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except OptionError:
        raise
    except (TypeError, ValueError) as error:
        raise OptionError(prefix.rstrip(".") or cls.__name__, str(error)) from error


def describe(cls: type) -> list[dict[str, str]]:
    """One row per option: name, type, default, allowed values and help (for CLI and README tables)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        allowed = ""
        if meta.get("choices") is not None:
            allowed = ", ".join(repr(c) for c in meta["choices"])
        elif meta.get("low") is not None or meta.get("high") is not None:
            allowed = describe_range(meta)
        default = f.default if f.default is not _MISSING else (f.default_factory() if f.default_factory is not _MISSING else "")
        rows.append(
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": repr(default),
                "allowed": allowed,
                "help": meta.get("help", ""),
            }
        )
    return rows
