"""Module-level reference of linearized attention: the test oracle of the ``linearize`` pass.

It plugs into transformers' attention interface (``AttentionInterface``) instead of rewriting graphs, and
computes every variant with explicit ``T x T`` weight matrices (no chunking, no kernels), so it shares no
code path with the pass: a pass that rewrites a site wrongly cannot agree with it by construction.

Semantics (for one layer; ``q`` has H heads, ``k``/``v`` have Hk heads, query head h reads key head
h // (H/Hk); ``valid_j`` marks keys that are not padding)::

    feature maps   elu:      phi(x) = elu(x) + 1
                   hedgehog: phi(x) = [softmax(x W_h), softmax(-x W_h)]      (W_h: d x d, identity at init,
                             one per query head for q and per key/value head for k; features double)
                   liger:    phi(x) = softmax(x)                              (over the head dimension)
    gates          liger only: g = max(logsigmoid(k) / 16, -1), per key dimension, from the raw key
    linear part    L_ij = sum_d phi(q_i)_d phi(k_j)_d exp(B_id - B_jd)       (B = cumsum of g; 0 without gates)
    window none    y_i = sum_j L_ij v_j / (sum_j L_ij + eps)                 j <= i (causal) or all j
    window lolcats (LoLCATs hybrid, terraced window of w tokens, one shared normalizer, f_h = sigmoid(a_h),
                   a_h = logit(0.1) at init):
                   window W(i) = { j <= i : j // w >= i // w - 1 },  s_ij = scale q_i.k_j,  m_i = max_W(i) s_ij
                   y_i = (f_h sum_W(i) e^{s_ij - m_i} v_j + sum_{j < w (i//w - 1)} L_ij v_j)
                         / (f_h sum_W(i) e^{s_ij - m_i} + sum_{j < w (i//w - 1)} L_ij + eps)
    window liger   y_i = 0.5 softmax_{i - w < j <= i}(s_ij) v + 0.5 (normalized gated linear attention)

Usage::

    params = linearize_reference(model, feature_map="hedgehog", window="none")   # switches the model
    out = model(input_ids)                                                           # linear attention
    restore_reference(model)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

EPS = 1e-6
WINDOW_FACTOR_INIT = math.log(0.1 / 0.9)  # sigmoid(.) = 0.1
GATE_DIVISOR = 16.0
GATE_MIN = -1.0
_IMPL_NAME = "transfigure_linear_reference"


def feature_map(x: torch.Tensor, kind: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x``: [B, heads, T, d] -> features [B, heads, T, d or 2d] in fp32."""
    x = x.float()
    if kind == "elu":
        return F.elu(x) + 1
    if kind == "liger":
        return torch.softmax(x, dim=-1)
    if kind == "hedgehog":
        y = torch.einsum("bhtd,hde->bhte", x, weight.float())
        return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)
    raise ValueError(f"unknown feature map {kind!r}")


def liger_gates(k: torch.Tensor) -> torch.Tensor:
    return (F.logsigmoid(k.float()) / GATE_DIVISOR).clamp_min(GATE_MIN)


def key_validity(mask: torch.Tensor | None, B: int, S: int, device) -> torch.Tensor:
    """[B, S] bool: keys that some query may attend (padding is what no query sees)."""
    if mask is None:
        return torch.ones(B, S, dtype=torch.bool, device=device)
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask.expand(B, -1, -1, -1)
    return mask.any(-2)[:, 0, :]


