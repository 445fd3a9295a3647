"""Thresholded sparse GEMV over LUT-quantized weights: ``y = s(x) @ W^T + b``, ``W`` = table[codes] * scales.

The LUT format (:mod:`transfigure.kernels.lut_format`) packs the codes of one *output row* along K, so a
zero activation ``x[k]`` cannot skip anything there: one int32 word holds the codes of 8 (4-bit) consecutive
inputs. For activation sparsity the codes are repacked once, at compile time, *column-major*:

* ``codes_t``: int32 ``[K_pad, N_pad * w / 32]``; row ``k`` holds the ``w``-bit codes of input ``k`` for
  every output ``n`` (word ``j`` holds outputs ``j * (32 // w) + t`` at bits ``[t * w, (t + 1) * w)``,
  the same little-end-first packing as the row-major format, along N instead of K);
* ``scales_t``: fp16 ``[K_pad / group_size, N]`` (the group scales transposed).

A zero ``x[k]`` (after thresholding) now skips one contiguous row of ``N * w / 8`` bytes. Per program: load
and threshold a ``[BLOCK_M, BLOCK_K]`` tile of ``x``; load the ``[BLOCK_K, BLOCK_N]`` codes with the
row-keep mask (words are fetched once per 32 / w lanes, the duplicates coalesce); unpack with a shift and a
mask; look the codes up in the table (``tl.load(table + code)``: a 16-entry array that stays in L1);
multiply-accumulate; scale by the group's scales (``BLOCK_K`` divides ``group_size``, so one scale per
output per K block). Single-plane code widths (1, 2, 4 bits, ``p = 1``) and no rotation are supported: with a
Hadamard rotation the rotated activation is dense and there is nothing to skip.

The op :func:`sparse_lut_linear` also receives the row-major codes: above :data:`MAX_SPARSE_TOKENS`
tokens it runs the plain path (threshold kernel + ``transfigure::lut_linear``) on them.
"""

from __future__ import annotations

import torch

from .autotune import Autotuner, Config
from .lut_format import PLANES, dequantize_parts, pack_codes, unpack_codes
from .registry import define_op, interpreter_mode, triton_available
from .sparse_gemv import MAX_SPARSE_TOKENS, _masked_input_grads, _tokens
from .threshold import sparsify_reference, sparsify_triton


def supports(bits: int, p: int) -> bool:
    """Whether the sparse LUT kernel handles this code format (single bit-plane, scalar codes)."""
    return p == 1 and bits in PLANES and len(PLANES[bits]) == 1


