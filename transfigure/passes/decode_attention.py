"""``decode_attention``: softmax attention of decode steps on a grouped-query kernel that skips the empty cache.

Math: unchanged -- ``softmax(scale * q k^T + mask) v`` per query head, with query head ``h`` reading key/value
head ``h // G``. What changes is how a decode step (one or a few query tokens against a KV cache) computes it:
``transfigure::decode_attention`` (:mod:`transfigure.kernels.decode_attention`) reads each key/value head once
for its ``G`` query heads (no ``repeat_kv`` copies of the cache), splits the key axis across programs as
flash-decoding does (Dao et al. 2023, *Flash-Decoding for long-context inference*) and skips key blocks the mask
hides entirely -- the unfilled tail of a static cache, which SDPA reads in full every step.

Matched: every ``scaled_dot_product_attention`` call whose query has at most ``max_query_tokens`` positions
(a decode step; prefill and encoder sites keep SDPA and its flash kernels, and are listed as skipped) in all
the forms transformers emits: GQA through ``repeat_kv`` (looked through, so the expanded copies are no longer
made) or ``enable_gqa``, a bool or additive mask, ``is_causal``. Sites with attention dropout are skipped.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from transfigure.compiler import GraphView, Pass, PassResult, option, register_pass
from transfigure.kernels import decode_attention as _decode_attention  # noqa: F401  (registers the op)
from transfigure.kernels.decode_attention import MAX_QUERY_ROWS
from transfigure.passes.linearize import _erase_unused, _shape, unrepeat_kv


@dataclasses.dataclass(frozen=True)
class DecodeAttentionOptions:
    max_query_tokens: int = option(
        4, "rewrite sites whose query has at most this many positions (decode steps; speculative drafts)", low=1,
        high=MAX_QUERY_ROWS)
    layers: tuple[int, ...] = option((), "layer indices to rewrite (empty: all)")


@register_pass
class DecodeAttentionPass(Pass):
    name = "decode_attention"
    Options = DecodeAttentionOptions
    order = 12  # after linearize (which takes the sites whose keys are the queries' own tokens)
    description = "decode-step SDPA -> GQA-native split-KV attention that skips masked cache blocks"

    def run(self, graph: GraphView) -> PassResult:
        opts: DecodeAttentionOptions = self.options
        result = PassResult(self.name)
        feeding: set[fx.Node] = set()
        for site in graph.attention_calls():
            if opts.layers and site.layer not in opts.layers:
                result.skip(site, f"layer {site.layer} not in layers={list(opts.layers)}")
                continue
            if site.dropout_p not in (0, 0.0, None):
                result.skip(site, f"attention dropout (dropout_p={site.dropout_p}); compile the model in eval mode")
                continue
            if not isinstance(site.is_causal, bool):
                result.skip(site, f"is_causal is not a constant ({site.is_causal!r})")
                continue
            if site.attn_mask is not None and not isinstance(site.attn_mask, fx.Node):
                result.skip(site, f"unsupported attn_mask {site.attn_mask!r}")
                continue
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
                continue
            B, H, Lq, d = q_shape
            Hk = k_shape[1]
            if H % Hk:
                result.skip(site, f"{H} query heads not a multiple of {Hk} key heads")
                continue
            if Lq > opts.max_query_tokens or (H // Hk) * Lq > MAX_QUERY_ROWS:
                result.skip(site, f"query length {Lq} > max_query_tokens={opts.max_query_tokens} "
                                  "(prefill or encoder: SDPA's own kernels stay)")
                continue
            scale = float(site.scale) if isinstance(site.scale, (int, float)) else 1.0 / math.sqrt(d)
            with graph.graph.inserting_before(site.node):
                new = graph.graph.call_function(
                    torch.ops.transfigure.decode_attention.default,
                    (site.query, key, value, site.attn_mask, scale, site.is_causal))
            new.meta.update({k: v for k, v in site.node.meta.items()
                             if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
            site.node.replace_all_uses_with(new)
            feeding.update(site.node.all_input_nodes)
            graph.graph.erase_node(site.node)
            mask = "none" if site.attn_mask is None else "yes"
            result.rewrote(site, f"Lq={Lq} over {k_shape[2]} cached keys, H={H} Hk={Hk} d={d}, GQA {gqa_form}, "
                                 f"mask={mask}, is_causal={site.is_causal}")
        _erase_unused(graph.graph, feeding)
        return result
