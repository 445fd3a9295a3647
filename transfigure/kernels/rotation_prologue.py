"""The elementwise work before a rotated LUT linear, folded into its input rotation: one launch fewer each.

A Hadamard-rotated LUT linear (:mod:`.lut_gemm`, :mod:`.rotated_sparse_lut`) rotates its input ``x`` before the
GEMV, in a launch of its own at decode (one token), and the kernel Inductor generated for ``x`` ran just before
it. Two producers of ``x`` in Llama-family blocks are cheap enough to compute inside the rotation's programs:

* residual add + RMSNorm (``LlamaRMSNorm`` and its copies in Qwen, Mistral, ...), feeding q/k/v and gate/up:

      h = round(r + d),   x = round(w * round(h * rsqrt(mean(h^2) + eps)))

  ``h`` (the residual stream) is also written, for the next add. Each program computes the row's mean square
  itself (a few KB, read from L2 by every program);
* the SwiGLU product feeding the down projection: ``x = round(round(silu(g)) * u)``.

(``round`` = to the activation dtype, where transformers' eager modules round.) Then the program rotates its
Hadamard block (``z = H_h D x / sqrt(h_size)``, the FWHT's one-rounding two-factor form) and either stores ``z``
for the dense LUT GEMV or compacts the surviving entries for the rotated-sparsity GEMV
(``rotated_sparse_lut._compact_slice``). On the 1B Llama decode step the two remove 47 of ~280 launches.

``add_rmsnorm_reference`` / ``silu_mul_reference`` are the math above in torch (the CPU path, the path above
one token, the test oracles).
"""

from __future__ import annotations

import math

import torch

from .lut_gemm import lut_linear_reference, lut_linear_triton
from .registry import define_op, triton_available
from .rotated_sparse_lut import fuses_rotation, rotated_sparse_lut_linear_reference
from .sparse_gemv import _tokens

MAX_ROW_CHUNK = 8192
"""Widest chunk of the row the norm kernel loads at once for its mean square (wider rows take several)."""


