"""Ladder residual: each converted sub-block reads the residual stream one sub-block late.

Math (Ladder Residual, Zhang, Mishra et al. 2025, arXiv:2501.06589). Number the sub-blocks of a pre-norm
decoder j = 1..2L (attention and MLP alternating), let ``h_j`` be the residual stream after sub-block j and
``h_0 = h_{-1}`` the embeddings. Standard residuals compute ``h_j = h_{j-1} + AR(f_j(h_{j-1}))``, where AR is
the tensor-parallel all-reduce of the row-parallel output projection. Ladder computes

    h_j = h_{j-1} + AR(f_j(h_{j-2}))

so ``f_j`` does not depend on ``f_{j-1}``'s output, and the all-reduce of sub-block j-1 can run while
sub-block j computes. The final norm reads ``h_2L``, which holds every output. Layers are converted whole (both
sub-blocks); the paper converts all layers for new models, or the upper half of a trained model followed by
a short re-training (converting a trained model zero-shot changes its function; see notes/issue-7.md).

What the pass does to the Dynamo graph:

1. finds the residual stream: the chain of adds ``s_j = s_{j-1} + b_j`` where ``s_{j-1}`` is an ancestor of
   the branch ``b_j`` and the nodes between them (the sub-block body) contain a projection (linear/matmul);
   ``s_0`` is the embedding output. A graph whose residual adds do not form one chain -- e.g. post-norm BERT,
   where a LayerNorm sits between one add and the next -- is refused with the node and the reason;
2. rewires, for each converted sub-block j >= 2, the body's uses of ``s_{j-1}`` (the pre-norm input) to
   ``s_{j-2}``; the residual add itself is untouched;
3. with ``overlap`` (default on) moves each delayed add ``s_{j-1}`` -- and the nodes that only feed its branch
   after the all-reduce is issued (``wait_tensor``, DTensor ``to_local``, dropout, views) -- down to just before
   its first use, which after step 2 lies after sub-block j's compute. Under tensor parallelism
   (``parallelize_module`` with column-parallel q/k/v/gate/up and row-parallel o/down) Dynamo records the
   all-reduce as an async DTensor ``redistribute``; AOTAutograd turns it into ``_c10d_functional.all_reduce``
   plus ``wait_tensor`` right after the all-reduce (traced functional collectives wait at once), so the pass
   rewrites each delayed branch's ``redistribute(Partial -> Replicate).to_local()`` into explicit
   ``_c10d_functional.all_reduce`` + ``wait_tensor`` nodes, which AOTAutograd keeps in graph order; the delayed
   add becomes the opaque ``transfigure::ladder_add`` so Inductor cannot fuse it into the earlier norm kernel
   (which would pull the wait back up). Graphs built on functional collectives directly carry the
   ``wait_tensor`` node already; it is moved the same way.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from transfigure.compiler.graph import ADD_TARGETS, LINEAR_TARGETS, SDPA_TARGETS, GraphView, layer_index
from transfigure.compiler.options import option
from transfigure.compiler.passes import Pass, PassResult, register_pass
from transfigure.reference.ladder import select_layers

__all__ = ["LadderError", "LadderOptions", "LadderPass", "SubBlock", "find_residual_chain", "apply_ladder"]


@torch.library.custom_op("transfigure::ladder_add", mutates_args=())
def ladder_add(stream: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
    """``stream + pending`` as an opaque op: Inductor cannot fuse it into an earlier kernel (which would pull the
    all-reduce wait of ``pending`` back in front of the sub-block it is meant to overlap)."""
    return stream + pending


@ladder_add.register_fake
def _(stream, pending):
    return torch.empty_like(torch.broadcast_tensors(stream, pending)[0])


class LadderError(ValueError):
    """The ladder pass cannot rewrite this graph: the message names the node, the reason and what to do."""


@dataclasses.dataclass(frozen=True)
class LadderOptions:
    layers: str | tuple[int, ...] = option(
        "all", "decoder layers to convert: 'all', 'upper_half', 'last_n' (with n), or a list of layer indices"
    )
    n: int = option(0, "how many last layers layers='last_n' converts", low=0)
    overlap: bool = option(True, "move each delayed residual add and its all-reduce wait past the next sub-block")

    def __post_init__(self):
        if isinstance(self.layers, str) and self.layers not in ("all", "upper_half", "last_n"):
            raise ValueError(f"layers={self.layers!r}: use 'all', 'upper_half', 'last_n' (with n) or a list of layer indices")
        if self.layers == "last_n" and self.n <= 0:
            raise ValueError("layers='last_n' needs n >= 1")


# Ops whose presence in a branch makes it a sub-block (a projection of the stream).
_PROJECTION_TARGETS = set(LINEAR_TARGETS) | {torch.matmul, torch.addmm, torch.mm, torch.bmm, operator.matmul, "matmul", "__matmul__"}
_ATTENTION_TARGETS = set(SDPA_TARGETS) | {torch.softmax, torch.nn.functional.softmax, "softmax"}
_IN_PLACE_ADDS = (operator.iadd, "add_")


def _is_wait(node: fx.Node) -> bool:
    name = str(node.target)
    return "wait_tensor" in name or (node.op == "call_method" and node.target == "wait")


def _is_collective(node: fx.Node) -> bool:
    name = str(node.target)
    return node.op == "call_method" and node.target == "redistribute" or any(
        key in name for key in ("all_reduce", "reduce_scatter", "all_gather")
    )


@dataclasses.dataclass
class SubBlock:
    """Sub-block j: ``add = stream + branch`` (either operand order), ``body`` = nodes between them."""

    index: int  # j, 1-based
    add: fx.Node
    stream: fx.Node
    branch: fx.Node
    body: set
    layer: int | None
    kind: str  # "attention" or "mlp"


def _ancestors(node: fx.Node, memo: dict) -> frozenset:
    """All transitive inputs of ``node`` (iterative, memoized)."""
    if node in memo:
        return memo[node]
    stack = [node]
    while stack:
        current = stack[-1]
        pending = [p for p in current.all_input_nodes if p not in memo]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        if current in memo:
            continue
        acc = set()
        for p in current.all_input_nodes:
            acc.add(p)
            acc |= memo[p]
        memo[current] = frozenset(acc)
    return memo[node]


def _is_projection(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and (node.target in _PROJECTION_TARGETS or "transfigure_linear" in node.meta)


def _layer_of(add: fx.Node, body: set) -> int | None:
    found = layer_index(GraphView.module_fqn(add))
    if found is not None:
        return found
    for node in body:
        if _is_projection(node):
            found = layer_index(GraphView.module_fqn(node))
            if found is not None:
                return found
    return None


def find_residual_chain(graph: fx.Graph) -> list[SubBlock]:
    """The sub-blocks of a pre-norm residual stream, in order; raises :class:`LadderError` otherwise."""
    memo: dict = {}
    candidates: dict[fx.Node, tuple[fx.Node, fx.Node, set]] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or node.target not in ADD_TARGETS or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for stream, branch in ((a, b), (b, a)):
            if stream in _ancestors(branch, memo):
                body = {n for n in _ancestors(branch, memo) if stream in _ancestors(n, memo)} | {branch}
                if any(_is_projection(n) for n in body):
                    candidates[node] = (stream, branch, body)
                break
    if not candidates:
        raise LadderError(
            "ladder: no residual add found (no `x + f(x)` where f contains a projection). The graph may be a "
            "fragment split off by a graph break, or not a residual network: check torch._dynamo.explain(model) "
            "for graph breaks, or disable the 'ladder' pass for this model."
        )
    by_stream: dict[fx.Node, list[fx.Node]] = {}
    for add, (stream, _, _) in candidates.items():
        by_stream.setdefault(stream, []).append(add)
    for stream, adds in by_stream.items():
        if len(adds) > 1:
            raise LadderError(
                f"ladder: the stream node `{stream.name}` feeds {len(adds)} residual adds "
                f"({', '.join(a.name for a in adds)}), e.g. parallel attention+MLP blocks; the ladder recurrence "
                "needs one sequential residual stream. Disable the 'ladder' pass for this model."
            )
    starts = [add for add, (stream, _, _) in candidates.items() if stream not in candidates]
    chains = []
    for start in starts:
        chain = [start]
        while chain[-1] in by_stream:
            chain.append(by_stream[chain[-1]][0])
        chains.append(chain)
    if len(chains) > 1:
        # Explain the first break: what sits between one chain's end and the next chain's start?
        chains.sort(key=lambda c: _position(graph)[c[0]])
        end, nxt = chains[0][-1], chains[1][0]
        stream_next = candidates[nxt][0]
        between = stream_next.name
        target = stream_next.target if isinstance(stream_next.target, str) else getattr(stream_next.target, "__name__", str(stream_next.target))
        raise LadderError(
            f"ladder: the residual stream is interrupted: the residual add `{end.name}` reaches the next residual "
            f"add `{nxt.name}` only through `{between}` ({target}), not directly. This is what a post-norm block "
            "(BERT-style: LayerNorm(x + f(x))) or a parallel block (GPT-J style: x + attn(x) + mlp(x)) looks like; "
            "the ladder recurrence "
            "h_j = h_{j-1} + f_j(h_{j-2}) is defined for pre-norm decoders (Llama, Qwen3, Mistral, GPT-2). "
            "Disable the 'ladder' pass for this model."
        )
    blocks = []
    for j, add in enumerate(chains[0], start=1):
        stream, branch, body = candidates[add]
        kind = "attention" if any(n.target in _ATTENTION_TARGETS for n in body) else "mlp"
        layer = _layer_of(add, body)
        if layer is None:
            raise LadderError(
                f"ladder: cannot tell which decoder layer the residual add `{add.name}` belongs to (no layer index in "
                "its module path). Layer choices need modules named like `layers.3` / `h.3`."
            )
        blocks.append(SubBlock(j, add, stream, branch, body, layer, kind))
    return blocks


def _position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def _sink(graph: fx.Graph, node: fx.Node) -> bool:
    """Move ``node`` down to just before its first user (a pure reorder). Returns True if it moved."""
    if not node.users:
        return False
    position = _position(graph)
    first = min(node.users, key=position.__getitem__)
    if position[first] == position[node] + 1:
        return False
    first.prepend(node)
    return True


def _pending_tail(branch: fx.Node, body: set) -> list[fx.Node]:
    """Nodes feeding only the residual add after the all-reduce was issued (wait, to_local, dropout, views).

    Walks up from the branch through single-user nodes with one input inside the sub-block; stops at the
    collective, a projection, or anything else with several inputs. Returned top-down.
    """
    tail = []
    current = branch
    for _ in range(8):
        if current.op not in ("call_function", "call_method") or _is_collective(current) or _is_projection(current):
            break
        inside = [p for p in current.all_input_nodes if p in body]
        if len(current.users) != 1 or len(inside) != 1:
            break
        tail.append(current)
        current = inside[0]
    return list(reversed(tail))


def _placements(node: fx.Node) -> tuple:
    value = node.meta.get("example_value", node.meta.get("val"))
    return tuple(getattr(value, "placements", ()) or ()), value


def _explicit_all_reduce(graph: fx.Graph, block: SubBlock) -> str:
    """Turn the branch's DTensor ``redistribute(Partial -> Replicate).to_local()`` into explicit
    ``_c10d_functional.all_reduce`` + ``wait_tensor`` nodes, so the wait stays where this pass puts it.

    (Traced DTensor collectives get their ``wait_tensor`` right after the ``all_reduce``: functional
    collectives wait immediately while tracing. Explicit nodes keep the order of the Dynamo graph.)
    Returns a short description of what was done (or why not).
    """
    for node in [*_pending_tail(block.branch, block.body), block.branch]:
        if _is_wait(node):
            return "functional wait_tensor already explicit"
        if not (node.op == "call_method" and node.target == "to_local"):
            continue
        redistribute = node.args[0]
        if not (isinstance(redistribute, fx.Node) and redistribute.op == "call_method" and redistribute.target == "redistribute"):
            continue
        source = redistribute.args[0]
        placements, value = _placements(source)
        out_placements, _ = _placements(redistribute)
        if len(placements) != 1 or not placements[0].is_partial() or not out_placements or not out_placements[0].is_replicate():
            return f"redistribute `{redistribute.name}` is not a 1-D Partial -> Replicate all-reduce: left to DTensor"
        if getattr(value, "requires_grad", False):
            return "graph needs gradients (the functional all_reduce op has no autograd): left to DTensor"
        if len(redistribute.users) != 1:
            return f"redistribute `{redistribute.name}` has other users: left to DTensor"
        reduce_op = getattr(placements[0], "reduce_op", "sum")
        group_name = value.device_mesh.get_group(0).group_name
        example = node.meta.get("example_value", node.meta.get("val"))
        with graph.inserting_before(redistribute):
            local = graph.call_method("to_local", (source,))
            reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (local, reduce_op, group_name))
            waited = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
        for new in (local, reduced, waited):
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
            if example is not None:
                new.meta["example_value"] = example
        node.replace_all_uses_with(waited)
        graph.erase_node(node)
        graph.erase_node(redistribute)
        block.body -= {node, redistribute}
        block.body |= {local, reduced, waited}
        if block.branch is node:
            block.branch = waited
        return f"explicit all_reduce `{reduced.name}` ({reduce_op}, group {group_name}) + `{waited.name}`"
    return "no all-reduce on this branch"


def apply_ladder(graph: fx.Graph, layers: tuple[int, ...] | str = "all", n: int = 0, overlap: bool = True, result: PassResult | None = None) -> list[SubBlock]:
    """Rewire ``graph`` in place per the ladder recurrence for ``layers``; returns the sub-blocks found."""
    blocks = find_residual_chain(graph)
    layer_ids = sorted({b.layer for b in blocks})
    per_layer = {i: [b for b in blocks if b.layer == i] for i in layer_ids}
    odd = [i for i, bs in per_layer.items() if [b.kind for b in bs] != ["attention", "mlp"]]
    if odd:
        bs = per_layer[odd[0]]
        raise LadderError(
            f"ladder: layer {odd[0]} has sub-blocks {[b.kind for b in bs]} (residual adds {[b.add.name for b in bs]}); "
            "expected one attention then one MLP sub-block per decoder layer. Disable the 'ladder' pass for this model."
        )
    if layer_ids != list(range(layer_ids[0], layer_ids[0] + len(layer_ids))):
        raise LadderError(f"ladder: decoder layers {layer_ids} in this graph are not consecutive; cannot apply layer choices")
    offset = layer_ids[0]
    if isinstance(layers, str):
        try:
            chosen = {offset + i for i in select_layers(layers, len(layer_ids), n)}
        except ValueError as error:
            raise LadderError(f"ladder.layers: {error}") from None
    else:
        chosen = set(layers)
        bad = sorted(chosen - set(layer_ids))
        if bad:
            raise LadderError(f"ladder.layers: layer indices {bad} out of range: this graph holds decoder layers {layer_ids[0]}..{layer_ids[-1]}")
    streams = [blocks[0].stream] + [b.add for b in blocks]  # streams[k] = s_k
    converted = []
    for block in blocks:
        if block.layer not in chosen:
            continue
        converted.append(block)
        j = block.index
        if j == 1:
            if result is not None:
                result.rewrote(block.add, f"layer {block.layer} {block.kind}: reads h_-1 = h_0 (unchanged)")
            continue
        current, earlier = streams[j - 1], streams[j - 2]
        users = [u for u in current.users if u in block.body]
        if not users:
            raise LadderError(f"ladder: sub-block {j} (`{block.add.name}`) does not read the stream `{current.name}`")
        for user in users:
            user.replace_input_with(current, earlier)
        if result is not None:
            result.rewrote(block.add, f"layer {block.layer} {block.kind}: reads `{earlier.name}` instead of `{current.name}`")
    if overlap:
        # Delay s_{j-1} (and its wait) past sub-block j wherever sub-block j was converted; go last-to-first so
        # each add lands before an already placed successor.
        for block in reversed(converted):
            if block.index == 1:
                continue
            prev = blocks[block.index - 2]
            if prev.add.target in _IN_PLACE_ADDS:
                if result is not None:
                    result.skip(prev.add, "in-place residual add: not moved")
                continue
            detail = _explicit_all_reduce(graph, prev)
            if detail.startswith("explicit all_reduce") and prev.add.target in (operator.add, torch.add) and not prev.add.kwargs:
                prev.add.target = torch.ops.transfigure.ladder_add.default
                detail += "; delayed add kept unfused (transfigure::ladder_add)"
            _sink(graph, prev.add)
            for node in reversed(_pending_tail(prev.branch, prev.body)):
                _sink(graph, node)
            if result is not None:
                result.note(f"`{prev.add.name}` delayed past sub-block {block.index}; {detail}")
    graph.lint()
    return blocks


@register_pass
class LadderPass(Pass):
    """Ladder residual rewiring (+ all-reduce wait placement under tensor parallelism)."""

    name = "ladder"
    Options = LadderOptions
    order = 20
    description = "each converted sub-block reads the residual stream one sub-block late, so TP all-reduces overlap compute"

    def run(self, graph: GraphView) -> PassResult:
        result = PassResult(self.name)
        opts = self.options
        if not any(_is_projection(node) for node in graph.graph.nodes):
            # a fragment without any projection (e.g. the loss, split off by a graph break): nothing to rewire
            result.note("no projection in this graph (a fragment after a graph break?): left unchanged")
            return result
        blocks = apply_ladder(graph.graph, opts.layers, opts.n, opts.overlap, result)
        result.note(f"{len(blocks)} sub-blocks in {len({b.layer for b in blocks})} layers")
        graph.recompile()
        return result
