"""``linearize``: replace softmax attention (``scaled_dot_product_attention``) by (gated) linear attention.

Math (per layer; see :mod:`transfigure.reference.linear_attention` for the full definition, which is also the
test oracle): with a feature map phi, causal linear attention is
``y_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / sum_{j<=i} phi(q_i).phi(k_j)``, computed chunkwise in O(T) by the
``transfigure::linear_attn`` Triton kernels (fp32 state, GQA native); bidirectional sites (BERT) use
``phi(Q) (phi(K)^T V)``.

* ``feature_map="hedgehog"`` (Zhang et al. 2024, *The Hedgehog & the Porcupine*): per head a learned d x d
  map W, initialized to identity, then ``[softmax(xW), softmax(-xW)]`` (2d features). W for q and for k are
  trainable extra inputs, trained by :func:`transfigure.passes.attention_transfer.distill_attention`.
* ``feature_map="liger"`` (Lan et al. 2025, *Liger*): ``softmax(x)`` over the head dimension, no new
  parameters, and per-dimension log gates from the key, ``g = max(logsigmoid(k)/16, -1)`` (gated linear
  attention, Yang et al. 2024).
* ``feature_map="elu"``: ``elu(x) + 1`` (Katharopoulos et al. 2020).
* ``window="lolcats"`` (Zhang et al. 2025, *LoLCATs*): softmax over a terraced window (the current and the
  previous block of ``window_size`` tokens) plus linear attention over older tokens, under one shared
  normalizer, the softmax part weighted by ``sigmoid(a_h)`` (trainable, starts at 0.1).
* ``window="liger"``: ``0.5 * sliding-window softmax (window_size) + 0.5 * linear attention``.

Matched forms (all that transformers emits): causal via ``is_causal=True`` or via a materialized bool mask
(detected by the ``kv_idx <= q_idx`` comparison it is built from), GQA via ``enable_gqa=True`` or
``repeat_kv`` (expand + reshape, which the pass looks through so keys are never repeated), bidirectional
(no mask, or a padding-only mask), padding (keys no query may see are dropped from the sums). Sites with
attention dropout, or a window on a bidirectional site, are skipped with the reason.

Decoding: the compiled graph has no place for a recurrent state between calls (transformers' ``Cache`` objects
store per-layer key/value tensors that grow with the context, and the backend sees one traced call at a time),
so under ``generate()`` a compiled linearized model recomputes the prefix (``use_cache=False``) or, with a KV
cache, its decode steps are skipped by the pass (key length != query length) and stay softmax.
:class:`LinearAttentionDecoder` is the decoding path: it keeps, per layer, the fp32 recurrent state (plus the
window's recent keys/values) across calls and runs each new token through the ``transfigure::linear_attn_decode``
step kernel, so per-token cost does not grow with the context.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

from transfigure.compiler import GraphView, Pass, PassResult, option, register_pass
from transfigure.compiler.options import load_file
from transfigure.kernels import window_attention as _window_attention  # noqa: F401  (registers transfigure::window_attention)
from transfigure.kernels.linear_attention import linear_attention, linear_attention_bidirectional, linear_attention_decode_step
from transfigure.passes.attention_sites import attention_operands, erase_unused, replace_attention_call, unrepeat_kv

EPS = 1e-6
WINDOW_FACTOR_INIT = math.log(0.1 / 0.9)
_COMPARISONS = {operator.le, operator.lt, operator.ge, operator.gt, torch.le, torch.lt, torch.ge, torch.gt, "le", "lt", "ge", "gt"}


@dataclasses.dataclass(frozen=True)
class LinearizeOptions:
    feature_map: Literal["hedgehog", "liger", "elu"] = option("hedgehog", "feature map phi applied to q and k")
    window: Literal["none", "lolcats", "liger"] = option("none", "softmax window mixed with the linear part")
    window_size: int = option(64, "window length in tokens (lolcats: block size of the terraced window)", low=1)
    layers: tuple[int, ...] = option((), "layer indices to linearize (empty: all)")
    chunk_size: int = option(64, "chunk length of the chunkwise-parallel kernel", choices=(16, 32, 64, 128))
    causal: Literal["auto", "causal", "bidirectional"] = option("auto", "override the detected causality of masked sites")
    state: Mapping[str, Any] | str | None = option(
        None, "trained feature-map/window parameters (dict from distill_attention, or a path to torch.save of it)"
    )


# --------------------------------------------------------------------------------------------------
# what replaces a site (traced by AOTAutograd; the kernels are opaque custom ops)
# --------------------------------------------------------------------------------------------------


def _phi(x: torch.Tensor, kind: str, weight: torch.Tensor | None) -> torch.Tensor:
    x = x.float()
    if kind == "elu":
        return F.elu(x) + 1
    if kind == "liger":
        return torch.softmax(x, dim=-1)
    y = torch.einsum("bhtd,hde->bhte", x, weight.float())
    return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)


def _lolcats_linear_part(fq, fk, v, T: int, W: int, chunk_size: int):
    """Linear attention over keys at least one full block back: sum_{j < W (i//W - 1)} phi(q_i).phi(k_j) [v_j, 1].

    Computed as causal linear attention (the chunked kernels) over keys and values delayed by ``W`` positions,
    which sums keys ``j <= i - W``, minus the part of block ``i//W - 1`` that the delay still lets in (keys
    ``(i//W - 1) W <= j <= i - W``: a blockwise ``[W, W]`` term). Memory O(T (W + d)) instead of a state per block.
    Returns (numerator, denominator)."""
    B, H, _, dk = fq.shape
    Hk = fk.shape[1]
    G = H // Hk
    N = -(-T // W)
    pad = N * W - T
    fq, fk = fq.float(), fk.float()
    vf = torch.cat([v.float(), v.new_ones(*v.shape[:3], 1, dtype=torch.float32)], -1)
    delayed_k = F.pad(fk, (0, 0, W, 0))[:, :, :T]
    delayed_v = F.pad(vf, (0, 0, W, 0))[:, :, :T]
    lagged = torch.ops.transfigure.linear_attn(fq.contiguous(), delayed_k.contiguous(), delayed_v.contiguous(), None,
                                               1.0, int(chunk_size))
    qc = F.pad(fq, (0, 0, 0, pad)).reshape(B, Hk, G, N, W, dk)
    kp = F.pad(fk, (0, 0, W, pad))[:, :, : N * W].reshape(B, Hk, N, W, dk)  # block n-1's keys for query block n
    vp = F.pad(vf, (0, 0, W, pad))[:, :, : N * W].reshape(B, Hk, N, W, -1)
    s = torch.einsum("bhgnid,bhnjd->bhgnij", qc, kp).tril()  # keys j_local <= i_local of the previous block
    extra = torch.einsum("bhgnij,bhnjv->bhgniv", s, vp).reshape(B, H, N * W, -1)[:, :, :T]
    out = lagged.float() - extra
    return out[..., :-1], out[..., -1:]


def linearized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    q_map: torch.Tensor | None,
    k_map: torch.Tensor | None,
    window_factor: torch.Tensor | None,
    *,
    causal: bool,
    feature_map: str,
    window: str,
    window_size: int,
    chunk_size: int,
    scale: float,
) -> torch.Tensor:
    """One linearized attention site. q: [B,H,T,d]; k, v: [B,Hk,T,d] (native GQA); mask: SDPA's attn_mask."""
    B, H, T, d = q.shape
    if mask is None:
        valid = torch.ones(B, k.shape[2], dtype=torch.bool, device=q.device)
    else:
        ok = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        valid = ok.expand(B, -1, -1, -1).any(-2)[:, 0, :]
    fq = _phi(q, feature_map, q_map)
    fk = _phi(k, feature_map, k_map) * valid[:, None, :, None]
    g = None
    if feature_map == "liger":
        g = (F.logsigmoid(k.float()) / 16.0).clamp_min(-1.0) * valid[:, None, :, None]
    compute = q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
    if compute == torch.float16:
        compute = torch.float32  # feature-map products underflow fp16; the kernels take fp32 or bf16
    if not causal:
        out = linear_attention_bidirectional(fq.to(compute), fk.to(compute), v.to(compute), normalize=True, eps=EPS)
        return out.to(q.dtype)
    if window == "lolcats":
        num_w, den_w = torch.ops.transfigure.window_attention(q, k, v, valid, window_factor, window_size, scale, window)
        num_l, den_l = _lolcats_linear_part(fq, fk, v, T, window_size, chunk_size)
        return ((num_w + num_l) / (den_w + den_l + EPS)).to(q.dtype)
    lin = linear_attention(fq.to(compute), fk.to(compute), v.to(compute), None if g is None else g.to(compute),
                           chunk_size=chunk_size, normalize=True, eps=EPS).float()
    if window == "liger":
        swa, _ = torch.ops.transfigure.window_attention(q, k, v, valid, None, window_size, scale, window)
        return (0.5 * swa + 0.5 * lin).to(q.dtype)
    return lin.to(q.dtype)


# --------------------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------------------


def mask_is_causal(mask: fx.Node, limit: int = 400) -> bool:
    """A materialized mask is causal when it is built from a position comparison (``kv_idx <= q_idx``)."""
    seen, stack = set(), [mask]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node) or node.op == "placeholder":
            continue
        seen.add(node)
        if node.target in _COMPARISONS and len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2]):
            return True  # index vs index (BERT's padding mask compares q_idx >= 0 only)
        stack.extend(node.all_input_nodes)
    return False


