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
from transfigure.passes.attention_sites import attention_operands, erase_unused, replace_attention_call


@dataclasses.dataclass(frozen=True)
class DecodeAttentionOptions:
    max_query_tokens: int = option(
        4, "rewrite sites whose query has at most this many positions (decode steps; speculative drafts)", low=1,
        high=MAX_QUERY_ROWS)
    layers: tuple[int, ...] = option((), "layer indices to rewrite (empty: all)")
    fuse_cache_update: bool = option(
        True, "the rotary embedding, static KV-cache write and fill counter of each rewritten site run inside its "
              "launch (pass cache_update_fuse; three launches fewer per layer; inference graphs)")


@register_pass
class DecodeAttentionPass(Pass):
    name = "decode_attention"
    Options = DecodeAttentionOptions
    order = 12  # after linearize (which takes the sites whose keys are the queries' own tokens)
    description = "decode-step SDPA -> GQA-native split-KV attention that skips masked cache blocks"

    def implied_passes(self) -> list[Pass]:
        from .fuse_cache_update import CacheUpdateFusePass

        return [CacheUpdateFusePass()] if self.options.fuse_cache_update else []

    def run(self, graph: GraphView) -> PassResult:
        opts: DecodeAttentionOptions = self.options
        result = PassResult(self.name)
        feeding: set[fx.Node] = set()
        for site in graph.attention_calls():
            operands = attention_operands(graph, site, result, opts.layers)
            if operands is None:
                continue
            if not isinstance(site.is_causal, bool):
                result.skip(site, f"is_causal is not a constant ({site.is_causal!r})")
                continue
            if site.attn_mask is not None and not isinstance(site.attn_mask, fx.Node):
                result.skip(site, f"unsupported attn_mask {site.attn_mask!r}")
                continue
            B, H, Lq, d = operands.q_shape
            Hk = operands.k_shape[1]
            if Lq > opts.max_query_tokens or (H // Hk) * Lq > MAX_QUERY_ROWS:
                result.skip(site, f"query length {Lq} > max_query_tokens={opts.max_query_tokens} "
                                  "(prefill or encoder: SDPA's own kernels stay)")
                continue
            scale = float(site.scale) if isinstance(site.scale, (int, float)) else 1.0 / math.sqrt(d)
            replace_attention_call(graph, site, torch.ops.transfigure.decode_attention.default,
                                   (site.query, operands.key, operands.value, site.attn_mask, scale, site.is_causal),
                                   None, feeding)
            mask = "none" if site.attn_mask is None else "yes"
            result.rewrote(site, f"Lq={Lq} over {operands.k_shape[2]} cached keys, H={H} Hk={Hk} d={d}, "
                                 f"GQA {operands.gqa_form}, mask={mask}, is_causal={site.is_causal}")
        erase_unused(graph.graph, feeding)
        return result
