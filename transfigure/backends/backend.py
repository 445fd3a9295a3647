"""The backend object: bind Dynamo's graph, run the pass pipeline, lower to Inductor or run eagerly.

``torch.compile(model, backend="transfigure", options={...})`` calls :func:`transfigure` with the options
as one keyword. ``transfigure.backend(passes=[...], **options)`` builds a reusable :class:`Backend` (make
one and reuse it: a new backend object per ``torch.compile`` call makes Dynamo recompile).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import transfigure.passes  # noqa: F401  (registers the built-in passes)
from transfigure.compiler import GraphView, Pass, Report, parse_compile_options, run_pipeline, written_operands
from transfigure.compiler.pipeline import CompilerOptions

log = logging.getLogger("transfigure")

LOWERINGS = ("inductor", "eager")


class StaleWeightsError(RuntimeError):
    """A parameter that a pass consumed at compile time was changed in place afterwards."""


class Backend:
    """A torch.compile backend running transfigure's pass pipeline.

    ``lowering="inductor"`` hands the rewritten graph to Inductor (``compile_fx``); ``"eager"`` runs the
    rewritten FX graph as Python (debugging, CPU). Every compiled graph's report is kept in ``reports``.
    """

    def __init__(self, passes: Sequence[Pass] = (), lowering: str = "inductor", **options: Any):
        if lowering not in LOWERINGS:
            raise ValueError(f"lowering={lowering!r}; allowed: {', '.join(LOWERINGS)}")
        self.user_passes = list(passes)
        self.lowering = lowering
        self.raw_options = dict(options)
        self.compiler_options, self.passes = parse_compile_options(options, self.user_passes)
        self.report = Report()
        self._lock = threading.Lock()

    def with_options(self, options: Mapping[str, Any] | None) -> "Backend":
        """A backend with ``options`` over this one's. It reports into this backend's ``report``: a mode given
        by torch.compile or transformers' CompileConfig compiles through a derived backend, and the user reads
        the report of the object they created."""
        return self._derived(self.lowering, options) if options else self

    def with_lowering(self, lowering: str) -> "Backend":
        """The same passes and options lowered another way, reporting into this backend's ``report``."""
        return self if lowering == self.lowering else self._derived(lowering, {})

    def _derived(self, lowering: str, options: Mapping[str, Any]) -> "Backend":
        derived = Backend(self.user_passes, lowering, **{**self.raw_options, **dict(options)})
        derived.report, derived._lock = self.report, self._lock
        return derived

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None,
                 mode: str | None = None):
        if mode:  # torch.compile(..., mode=) on a backend object, or transformers' CompileConfig(mode=...)
            options = {**dict(options or {}), "mode": mode}
        if options:
            return self.with_options(options)(gm, example_inputs)
        return compile_graph(self, gm, example_inputs)

    def __deepcopy__(self, memo):
        # One backend object is meant to be shared (transformers' CompileConfig deep-copies its fields).
        return self

    def __repr__(self) -> str:
        return f"transfigure.Backend(lowering={self.lowering!r}, passes={[p.name for p in self.passes]})"


MODES = {
    "default": {},
    "reduce-overhead": {"triton.cudagraphs": True},
    "max-autotune": {"max_autotune": True, "triton.cudagraphs": True},
    "max-autotune-no-cudagraphs": {"max_autotune": True},
}


def _mode_config(mode: str) -> dict[str, Any]:
    """torch.compile's ``mode=`` as Inductor config (so transformers' ``CompileConfig(mode=...)`` works)."""
    from transfigure.compiler import OptionError

    if mode not in MODES:
        raise OptionError("mode", f"got {mode!r}; allowed: {', '.join(repr(m) for m in MODES)}")
    return dict(MODES[mode])