def add_rmsnorm_reference(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, h)``: ``h = residual + delta`` and ``x = weight * RMSNorm(h)``, rounded where transformers' eager
    Llama-family modules round (``h`` and ``h * rsqrt(.)`` to the activation dtype, the product by ``weight``
    in the weight's dtype promotion)."""
    h = residual + delta
    hf = h.to(torch.float32)
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * normed, h


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as transformers' eager SwiGLU MLP computes it (two roundings)."""
    return torch.nn.functional.silu(gate) * up


add_rmsnorm_rotate = silu_mul_rotate = None
"""``add_rmsnorm_rotate(residual, delta, weight, eps, signs, hadamard_size, kp, tau=None, group_size=0)`` ->
``(z [1, kp], h)`` or, with ``tau``, ``((values, indices, counts), h)``; ``silu_mul_rotate(gate, up, signs,
hadamard_size, kp, tau=None, group_size=0)`` -> ``z`` or ``(values, indices, counts)``: one token; None without
Triton."""

if triton_available():
    import triton
    import triton.language as tl

    from .fwht import _hadamard, _kron_rotate, _split
    from .rotated_sparse_lut import _compact_slice, rotated_sparse_gemv

    @triton.jit
    def _rotate_tail(x, pid, block, inner, s_ptr, z_ptr, vals_ptr, idx_ptr, count_ptr, scale, tau2,
                     A: tl.constexpr, B: tl.constexpr, LOG_A: tl.constexpr, LOG_B: tl.constexpr, G: tl.constexpr,
                     HAS_SIGNS: tl.constexpr, LOWP: tl.constexpr, COMPACT: tl.constexpr):
        """Signs, rotation (``_kron_rotate``, one rounding, as ``_fwht_kron_kernel``) of the block ``x [A, B]``,
        then the compaction (COMPACT) or the store of ``z``."""
        if HAS_SIGNS:
            x = x * tl.load(s_ptr + block + inner).to(x.dtype)
        hb = _hadamard(B, LOG_B)
        ha = _hadamard(A, LOG_A)
        y = _kron_rotate(x, ha, hb, LOWP, False)
        z = (y * scale).to(x.dtype)
        if COMPACT:
            _compact_slice(tl.reshape(z.to(tl.float32), [A * B]), block + tl.arange(0, A * B), pid, vals_ptr,
                           idx_ptr, count_ptr, tau2, A * B, A * B, G)
        else:
            tl.store(z_ptr + block + inner, z)

    @triton.jit
    def _add_rmsnorm_rotate_kernel(r_ptr, d_ptr, w_ptr, s_ptr, h_ptr, z_ptr, vals_ptr, idx_ptr, count_ptr,
                                   in_features, eps, scale, tau2, A: tl.constexpr, B: tl.constexpr,
                                   LOG_A: tl.constexpr, LOG_B: tl.constexpr, G: tl.constexpr,
                                   HAS_SIGNS: tl.constexpr, LOWP: tl.constexpr, COMPACT: tl.constexpr,
                                   ROW: tl.constexpr):
        """Program ``pid``: Hadamard block ``pid`` of one token. The row's sum of squares of ``h = r + d`` (as
        rounded to the activation dtype) over ``ROW``-wide chunks (one for rows up to 8192: the loads go out
        together), then the block's norm, its ``h`` store and ``_rotate_tail``. Inputs past ``in_features`` are
        the zero padding."""
        pid = tl.program_id(0)
        chunk = tl.arange(0, ROW)
        sum_sq = tl.zeros([ROW], dtype=tl.float32)
        for start in range(0, in_features, ROW):
            offs = start + chunk
            inside = offs < in_features
            r = tl.load(r_ptr + offs, mask=inside, other=0.0)
            h = (r.to(tl.float32) + tl.load(d_ptr + offs, mask=inside, other=0.0).to(tl.float32)).to(r.dtype)
            hf = h.to(tl.float32)
            sum_sq += hf * hf
        rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / in_features + eps)
        block = pid * (A * B)
        inner = tl.arange(0, A)[:, None] * B + tl.arange(0, B)[None, :]
        inside = (block + inner) < in_features
        r = tl.load(r_ptr + block + inner, mask=inside, other=0.0)
        h = (r.to(tl.float32) + tl.load(d_ptr + block + inner, mask=inside, other=0.0).to(tl.float32)).to(r.dtype)
        tl.store(h_ptr + block + inner, h, mask=inside)
        normed = (h.to(tl.float32) * rstd).to(r.dtype)
        x = (tl.load(w_ptr + block + inner, mask=inside, other=0.0).to(tl.float32) * normed.to(tl.float32)).to(r.dtype)
        _rotate_tail(x, pid, block, inner, s_ptr, z_ptr, vals_ptr, idx_ptr, count_ptr, scale, tau2, A, B, LOG_A,
                     LOG_B, G, HAS_SIGNS, LOWP, COMPACT)

    @triton.jit
    def _silu_mul_rotate_kernel(g_ptr, u_ptr, s_ptr, z_ptr, vals_ptr, idx_ptr, count_ptr, in_features, scale, tau2,
                                A: tl.constexpr, B: tl.constexpr, LOG_A: tl.constexpr, LOG_B: tl.constexpr,
                                G: tl.constexpr, HAS_SIGNS: tl.constexpr, LOWP: tl.constexpr,
                                COMPACT: tl.constexpr):
        """Program ``pid``: ``x = round(round(silu(g)) * u)`` on Hadamard block ``pid``, then ``_rotate_tail``."""
        pid = tl.program_id(0)
        block = pid * (A * B)
        inner = tl.arange(0, A)[:, None] * B + tl.arange(0, B)[None, :]
        inside = (block + inner) < in_features
        g = tl.load(g_ptr + block + inner, mask=inside, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        x = (act.to(tl.float32) * tl.load(u_ptr + block + inner, mask=inside, other=0.0).to(tl.float32)).to(g.dtype)
        _rotate_tail(x, pid, block, inner, s_ptr, z_ptr, vals_ptr, idx_ptr, count_ptr, scale, tau2, A, B, LOG_A,
                     LOG_B, G, HAS_SIGNS, LOWP, COMPACT)

    def _outputs(kp: int, like: torch.Tensor, tau: float | None, group_size: int):
        """(z, vals, idx, counts) buffers: the compaction's three, or ``z`` alone (the others alias it)."""
        if tau is not None:
            vals = torch.empty(kp, dtype=torch.float32, device=like.device)
            idx = torch.empty(kp, dtype=torch.int32, device=like.device)
            counts = torch.empty(kp // group_size, dtype=torch.int32, device=like.device)
            return vals, vals, idx, counts
        z = torch.empty(1, kp, dtype=like.dtype, device=like.device)
        return z, z, z, z

    def _rotation_meta(hadamard_size: int, group_size: int, signs, like: torch.Tensor, tau) -> dict:
        a, b = _split(hadamard_size)
        return dict(A=a, B=b, LOG_A=int(math.log2(a)), LOG_B=int(math.log2(b)), G=group_size or hadamard_size,
                    HAS_SIGNS=signs is not None, LOWP=like.dtype in (torch.float16, torch.bfloat16),
                    COMPACT=tau is not None, num_warps=4, num_stages=1)

    def _check_format(who: str, in_features: int, hadamard_size: int, group_size: int, kp: int) -> None:
        if kp % hadamard_size or in_features > kp or not fuses_rotation(hadamard_size,
                                                                         group_size or hadamard_size):
            raise ValueError(f"{who}: no fused kernel for hadamard_size={hadamard_size}, group_size={group_size}, "
                             f"{in_features} features padded to {kp}")

    def add_rmsnorm_rotate(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                           signs: torch.Tensor | None, hadamard_size: int, kp: int, tau: float | None = None,
                           group_size: int = 0):
        in_features = residual.shape[-1]
        if residual.numel() != in_features or delta.shape != residual.shape or weight.numel() != in_features:
            raise ValueError(f"add_rmsnorm_rotate: one token of {in_features} features expected, got residual "
                             f"{tuple(residual.shape)}, delta {tuple(delta.shape)}, weight {tuple(weight.shape)}")
        _check_format("add_rmsnorm_rotate", in_features, hadamard_size, group_size, kp)
        residual, delta, weight = residual.contiguous(), delta.contiguous(), weight.contiguous()
        if signs is not None:
            signs = signs.to(device=residual.device, dtype=torch.float32).contiguous()
        h = torch.empty_like(residual)
        z, vals, idx, counts = _outputs(kp, residual, tau, group_size)
        _add_rmsnorm_rotate_kernel[(kp // hadamard_size,)](
            residual, delta, weight, signs if signs is not None else residual, h, z, vals, idx, counts, in_features,
            float(eps), 1.0 / math.sqrt(hadamard_size), float(tau or 0.0) ** 2,
            ROW=min(triton.next_power_of_2(in_features), MAX_ROW_CHUNK),
            **_rotation_meta(hadamard_size, group_size, signs, residual, tau))
        return ((vals, idx, counts) if tau is not None else z), h

    def silu_mul_rotate(gate: torch.Tensor, up: torch.Tensor, signs: torch.Tensor | None, hadamard_size: int,
                        kp: int, tau: float | None = None, group_size: int = 0):
        in_features = gate.shape[-1]
        if gate.numel() != in_features or up.shape != gate.shape:
            raise ValueError(f"silu_mul_rotate: one token of {in_features} features expected, got gate "
                             f"{tuple(gate.shape)}, up {tuple(up.shape)}")
        _check_format("silu_mul_rotate", in_features, hadamard_size, group_size, kp)
        gate, up = gate.contiguous(), up.contiguous()
        if signs is not None:
            signs = signs.to(device=gate.device, dtype=torch.float32).contiguous()
        z, vals, idx, counts = _outputs(kp, gate, tau, group_size)
        _silu_mul_rotate_kernel[(kp // hadamard_size,)](
            gate, up, signs if signs is not None else gate, z, vals, idx, counts, in_features,
            1.0 / math.sqrt(hadamard_size), float(tau or 0.0) ** 2,
            **_rotation_meta(hadamard_size, group_size, signs, gate, tau))
        return (vals, idx, counts) if tau is not None else z


def rmsnorm_lut_linear_reference(
    residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, codes: torch.Tensor,
    scales: torch.Tensor, table: torch.Tensor, signs: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
    p: int, group_size: int, hadamard_size: int, in_features: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lut_linear(weight * RMSNorm(residual + delta)), residual + delta)``."""
    x, h = add_rmsnorm_reference(residual, delta, norm_weight, eps)
    return lut_linear_reference(x, codes, scales, table, signs, bias, bits, p, group_size, hadamard_size,
                                in_features), h


def rmsnorm_rotated_sparse_lut_linear_reference(
    residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, codes: torch.Tensor,
    scales: torch.Tensor, table: torch.Tensor, signs: torch.Tensor | None, bias: torch.Tensor | None,
    codes_tm: torch.Tensor, scales_tm: torch.Tensor, bits: int, group_size: int, hadamard_size: int,
    in_features: int, tau: float, sparse_prefill: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rotated_sparse_lut_linear(weight * RMSNorm(residual + delta)), residual + delta)``."""
    x, h = add_rmsnorm_reference(residual, delta, norm_weight, eps)
    return rotated_sparse_lut_linear_reference(x, codes, scales, table, signs, bias, codes_tm, scales_tm, bits,
                                               group_size, hadamard_size, in_features, tau, sparse_prefill), h


def _rmsnorm_lut_linear_cuda(residual, delta, norm_weight, eps, codes, scales, table, signs, bias, bits, p,
                             group_size, hadamard_size, in_features):
    kp = scales.shape[1] * group_size
    if (_tokens(residual) == 1 and fuses_rotation(hadamard_size, hadamard_size)
            and norm_weight.dtype == residual.dtype):
        z, h = add_rmsnorm_rotate(residual.reshape(-1), delta.reshape(-1), norm_weight, eps, signs, hadamard_size,
                                  kp)
        y = lut_linear_triton(z, codes, scales, table, None, bias, bits, p, group_size, 0, kp)
        return y.reshape(*residual.shape[:-1], scales.shape[0]), h.reshape(residual.shape)
    x, h = add_rmsnorm_reference(residual, delta, norm_weight, eps)
    return torch.ops.transfigure.lut_linear(x, codes, scales, table, signs, bias, bits, p, group_size,
                                            hadamard_size, in_features), h


def _rmsnorm_rotated_sparse_cuda(residual, delta, norm_weight, eps, codes, scales, table, signs, bias, codes_tm,
                                 scales_tm, bits, group_size, hadamard_size, in_features, tau, sparse_prefill=True):
    kp = scales.shape[1] * group_size
    if (_tokens(residual) == 1 and fuses_rotation(hadamard_size, group_size)
            and norm_weight.dtype == residual.dtype):
        (vals, idx, counts), h = add_rmsnorm_rotate(residual.reshape(-1), delta.reshape(-1), norm_weight, eps,
                                                    signs, hadamard_size, kp, tau=tau, group_size=group_size)
        y = rotated_sparse_gemv(vals, idx, counts, codes_tm, scales_tm, table, bias, group_size, residual.dtype,
                                scales.shape[0])
        return y.reshape(*residual.shape[:-1], scales.shape[0]), h.reshape(residual.shape)
    x, h = add_rmsnorm_reference(residual, delta, norm_weight, eps)
    return torch.ops.transfigure.rotated_sparse_lut_linear(x, codes, scales, table, signs, bias, codes_tm, scales_tm,
                                                           bits, group_size, hadamard_size, in_features, tau,
                                                           sparse_prefill), h


def silu_mul_lut_linear_reference(
    gate: torch.Tensor, up: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
    signs: torch.Tensor | None, bias: torch.Tensor | None, bits: int, p: int, group_size: int, hadamard_size: int,
    in_features: int,
) -> torch.Tensor:
    """``lut_linear(silu(gate) * up)``."""
    return lut_linear_reference(silu_mul_reference(gate, up), codes, scales, table, signs, bias, bits, p,
                                group_size, hadamard_size, in_features)


def silu_mul_rotated_sparse_lut_linear_reference(
    gate: torch.Tensor, up: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
    signs: torch.Tensor | None, bias: torch.Tensor | None, codes_tm: torch.Tensor, scales_tm: torch.Tensor,
    bits: int, group_size: int, hadamard_size: int, in_features: int, tau: float, sparse_prefill: bool = True,
) -> torch.Tensor:
    """``rotated_sparse_lut_linear(silu(gate) * up)``."""
    return rotated_sparse_lut_linear_reference(silu_mul_reference(gate, up), codes, scales, table, signs, bias,
                                               codes_tm, scales_tm, bits, group_size, hadamard_size, in_features,
                                               tau, sparse_prefill)


def _silu_mul_lut_linear_cuda(gate, up, codes, scales, table, signs, bias, bits, p, group_size, hadamard_size,
                              in_features):
    kp = scales.shape[1] * group_size
    if _tokens(gate) == 1 and fuses_rotation(hadamard_size, hadamard_size) and gate.shape == up.shape:
        z = silu_mul_rotate(gate.reshape(-1), up.reshape(-1), signs, hadamard_size, kp)
        y = lut_linear_triton(z, codes, scales, table, None, bias, bits, p, group_size, 0, kp)
        return y.reshape(*gate.shape[:-1], scales.shape[0])
    return torch.ops.transfigure.lut_linear(silu_mul_reference(gate, up), codes, scales, table, signs, bias, bits,
                                            p, group_size, hadamard_size, in_features)


def _silu_mul_rotated_sparse_cuda(gate, up, codes, scales, table, signs, bias, codes_tm, scales_tm, bits, group_size,
                                  hadamard_size, in_features, tau, sparse_prefill=True):
    kp = scales.shape[1] * group_size
    if _tokens(gate) == 1 and fuses_rotation(hadamard_size, group_size) and gate.shape == up.shape:
        vals, idx, counts = silu_mul_rotate(gate.reshape(-1), up.reshape(-1), signs, hadamard_size, kp, tau=tau,
                                            group_size=group_size)
        y = rotated_sparse_gemv(vals, idx, counts, codes_tm, scales_tm, table, bias, group_size, gate.dtype,
                                scales.shape[0])
        return y.reshape(*gate.shape[:-1], scales.shape[0])
    return torch.ops.transfigure.rotated_sparse_lut_linear(silu_mul_reference(gate, up), codes, scales, table, signs,
                                                           bias, codes_tm, scales_tm, bits, group_size, hadamard_size,
                                                           in_features, tau, sparse_prefill)


def _fake_silu(gate, up, codes, scales, *rest):
    return gate.new_empty((*gate.shape[:-1], scales.shape[0]))


def _fake_lut(residual, delta, norm_weight, eps, codes, scales, *rest):
    return residual.new_empty((*residual.shape[:-1], scales.shape[0])), torch.empty_like(residual)


# Inference ops (no autograd formula): the norm_fuse pass leaves graphs that need gradients alone.
rmsnorm_lut_linear = define_op(
    "rmsnorm_lut_linear", rmsnorm_lut_linear_reference,
    cuda=_rmsnorm_lut_linear_cuda if triton_available() else None, fake=_fake_lut)
rmsnorm_rotated_sparse_lut_linear = define_op(
    "rmsnorm_rotated_sparse_lut_linear", rmsnorm_rotated_sparse_lut_linear_reference,
    cuda=_rmsnorm_rotated_sparse_cuda if triton_available() else None, fake=_fake_lut)

silu_mul_lut_linear = define_op(
    "silu_mul_lut_linear", silu_mul_lut_linear_reference,
    cuda=_silu_mul_lut_linear_cuda if triton_available() else None, fake=_fake_silu)
silu_mul_rotated_sparse_lut_linear = define_op(
    "silu_mul_rotated_sparse_lut_linear", silu_mul_rotated_sparse_lut_linear_reference,
    cuda=_silu_mul_rotated_sparse_cuda if triton_available() else None, fake=_fake_silu)

__all__ = ["add_rmsnorm_reference", "add_rmsnorm_rotate", "rmsnorm_lut_linear",
           "rmsnorm_rotated_sparse_lut_linear", "silu_mul_reference", "silu_mul_rotate", "silu_mul_lut_linear",
           "silu_mul_rotated_sparse_lut_linear"]
