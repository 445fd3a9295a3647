"""Softmax attention over a local window: the window half of the hybrid linearized attention.

Two windows (``mode``), both causal, with queries cut into blocks of ``W = window_size`` positions:

* ``"lolcats"`` (LoLCATs' terraced window, Zhang et al. 2025): a query in block ``n`` attends to every earlier
  position of blocks ``n - 1`` and ``n``. Returns the UNNORMALIZED parts of the hybrid's shared normalizer,
  ``num_i = f_h * sum_j exp(s_ij - m_i) v_j`` and ``den_i = f_h * sum_j exp(s_ij - m_i)`` with
  ``s_ij = scale * q_i . k_j``, ``m_i`` the row maximum over the window and ``f_h = sigmoid(window_factor_h)``;
  the caller adds the linear-attention terms of older blocks and divides once.
* ``"liger"`` (Liger's sliding window, Lan et al. 2025): the last ``W`` positions (``i - W < j <= i``);
  returns the normalized softmax output as ``num`` and ones as ``den``.

``q: [B, H, T, d]``, ``k, v: [B, Hk, T, d]`` with ``H`` a multiple of ``Hk`` (grouped-query attention handled
natively: query head ``h`` reads key/value head ``h // (H // Hk)``), ``valid: [B, T]`` (padding mask of keys).
Cost O(T * W * d), against O(T^2 * d) for full softmax attention.

Reference: blockwise PyTorch (the CPU path, the oracle, and the backward, which recomputes it). Triton: one
program per (batch x head, query block); scores ``[W, 2W]`` with ``tl.dot``, masked, exponentiated against the
row maximum, and multiplied by the values with a second ``tl.dot``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .registry import define_op, triton_available

MODES = ("lolcats", "liger")


def window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    window_factor: Optional[torch.Tensor],
    window_size: int,
    scale: float,
    mode: str,
) -> list[torch.Tensor]:
    if mode not in MODES:
        raise ValueError(f"window_attention: mode must be one of {MODES}, got {mode!r}")
    B, H, T, d = q.shape
    Hk = k.shape[1]
    G = H // Hk
    W = window_size
    N = -(-T // W)
    pad = N * W - T
    qf = F.pad(q.float(), (0, 0, 0, pad)).reshape(B, Hk, G, N, W, d)
    kf = F.pad(k.float(), (0, 0, W, pad))  # one block of zeros in front: block n sees blocks n-1, n
    vf = F.pad(v.float(), (0, 0, W, pad))
    validf = F.pad(valid, (W, pad))
    kw = torch.cat([kf[:, :, : N * W].reshape(B, Hk, N, W, d), kf[:, :, W:].reshape(B, Hk, N, W, d)], 3)
    vw = torch.cat([vf[:, :, : N * W].reshape(B, Hk, N, W, -1), vf[:, :, W:].reshape(B, Hk, N, W, -1)], 3)
    okw = torch.cat([validf[:, : N * W].reshape(B, N, W), validf[:, W:].reshape(B, N, W)], 2)  # [B, N, 2W]
    qi = torch.arange(W, device=q.device)[:, None] + W  # position inside the 2W span
    kj = torch.arange(2 * W, device=q.device)[None, :]
    allowed = kj <= qi
    if mode == "liger":
        allowed = allowed & (qi - kj < W)
    block = torch.arange(N, device=q.device)
    allowed = allowed[None] & ~((block[:, None, None] == 0) & (kj[None] < W))  # no block before the first
    allowed = allowed[None, None, None] & okw[:, None, None, :, None, :]  # [B, 1, 1, N, W, 2W]
    s = scale * torch.einsum("bhgnid,bhnjd->bhgnij", qf, kw)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = (s - m).exp()
    if mode == "liger":
        out = torch.einsum("bhgnij,bhnjv->bhgniv", a, vw) / (a.sum(-1, keepdim=True) + 1e-30)
        out = out.reshape(B, H, N * W, -1)[:, :, :T]
        return [out, torch.ones(B, H, T, 1, device=q.device)]
    f = torch.sigmoid(window_factor.float()).reshape(1, Hk, G, 1, 1, 1)
    a = f * a
    num = torch.einsum("bhgnij,bhnjv->bhgniv", a, vw).reshape(B, H, N * W, -1)[:, :, :T]
    den = a.sum(-1).reshape(B, H, N * W)[:, :, :T, None]
    return [num.contiguous(), den.contiguous()]


def _fake(q, k, v, valid, window_factor, window_size, scale, mode):
    B, H, T, _ = q.shape
    return [q.new_empty((B, H, T, v.shape[-1]), dtype=torch.float32), q.new_empty((B, H, T, 1), dtype=torch.float32)]


def triton_supported(q: torch.Tensor, v: torch.Tensor, window_size: int) -> bool:
    """The Triton kernel needs a power-of-two window of at least 16 (``tl.dot`` tiles) and head dims <= 256."""
    return (window_size >= 16 and window_size & (window_size - 1) == 0 and q.shape[-1] <= 256
            and v.shape[-1] <= 256)


window_attention_triton = None

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _window_attention_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, factor_ptr, num_ptr, den_ptr, H, G, T, D, DV,
                                 scale, W: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, LIGER: tl.constexpr,
                                 IEEE: tl.constexpr):
        pid_bh = tl.program_id(0)
        n = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        Hk = H // G
        hk = h // G
        qi = tl.arange(0, W)                      # query row inside the block
        kj = tl.arange(0, 2 * W)                  # key column inside blocks n-1, n
        rows = n * W + qi
        cols = (n - 1) * W + kj
        row_ok = rows < T
        col_ok = (cols >= 0) & (cols < T)
        col_ok = col_ok & (tl.load(valid_ptr + b * T + cols, mask=col_ok, other=0) != 0)
        dq = tl.arange(0, BD)
        dv = tl.arange(0, BDV)
        q_base = q_ptr + (pid_bh.to(tl.int64) * T) * D
        kv_head = (b * Hk + hk).to(tl.int64) * T
        q = tl.load(q_base + rows[:, None] * D + dq[None, :], mask=row_ok[:, None] & (dq[None, :] < D), other=0.0)
        k = tl.load(k_ptr + kv_head * D + cols[:, None] * D + dq[None, :], mask=col_ok[:, None] & (dq[None, :] < D),
                    other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        allowed = (kj[None, :] <= qi[:, None] + W) & col_ok[None, :]
        if LIGER:
            allowed = allowed & (qi[:, None] + W - kj[None, :] < W)
        s = tl.where(allowed, s, float("-inf"))
        m = tl.max(s, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)
        a = tl.where(allowed, tl.exp(s - m[:, None]), 0.0)
        v = tl.load(v_ptr + kv_head * DV + cols[:, None] * DV + dv[None, :], mask=col_ok[:, None] & (dv[None, :] < DV),
                    other=0.0)
        if IEEE:
            num = tl.dot(a, v, input_precision="ieee")
        else:
            num = tl.dot(a.to(v.dtype), v)
        den = tl.sum(a, axis=1)
        if LIGER:
            num = num / (den[:, None] + 1e-30)
            den = tl.full([W], 1.0, tl.float32)
        else:
            f = tl.sigmoid(tl.load(factor_ptr + h).to(tl.float32))
            num = num * f
            den = den * f
        out = pid_bh.to(tl.int64) * T + rows
        tl.store(num_ptr + out[:, None] * DV + dv[None, :], num, mask=row_ok[:, None] & (dv[None, :] < DV))
        tl.store(den_ptr + out, den, mask=row_ok)

    def window_attention_triton(q, k, v, valid, window_factor, window_size: int, scale: float, mode: str):
        """Triton path (CUDA, or CPU with TRITON_INTERPRET=1); other windows fall back to the reference."""
        if mode not in MODES:
            raise ValueError(f"window_attention: mode must be one of {MODES}, got {mode!r}")
        if not triton_supported(q, v, window_size):
            return window_attention_reference(q, k, v, valid, window_factor, window_size, scale, mode)
        B, H, T, D = q.shape
        Hk, DV = k.shape[1], v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        valid8 = valid.to(torch.int8).contiguous()
        factor = window_factor.contiguous() if window_factor is not None else valid8
        num = torch.empty(B, H, T, DV, device=q.device, dtype=torch.float32)
        den = torch.empty(B, H, T, 1, device=q.device, dtype=torch.float32)
        if B * H * T:
            grid = (B * H, triton.cdiv(T, window_size))
            _window_attention_kernel[grid](
                q, k, v, valid8, factor, num, den, H, H // Hk, T, D, DV, float(scale), W=window_size,
                BD=max(16, triton.next_power_of_2(D)), BDV=max(16, triton.next_power_of_2(DV)),
                LIGER=mode == "liger", IEEE=q.dtype == torch.float32, num_warps=4 if window_size <= 64 else 8)
        return [num, den]


def _setup_context(ctx, inputs, output):
    q, k, v, valid, window_factor, window_size, scale, mode = inputs
    ctx.save_for_backward(q, k, v, valid, window_factor)
    ctx.meta = (window_size, scale, mode)


def _backward(ctx, grads):
    """Recompute the reference under autograd (the window part is O(T * W); no second kernel needed)."""
    grad_num, grad_den = grads  # a list-returning custom op gets its output gradients as one list
    q, k, v, valid, window_factor = ctx.saved_tensors
    window_size, scale, mode = ctx.meta
    wants = ctx.needs_input_grad
    leaves = [t.detach().requires_grad_(bool(want)) if t is not None else None
              for t, want in zip((q, k, v, window_factor), (wants[0], wants[1], wants[2], wants[4]))]
    with torch.enable_grad():
        num, den = window_attention_reference(leaves[0], leaves[1], leaves[2], valid, leaves[3], window_size, scale, mode)
        inputs = [t for t in leaves if t is not None and t.requires_grad]
        # an output may not depend on any input that wants a gradient (den does not depend on v): leave it out
        pairs = [(o, g if g is not None else torch.zeros_like(o)) for o, g in ((num, grad_num), (den, grad_den))
                 if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True) \
            if inputs and pairs else [None] * len(inputs)
    by_leaf = dict(zip(map(id, inputs), grads))
    out = [by_leaf.get(id(t)) if t is not None else None for t in leaves]
    return out[0], out[1], out[2], None, out[3], None, None, None


window_attention = define_op(
    "window_attention",
    window_attention_reference,
    cuda=window_attention_triton,
    fake=_fake,
    backward=_backward,
    setup_context=_setup_context,
)
