"""The pipeline: parse options, order passes, run them on a :class:`GraphView`, verify and report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from . import options as options_module
from .graph import GraphView
from .options import OptionError, option
from .passes import Pass, TensorRecord, builtin_passes
from .report import GraphReport, PassReport, Region


@dataclasses.dataclass(frozen=True)
class CompilerOptions:
    """Options of the compiler itself (every other top-level key names a built-in pass)."""

    verify: bool = option(False, "run the graph before and after each pass on the example inputs; record the max relative error")
    disable: tuple[str, ...] = option((), "names of passes not to run (built-in or user passes)")
    dump_dir: str | None = option(None, "write the report of every compiled graph here (also env TRANSFIGURE_DUMP_DIR)")
    weight_check: Literal["error", "recompile", "ignore"] = option(
        "error", "when a parameter a pass packed at compile time changes in place: raise, recompile, or ignore"
    )
    inductor_config: Mapping[str, Any] | None = option(None, "Inductor config patches passed to compile_fx (transfigure backend only)")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = option(
        None, "torch.compile's mode as an option (torch.compile refuses mode= beside options=); 'reduce-overhead' "
        "turns on CUDA graphs, which training steps need (a 1B step is host-bound without them)"
    )


def parse_compile_options(
    values: Mapping[str, Any] | None, user_passes: Sequence[Pass] = ()
) -> tuple[CompilerOptions, list[Pass]]:
    """Split ``options={...}`` into compiler options and enabled pass instances, validating everything.

    A built-in pass is enabled by its name: ``{"sparsity": {"target": 0.5}}``, ``{"sparsity": True}``
    (defaults) or ``{"sparsity": False}`` (off). Errors name the bad key and what is allowed.
    """
    values = dict(values or {})
    builtins = builtin_passes()
    compiler_fields = {f.name for f in dataclasses.fields(CompilerOptions)}
    compiler_values, enabled = {}, []
    for key, value in values.items():
        if key in compiler_fields:
            compiler_values[key] = value
        elif key in builtins:
            if value is False or value is None:
                continue
            if value is True:
                value = {}
            if isinstance(value, Pass):
                enabled.append(value)
                continue
            if not isinstance(value, Mapping):
                raise OptionError(key, f"got {value!r}; expected a dict of {key} options, true or false")
            enabled.append(builtins[key](**value))
        else:
            allowed = sorted(compiler_fields) + sorted(builtins)
            hint = options_module.suggest(str(key), allowed)
            raise OptionError(
                str(key),
                f"unknown option or pass{hint}; compiler options: {', '.join(sorted(compiler_fields))}; "
                f"built-in passes: {', '.join(builtins) or '(none)'}",
            )
    compiler = options_module.parse(CompilerOptions, compiler_values)
    for user_pass in user_passes:
        if not isinstance(user_pass, Pass):
            raise OptionError("passes", f"got {user_pass!r}; expected instances of transfigure.Pass")
    explicit = {p.name for p in list(enabled) + list(user_passes)}
    for implied in [q for p in enabled for q in p.implied_passes()]:
        if implied.name not in explicit:
            explicit.add(implied.name)
            enabled.append(implied)
    passes = sorted(list(enabled) + list(user_passes), key=lambda p: p.order)
    names = [p.name for p in passes]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise OptionError("passes", f"pass names must be unique; repeated: {', '.join(sorted(duplicates))}")
    known = set(names) | set(builtins)
    for name in compiler.disable:
        if name not in known:
            raise OptionError("disable", f"got {name!r}, which is no pass{options_module.suggest(name, known)}; known: {', '.join(sorted(known))}")
    passes = [p for p in passes if p.name not in compiler.disable]
    return compiler, passes


def _storage_ptr(value: Any) -> int | None:
    if not isinstance(value, torch.Tensor) or value.device.type == "meta":
        return None
    try:
        return value.untyped_storage().data_ptr() or None
    except Exception:  # fake / functional tensors have no real storage
        return None


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    return []


def run_graph(gm: torch.fx.GraphModule, inputs: Sequence[Any], seed: int = 0) -> list[torch.Tensor]:
    """Run ``gm`` once without grad on copies of non-parameter inputs (so in-place updates don't leak)."""
    copied = [
        x.detach().clone() if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) else x for x in inputs
    ]
    devices = sorted({x.device.index or 0 for x in copied if isinstance(x, torch.Tensor) and x.is_cuda})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return [t.detach() for t in _flat_tensors(gm(*copied))]


