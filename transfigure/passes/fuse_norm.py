"""Residual add + RMSNorm -> the input rotation of the rotated LUT linear they feed: pass ``norm_fuse``.

Math. A Llama-family block feeds its projections ``x = w * RMSNorm(h)``, ``h = r + d`` (residual stream plus the
previous sublayer's output; transformers' ``LlamaRMSNorm`` and its copies in Qwen, Mistral, ...):

    h = r + d,   x = w * (h * rsqrt(mean(h^2) + eps)),   y = (R x) W_r^T   (R: the LUT linear's rotation)

``h`` also continues as the residual stream. The op ``transfigure::rmsnorm_lut_linear`` (or its rotated-sparsity
twin) takes ``(r, d, w, eps)`` in place of ``x`` and returns ``(y, h)``: at one token its kernel
(:mod:`transfigure.kernels.rotation_prologue`) adds, normalizes and rotates in the launch that rotated ``x`` before, so
Inductor's add + norm reduction kernel disappears (two per layer); above one token it runs the same math in
torch. The same trick is behind fused add-RMSNorm kernels in vLLM and TensorRT-LLM; folding it into the online
Hadamard transform is possible here because the rotation already reads the whole token.

Matching. Starting from each rotated LUT linear (``lut_quant`` with ``hadamard_size`` 256..2048, after
``lut_fuse``) whose input comes from a module named ``*RMSNorm``: the norm's nodes (same innermost module), its
one parameter (the weight), its epsilon (the float added to the variance), and its input, which must be a
two-tensor ``add``. The region is then run on a random input and compared with the formula above; a norm that
computes something else (Gemma's ``1 + w``, LayerNorm) is left alone with the reason in the report, as is a norm
read by anything but that one linear. Inference only: a graph that needs gradients is left unchanged (the fused
ops have no backward).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from transfigure.compiler.graph import GraphView, normalize_module_path
from transfigure.compiler.passes import Pass, PassResult, SiteRecord, register_pass
from transfigure.kernels import rotation_prologue as _rotation_prologue  # noqa: F401  (registers the fused ops)
from transfigure.kernels.rotated_sparse_lut import fuses_rotation
from transfigure.kernels.rotation_prologue import add_rmsnorm_reference

__all__ = ["NormFusePass", "TRAINING_NOTE", "rotated_lut_kind", "rotated_lut_sizes", "traced_for_training"]

_DENSE = "transfigure.lut_linear"
_SPARSE = "transfigure.rotated_sparse_lut_linear"


TRAINING_NOTE = "not run: the graph is traced for training (the fused ops have no backward)"


def traced_for_training(graph: GraphView) -> bool:
    """Autograd is on and some graph input is trainable: AOTAutograd will build a backward for this graph."""
    return torch.is_grad_enabled() and any(p.trainable for p in graph.placeholders)


def rotated_lut_kind(node: fx.Node) -> str | None:
    """'dense' / 'sparse' for the rotated LUT ops this pass can absorb a norm into, else None."""
    if node.op != "call_function" or node.kwargs:
        return None
    target = str(node.target)
    if target.startswith(_SPARSE) and len(node.args) in (13, 14):
        return "sparse"
    if target.startswith(_DENSE) and "sparse" not in target and len(node.args) == 11:
        return "dense"
    return None


def rotated_lut_sizes(node: fx.Node, kind: str) -> tuple[int, int, int]:
    """(group_size, hadamard_size, in_features) of a LUT op node."""
    if kind == "dense":
        return node.args[8], node.args[9], node.args[10]
    return node.args[9], node.args[10], node.args[11]


def _innermost_module(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return path, cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].strip("'>")


def _is_mean(node: object) -> bool:
    return isinstance(node, fx.Node) and (node.target == "mean" if node.op == "call_method"
                                          else node.target in (torch.mean, torch.ops.aten.mean.dim))


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


class _Norm:
    """An RMSNorm region of the graph: its nodes, input, weight placeholder and epsilon."""

    def __init__(self, nodes: list[fx.Node], source: fx.Node, weight: fx.Node, eps: float, fqn: str):
        self.nodes, self.source, self.weight, self.eps, self.fqn = nodes, source, weight, eps, fqn


def _find_norm(graph: GraphView, x: fx.Node) -> _Norm | str:
    """The RMSNorm whose output is ``x``, or why there is none to fuse."""
    module = _innermost_module(x)
    if module is None:
        return "the input was not made by a module"
    path, cls = normalize_module_path(module[0]), module[1]
    if not cls.endswith("RMSNorm"):
        return f"the input comes from {cls}, not an RMSNorm"
    region, todo = {x}, [x]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in region and arg.op in ("call_function", "call_method"):
                if _innermost_module(arg) == module:
                    region.add(arg)
                    todo.append(arg)
    outside = {a for n in region for a in n.all_input_nodes if a not in region}
    params = [a for a in outside if (graph.placeholder(a) is not None and graph.placeholder(a).kind == "parameter")]
    sources = [a for a in outside if a not in params]
    if len(params) != 1 or len(sources) != 1:
        return f"{cls} at {path} reads {len(params)} parameters and {len(sources)} other tensors (expected 1 and 1)"
    for node in region:
        if node is not x and any(user not in region for user in node.users):
            return f"an intermediate of {cls} at {path} ({node.name}) is used outside it"
    constants = [a for n in region if n.op == "call_function" and n.target in (operator.add, torch.add)
                 and any(_is_mean(b) for b in n.args) for a in n.args if isinstance(a, float)]
    if len(constants) != 1:
        return f"{cls} at {path}: no single epsilon added to a mean"
    ordered = [n for n in graph.graph.nodes if n in region]
    return _Norm(ordered, sources[0], params[0], constants[0], path)


def _computes_rmsnorm(graph: GraphView, norm: _Norm, dtype: torch.dtype, features: int) -> bool:
    """Run the region on a random input and compare with ``w * RMSNorm(h)``."""
    sub = fx.Graph()
    env = {norm.source: sub.placeholder("h"), norm.weight: sub.placeholder("w")}
    for node in norm.nodes:
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(env[norm.nodes[-1]])
    weight = graph.tensor(norm.weight)
    generator = torch.Generator().manual_seed(0)
    h = (torch.randn(2, features, generator=generator) * 3).to(dtype)
    w = weight.detach().to("cpu")
    try:
        with torch.no_grad():
            got = fx.GraphModule(torch.nn.Module(), sub)(h, w)
    except Exception:
        return False
    expected, _ = add_rmsnorm_reference(h, torch.zeros_like(h), w, norm.eps)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol)


@register_pass
class NormFusePass(Pass):
    name = "norm_fuse"
    order = 95
    description = ("residual add + RMSNorm folded into the input rotation of the rotated LUT linear they feed "
                   "(one launch fewer per norm at decode); on whenever lut_quant.fuse_norms is")

    def run(self, graph: GraphView) -> PassResult:
        result = PassResult(self.name)
        if traced_for_training(graph):
            result.note(TRAINING_NOTE)
            return result
        order = {node: i for i, node in enumerate(graph.graph.nodes)}
        for op in [n for n in graph.graph.nodes if rotated_lut_kind(n)]:
            module = _innermost_module(op.args[0]) if isinstance(op.args[0], fx.Node) else None
            if module is None or not module[1].endswith("RMSNorm"):
                continue  # not fed by a norm: not a site of this pass
            kind = rotated_lut_kind(op)
            linear = op.meta.get("transfigure_linear")
            fqn = getattr(linear, "fqn", "") or normalize_module_path(module[0])
            reason = self._fuse(graph, op, kind, order)
            target = "transfigure.rmsnorm_" + ("lut_linear" if kind == "dense" else "rotated_sparse_lut_linear")
            if reason:
                result.sites.append(SiteRecord("skipped", op.name, fqn, reason, target))
            else:
                result.sites.append(SiteRecord("rewritten", op.name, fqn, "residual add + "
                                               f"{normalize_module_path(module[0])} fused into its input rotation",
                                               target))
        return result

    def _fuse(self, graph: GraphView, op: fx.Node, kind: str, order: dict) -> str:
        group, hadamard, in_features = rotated_lut_sizes(op, kind)
        if not fuses_rotation(hadamard, group if kind == "sparse" else hadamard):
            return (f"hadamard_size {hadamard} (group {group}): the fused kernel rotates blocks of 256..2048 "
                    "holding whole groups")
        x = op.args[0]
        norm = _find_norm(graph, x)
        if isinstance(norm, str):
            return norm
        if any(user is not op for user in x.users):
            return f"the output of {norm.fqn} is read by more than this linear (siblings not fused, or LoRA)"
        source = norm.source
        if not _is_add(source):
            return f"the input of {norm.fqn} is not a residual add"
        value = graph.meta_value(source)
        parts = [graph.meta_value(a) for a in source.args]
        weight = graph.tensor(norm.weight)
        if not all(isinstance(t, torch.Tensor) for t in (value, *parts, weight)):
            return "shapes unknown"
        if any(p.shape != value.shape or p.dtype != value.dtype for p in parts) or value.shape[-1] != in_features:
            return f"the residual add before {norm.fqn} broadcasts or casts"
        if weight.dtype != value.dtype or tuple(weight.shape) != (in_features,):
            return f"{norm.fqn}'s weight is {weight.dtype} {tuple(weight.shape)}, the activations {value.dtype}"
        if not _computes_rmsnorm(graph, norm, value.dtype, in_features):
            return f"{norm.fqn} does not compute w * x * rsqrt(mean(x^2) + eps) (e.g. Gemma's 1 + w)"
        # nodes an earlier fusion of this pass inserted have no position: count them as late
        late = [a for a in op.args[1:] if isinstance(a, fx.Node) and a.op != "placeholder"
                and order.get(a, len(order)) > order[source]]
        if late:
            return f"the linear's argument {late[0].name} is computed after the residual add"
        target = (torch.ops.transfigure.rmsnorm_lut_linear.default if kind == "dense"
                  else torch.ops.transfigure.rmsnorm_rotated_sparse_lut_linear.default)
        with graph.graph.inserting_after(source):
            fused = graph.graph.call_function(target, (*source.args, norm.weight, norm.eps, *op.args[1:]))
        with graph.graph.inserting_after(fused):
            y = graph.graph.call_function(operator.getitem, (fused, 0))
        with graph.graph.inserting_after(y):
            h = graph.graph.call_function(operator.getitem, (fused, 1))
        fused.meta["nn_module_stack"] = dict(x.meta.get("nn_module_stack", {}))
        y.meta.update({k: v for k, v in op.meta.items() if k in ("nn_module_stack", "stack_trace", "val",
                                                                    "example_value")})
        if "transfigure_linear" in op.meta:
            y.meta["transfigure_linear"] = dataclasses.replace(op.meta["transfigure_linear"], node=y)
        h.meta.update({k: v for k, v in source.meta.items() if k in ("nn_module_stack", "val", "example_value")})
        op.replace_all_uses_with(y)
        graph.graph.erase_node(op)
        for node in reversed(norm.nodes):
            graph.graph.erase_node(node)
        source.replace_all_uses_with(h)
        graph.graph.erase_node(source)
        return ""