def linear_attention_quadratic(
    q, k, v, *, causal: bool, feature: str, window: str, q_map=None, k_map=None, window_factor=None,
    valid: torch.Tensor | None = None, scale: float | None = None, window_size: int = 64,
) -> torch.Tensor:
    """The definition above with explicit T x T matrices. q: [B,H,T,d], k/v: [B,Hk,T,d]; returns [B,H,T,dv]."""
    B, H, T, d = q.shape
    Hk = k.shape[1]
    G = H // Hk
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid
    fq = feature_map(q, feature, q_map)
    fk = feature_map(k, feature, k_map).repeat_interleave(G, 1)
    kk = k.float().repeat_interleave(G, 1)
    vv = v.float().repeat_interleave(G, 1)
    i = torch.arange(T, device=q.device)
    allowed = valid[:, None, None, :].expand(B, 1, T, T)
    if causal:
        allowed = allowed & (i[None, :] <= i[:, None])
    if feature == "liger":
        g = liger_gates(k).masked_fill(~valid[:, None, :, None], 0.0).repeat_interleave(G, 1)
        Bc = g.cumsum(2)
        decay = (Bc[:, :, :, None, :] - Bc[:, :, None, :, :]).clamp_max(0.0).exp()  # only j <= i is used
        L = torch.einsum("bhid,bhjd,bhijd->bhij", fq, fk, decay)
    else:
        L = fq @ fk.transpose(-1, -2)
    s = scale * (q.float() @ kk.transpose(-1, -2))
    if window == "none" or not causal:
        L = L * allowed
        return ((L @ vv) / (L.sum(-1, keepdim=True) + EPS)).to(q.dtype)
    if window == "lolcats":
        blk = i // window_size
        in_win = (blk[None, :] >= blk[:, None] - 1) & allowed
        in_lin = (blk[None, :] < blk[:, None] - 1) & allowed
        s = s.masked_fill(~in_win, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        f = torch.sigmoid(window_factor.float())[None, :, None, None]
        a = f * (s - m).exp()
        L = L * in_lin
        return ((a @ vv + L @ vv) / (a.sum(-1, keepdim=True) + L.sum(-1, keepdim=True) + EPS)).to(q.dtype)
    if window == "liger":
        band = allowed & (i[:, None] - i[None, :] < window_size)
        s = s.masked_fill(~band, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        L = L * allowed
        lin = (L @ vv) / (L.sum(-1, keepdim=True) + EPS)
        return (0.5 * (p @ vv) + 0.5 * lin).to(q.dtype)
    raise ValueError(f"unknown window {window!r}")


def init_params(feature: str, window: str, H: int, Hk: int, d: int, device=None) -> dict[str, torch.Tensor]:
    """Fresh per-layer parameters: identity feature maps, window factor at sigmoid = 0.1."""
    params: dict[str, torch.Tensor] = {}
    if feature == "hedgehog":
        params["q_map"] = torch.eye(d, device=device).repeat(H, 1, 1)
        params["k_map"] = torch.eye(d, device=device).repeat(Hk, 1, 1)
    if window == "lolcats":
        params["window_factor"] = torch.full((H,), WINDOW_FACTOR_INIT, device=device)
    return params


def attention_layers(model: torch.nn.Module, layers: tuple[int, ...] = ()) -> dict[str, torch.nn.Module]:
    """Attention modules (those with ``num_key_value_groups`` or ``attention_head_size``/``head_dim``) by FQN."""
    from transfigure.compiler.graph import layer_index

    found = {}
    for name, module in model.named_modules():
        cls = type(module).__name__
        if not (cls.endswith("Attention") and hasattr(module, "is_causal")):
            continue
        index = layer_index(name)
        if layers and index not in layers:
            continue
        found[name] = module
    return found


class _Config:
    def __init__(self, feature, window, params, window_size, hook=None):
        self.feature, self.window, self.params, self.window_size, self.hook = feature, window, params, window_size, hook


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    cfg: _Config | None = getattr(module, "_transfigure_linear_reference", None)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cfg is None:  # layer not selected: stock attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    B, _, T, _ = query.shape
    valid = key_validity(attention_mask, B, key.shape[2], query.device)
    p = cfg.params
    out = linear_attention_quadratic(
        query, key, value, causal=causal,
        feature=cfg.feature, window=cfg.window, q_map=p.get("q_map"), k_map=p.get("k_map"),
        window_factor=p.get("window_factor"), valid=valid, scale=scaling, window_size=cfg.window_size,
    )
    if cfg.hook is not None:
        cfg.hook(module, query, key, value, attention_mask, scaling, out)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(_IMPL_NAME, _attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_IMPL_NAME, sdpa_mask)


def linearize_reference(
    model: torch.nn.Module,
    feature_map: str = "hedgehog",
    window: str = "none",
    layers: tuple[int, ...] = (),
    window_size: int = 64,
    state: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Switch ``model``'s attention to the reference linear attention. Returns the flat parameter dict
    (``"<attention fqn>.q_map"`` ...), taken from ``state`` where given, else freshly initialized."""
    _register()
    flat: dict[str, torch.Tensor] = {}
    for fqn, module in attention_layers(model, layers).items():
        H, Hk, d = _head_counts(module)
        params = init_params(feature_map, window, H, Hk, d)
        for name in list(params):
            if state is not None and f"{fqn}.{name}" in state:
                params[name] = state[f"{fqn}.{name}"]
            flat[f"{fqn}.{name}"] = params[name]
        module._transfigure_linear_reference = _Config(feature_map, window, params, window_size)
    _set_impl(model, _IMPL_NAME)
    return flat


def restore_reference(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "_transfigure_linear_reference"):
            del module._transfigure_linear_reference
    _set_impl(model, "sdpa")


def _set_impl(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except Exception:
        model.config._attn_implementation = name


def _head_counts(module) -> tuple[int, int, int]:
    cfg = getattr(module, "config", None)
    H = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None) or getattr(cfg, "num_attention_heads", None)
    d = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    if d is None and cfg is not None:
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    groups = getattr(module, "num_key_value_groups", 1)
    return int(H), int(H) // int(groups), int(d)


__all__: list[Any] = [
    "attention_layers",
    "feature_map",
    "init_params",
    "key_validity",
    "linear_attention_quadratic",
    "linearize_reference",
    "restore_reference",
]
