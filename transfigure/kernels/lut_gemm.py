"""LUT GEMV / GEMM: ``y = x @ W^T + b`` where ``W`` is stored as packed codes + group scales + a lookup table.

Format and op signature: :mod:`transfigure.kernels.lut_format` (stable contract). The op

    torch.ops.transfigure.lut_linear(x, codes, scales, table, signs, bias, bits, p, group_size,
                                     hadamard_size, in_features) -> Tensor

pads ``x`` to ``K_pad`` and, when ``hadamard_size > 0``, rotates it online (``torch.ops.transfigure.fwht``),
then multiplies by the rotated quantized weight ``W_r[n, k] = table[code[n, k//p], k%p] * scale[n, k//g]``.

Reference (CPU path and oracle): dequantize to dense float32, one matmul.
"""

from __future__ import annotations

import math

import torch

from .lut_format import dequantize_parts, rotate_input
from .registry import define_op, triton_available


def lut_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    table: torch.Tensor,
    signs: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    p: int,
    group_size: int,
    hadamard_size: int,
    in_features: int,
) -> torch.Tensor:
    kp = scales.shape[1] * group_size
    w = dequantize_parts(codes, scales, table, signs, bits, p, group_size, hadamard_size, in_features, "rotated")
    xr = rotate_input(x.to(torch.float32), signs, hadamard_size, kp)
    y = xr @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def _fake(x, codes, scales, table, signs, bias, bits, p, group_size, hadamard_size, in_features):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, scales, table, signs, bias, bits, p, group_size, hadamard_size, in_features = inputs
    ctx.save_for_backward(codes, scales, table, signs)
    ctx.meta = (bits, p, group_size, hadamard_size, in_features)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    codes, scales, table, signs = ctx.saved_tensors
    bits, p, group_size, hadamard_size, in_features = ctx.meta
    w = dequantize_parts(codes, scales, table, signs, bits, p, group_size, hadamard_size, in_features, "original")
    grad_x = (grad.to(torch.float32) @ w).to(ctx.x_dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_b, None, None, None, None, None


lut_linear_triton = None  # the Triton GEMV/GEMM launcher is added in this module next

lut_linear = define_op(
    "lut_linear",
    lut_linear_reference,
    cuda=lut_linear_triton,
    fake=_fake,
    backward=_backward,
    setup_context=_setup_context,
)
