"""Rotary embedding + static-cache write + fill counter -> the decode attention launch: pass ``cache_update_fuse``.

Math. A decode step of a transformers model with a static cache does, per layer (``Lq`` new tokens):

    q' = q * cos + rotate_half(q) * sin,   k' = k * cos + rotate_half(k) * sin      (RoPE, Su et al. 2021)
    p  = fill + arange(Lq);  fill += Lq;  K[:, :, p] = k';  V[:, :, p] = v           (StaticLayer.update)
    out = softmax(scale * q' K^T + mask) V

Unfused, Inductor runs the rotations, the two cache writes and the counter increment as three small kernels per
layer around the attention launch -- at one token, pure launch latency. ``transfigure::decode_attention_update``
(:mod:`transfigure.kernels.decode_attention`) does all of it inside the decode attention launch: every program
rotates its query rows on load, the program whose key split holds position ``p`` attends to the new token from
registers and writes its cache row for later steps, and the last program to read ``fill`` advances it. The rotary
tables and the mask, which every layer's op reads, go through one ``transfigure::shared_step_inputs`` so Inductor
computes them once per step rather than once per layer. The same fusion is
what serving engines' "rotary + cache append" attention prologues do (vLLM, FlashInfer's append kernels); here it
is found in the stock graph.

Matching. Starting from each ``transfigure::decode_attention`` node (pass ``decode_attention``) whose keys and
values are graph inputs (the cache tensors) read by nothing else than one ``index_copy_`` each along dim 2 at
the same positions ``arange(Lq) + fill``, where ``fill`` is a graph input advanced by ``fill.add_(Lq)`` with every
other read of it before that. The op advances ``fill`` itself only when nothing else reads it (layer 0's counter
also feeds the mask and the rotary positions: there the graph keeps its increment and the op takes the
positions). The query and the copied keys are either both rotary-embedded with the same
``cos``/``sin`` (the region is checked on random inputs against the formula above, so a partial rotary or
another convention is left alone with the reason) or both plain (GPT-2). Anything else keeps the unfused graph,
with the reason in the report. Inference only (the fused op mutates the cache and has no backward).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from transfigure.compiler.graph import GraphView
from transfigure.compiler.passes import Pass, PassResult, register_pass
from transfigure.kernels import decode_attention as _decode_attention  # noqa: F401  (registers the ops)
from transfigure.kernels.decode_attention import rotate_half_embedding
from transfigure.passes.attention_sites import erase_unused
from transfigure.passes.fuse_norm import TRAINING_NOTE, traced_for_training

__all__ = ["CacheUpdateFusePass"]

_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)


def _is_call(node, functions=(), method: str | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in functions) or (
        method is not None and node.op == "call_method" and node.target == method)


def _region(output: fx.Node, inputs: set[fx.Node]) -> list[fx.Node] | None:
    """The nodes computing ``output`` from ``inputs`` alone (None if it reads anything else), in graph order."""
    region, todo = {output}, [output]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg in inputs or arg in region:
                continue
            if arg.op not in ("call_function", "call_method"):
                return None
            region.add(arg)
            todo.append(arg)
    return [n for n in output.graph.nodes if n in region]


def _rope_parts(node) -> tuple[fx.Node, fx.Node, fx.Node, list[fx.Node]] | None:
    """``(x, cos, sin, region)`` if ``node`` has the shape ``x * cos + f(x) * sin`` with ``f`` a ``cat`` of pieces of
    ``x``; the formula itself is checked numerically by :func:`_computes_rope`."""
    if not _is_call(node, _ADD, "add") or len(node.args) != 2:
        return None
    for first, second in (node.args, node.args[::-1]):
        if not (_is_call(first, _MUL, "mul") and _is_call(second, _MUL, "mul")):
            continue
        for x, cos in (first.args, first.args[::-1]):
            for rotated, sin in (second.args, second.args[::-1]):
                if not all(isinstance(n, fx.Node) for n in (x, cos, rotated, sin)):
                    continue
                if not _is_call(rotated, (torch.cat,)) or cos is sin:
                    continue
                region = _region(node, {x, cos, sin})
                if region is not None:
                    return x, cos, sin, region
    return None


def _computes_rope(graph: GraphView, x: fx.Node, cos: fx.Node, sin: fx.Node, region: list[fx.Node]) -> bool:
    """Run the region on random inputs of its shapes and compare with :func:`rotate_half_embedding`."""
    shapes = [getattr(graph.meta_value(n), "shape", None) for n in (x, cos, sin)]
    if any(s is None for s in shapes):
        return False
    sub = fx.Graph()
    env = {n: sub.placeholder(n.name) for n in (x, cos, sin)}
    for node in region:
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(env[region[-1]])
    generator = torch.Generator().manual_seed(0)
    xs, c, s = (torch.randn(tuple(shape), generator=generator, dtype=torch.float64) for shape in shapes)
    try:
        with torch.no_grad():
            got = fx.GraphModule(torch.nn.Module(), sub)(xs, c, s)
    except Exception:
        return False
    expected = rotate_half_embedding(xs, c, s)
    return isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(
        got.double(), expected, rtol=1e-9, atol=1e-9)


def _before_unsqueeze(table: fx.Node) -> fx.Node:
    """``cos`` for ``cos.unsqueeze(1)``: every layer unsqueezes the model's one table; handing the op that one
    table lets Inductor compute it once per step instead of once per layer (it recomputes small pointwise
    results for each extern kernel that reads them through a view)."""
    if _is_call(table, (torch.unsqueeze,), "unsqueeze") and tuple(table.args[1:]) == (1,) and not table.kwargs:
        return table.args[0]
    return table


def _before_expand(mask):
    """The mask before transformers' ``expand`` to ``[B, 1, Lq, L]`` (the op broadcasts it), for the same reason."""
    if _is_call(mask, (), "expand") and isinstance(mask.args[0], fx.Node):
        return mask.args[0]
    return mask