def compile_graph(backend: Backend, gm: fx.GraphModule, example_inputs: Sequence[Any]):
    start = time.perf_counter()
    compiler = backend.compiler_options
    view = GraphView(gm, example_inputs)
    with backend._lock:
        index = len(backend.report.graphs)
        graph_report = run_pipeline(view, backend.passes, compiler, index=index)
        graph_report.lowering = backend.lowering
        backend.report.graphs.append(graph_report)
    dump_dir = compiler.dump_dir or os.environ.get("TRANSFIGURE_DUMP_DIR")
    if dump_dir:
        Report([graph_report]).save(Path(dump_dir) / f"compile_{os.getpid()}_{id(backend):x}_{index:02d}")
    lowering_start = time.perf_counter()
    compiled = _lower(view, backend.lowering, compiler)
    graph_report.lowering_seconds = time.perf_counter() - lowering_start
    graph_report.compile_seconds = time.perf_counter() - start
    if not view.derived_from or compiler.weight_check == "ignore":
        return compiled
    return _WeightGuard(backend, gm, list(example_inputs), view, compiled)


def _lower(view: GraphView, lowering: str, compiler: CompilerOptions):
    extras = list(view.extra_inputs)
    if lowering == "eager":
        module = view.gm

        def run_eager(*args):
            return module(*args, *extras)

        if _mode_config(compiler.mode or "default").get("triton.cudagraphs"):
            return _cuda_graphed(view, run_eager)
        return run_eager
    from torch._inductor.compile_fx import compile_fx

    # Dynamo's placeholders carry only meta["example_value"], the ones passes add also "val". Inductor's
    # cpp_wrapper path takes placeholder vals as its inputs once any exists, so give every placeholder one.
    for node in view.gm.graph.find_nodes(op="placeholder"):
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
    patches = {**_mode_config(compiler.mode or "default"), **dict(compiler.inductor_config or {})} or None
    compiled = compile_fx(view.gm, view.inputs(), config_patches=patches)
    if not extras:
        return compiled

    # compile_fx's callable takes unpacked arguments even though it is marked _boxed_call.
    def run_inductor(*args):
        return compiled(*args, *extras)

    return run_inductor


def _mutated_placeholders(view: GraphView) -> set[int]:
    """Indices of the placeholders the graph writes in place."""
    index = {node: i for i, node in enumerate(view.graph.find_nodes(op="placeholder"))}
    return {index[arg] for node in view.graph.nodes for arg in written_operands(node)
            if isinstance(arg, fx.Node) and arg in index}


def _cuda_graphed(view: GraphView, run_eager):
    """``lowering="eager"`` under ``mode="reduce-overhead"``: the rewritten graph replayed from Inductor's cudagraph
    trees (one recording per set of integer inputs, i.e. per prompt length under dynamic shapes). The host cost of
    ~1000 small launches goes, without Inductor's compile time. Parameters, buffers, packed weights and
    ``mark_static_address`` tensors (a static KV cache) are static inputs; other tensors are copied into the
    graph's buffers per call. A graph that writes into a non-static input (a replay would write into the copy),
    or holds CPU tensors, runs eagerly."""
    inputs = view.inputs()
    if not any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
        return run_eager
    kinds = {p.index: p.kind for p in view.placeholders}
    static = [i for i, x in enumerate(inputs) if i >= len(view.example_inputs)
              or kinds.get(i) in ("parameter", "buffer") or hasattr(x, "_dynamo_static_input_type")]
    mutated = _mutated_placeholders(view)
    unsafe = sorted(mutated - set(static))
    cpu = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and not x.is_cuda]
    if unsafe or cpu:
        log.warning("transfigure: eager lowering without CUDA graphs for this graph: %s",
                    f"it writes into inputs {unsafe} that are not static" if unsafe else f"CPU tensor inputs {cpu}")
        return run_eager
    from torch._inductor.cudagraph_trees import cudagraphify_impl
    from torch._inductor.cudagraph_utils import get_placeholder_info

    module = view.gm

    def boxed(args: list[Any]):  # cudagraph trees call with one list (the extra inputs included) and own it
        values = list(args)
        args.clear()
        return module(*values)

    device = next(x for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda).device
    # cudagraph trees key recordings on the int inputs; symbolic sizes arrive as ints at run time
    shapes = [x if isinstance(x, torch.Tensor) else 0 for x in inputs]
    outputs = view.graph.output_node().args[0]
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    graphed = cudagraphify_impl(boxed, shapes, static, device_index=device.index or 0, is_backward=False,
                                is_inference=True, mutated_input_idxs=tuple(sorted(mutated)),
                                stack_traces=[getattr(o, "stack_trace", None) for o in outputs],
                                placeholders=tuple(get_placeholder_info(view.graph)))

    extras = list(view.extra_inputs)

    def run_graphed(*args):
        return graphed([*args, *extras])

    return run_graphed


