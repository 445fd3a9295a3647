"""SwiGLU product -> the input rotation of the rotated LUT linear it feeds (the down projection): ``act_fuse``.

Math. A Llama-family MLP computes ``down(silu(gate(x)) * up(x))``. With a Hadamard-rotated LUT down projection
(``lut_quant``, optionally with rotated-basis sparsity) its input is rotated first, ``z = R (silu(g) * u)``, in a
launch of its own at decode, right after the pointwise kernel Inductor generates for ``silu(g) * u``. The ops
``transfigure::silu_mul_lut_linear`` / ``silu_mul_rotated_sparse_lut_linear`` take ``(g, u)`` and form the
product inside the rotation's programs (:mod:`transfigure.kernels.rotation_prologue`): one launch fewer per
layer, the same roundings as transformers' eager MLP.

Matching: a rotated LUT op (Hadamard block 256..2048 holding whole groups) whose input is ``mul(silu(g), u)``
(either order, equal shapes and dtypes), where the product and the ``silu`` have no other reader. Other
activations (GELU MLPs of GPT-2 / BERT, which multiply nothing) are not sites. Inference only, as ``norm_fuse``.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from transfigure.compiler.graph import GraphView
from transfigure.compiler.passes import Pass, PassResult, SiteRecord, register_pass
from transfigure.kernels import rotation_prologue as _rotation_prologue  # noqa: F401  (registers the fused ops)
from transfigure.kernels.rotated_sparse_lut import fuses_rotation

from .fuse_norm import TRAINING_NOTE, rotated_lut_kind, rotated_lut_sizes, traced_for_training

__all__ = ["ActivationFusePass"]


def _is_silu(node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.nn.functional.silu
            and len(node.args) == 1 and not node.kwargs.get("inplace", False))


def _swiglu_inputs(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(g, u)`` when ``node`` is ``silu(g) * u`` (or ``u * silu(g)``), else None."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2:
        return None
    a, b = node.args
    if _is_silu(a) and isinstance(b, fx.Node):
        return a, b
    if _is_silu(b) and isinstance(a, fx.Node):
        return b, a
    return None


@register_pass
class ActivationFusePass(Pass):
    name = "act_fuse"
    order = 96
    description = ("SwiGLU product silu(g) * u folded into the input rotation of the rotated LUT linear it feeds "
                   "(one launch fewer per MLP at decode); on whenever lut_quant.fuse_activations is")

    def run(self, graph: GraphView) -> PassResult:
        result = PassResult(self.name)
        if traced_for_training(graph):
            result.note(TRAINING_NOTE)
            return result
        for op in [n for n in graph.graph.nodes if rotated_lut_kind(n)]:
            x = op.args[0]
            pair = _swiglu_inputs(x) if isinstance(x, fx.Node) else None
            if pair is None:
                continue
            kind = rotated_lut_kind(op)
            linear = op.meta.get("transfigure_linear")
            fqn = getattr(linear, "fqn", "") or graph.module_fqn(op)
            target = "transfigure.silu_mul_" + ("lut_linear" if kind == "dense" else "rotated_sparse_lut_linear")
            reason = self._fuse(graph, op, kind, x, *pair)
            status, detail = ("skipped", reason) if reason else ("rewritten", "silu(gate) * up fused into its input "
                                                                              "rotation")
            result.sites.append(SiteRecord(status, op.name, fqn, detail, target))
        return result

    @staticmethod
    def _fuse(graph: GraphView, op: fx.Node, kind: str, product: fx.Node, silu: fx.Node, up: fx.Node) -> str:
        group, hadamard, in_features = rotated_lut_sizes(op, kind)
        if not fuses_rotation(hadamard, group if kind == "sparse" else hadamard):
            return (f"hadamard_size {hadamard} (group {group}): the fused kernel rotates blocks of 256..2048 "
                    "holding whole groups")
        if len(product.users) != 1 or len(silu.users) != 1:
            return "silu(gate) * up is read by more than this linear"
        gate = silu.args[0]
        shapes = [graph.meta_value(n) for n in (gate, up, product)]
        if not all(isinstance(t, torch.Tensor) for t in shapes):
            return "shapes unknown"
        if any(t.shape != shapes[2].shape or t.dtype != shapes[2].dtype for t in shapes[:2]):
            return "silu(gate) * up broadcasts or casts"
        target = (torch.ops.transfigure.silu_mul_lut_linear.default if kind == "dense"
                  else torch.ops.transfigure.silu_mul_rotated_sparse_lut_linear.default)
        with graph.graph.inserting_before(op):
            fused = graph.graph.call_function(target, (gate, up, *op.args[1:]))
        fused.meta.update({k: v for k, v in op.meta.items() if k in ("nn_module_stack", "stack_trace", "val",
                                                                        "example_value")})
        if "transfigure_linear" in op.meta:
            fused.meta["transfigure_linear"] = dataclasses.replace(op.meta["transfigure_linear"], node=fused)
        op.replace_all_uses_with(fused)
        for node in (op, product, silu):
            graph.graph.erase_node(node)
        return ""
