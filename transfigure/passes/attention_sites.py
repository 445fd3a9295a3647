"""What the attention-rewriting passes (``linearize``, ``decode_attention``) share: reading a
``scaled_dot_product_attention`` site's operands the way transformers builds them, and swapping the call.

Not a pass: it registers nothing. Every rewrite of an SDPA site has to look through ``repeat_kv`` (so keys are
never repeated), read static shapes, skip what it cannot handle with a reason, and, after replacing the call,
erase only what the rewrite left unused (never an in-place update of the graph).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from transfigure.compiler import GraphView, PassResult, written_operands


def _shape(graph: GraphView, node: Any) -> tuple[int, ...] | None:
    value = graph.meta_value(node) if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in value.shape) if value is not None and hasattr(value, "shape") else None


def unrepeat_kv(node: fx.Node) -> fx.Node | None:
    """If ``node`` is transformers' ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``), the un-repeated ``x``."""
    if not isinstance(node, fx.Node) or node.target not in ("reshape", "view", torch.reshape):
        return None
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or expand.target != "expand":
        return None
    index = expand.args[0]
    if not isinstance(index, fx.Node) or index.target is not operator.getitem:
        return None
    src, item = index.args
    if isinstance(item, tuple) and len(item) == 5 and item[2] is None and all(isinstance(s, slice) for i, s in enumerate(item) if i != 2):
        return src
    return None


@dataclasses.dataclass(frozen=True)
class AttentionOperands:
    """A site's query and its un-repeated key/value, with static shapes ``[B, H, Lq, d]`` / ``[B, Hk, L, d]``."""

    query: fx.Node
    key: fx.Node
    value: fx.Node
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    gqa_form: str  # "repeat_kv (looked through)", "enable_gqa" or "none"


def attention_operands(graph: GraphView, site: Any, result: PassResult,
                       layers: tuple[int, ...] = ()) -> AttentionOperands | None:
    """The site's operands, or None after recording on ``result`` why the site is skipped: a layer outside
    ``layers`` (empty: all), attention dropout, shapes that are unknown, symbolic or not 4-D, or query heads that
    are not a multiple of the key/value heads."""
    if layers and site.layer not in layers:
        result.skip(site, f"layer {site.layer} not in layers={list(layers)}")
        return None
    if site.dropout_p not in (0, 0.0, None):
        result.skip(site, f"attention dropout (dropout_p={site.dropout_p}); compile the model in eval mode")
        return None
    key, value, gqa_form = site.key, site.value, "enable_gqa" if site.enable_gqa is True else "none"
    k_src, v_src = unrepeat_kv(key), unrepeat_kv(value)
    if k_src is not None and v_src is not None:
        key, value, gqa_form = k_src, v_src, "repeat_kv (looked through)"
    try:
        q_shape, k_shape, v_shape = (_shape(graph, n) for n in (site.query, key, value))
    except (TypeError, ValueError):  # symbolic sizes (dynamic shapes)
        q_shape = k_shape = v_shape = None
    if q_shape is None or k_shape is None or v_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
        result.skip(site, "query/key shapes unknown or not [B, H, T, d] (compile with static shapes)")
        return None
    if q_shape[1] % k_shape[1]:
        result.skip(site, f"{q_shape[1]} query heads not a multiple of {k_shape[1]} key heads")
        return None
    return AttentionOperands(site.query, key, value, q_shape, k_shape, gqa_form)


def replace_attention_call(graph: GraphView, site: Any, target: Any, args: tuple, kwargs: dict | None,
                           feeding: set[fx.Node]) -> fx.Node:
    """Put ``target(*args, **kwargs)`` in place of the site's SDPA call (its module stack and output metadata
    kept, for later passes and the report) and return the new node. The old call's inputs, which may have become
    dead (e.g. the ``repeat_kv`` copies), join ``feeding``: :func:`erase_unused` takes them once every site is
    rewritten."""
    with graph.graph.inserting_before(site.node):
        new = graph.graph.call_function(target, args, kwargs or {})
    new.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
    site.node.replace_all_uses_with(new)
    feeding.update(site.node.all_input_nodes)
    graph.graph.erase_node(site.node)
    return new


def _mutates(node: fx.Node) -> bool:
    """Whether a node may have an effect besides its output: FX's own rule, plus in-place methods and
    functions of the Dynamo graph (``index_copy_``, ``add_``, ``setitem``...), which it does not know."""
    return node.is_impure() or bool(written_operands(node))


def erase_unused(graph: fx.Graph, candidates: set[fx.Node]) -> None:
    """Erase the nodes the rewrite left without users, starting from ``candidates`` and walking up, never a
    node that may mutate something (a whole-graph ``eliminate_dead_code`` dropped the in-place KV-cache and
    token-buffer updates of a decode step: FX does not see ``Tensor.index_copy_`` as impure)."""
    pending = set(candidates)
    while pending:
        node = pending.pop()
        if node.users or node.op not in ("call_function", "call_method") or _mutates(node):
            continue
        pending.update(node.all_input_nodes)
        graph.erase_node(node)
