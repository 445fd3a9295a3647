"""The ``sparsity`` pass: TEAL activation sparsity on the inputs of every projection in a transformer block.

Math (Liu et al., "Training-Free Activation Sparsity in Large Language Models", TEAL, ICLR 2025)
------------------------------------------------------------------------------------------------
Each projection ``y = x W^T + b`` inside a block becomes ``y = s(x) W^T + b`` with
``s(x) = x * 1[|x| > t]``. The threshold ``t`` of an input is the ``p``-quantile of ``|x|`` over calibration
text (:func:`transfigure.passes.teal_calibration.calibrate`), with ``p`` the site's sparsity under the
chosen allocation (``uniform``: the target everywhere; ``greedy``: TEAL's block-wise greedy search).
Projections sharing an input node share the threshold (q/k/v, gate/up; GPT-2 and BERT likewise).
When ``x[k] = 0`` the ``k``-th column of ``W`` is not needed: at decode (few tokens) the
``transfigure::sparse_linear`` op runs a GEMV over ``W^T`` (stored column-major, so a column is contiguous)
that skips those columns; with many tokens it runs the plain path (threshold kernel + cuBLAS). The choice is
a shape check inside the op, so the graph has no break and no guard on the token count.

What the pass matches
---------------------
* ``F.linear`` in a block (Llama, Qwen3, Mistral, BERT) -> ``sparse_linear(x, W^T, b, t)``; ``W^T`` is a
  column-major copy made at compile time (an extra input derived from ``W``: in-place changes to ``W``
  after compiling are caught by the compiler's weight check).
* ``torch.addmm(b, x, W)`` from GPT-2's ``Conv1D`` -> ``sparse_linear(x, W, b, t)``: GPT-2 already stores
  ``W`` as ``[in, out]``, i.e. column-major, so no copy.
* ``transfigure::lut_linear`` from the quantization pass (order 40) without rotation ->
  ``transfigure::sparse_lut_linear`` over the codes repacked column-major (see
  :mod:`transfigure.kernels.sparse_lut_gemv`). With a Hadamard rotation the rotated activation ``R s(x)`` is
  dense, so only the threshold is inserted (same math, no speed-up) -- unless ``rotated_basis=True``: then the
  *rotated* input is thresholded, ``s_R(R x)`` with ``tau`` relative to each block's RMS (calibrated by
  ``calibrate(..., rotations=...)``), and 4-bit scalar LUT linears become ``transfigure::rotated_sparse_lut_linear``
  (:mod:`transfigure.kernels.rotated_sparse_lut`); q/k/v and gate/up stay one op over their stacked rows.
* any other rewritten linear: the threshold op is inserted on its input.
Linears outside blocks (``lm_head``, BERT's pooler) are left alone, as in TEAL.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any, Literal

import torch
import torch.fx as fx

from ..compiler import Pass, PassResult, option, register_pass
from ..compiler.graph import GraphView, LinearCall, layer_index
from ..kernels import sparse_gemv as _sparse_gemv  # noqa: F401  (registers transfigure::sparse_linear)
from ..kernels import threshold as _threshold  # noqa: F401  (registers transfigure::sparsify)
from .teal_calibration import Calibration

ADDMM_TARGETS = (torch.addmm, torch.Tensor.addmm, "addmm")


def _load_calibration(value: Any) -> Calibration:
    if isinstance(value, Calibration):
        return value
    if isinstance(value, (str, os.PathLike)):
        if not os.path.exists(value):
            raise ValueError(f"calibration file {os.fspath(value)!r} does not exist")
        return Calibration.load(value)
    raise ValueError("a Calibration from transfigure.calibrate(model, batches) or the path of a saved one is "
                     f"required (got {type(value).__name__})")


@dataclasses.dataclass(frozen=True)
class SparsityOptions:
    target: float = option(0.5, "model-wide target activation sparsity", low=0.0, high=1.0, high_open=True)
    calibration: Any = option(None, "Calibration object from transfigure.calibrate(...) or path of a saved one (required)")
    allocation: Literal["uniform", "greedy"] = option("greedy", "uniform: target on every input; greedy: TEAL's block-wise search")
    modules: tuple[str, ...] = option(("*",), "fnmatch patterns over linear module FQNs to sparsify")
    sparse_prefill: bool = option(True, "also threshold inputs of more than 8 tokens (False: dense prefill, sparse decode)")
    fuse_siblings: bool = option(True, "dense linears that share an input and threshold (q/k/v, gate/up) become one "
                                       "sparse GEMV over their stacked columns: one launch instead of three or two")
    rotated_basis: bool = option(False, "for Hadamard-rotated 4-bit lut_quant linears, threshold the rotated input "
                                        "(calibrated |Rx|/rms quantile) and run the rotated-basis sparse LUT GEMV; "
                                        "False: threshold x before the rotation (TEAL's sites, no sparse kernel). "
                                        "On an H100 the sparse kernel measured slower than the dense 4-bit GEMV")

    def __post_init__(self):
        object.__setattr__(self, "calibration", _load_calibration(self.calibration))
        # allocation feasibility is checked here so that a bad target fails at option parsing
        self.calibration.sparsities(self.target, self.allocation)


def _addmm_calls(graph: GraphView) -> list[LinearCall]:
    """GPT-2 ``Conv1D``: ``addmm(bias, x2d, weight[in, out])`` inside a block."""
    found = []
    for node in graph.graph.nodes:
        if node.op not in ("call_function", "call_method") or node.target not in ADDMM_TARGETS:
            continue
        if "transfigure_linear" in node.meta or len(node.args) < 3 or node.kwargs:
            continue
        bias, x, weight = node.args[:3]
        if not isinstance(weight, fx.Node) or weight.op != "placeholder":
            continue
        w = graph.tensor(weight)
        if not isinstance(w, torch.nn.Parameter) or w.dim() != 2:
            continue
        fqn = graph.module_fqn(node)
        weight_fqn = graph.fqn(weight)
        if weight_fqn and (not fqn or not weight_fqn.startswith(fqn)):
            fqn = weight_fqn.rsplit(".", 1)[0]
        site = LinearCall(node, x, weight, bias, fqn, weight_fqn, w.shape[0], w.shape[1], layer_index(fqn))
        if hasattr(site, "transposed"):
            site.transposed = True
        found.append(site)
    return found


def _copy_meta(new: fx.Node, like: fx.Node) -> None:
    for key in ("val", "example_value", "nn_module_stack", "stack_trace"):
        if key in like.meta:
            new.meta[key] = like.meta[key]


THRESHOLD_ONLY = "threshold only (no sparse kernel for this linear)"


@register_pass
class SparsityPass(Pass):
    name = "sparsity"
    Options = SparsityOptions
    order = 45
    description = "TEAL activation sparsity: calibrated thresholds on projection inputs, sparse GEMV at decode"

    def run(self, graph: GraphView) -> PassResult:
        opts = self.options
        result = PassResult(self.name)
        calibration: Calibration = opts.calibration
        sites = [s for s in graph.linear_calls() if s.layer is not None]
        seen = {s.node for s in sites}
        # GPT-2's Conv1D addmm (newer GraphView versions already list it, with ``transposed=True``)
        sites += [s for s in _addmm_calls(graph) if s.layer is not None and s.node not in seen]
        calibration.check({s.fqn: s.in_features for s in sites})
        thresholds = calibration.thresholds(opts.target, opts.allocation)
        levels = calibration.sparsities(opts.target, opts.allocation)
        site_of = calibration.site_of()
        self._thresholded: dict[tuple, fx.Node] = {}  # one threshold op per (input, t): q/k/v and gate/up share it
        sharing: dict[fx.Node, list[str]] = {}
        rotated_lut: list[str] = []
        for s in sites:
            sharing.setdefault(s.input, []).append(s.fqn.rsplit(".", 1)[-1])
        rotated_groups: dict[tuple, list[tuple[LinearCall, str]]] = {}
        uncalibrated_rotations: set[int] = set()
        taus: dict[int, dict[str, float | None]] = {}  # Hadamard size -> module FQN -> tau
        dense_groups: dict[tuple, list[tuple[LinearCall, str]]] = {}
        for site in sites:
            if not any(fnmatch.fnmatchcase(site.fqn, pattern) for pattern in opts.modules):
                result.skip(site, "not matched by sparsity.modules")
                continue
            t = thresholds[site.fqn]
            level = levels[site_of[site.fqn].name]
            if t <= 0.0:
                result.skip(site, f"allocated sparsity {level:.2f}: left dense")
                continue
            shared = sharing.get(site.input, [])
            shared_detail = f", input shared by {'/'.join(shared)}" if len(shared) > 1 else ""
            detail = f"t={t:.4g} (s={level:.2f})" + shared_detail
            rotation = _rotated_lut_format(site.node) if opts.rotated_basis else None
            if rotation is not None:
                if rotation not in taus:
                    taus[rotation] = calibration.rotated_thresholds(opts.target, opts.allocation, rotation)
                tau = taus[rotation].get(site.fqn)
                if tau is None:
                    uncalibrated_rotations.add(rotation)
                elif tau > 0.0:
                    key = (site.input, tau, site.node.args[3], site.node.args[5] is None, *site.node.args[6:])
                    rotated_groups.setdefault(key, []).append(
                        (site, f"tau={tau:.4g} of |Rx|/rms (s={level:.2f}){shared_detail}"))
                    continue
            if opts.fuse_siblings and self._stackable(graph, site) is not None:
                dense_groups.setdefault((site.input, t), []).append((site, detail))
                continue
            kind = self._rewrite(graph, site, t)
            result.rewrote(site, f"{detail}, {kind}")
            if kind == THRESHOLD_ONLY and _is_lut_linear(site.node) and _lut_rotation(site.node):
                rotated_lut.append(site.fqn)
        for (_, t), members in dense_groups.items():
            for site, detail, kind in self._rewrite_dense_group(graph, members, t):
                result.rewrote(site, f"{detail}, {kind}")
        for (x, tau, *_), members in rotated_groups.items():
            for site, detail, kind in self._rewrite_rotated(graph, [m[0] for m in members], x, tau,
                                                            [m[1] for m in members]):
                result.rewrote(site, f"{detail}, {kind}")
        if uncalibrated_rotations:
            sizes = tuple(sorted(uncalibrated_rotations))
            result.warn(
                f"the calibration has no rotated-basis statistics for Hadamard size(s) {sizes}: those quantized "
                f"linears threshold their input before the rotation instead. calibrate(model, batches, "
                f"rotations={sizes}) records them.")
        if rotated_lut:
            result.warn(
                f"{len(rotated_lut)} quantized linear(s) (e.g. {rotated_lut[0]}) only threshold their input: lut_quant "
                "rotates it by a Hadamard transform, which makes it dense again, so no sparse kernel applies and "
                "these sites pay the quality cost without a decode speedup. Leave sparsity off for them "
                "(sparsity.modules). sparsity.rotated_basis=True thresholds the rotated input instead and runs a sparse "
                "LUT kernel, but on an H100 that measured slower than the dense 4-bit tensor-core GEMV (README)."
            )
        result.note(f"target {opts.target}, allocation {opts.allocation}, calibration {calibration!r}")
        return result

    # -- rewrites ----------------------------------------------------------------------------------
    def _rewrite(self, graph: GraphView, site: LinearCall, t: float) -> str:
        node = site.node
        prefill = self.options.sparse_prefill
        if node.target in ADDMM_TARGETS:
            return self._replace(graph, site, (site.input, site.weight, site.bias, t, prefill), "sparse GEMV (Conv1D W is column-major)")
        if node.target in (torch._C._nn.linear, torch.nn.functional.linear):
            w = graph.tensor(site.weight) if isinstance(site.weight, fx.Node) and site.weight.op == "placeholder" else None
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                wt = graph.cached(w, f"sparsity.weight_t.v{w._version}", lambda: w.detach().t().contiguous())
                wt_node = graph.add_input(f"{site.fqn}.weight_t", wt, derived_from=[w])
                return self._replace(graph, site, (site.input, wt_node, site.bias, t, prefill), "sparse GEMV")
        if _is_lut_linear(node):
            fused = _sparse_lut(graph, site, t, prefill)
            if fused is not None:
                graph.replace_linear(site, fused)
                return "sparse LUT GEMV"
        # anything else (rotated LUT, other rewrites): threshold its input, same math, no sparse kernel
        op = torch.ops.transfigure.sparsify.default if prefill else torch.ops.transfigure.sparsify_decode.default
        xs = self._thresholded.get((site.input, t, op))
        if xs is None:
            with graph.graph.inserting_before(node):  # sites come in graph order: before every sibling
                xs = graph.graph.call_function(op, (site.input, t))
            _copy_meta(xs, site.input)
            self._thresholded[(site.input, t, op)] = xs
        node.replace_input_with(site.input, xs)
        if "transfigure_linear" in node.meta:
            node.meta["transfigure_linear"] = dataclasses.replace(node.meta["transfigure_linear"], input=xs)
        return THRESHOLD_ONLY

    @staticmethod
    def _stackable(graph: GraphView, site: LinearCall) -> torch.Tensor | None:
        """The weight of a plain ``F.linear`` site whose weight (and bias) are graph inputs, else None."""
        if site.node.target not in (torch._C._nn.linear, torch.nn.functional.linear):
            return None
        if not (isinstance(site.weight, fx.Node) and site.weight.op == "placeholder"):
            return None
        if site.bias is not None and not (isinstance(site.bias, fx.Node) and site.bias.op == "placeholder"):
            return None
        w = graph.tensor(site.weight)
        return w if isinstance(w, torch.Tensor) and w.dim() == 2 else None

    def _rewrite_dense_group(self, graph: GraphView, members: list[tuple[LinearCall, str]],
                             t: float) -> list[tuple[LinearCall, str, str]]:
        """Dense linears reading one thresholded input -> ONE ``sparse_linear`` over ``[W_1^T | W_2^T | ...]``.

        The columns a token drops are skipped in every sibling at once, so q/k/v (or gate/up) cost one launch
        and one pass over the surviving rows of the stacked ``W^T``; the outputs are ``narrow`` views of it."""
        sites = [m[0] for m in members]
        weights = [self._stackable(graph, site) for site in sites]
        if len(sites) == 1 or len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            return [(site, detail, self._rewrite(graph, site, t)) for site, detail in members]
        prefill = self.options.sparse_prefill
        key = "sparsity.stacked_weight_t." + ".".join(f"{id(w)}v{w._version}" for w in weights)
        stacked = graph.cached(weights[0], key, lambda: torch.cat([w.detach().t() for w in weights], dim=1).contiguous())
        name = sites[0].fqn.rsplit(".", 1)[0] + ".sparse_" + "_".join(s.fqn.rsplit(".", 1)[-1] for s in sites)
        wt_node = graph.add_input(f"{name}.weight_t", stacked, derived_from=weights)
        bias_node = None
        if any(site.bias is not None for site in sites):
            biases = [graph.tensor(site.bias) if site.bias is not None else None for site in sites]
            stacked_bias = torch.cat([b.detach() if b is not None else weights[i].new_zeros(weights[i].shape[0])
                                      for i, b in enumerate(biases)])
            bias_node = graph.add_input(f"{name}.bias", stacked_bias, derived_from=[b for b in biases if b is not None])
        pieces = graph.insert_fused([site.node for site in sites], torch.ops.transfigure.sparse_linear.default,
                                    (sites[0].input, wt_node, bias_node, t, prefill), [w.shape[0] for w in weights],
                                    [s.fqn for s in sites])
        for site, piece in zip(sites, pieces):  # the insertion point is a member: replace after inserting all
            graph.replace_linear(site, piece)
        rows = "+".join(str(w.shape[0]) for w in weights)
        return [(site, detail, f"sparse GEMV, fused columns {rows}") for site, detail in members]

    def _rewrite_rotated(self, graph: GraphView, sites: list[LinearCall], x: fx.Node, tau: float,
                         details: list[str]) -> list[tuple[LinearCall, str, str]]:
        """Rotated 4-bit LUT linears reading ``x`` -> ``rotated_sparse_lut_linear`` over column-major codes.

        Siblings (q/k/v, gate/up) whose codes and scales are row blocks of one buffer (``lut_quant.fuse_siblings``)
        become ONE op over the stacked rows plus slices, like ``lut_fuse`` does for dense LUT linears (which
        cannot fuse them any more): one FWHT, one compaction and one sparse GEMV per input."""
        from ..kernels.rotated_sparse_lut import decode_layout  # (importing registers the op)
        from .fuse_lut import span

        prefill = self.options.sparse_prefill
        op = torch.ops.transfigure.rotated_sparse_lut_linear.default
        pairs = sorted(zip(sites, details), key=lambda sd: graph.tensor(sd[0].node.args[1]).storage_offset())
        sites, details = [p[0] for p in pairs], [p[1] for p in pairs]
        nodes = [site.node for site in sites]
        codes = [graph.tensor(n.args[1]) for n in nodes]
        scales = [graph.tensor(n.args[2]) for n in nodes]
        bits, _, group_size, h, in_features = nodes[0].args[6:]
        fused_codes, fused_scales = (span(codes), span(scales)) if len(nodes) > 1 else (None, None)
        biases = [graph.tensor(n.args[5]) if isinstance(n.args[5], fx.Node) else None for n in nodes]
        signs = [graph.tensor(n.args[4]) if isinstance(n.args[4], fx.Node) else None for n in nodes]
        fusable = (fused_codes is not None and fused_scales is not None
                   and (nodes[0].args[5] is None or all(isinstance(b, torch.Tensor) for b in biases))
                   and all(isinstance(t, torch.Tensor) and isinstance(signs[0], torch.Tensor) and torch.equal(t, signs[0])
                           for t in signs))

        def layout(c, sc):
            return graph.cached(c, "sparsity.rotated_decode_layout", lambda: decode_layout(c, sc))

        if not fusable:
            out = []
            for site, detail, c, sc in zip(sites, details, codes, scales):
                codes_tm, scales_tm = layout(c, sc)
                args = list(site.node.args)
                with graph.graph.inserting_before(site.node):
                    new = graph.graph.call_function(op, (
                        *args[:6], graph.add_input(f"{site.fqn}.codes_decode", codes_tm),
                        graph.add_input(f"{site.fqn}.scales_decode", scales_tm), bits, group_size, h, in_features,
                        tau, prefill))
                graph.replace_linear(site, new)
                out.append((site, detail, "rotated-basis sparse LUT GEMV"))
            return out
        codes_tm, scales_tm = layout(fused_codes, fused_scales)
        name = sites[0].fqn.rsplit(".", 1)[0] + ".rotated_" + "_".join(s.fqn.rsplit(".", 1)[-1] for s in sites)
        codes_node = graph.add_input(f"{name}.lut_codes", fused_codes)
        scales_node = graph.add_input(f"{name}.lut_scales", fused_scales)
        bias_node = None
        if nodes[0].args[5] is not None:
            bias_node = graph.add_input(f"{name}.bias", torch.cat([b.detach() for b in biases]), derived_from=biases)
        codes_decode = graph.add_input(f"{name}.codes_decode", codes_tm)
        scales_decode = graph.add_input(f"{name}.scales_decode", scales_tm)
        # table and signs: graph inputs, equal across the members (checked above)
        pieces = graph.insert_fused(nodes, op, (x, codes_node, scales_node, *nodes[0].args[3:5], bias_node, codes_decode,
                                                scales_decode, bits, group_size, h, in_features, tau, prefill),
                                    [c.shape[0] for c in scales], [s.fqn for s in sites])
        for site, piece in zip(sites, pieces):  # the insertion point is a member: replace after inserting all
            graph.replace_linear(site, piece)
        rows = "+".join(str(c.shape[0]) for c in scales)
        return [(site, detail, f"rotated-basis sparse LUT GEMV, fused rows {rows}") for site, detail in zip(sites, details)]

    @staticmethod
    def _replace(graph: GraphView, site: LinearCall, args: tuple, kind: str) -> str:
        with graph.graph.inserting_before(site.node):
            new = graph.graph.call_function(torch.ops.transfigure.sparse_linear.default, args)
        graph.replace_linear(site, new)
        return kind


def _is_lut_linear(node: fx.Node) -> bool:
    return "lut_linear" in str(node.target) and "sparse" not in str(node.target)


def _rotated_lut_format(node: fx.Node) -> int | None:
    """The Hadamard size of a rotated ``lut_linear`` the rotated-basis sparse kernel handles, else None."""
    from ..kernels import rotated_sparse_lut

    if not _is_lut_linear(node) or len(node.args) != 11 or node.kwargs:
        return None
    x, codes, scales, table, signs, bias, bits, p, group_size, hadamard_size, in_features = node.args
    if not all(isinstance(a, fx.Node) and a.op == "placeholder" for a in (codes, scales)):
        return None
    if not isinstance(hadamard_size, int) or not rotated_sparse_lut.supports(bits, p, group_size, hadamard_size):
        return None
    return hadamard_size


def _lut_rotation(node: fx.Node) -> int:
    """The Hadamard block of a ``lut_linear`` call (0: none, or not the argument layout known here)."""
    return node.args[9] if len(node.args) == 11 and isinstance(node.args[9], int) else 0


def _sparse_lut(graph: GraphView, site: LinearCall, t: float, prefill: bool) -> fx.Node | None:
    """``lut_linear`` without rotation -> ``sparse_lut_linear`` over column-major codes, or None."""
    try:
        from ..kernels import sparse_lut_gemv
    except ImportError:
        return None
    node = site.node
    args = list(node.args)
    if len(args) != 11 or node.kwargs:
        return None
    x, codes, scales, table, signs, bias, bits, p, group_size, hadamard_size, in_features = args
    if hadamard_size or not isinstance(codes, fx.Node) or codes.op != "placeholder":
        return None
    if not sparse_lut_gemv.supports(bits, p):
        return None
    codes_value = graph.tensor(codes)
    scales_value = graph.tensor(scales) if isinstance(scales, fx.Node) and scales.op == "placeholder" else None
    if scales_value is None:
        return None
    codes_t, scales_t = graph.cached(codes_value, "sparsity.lut_colmajor",
                                     lambda: sparse_lut_gemv.repack_column_major(codes_value, scales_value, bits, p))
    codes_node = graph.add_input(f"{site.fqn}.codes_colmajor", codes_t)
    scales_node = graph.add_input(f"{site.fqn}.scales_colmajor", scales_t)
    with graph.graph.inserting_before(node):
        return graph.graph.call_function(
            torch.ops.transfigure.sparse_lut_linear.default,
            (x, codes, scales, table, bias, codes_node, scales_node, bits, group_size, in_features, t, prefill),
        )