def _index_copy(cache: fx.Node, attention: fx.Node) -> fx.Node | str:
    others = [u for u in cache.users if u is not attention]
    copies = [u for u in others if _is_call(u, (torch.Tensor.index_copy_,), "index_copy_")]
    if len(others) != 1 or len(copies) != 1:
        return (f"cache tensor {cache.name} is read or written by {len(others)} other nodes "
                "(expected one index_copy_: transformers' StaticLayer.update)")
    copy = copies[0]
    if copy.users or len(copy.args) != 4 or copy.args[0] is not cache or copy.args[1] not in (2, -2):
        return f"{copy.name} is not index_copy_(2, positions, new) into {cache.name}"
    return copy


def _fill_counter(graph: GraphView, positions: fx.Node, Lq: int, order: dict) -> tuple[fx.Node, fx.Node, bool] | str:
    """``(fill, fill.add_(Lq), foldable)`` if ``positions = arange(Lq) + fill`` with every other read of ``fill``
    before the increment; ``foldable`` when nothing but the positions and the increment reads ``fill``."""
    if not _is_call(positions, _ADD, "add") or len(positions.args) != 2:
        return f"cache positions {positions.name} are not arange(Lq) + a fill counter"
    ranges = [a for a in positions.args if _is_call(a, (torch.arange,)) and tuple(a.args) == (Lq,)]
    fills = [a for a in positions.args if isinstance(a, fx.Node) and a.op == "placeholder"]
    if len(ranges) != 1 or len(fills) != 1:
        return f"cache positions {positions.name} are not arange({Lq}) + a fill counter input"
    fill = fills[0]
    value = graph.meta_value(fill)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dtype not in (torch.int32, torch.int64):
        return f"fill counter {fill.name} is not a one-element integer tensor"
    increments = [u for u in fill.users if _is_call(u, (torch.Tensor.add_,), "add_")]
    if len(increments) != 1 or increments[0].users or tuple(increments[0].args[1:]) != (Lq,):
        return f"fill counter {fill.name} is not advanced by exactly one add_({Lq})"
    increment = increments[0]
    late = [u for u in fill.users if u is not increment and order[u] > order[increment]]
    if late:
        return f"fill counter {fill.name} is read after its increment (by {late[0].name})"
    return fill, increment, set(fill.users) == {positions, increment}