def load_state(state: Mapping[str, Any] | str | None) -> dict[str, torch.Tensor]:
    if state is None:
        return {}
    if isinstance(state, str):
        state = load_file(state)
    return {str(k): v for k, v in dict(state).items() if isinstance(v, torch.Tensor)}


@register_pass
class LinearizePass(Pass):
    name = "linearize"
    Options = LinearizeOptions
    order = 10
    description = "softmax attention -> (gated) linear attention (Hedgehog / Liger / ELU, LoLCATs or Liger window)"

    def run(self, graph: GraphView) -> PassResult:
        opts: LinearizeOptions = self.options
        result = PassResult(self.name)
        state = load_state(opts.state)
        feeding: set[fx.Node] = set()  # inputs of replaced attention calls: may become dead (e.g. repeat_kv)
        for site in graph.attention_calls():
            operands = attention_operands(graph, site, result, opts.layers)
            if operands is None:
                continue
            key, value, gqa_form = operands.key, operands.value, operands.gqa_form
            B, H, T, d = operands.q_shape
            Hk = operands.k_shape[1]
            if operands.k_shape[2] != T:
                result.skip(site, f"key length {operands.k_shape[2]} != query length {T} (KV cache / cross attention)")
                continue
            if site.is_causal is True:
                causal, how = True, "is_causal"
            elif site.attn_mask is None:
                causal, how = False, "no mask"
            elif not isinstance(site.attn_mask, fx.Node):
                result.skip(site, f"unsupported attn_mask {site.attn_mask!r}")
                continue
            elif opts.causal != "auto":
                causal, how = opts.causal == "causal", "option"
            else:
                causal = mask_is_causal(site.attn_mask)
                how = "mask built from a position comparison" if causal else "padding-only mask"
            if not isinstance(site.is_causal, bool):
                result.skip(site, f"is_causal is not a constant ({site.is_causal!r})")
                continue
            if not causal and opts.window != "none":
                result.skip(site, f"window={opts.window!r} needs a causal site (this one is bidirectional)")
                continue
            scale = float(site.scale) if isinstance(site.scale, (int, float)) else 1.0 / math.sqrt(d)
            prefix = site.fqn or site.node.name
            params = self._params(graph, prefix, opts, H, Hk, d, state)
            nodes = {name: graph.add_input(f"{prefix}.{name}", tensor, trainable=True) for name, tensor in params.items()}
            replace_attention_call(
                graph, site, linearized_attention,
                (site.query, key, value, site.attn_mask, nodes.get("q_map"), nodes.get("k_map"), nodes.get("window_factor")),
                dict(causal=causal, feature_map=opts.feature_map, window=opts.window if causal else "none",
                     window_size=opts.window_size, chunk_size=opts.chunk_size, scale=scale),
                feeding)
            detail = (f"{opts.feature_map} {'causal' if causal else 'bidirectional'} ({how}), window={opts.window if causal else 'none'}, "
                      f"H={H} Hk={Hk} d={d}, GQA {gqa_form}, mask={'yes' if site.attn_mask is not None else 'no'}")
            if params:
                detail += ", " + ("trained state" if any(f"{prefix}.{n}" in state for n in params) else "fresh parameters")
            result.rewrote(site, detail)
        erase_unused(graph.graph, feeding)
        return result

    def _params(self, graph: GraphView, prefix: str, opts: LinearizeOptions, H: int, Hk: int, d: int, state) -> dict[str, torch.Tensor]:
        shapes: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
        if opts.feature_map == "hedgehog":
            shapes["q_map"] = ((H, d, d), torch.eye(d).repeat(H, 1, 1))
            shapes["k_map"] = ((Hk, d, d), torch.eye(d).repeat(Hk, 1, 1))
        if opts.window == "lolcats":
            shapes["window_factor"] = ((H,), torch.full((H,), WINDOW_FACTOR_INIT))
        owner = next((p.value for p in graph.placeholders if p.kind == "parameter"), None)
        device = next((p.value.device for p in graph.placeholders if p.kind == "parameter"), torch.device("cpu"))
        params = {}
        for name, (shape, init) in shapes.items():
            given = state.get(f"{prefix}.{name}")
            if given is not None and tuple(given.shape) != shape:
                raise ValueError(f"linearize state {prefix}.{name} has shape {tuple(given.shape)}, expected {shape}")
            source = given if given is not None else init

            def make(source=source):
                return source.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)

            key = f"linearize:{prefix}.{name}:{opts.feature_map}:{opts.window}:{id(opts.state) if opts.state is not None else 0}"
            params[name] = graph.cached(owner, key, make) if owner is not None else make()
        return params


