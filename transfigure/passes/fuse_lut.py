"""Sibling LUT linears -> one GEMV: pass ``lut_fuse`` (order 90, implied by ``lut_quant.fuse_siblings``).

Math. Linears that read the same activation ``x`` (attention q/k/v, MLP gate/up) satisfy
``[x W_1^T, ..., x W_n^T] = x [W_1; ...; W_n]^T``: one GEMV over the row-stacked weight, then column slices.
With LUT quantization (:mod:`.quantize`) the stacked weight is just the stacked codes and group scales (both
are per output row), the grid table is shared, and the Hadamard signs depend only on the input size and
seed, so the stack is exact: the same numbers, one kernel launch and one online rotation of ``x`` instead of
``n`` each, and one wider GEMV (q/k/v of a 1B Llama: 2048 + 512 + 512 rows), which fills the GPU better than
three narrow ones. The same reasoning is behind fused QKV projections in gpt-fast and vLLM.

``lut_quant`` already stored each sibling group's codes and scales as row blocks of one buffer, so the fused
op reads a view spanning the blocks (no copy). This pass runs late, after sparsity (45) and LoRA (50), which
match q, k, v, gate, up one by one: a LoRA adapter keeps adding its term to its own slice. Groups are formed
by the input node, so siblings that sparsity fed through one shared threshold op fuse too. Bias (Qwen's
q/k/v) is concatenated into a new input.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from transfigure.compiler.graph import GraphView
from transfigure.compiler.passes import Pass, PassResult, SiteRecord, register_pass

__all__ = ["LUTFusePass", "span"]

_LUT = "transfigure.lut_linear"


def _is_lut(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith(_LUT) and "sparse" not in str(node.target)


def span(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """A view over row blocks ``parts`` that sit back to back in one storage, or None."""
    first = parts[0]
    if first.dim() != 2 or not all(p.is_contiguous() and p.dtype == first.dtype and p.shape[1] == first.shape[1]
                                   for p in parts):
        return None
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for part in parts:
        if part.untyped_storage().data_ptr() != storage.data_ptr() or part.storage_offset() != offset:
            return None
        offset += part.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.new_empty(0).set_(storage, first.storage_offset(), (rows, first.shape[1]), first.stride())


@register_pass
class LUTFusePass(Pass):
    name = "lut_fuse"
    order = 90
    description = ("sibling LUT linears (q/k/v, gate/up) sharing one input and one buffer -> one GEMV + slices; "
                   "on whenever lut_quant.fuse_siblings is")

    def run(self, graph: GraphView) -> PassResult:
        result = PassResult(self.name)
        groups: dict[tuple, list[fx.Node]] = {}
        for node in graph.graph.nodes:
            if not _is_lut(node) or len(node.args) != 11 or node.kwargs:
                continue
            x, codes, scales, table, signs, bias, *ints = node.args
            if not all(isinstance(a, fx.Node) and a.op == "placeholder" for a in (codes, scales, table)):
                continue
            groups.setdefault((x, table, tuple(ints), bias is None), []).append(node)
        for (x, table, ints, no_bias), members in groups.items():
            if len(members) < 2:
                continue
            fqns = [self._fqn(graph, m) for m in members]
            rows = "+".join(str(graph.tensor(m.args[2]).shape[0]) for m in members)
            names = [m.name for m in members]
            reason = self._fuse(graph, members, no_bias)
            if reason:
                result.note(f"not fused {'/'.join(fqns)}: {reason}")
            else:
                result.note(f"fused {'/'.join(fqns)} into one lut_linear over rows {rows}")
                for name, fqn in zip(names, fqns):
                    result.sites.append(SiteRecord("rewritten", name, fqn, f"fused with its siblings (rows {rows})",
                                                   "transfigure.lut_linear"))
        return result

    @staticmethod
    def _fqn(graph: GraphView, node: fx.Node) -> str:
        """The linear's FQN: from its site (LoRA moves that to its add node), else from its codes input."""
        site = node.meta.get("transfigure_linear")
        if getattr(site, "fqn", None):
            return site.fqn
        holder = graph.placeholder(node.args[1]) if isinstance(node.args[1], fx.Node) else None
        name = getattr(holder, "fqn", None) or ""
        for suffix in (".weight.lut_codes", ".lut_codes"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return node.name

    def _fuse(self, graph: GraphView, members: list[fx.Node], no_bias: bool) -> str:
        # row blocks in storage order
        members.sort(key=lambda m: graph.tensor(m.args[1]).storage_offset())
        codes = span([graph.tensor(m.args[1]) for m in members])
        scales = span([graph.tensor(m.args[2]) for m in members])
        if codes is None or scales is None:
            return "codes/scales are not one buffer (lut_quant.fuse_siblings off, or formats differ)"
        signs = [graph.tensor(m.args[4]) if isinstance(m.args[4], fx.Node) else None for m in members]
        if any((s is None) != (signs[0] is None) or (s is not None and not torch.equal(s, signs[0])) for s in signs):
            return "different Hadamard signs"
        # the weights the fused codes derive from (for the stale-weight check). After LoRA a member has no site
        # meta any more; its own codes input already registered its weight with the check, so nothing is lost.
        weights = []
        for m in members:
            site = m.meta.get("transfigure_linear")
            w = graph.tensor(site.weight) if site is not None and isinstance(site.weight, fx.Node) else None
            if isinstance(w, torch.Tensor):
                weights.append(w)
        name = self._fqn(graph, members[0]).rsplit(".", 1)[0] + ".fused_" + "_".join(
            self._fqn(graph, m).rsplit(".", 1)[-1] for m in members)
        codes_node = graph.add_input(f"{name}.lut_codes", codes, derived_from=weights)
        scales_node = graph.add_input(f"{name}.lut_scales", scales)
        bias_node = None
        if not no_bias:
            biases = [graph.tensor(m.args[5]) if isinstance(m.args[5], fx.Node) else None for m in members]
            if any(not isinstance(b, torch.Tensor) for b in biases):
                return "a bias is not a graph input"
            bias_node = graph.add_input(f"{name}.bias", torch.cat([b.detach() for b in biases]), derived_from=biases)
        # every member reads the same x, table and sizes; the signs are equal (checked above) graph inputs
        x, _, _, table, signs_node, _, *ints = members[0].args
        pieces = graph.insert_fused(members, members[0].target,
                                    (x, codes_node, scales_node, table, signs_node, bias_node, *ints),
                                    [graph.tensor(m.args[2]).shape[0] for m in members],
                                    [self._fqn(graph, m) for m in members])
        for m, piece in zip(members, pieces):  # erase only after every insertion (the insertion point is a member)
            piece.meta.update({k: v for k, v in m.meta.items() if k in ("nn_module_stack", "stack_trace", "val", "example_value")})
            site = m.meta.get("transfigure_linear")
            m.replace_all_uses_with(piece)
            if site is not None:
                piece.meta["transfigure_linear"] = dataclasses.replace(site, node=piece)
            graph.graph.erase_node(m)
        return ""