@register_pass
class CacheUpdateFusePass(Pass):
    name = "cache_update_fuse"
    order = 13  # right after decode_attention (12), before the projections are rewritten
    description = ("RoPE + static KV-cache write + fill counter folded into the decode attention launch "
                   "(three launches fewer per layer); on whenever decode_attention.fuse_cache_update is")

    def run(self, graph: GraphView) -> PassResult:
        result = PassResult(self.name)
        if traced_for_training(graph):
            result.note(TRAINING_NOTE)
            return result
        order = {node: i for i, node in enumerate(graph.graph.nodes)}
        self._shared: dict[tuple, list[fx.Node]] = {}
        target = torch.ops.transfigure.decode_attention.default
        for attention in [n for n in graph.graph.nodes if n.op == "call_function" and n.target is target]:
            outcome = self._fuse(graph, attention, order)
            if isinstance(outcome, str):
                result.skip(attention, outcome)
            else:
                counter = "fill counter" if outcome.args[8] is not None else "positions (counter read elsewhere)"
                result.rewrote(outcome, f"{'RoPE + ' if outcome.args[3] is not None else ''}cache write of "
                                        f"{outcome.args[5].name}/{outcome.args[6].name} + {counter}")
        return result

    def _shared_inputs(self, graph: GraphView, *inputs, order: dict) -> tuple:
        """The rotary tables and mask, through one ``transfigure::shared_step_inputs`` per distinct set (placed
        after the last of them), so Inductor computes them once per step rather than once per layer."""
        nodes = [n for n in inputs if isinstance(n, fx.Node)]
        if not nodes:
            return inputs
        key = tuple(nodes)
        if key not in self._shared:
            last = max(nodes, key=lambda n: order.get(n, -1))
            with graph.graph.inserting_after(last):
                shared = graph.graph.call_function(torch.ops.transfigure.shared_step_inputs.default, (list(nodes),))
            copies = []
            anchor = shared
            for i, node in enumerate(nodes):
                with graph.graph.inserting_after(anchor):
                    anchor = graph.graph.call_function(operator.getitem, (shared, i))
                anchor.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value")})
                copies.append(anchor)
            self._shared[key] = copies
        copies = iter(self._shared[key])
        return tuple(next(copies) if isinstance(n, fx.Node) else n for n in inputs)

    def _fuse(self, graph: GraphView, attention: fx.Node, order: dict) -> fx.Node | str:
        q, keys, values, mask, scale, is_causal = attention.args
        if not all(isinstance(n, fx.Node) and n.op == "placeholder" for n in (keys, values)):
            return "keys/values are not cache tensors passed in (no static cache written in this graph)"
        copies = [_index_copy(cache, attention) for cache in (keys, values)]
        for copy in copies:
            if isinstance(copy, str):
                return copy
        key_copy, value_copy = copies
        positions, k_new, v_new = key_copy.args[2], key_copy.args[3], value_copy.args[3]
        if value_copy.args[2] is not positions or not isinstance(positions, fx.Node):
            return "keys and values are written at different positions"
        if any(order[c] > order[attention] for c in copies):
            return "a cache write comes after the attention"
        q_shape = getattr(graph.meta_value(q), "shape", None)
        if q_shape is None or len(q_shape) != 4:
            return "query shape unknown"
        Lq = int(q_shape[2])
        counter = _fill_counter(graph, positions, Lq, order)
        if isinstance(counter, str):
            return counter
        fill, increment, foldable = counter
        q_rope, k_rope = _rope_parts(q), _rope_parts(k_new)
        cos = sin = None
        if (q_rope is None) != (k_rope is None):
            return "only one of the query and the new keys is rotary-embedded"
        if q_rope is not None:
            if q_rope[1:3] != k_rope[1:3]:
                return "the query and the new keys use different cos/sin tables"
            if not (_computes_rope(graph, *q_rope) and _computes_rope(graph, *k_rope)):
                return "the query/key embedding is not x * cos + rotate_half(x) * sin (e.g. partial rotary)"
            if any(u is not attention for u in q.users) or any(u is not key_copy for u in k_new.users):
                return "the rotated query or keys are read elsewhere"
            (q_in, cos, sin), k_in = q_rope[:3], k_rope[0]
            tables = [getattr(graph.meta_value(t), "shape", None) for t in (cos, sin)]
            if any(t is None or len(t) != 4 or t[1] != 1 or t[-1] != q_shape[-1] for t in tables):
                return f"cos/sin tables of shapes {tables} are not [B, 1, Lq, D]"
            cos, sin = _before_unsqueeze(cos), _before_unsqueeze(sin)
        else:
            q_in, k_in = q, k_new
        k_value, cache = graph.meta_value(k_in), graph.meta_value(keys)
        if getattr(k_value, "dtype", None) != getattr(cache, "dtype", None):
            return f"new keys are {getattr(k_value, 'dtype', '?')}, the cache {getattr(cache, 'dtype', '?')}"
        cos, sin, mask = self._shared_inputs(graph, cos, sin, _before_expand(mask), order=order)
        with graph.graph.inserting_before(attention):
            fused = graph.graph.call_function(
                torch.ops.transfigure.decode_attention_update.default,
                (q_in, k_in, v_new, cos, sin, keys, values, None if foldable else positions, fill if foldable else None,
                 mask, scale, is_causal))
        fused.meta.update({k: v for k, v in attention.meta.items()
                           if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
        attention.replace_all_uses_with(fused)
        # a counter read elsewhere (layer 0's feeds the mask and the rotary positions) keeps the graph's own
        # increment: it becomes a copy at the end of the graph, while an in-op increment could run before
        # Inductor's recomputation of those reads
        for node in (attention, key_copy, value_copy) + ((increment,) if foldable else ()):
            graph.graph.erase_node(node)
        erase_unused(graph.graph, {positions, q, k_new, *(n for n in (mask, *(q_rope or ())[1:3]) if isinstance(n, fx.Node))})
        return fused