def repack_column_major(codes: torch.Tensor, scales: torch.Tensor, bits: int, p: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major LUT codes ``[N, words]`` + scales ``[N, groups]`` -> ``(codes_t, scales_t)`` (see module doc)."""
    if not supports(bits, p):
        raise ValueError(f"sparse LUT GEMV supports p=1 and bits in {[b for b in PLANES if supports(b, 1)]}, got bits={bits}, p={p}")
    n = scales.shape[0]
    k_pad = codes.shape[1] * 32 // bits
    idx = unpack_codes(codes, bits, k_pad)  # [N, K_pad] int64
    n_pad = -(-n // 32) * 32
    idx_t = torch.zeros(k_pad, n_pad, dtype=torch.int64, device=codes.device)
    idx_t[:, :n] = idx.t()
    return pack_codes(idx_t, bits), scales.t().contiguous()


def unpack_column_major(codes_t: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of the code half of :func:`repack_column_major`: int64 ``[N, K_pad]``."""
    n_pad = codes_t.shape[1] * 32 // bits
    return unpack_codes(codes_t, bits, n_pad)[:, :n].t()


def _dense_weight(codes_t, scales_t, table, bits, group_size, in_features) -> torch.Tensor:
    n = scales_t.shape[1]
    idx = unpack_column_major(codes_t, bits, n)  # [N, K_pad]
    vals = table.to(torch.float32)[idx, 0]
    w = vals * scales_t.to(torch.float32).t().repeat_interleave(group_size, dim=1)
    return w[:, :in_features]


def sparse_lut_linear_reference(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None,
    codes_t: torch.Tensor, scales_t: torch.Tensor, bits: int, group_size: int, in_features: int, threshold: float,
    sparse_prefill: bool = True,
) -> torch.Tensor:
    """``s(x) @ W^T + b`` with ``W`` dequantized from the row-major codes (the column-major copy must agree)."""
    if sparse_prefill or _tokens(x) <= MAX_SPARSE_TOKENS:
        x = sparsify_reference(x, threshold)
    w = dequantize_parts(codes, scales, table, None, bits, 1, group_size, 0, in_features, "original")
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


if triton_available():
    import triton
    import triton.language as tl

    from .lut_gemm import _store_tile_counted
    from .sparse_gemv import _outputs, _thresholded_tile

    @triton.jit
    def _sparse_lut_gemv_kernel(
        x_ptr, c_ptr, s_ptr, t_ptr, b_ptr, y_ptr, work_ptr, count_ptr,
        M, N, K, stride_xm, stride_c, stride_s, threshold, k_per_split,
        W: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
        USE_DOT: tl.constexpr, EVICT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        PER: tl.constexpr = 32 // W
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        word = offs_n // PER
        shift = (offs_n % PER) * W
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_begin = pid_k * k_per_split
        for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x, row_keep = _thresholded_tile(x_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, threshold)
            c_ptrs = c_ptr + offs_k[:, None] * stride_c + word[None, :]
            c_mask = row_keep[:, None] & n_mask[None, :]
            if EVICT:
                words = tl.load(c_ptrs, mask=c_mask, other=0, eviction_policy="evict_first")
            else:
                words = tl.load(c_ptrs, mask=c_mask, other=0)
            codes = (words >> shift[None, :]) & ((1 << W) - 1)
            w = tl.load(t_ptr + codes)  # [BLOCK_K, BLOCK_N] fp32 table values
            if USE_DOT:
                part = tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
            else:
                part = tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
            group_row = tl.minimum(k0, K - 1) // GROUP  # a block past K (last split) reads a valid row; part is 0
            scale = tl.load(s_ptr + group_row * stride_s + offs_n, mask=n_mask, other=0.0)
            acc += part * scale.to(tl.float32)[None, :]
        _store_tile_counted(y_ptr, b_ptr, work_ptr, count_ptr, acc, offs_m, offs_n, m_mask, n_mask, M, N, pid_n, pid_k,
                            BLOCK_M, BLOCK_N, SPLIT_K, HAS_BIAS)

    def _launch(config: Config, x2, codes_t, scales_t, table, bias, bits, group_size, threshold):
        M, K = x2.shape
        N = scales_t.shape[1]
        block_m = 1 if M == 1 else 16
        block_n, block_k, split = config.meta["BLOCK_N"], config.meta["BLOCK_K"], config.meta["SPLIT_K"]
        block_k = min(block_k, group_size)
        k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
        grid = (triton.cdiv(N, block_n), triton.cdiv(K, k_per_split))
        y, work, counts = _outputs(x2, N, grid[0], grid[1])
        _sparse_lut_gemv_kernel[grid](
            x2, codes_t, scales_t, table, bias if bias is not None else scales_t, y, work, counts,
            M, N, K, x2.stride(0), codes_t.stride(0), scales_t.stride(0), float(threshold), k_per_split,
            W=bits, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=grid[1], USE_DOT=block_m > 1,
            EVICT=not interpreter_mode(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return y

    def _configs() -> list[Config]:
        configs = [Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=2, num_stages=1)]
        for block_n, block_k, warps in ((64, 64, 2), (128, 32, 4), (128, 64, 4), (256, 32, 4), (256, 64, 8), (512, 32, 8)):
            for split in (1, 4, 8, 16, 32):
                configs.append(Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split}, warps, 3))
        return configs

    def _prune(configs, args):
        x2, group_size = args[0], args[6]
        K = x2.shape[1]
        kept = [c for c in configs if c.meta["BLOCK_K"] <= group_size and c.meta["SPLIT_K"] * c.meta["BLOCK_K"] <= max(K, c.meta["BLOCK_K"])]
        return kept or configs[:1]

    _tuner = Autotuner(
        "sparse_lut_gemv",
        _configs(),
        key=lambda x2, ct, st, t, b, bits, g, th: (str(x2.dtype), 1 if x2.shape[0] == 1 else 8, st.shape[1], x2.shape[1], bits, g, b is not None),
        launch=_launch,
        prune=_prune,
    )


    def sparse_lut_gemv_triton(x, codes_t, scales_t, table, bias, bits: int, group_size: int, in_features: int,
                               threshold: float) -> torch.Tensor:
        """The Triton sparse LUT GEMV alone (at most 16 tokens; CUDA or interpreter tensors)."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.shape[0] > 16:
            raise ValueError(f"sparse_lut_gemv: at most 16 tokens, got {x2.shape[0]}")
        if x2.shape[1] != in_features:
            raise ValueError(f"sparse_lut_gemv: x has {x2.shape[1]} features, the weight {in_features}")
        n = scales_t.shape[1]
        if x2.shape[0] == 0:
            return x.new_empty((*x.shape[:-1], n))
        table = table.reshape(-1).to(torch.float32).contiguous()
        y = _tuner(x2, codes_t, scales_t, table, bias, bits, group_size, threshold)
        return y.reshape(*x.shape[:-1], n)

    def _sparse_lut_linear_cuda(x, codes, scales, table, bias, codes_t, scales_t, bits, group_size, in_features,
                                threshold, sparse_prefill=True):
        if _tokens(x) <= MAX_SPARSE_TOKENS:
            return sparse_lut_gemv_triton(x, codes_t, scales_t, table, bias, bits, group_size, in_features, threshold)
        if sparse_prefill:
            x = sparsify_triton(x, threshold)
        from . import lut_gemm  # noqa: F401  (registers transfigure::lut_linear)

        return torch.ops.transfigure.lut_linear(x, codes, scales, table, None, bias, bits, 1, group_size, 0, in_features)

else:  # pragma: no cover
    sparse_lut_gemv_triton = None
    _sparse_lut_linear_cuda = None


def _fake(x, codes, scales, table, bias, codes_t, scales_t, bits, group_size, in_features, threshold, sparse_prefill=True):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, scales, table, bias, codes_t, scales_t, bits, group_size, in_features, threshold, *rest = inputs
    ctx.save_for_backward(x, codes, scales, table)
    ctx.meta = (bits, group_size, in_features, threshold, rest[0] if rest else True)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Gradient for the input (masked like the forward's threshold) and the bias; the codes are constants
    (QLoRA-style training: adapters beside the quantized, sparsified linear get theirs through their own ops)."""
    x, codes, scales, table = ctx.saved_tensors
    bits, group_size, in_features, threshold, sparse_prefill = ctx.meta
    w = dequantize_parts(codes, scales, table, None, bits, 1, group_size, 0, in_features, "original")
    grad_x, grad_b = _masked_input_grads(grad, (grad.to(torch.float32) @ w).to(x.dtype), x, threshold, sparse_prefill,
                                         ctx.has_bias)
    return (grad_x, None, None, None, grad_b, None, None, None, None, None, None, None)


sparse_lut_linear = define_op("sparse_lut_linear", sparse_lut_linear_reference, cuda=_sparse_lut_linear_cuda,
                              fake=_fake, backward=_backward, setup_context=_setup_context)