# --------------------------------------------------------------------------------------------------
# decoding with a recurrent state (outside the compiled graph)
# --------------------------------------------------------------------------------------------------

_DECODE_IMPL = "transfigure_linear_decode"


class _LayerCache:
    __slots__ = ("S", "k", "v", "start", "kv_full")

    def __init__(self):
        self.S = None  # [B, Hk, d_phi, d_v + 1] fp32: phi(k)^T [v, 1] summed (decayed) over folded keys
        self.k = self.v = None  # window buffer: raw keys/values of positions start .. pos-1
        self.start = 0
        self.kv_full = None  # layers left as softmax: their whole K/V (grows with context)


def _decode_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    decoder = getattr(module, "_transfigure_decoder", None)
    if decoder is None:
        raise RuntimeError("LinearAttentionDecoder: attention module has no decoder attached")
    out = decoder._attend(module, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


class LinearAttentionDecoder:
    """Token-by-token decoding of a linearized model with per-token cost flat in the context length.

    The same math as the ``linearize`` pass (same options, same trained ``state``), run eagerly through
    transformers' attention interface. Per attention layer it keeps the fp32 recurrent state
    ``S = sum_j phi(k_j)^T [v_j, 1]`` (decayed by the Liger gates; the extra column is the normalizer) and, with
    a window, the raw keys/values the window still needs: ``window="liger"`` the last ``window_size`` tokens,
    ``window="lolcats"`` the current and previous ``window_size`` block (a block that falls out of the window
    is folded into ``S``). Layers not selected by ``layers`` keep an ordinary growing K/V list (softmax).

    The prompt is prefilled with the chunked kernels in one call; every later token costs one
    ``transfigure::linear_attn_decode`` step per layer. Rows of a batch must share one length (no padding).

    >>> dec = LinearAttentionDecoder(model, feature_map="hedgehog", window="lolcats", state=state)
    >>> ids = dec.generate(prompt_ids, max_new_tokens=64)          # greedy
    >>> logits = dec.prefill(prompt_ids); logits = dec.step(next_ids)  # or drive it yourself
    """

    def __init__(self, model: torch.nn.Module, feature_map: str = "hedgehog", window: str = "none", window_size: int = 64,
                 chunk_size: int = 64, layers: tuple[int, ...] = (), state: Mapping[str, Any] | str | None = None):
        opts = LinearizeOptions(feature_map=feature_map, window=window, window_size=window_size, layers=tuple(layers),
                                chunk_size=chunk_size)  # validates like the pass
        from transfigure.passes.attention_transfer import init_state
        from transfigure.reference.linear_attention import attention_layers

        self.model, self.opts = model, opts
        given = load_state(state)
        fresh = init_state(model, feature_map, window)
        self.params = {k: given.get(k, v).detach().float().to(v.device) for k, v in fresh.items()}
        self.selected = set(attention_layers(model, opts.layers))
        self.modules = attention_layers(model)
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        self.cache = {fqn: _LayerCache() for fqn in self.modules}

    # -- the per-layer computation --
    def _attend(self, module, q, k, v, scaling):
        fqn = module._transfigure_fqn
        c = self.cache[fqn]
        T = q.shape[2]
        scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
        if fqn not in self.selected:  # softmax layer with a plain growing K/V list
            kf, vf = (k, v) if c.kv_full is None else (torch.cat([c.kv_full[0], k], 2), torch.cat([c.kv_full[1], v], 2))
            c.kv_full = (kf, vf)
            return F.scaled_dot_product_attention(q, kf, vf, is_causal=T > 1, scale=scale, enable_gqa=True)
        p = {n: self.params.get(f"{fqn}.{n}") for n in ("q_map", "k_map", "window_factor")}
        if T > 1 or self.pos == 0:
            if self.pos != 0:
                raise ValueError("LinearAttentionDecoder: feed the prompt once (prefill), then one token per step")
            return self._prefill(c, q, k, v, p, scale)
        return self._step(c, q, k, v, p, scale)

    def _prefill(self, c, q, k, v, p, scale):
        o = self.opts
        T = q.shape[2]
        out = linearized_attention(q, k, v, None, p["q_map"], p["k_map"], p["window_factor"], causal=True,
                                   feature_map=o.feature_map, window=o.window, window_size=o.window_size,
                                   chunk_size=o.chunk_size, scale=scale)
        fk = _phi(k, o.feature_map, p["k_map"])
        va = torch.cat([v.float(), v.new_ones(*v.shape[:3], 1, dtype=torch.float32)], -1)
        W = o.window_size
        if o.window == "lolcats":
            n = T // W  # block of the next position
            c.start = max(0, W * (n - 1))
            c.S = torch.einsum("bhtk,bhtv->bhkv", fk[:, :, : c.start], va[:, :, : c.start])
        else:
            if o.feature_map == "liger":
                g = (F.logsigmoid(k.float()) / 16.0).clamp_min(-1.0)
                b = g.cumsum(2)
                fk = fk * (b[:, :, -1:] - b).exp()  # decay from each key to the end of the prompt
            c.S = torch.einsum("bhtk,bhtv->bhkv", fk, va)
            c.start = max(0, T - (W - 1)) if o.window == "liger" else T
        c.k, c.v = k[:, :, c.start - T:] if c.start < T else k[:, :, :0], v[:, :, c.start - T:] if c.start < T else v[:, :, :0]
        return out

    def _step(self, c, q, k, v, p, scale):
        o = self.opts
        i, W = self.pos, o.window_size
        B, H = q.shape[:2]
        Hk = k.shape[1]
        fq = _phi(q, o.feature_map, p["q_map"])[:, :, 0]
        fk = _phi(k, o.feature_map, p["k_map"])[:, :, 0]
        va = torch.cat([v.float(), v.new_ones(*v.shape[:3], 1, dtype=torch.float32)], -1)[:, :, 0]
        if o.window == "lolcats":
            lo = max(0, W * (i // W - 1))
            if lo > c.start:  # a block left the window: fold it into the state
                m = lo - c.start
                c.S = c.S + torch.einsum("bhtk,bhtv->bhkv", _phi(c.k[:, :, :m], o.feature_map, p["k_map"]),
                                         torch.cat([c.v[:, :, :m].float(), c.v.new_ones(B, Hk, m, 1, dtype=torch.float32)], -1))
                c.k, c.v, c.start = c.k[:, :, m:], c.v[:, :, m:], lo
            lin = torch.einsum("bhgk,bhkv->bhgv", fq.reshape(B, Hk, H // Hk, -1), c.S).reshape(B, H, -1)
        else:
            g = (F.logsigmoid(k[:, :, 0].float()) / 16.0).clamp_min(-1.0) if o.feature_map == "liger" else None
            lin, c.S = linear_attention_decode_step(fq, fk, va, g, c.S, 1.0, inplace=True)
        kw = torch.cat([c.k, k], 2)
        vw = torch.cat([c.v, v], 2)
        if o.window == "none":
            out = lin[..., :-1] / (lin[..., -1:] + EPS)
        else:
            s = scale * torch.einsum("bhgd,bhjd->bhgj", q[:, :, 0].float().reshape(B, Hk, H // Hk, -1), kw.float())
            a = (s - s.amax(-1, keepdim=True)).exp()
            num_w = torch.einsum("bhgj,bhjv->bhgv", a, vw.float()).reshape(B, H, -1)
            den_w = a.sum(-1).reshape(B, H, 1)
            if o.window == "liger":
                out = 0.5 * num_w / den_w + 0.5 * lin[..., :-1] / (lin[..., -1:] + EPS)
            else:
                f = torch.sigmoid(p["window_factor"].float()).reshape(1, H, 1)
                out = (f * num_w + lin[..., :-1]) / (f * den_w + lin[..., -1:] + EPS)
        keep = W - 1 if o.window == "liger" else kw.shape[2]
        if o.window != "none":
            c.k, c.v = kw[:, :, kw.shape[2] - keep:], vw[:, :, vw.shape[2] - keep:]
            c.start = i + 1 - keep
        return out[:, :, None].to(q.dtype)

    # -- driving the model --
    def _call(self, ids: torch.Tensor, **kwargs):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(_DECODE_IMPL, _decode_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(_DECODE_IMPL, sdpa_mask)
        previous = self.model.config._attn_implementation
        for fqn, module in self.modules.items():
            module._transfigure_decoder, module._transfigure_fqn = self, fqn
        try:
            try:
                self.model.set_attn_implementation(_DECODE_IMPL)
            except Exception:
                self.model.config._attn_implementation = _DECODE_IMPL
            T = ids.shape[1]
            positions = torch.arange(self.pos, self.pos + T, device=ids.device)[None].expand(ids.shape[0], -1)
            out = self.model(ids, position_ids=positions, use_cache=False, **kwargs)
            self.pos += T
            return out.logits
        finally:
            for module in self.modules.values():
                del module._transfigure_decoder
            try:
                self.model.set_attn_implementation(previous)
            except Exception:
                self.model.config._attn_implementation = previous

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Reset, run the prompt (chunked kernels), keep the states; returns the prompt's logits."""
        self.reset()
        return self._call(input_ids, **kwargs)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """One new token per row (``[B, 1]``); returns its logits ``[B, 1, vocab]``."""
        if token_ids.shape[1] != 1:
            raise ValueError("step takes one token per row")
        return self._call(token_ids, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding; returns ``input_ids`` followed by ``max_new_tokens`` generated tokens."""
        logits = self.prefill(input_ids)
        out = [input_ids]
        for n in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            if n + 1 < max_new_tokens:
                logits = self.step(nxt)
        return torch.cat(out, 1)


def generate_linear(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
    """Greedy decoding of ``model`` linearized with ``options`` (the pass's options), O(1) per token."""
    return LinearAttentionDecoder(model, **options).generate(input_ids, max_new_tokens)


__all__ = ["LinearAttentionDecoder", "LinearizeOptions", "LinearizePass", "generate_linear", "linearized_attention", "mask_is_causal", "unrepeat_kv", "load_state"]