class _WeightGuard:
    """Checks, per call, that parameters a pass consumed at compile time were not changed in place.

    Parameters are unguarded in Dynamo (changing them does not recompile), so a packed copy would silently
    go stale. The check reads each tensor's version counter: a few attribute reads per consumed parameter.
    """

    def __init__(self, backend: Backend, gm, example_inputs, view: GraphView, compiled):
        self.backend = backend
        self.gm = gm
        self.example_inputs = example_inputs
        self.watched = list(view.derived_from)
        self.compiled = compiled

    def __call__(self, *args):
        for fqn, tensor, version in self.watched:
            if tensor._version != version:
                self._stale(fqn)
                break
        return self.compiled(*args)

    def _stale(self, fqn: str) -> None:
        policy = self.backend.compiler_options.weight_check
        if policy == "error":
            raise StaleWeightsError(
                f"transfigure: parameter {fqn!r} changed in place after a pass packed it at compile time, so the "
                "compiled model would use stale weights. Re-run the compile (torch._dynamo.reset() and call the "
                "model again), or pass options={'weight_check': 'recompile'} to repack automatically, or "
                "'ignore' to keep the packed weights."
            )
        log.warning("transfigure: parameter %s changed in place; recompiling this graph", fqn)
        fresh = compile_graph(self.backend, self.gm, self.example_inputs)
        if isinstance(fresh, _WeightGuard):
            self.watched, self.compiled = fresh.watched, fresh.compiled
        else:
            self.watched, self.compiled = [], fresh


def backend(passes: Sequence[Pass] = (), *, lowering: str = "inductor", **options: Any) -> Backend:
    """Build one reusable backend: ``torch.compile(model, backend=transfigure.backend(passes=[MyPass()]))``."""
    return Backend(passes, lowering, **options)


def _options_without_lowering(options: Mapping[str, Any] | None, backend_name: str) -> dict[str, Any]:
    from transfigure.compiler import OptionError

    options = dict(options or {})
    if "lowering" in options:
        raise OptionError(
            "lowering",
            f"got {options['lowering']!r}, but the lowering is chosen by the backend name, not by an option of "
            f"backend={backend_name!r}: use backend='transfigure' (Inductor) or backend='transfigure_eager' (plain "
            "PyTorch), or backend=transfigure.backend(lowering=...).",
        )
    return options


def transfigure(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None,
                mode: str | None = None):
    """``backend="transfigure"``: the pass pipeline, then Inductor (``mode`` as in torch.compile)."""
    return Backend(lowering="inductor", **_options_without_lowering(options, "transfigure"))(gm, example_inputs, mode=mode)


def transfigure_eager(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None,
                      mode: str | None = None):
    """``backend="transfigure_eager"``: the pass pipeline, then the rewritten graph runs as plain PyTorch (replayed
    from CUDA graphs under ``mode="reduce-overhead"`` on a GPU)."""
    return Backend(lowering="eager", **_options_without_lowering(options, "transfigure_eager"))(
        gm, example_inputs, mode=mode)