def max_relative_error(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """max over outputs of max|ref - out| / max|ref| (floating outputs; exact match required for others)."""
    if len(reference) != len(actual):
        return float("inf")
    worst = 0.0
    for ref, out in zip(reference, actual):
        if ref.shape != out.shape:
            return float("inf")
        if not ref.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(ref, out.to(ref.dtype)) else float("inf"))
            continue
        if ref.numel() == 0:
            continue
        ref64, out64 = ref.double(), out.double()
        scale = ref64.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, float(((ref64 - out64).abs().max() / scale).item()))
    return worst


def _inventory(view: GraphView) -> dict[str, list[dict[str, Any]]]:
    linears = [
        {"node": s.node.name, "fqn": s.fqn, "shape": f"{s.out_features}x{s.in_features}", "layer": s.layer}
        for s in view.linear_calls()
    ]
    attention = [
        {
            "node": s.node.name,
            "fqn": s.fqn,
            "layer": s.layer,
            "is_causal": s.is_causal,
            "mask": s.attn_mask is not None,
            "enable_gqa": s.enable_gqa,
        }
        for s in view.attention_calls()
    ]
    return {"linear": linears, "attention": attention}


def _emit_trace_artifact(name: str, code: str) -> None:
    try:
        from torch._logging._internal import trace_structured_artifact

        trace_structured_artifact(name, "string", payload_fn=lambda: code)
    except Exception:
        pass  # tracing is best-effort: never let logging break compilation


def run_pipeline(view: GraphView, passes: Sequence[Pass], compiler: CompilerOptions, index: int = 0) -> GraphReport:
    """Run ``passes`` in order on ``view``; returns the report (verify errors included when asked)."""
    counts: dict[str, int] = {}
    for p in view.placeholders:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    original_code = view.gm.code
    report = GraphReport(index, _inventory(view), counts, original_code=original_code)
    reference_outputs = run_graph(view.gm, view.inputs()) if compiler.verify and passes else None
    previous_outputs = reference_outputs
    for graph_pass in passes:
        before_graph = view.gm.graph
        before_code = view.gm.code
        snapshot = None
        if compiler.verify:
            from .graph import copy_graph_module

            snapshot = copy_graph_module(view.gm)
            before_graph = snapshot.graph
        else:
            before_graph = _names_only(view.gm.graph)
        extra_before = len(view.extra_inputs)
        start = time.perf_counter()
        try:
            result = graph_pass.run(view)
        except OptionError:
            raise
        except Exception as error:
            raise PassError(graph_pass.name, error) from error
        if result is None or not hasattr(result, "sites"):
            raise PassError(graph_pass.name, TypeError("run() must return a PassResult"))
        result.pass_name = result.pass_name or graph_pass.name
        view.recompile()
        seconds = time.perf_counter() - start
        # a new input that views storage the graph already had (lut_fuse's span over sibling codes) adds no memory
        known_storage = {_storage_ptr(p.value) for p in view.placeholders[: len(view.example_inputs) + extra_before]}
        for placeholder in view.placeholders[len(view.example_inputs) + extra_before :]:
            tensor = placeholder.value
            shared = _storage_ptr(tensor) in known_storage - {None}
            result.tensors_added.append(
                TensorRecord(placeholder.fqn or placeholder.node.name, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""),
                             placeholder.trainable, 0 if shared else tensor.numel() * tensor.element_size())
            )
        after_code = view.gm.code
        verify_error = None
        if compiler.verify:
            outputs = run_graph(view.gm, view.inputs())
            verify_error = max_relative_error(previous_outputs, outputs)
            previous_outputs = outputs
        region = Region.between(before_graph, view.gm.graph) if before_code != after_code else None
        options = {f.name: getattr(graph_pass.options, f.name) for f in dataclasses.fields(graph_pass.options)}
        report.passes.append(PassReport(graph_pass.name, options, result, before_code, after_code, region, verify_error, seconds))
        _emit_trace_artifact(f"transfigure_graph{index}_{graph_pass.name}_after", after_code)
    if compiler.verify and passes:
        report.verify_error = max_relative_error(reference_outputs, previous_outputs)
    report.final_code = view.gm.code
    return report


class _NameGraph:
    def __init__(self, names):
        self.nodes = [type("N", (), {"name": n})() for n in names]


def _names_only(graph: torch.fx.Graph):
    """A cheap stand-in for the pre-pass graph when only node names are needed (the region diff)."""
    return _NameGraph([n.name for n in graph.nodes])


class PassError(RuntimeError):
    """A pass raised: the message names the pass and says what to do."""

    def __init__(self, pass_name: str, error: BaseException):
        self.pass_name = pass_name
        super().__init__(
            f"transfigure pass {pass_name!r} failed: {type(error).__name__}: {error}\n"
            f"  To compile without it, add options={{'disable': ['{pass_name}']}}; "
            f"to see the graph it ran on, use transfigure.inspect(model, *inputs, disable=[...])."
        )
