"""Thresholded sparse GEMV for decoding: ``y = s(x) @ W^T + b`` with ``s(x) = x * 1[|x| > t]`` (TEAL).

At decode time a projection reads its whole weight matrix to produce a handful of output rows, so its cost
is the weight bytes moved. When an activation ``x[k]`` is zero, column ``k`` of ``W`` (the ``k``-th row of
``W^T``) contributes nothing and need not be read at all. The kernel therefore stores the weight
*column-major*, as ``weight_t = W^T`` of shape ``[K, N]`` row-major, so that one input feature's weights
are one contiguous row, and each program:

1. loads a ``[BLOCK_M, BLOCK_K]`` tile of ``x`` and thresholds it in registers (no separate pass over x);
2. keeps row ``k`` of ``weight_t`` when *any* of the ``M <= 8`` tokens survives at ``k`` and loads the
   ``[BLOCK_K, BLOCK_N]`` weight tile with that row mask, so masked rows cause no memory traffic;
3. accumulates in fp32 (an outer-product sum for ``M == 1``, ``tl.dot`` over a 16-row tile otherwise) and
   either stores (``SPLIT_K == 1``) or atomically adds its split-K partial into an fp32 buffer.

With per-token sparsity ``p`` and ``M`` independent tokens the fraction of rows read is ``1 - p^M``, so the kernel pays off for very few tokens; :func:`sparse_linear` (the op the
``sparsity`` pass inserts) checks the token count *inside* the op and above :data:`MAX_SPARSE_TOKENS`
runs the plain path: the existing ``transfigure.sparsify`` threshold kernel followed by cuBLAS (or, with
``sparse_prefill=False``, cuBLAS on the unthresholded input, which is TEAL's decode-only setting).
The shape check is one Python comparison on the host, so it costs nothing on the GPU and no graph break.

Reference: J. Liu et al., "Training-Free Activation Sparsity in Large Language Models" (TEAL, ICLR 2025),
whose kernel is fp16 only; this one runs in bf16 and fp16 (fp32 in the interpreter for tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .autotune import Autotuner, Config
from .registry import define_op, interpreter_mode, triton_available
from .threshold import _backward as _sparsify_backward
from .threshold import _setup_context as _sparsify_setup
from .threshold import sparsify_reference, sparsify_triton

MAX_SPARSE_TOKENS = 8
"""Token counts up to this run the sparse GEMV; above it the plain (threshold + dense matmul) path."""


def _tokens(x: torch.Tensor) -> int:
    k = x.shape[-1]
    return x.numel() // k if k else 0


def _uses_sparse_kernel(x: torch.Tensor, sparse_prefill: bool) -> bool:
    del sparse_prefill
    return _tokens(x) <= MAX_SPARSE_TOKENS


def sparse_linear_reference(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float, sparse_prefill: bool = True
) -> torch.Tensor:
    """``s(x) @ weight_t + bias``; with ``sparse_prefill=False`` inputs of more than 8 tokens are not thresholded."""
    if sparse_prefill or _tokens(x) <= MAX_SPARSE_TOKENS:
        x = sparsify_reference(x, threshold)
    out = torch.matmul(x, weight_t.to(x.dtype))
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


def _plain_path(x, weight_t, bias, threshold, sparse_prefill):
    if sparse_prefill:
        x = sparsify_triton(x, threshold) if sparsify_triton is not None else sparsify_reference(x, threshold)
    # weight_t.t() is a transposed view: cuBLAS reads it in place (an "NT" GEMM), no copy.
    return F.linear(x, weight_t.t(), bias)


if triton_available():
    import triton
    import triton.language as tl

    # Split-K partials go to a workspace and the last program of an output tile sums them (lut_gemm's
    # epilogue): no zeroed fp32 output and no cast kernel, which were two extra launches per projection.
    from .lut_gemm import _store_tile_counted, _tile_counters

    @triton.jit
    def _thresholded_tile(x_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, threshold):
        """The ``[BLOCK_M, BLOCK_K]`` input tile with ``|x| <= t`` zeroed, and which of its K rows any token keeps."""
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        keep = tl.abs(x.to(tl.float32)) > threshold
        return tl.where(keep, x, tl.zeros_like(x)), tl.max(keep.to(tl.int32), axis=0) > 0

    @triton.jit
    def _sparse_gemv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, work_ptr, count_ptr,
        M, N, K, stride_xm, stride_wk, threshold, k_per_split,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, EVICT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEFER: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # DEFER (one token): per-element fp32 products accumulate in a [BLOCK_K, BLOCK_N] tile and the K reduction
        # (cross-thread) runs once at the end instead of every step
        partial = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        k_begin = pid_k * k_per_split
        for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x, row_keep = _thresholded_tile(x_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, threshold)
            w_mask = row_keep[:, None] & n_mask[None, :]
            w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :]
            if EVICT:
                w = tl.load(w_ptrs, mask=w_mask, other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            if USE_DOT:
                acc += tl.dot(x.to(w.dtype), w)
            elif DEFER:
                partial += tl.reshape(x.to(tl.float32), (BLOCK_K,))[:, None] * w.to(tl.float32)
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        if DEFER:
            acc += tl.sum(partial, axis=0)[None, :]
        _store_tile_counted(y_ptr, b_ptr, work_ptr, count_ptr, acc, offs_m, offs_n, m_mask, n_mask, M, N, pid_n, pid_k,
                            BLOCK_M, BLOCK_N, SPLIT_K, HAS_BIAS)

    def _outputs(x2: torch.Tensor, n: int, tiles: int, split: int):
        """(y, split-K workspace, tile counters); the last two are y itself when there is no split."""
        m = x2.shape[0]
        y = x2.new_empty((m, n))
        if split == 1:
            return y, y, y
        return y, torch.empty((split, m, n), dtype=torch.float32, device=x2.device), _tile_counters(x2.device, tiles)

    def _launch(config: Config, x2: torch.Tensor, weight_t: torch.Tensor, bias, threshold: float) -> torch.Tensor:
        M, K = x2.shape
        N = weight_t.shape[1]
        block_m = 1 if M == 1 else 16
        block_n, block_k, split = config.meta["BLOCK_N"], config.meta["BLOCK_K"], config.meta["SPLIT_K"]
        k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
        grid = (triton.cdiv(N, block_n), triton.cdiv(K, k_per_split))
        y, work, counts = _outputs(x2, N, grid[0], grid[1])
        _sparse_gemv_kernel[grid](
            x2, weight_t, bias if bias is not None else weight_t, y, work, counts,
            M, N, K, x2.stride(0), weight_t.stride(0), float(threshold), k_per_split,
            HAS_BIAS=bias is not None, SPLIT_K=grid[1], USE_DOT=block_m > 1, EVICT=not interpreter_mode(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DEFER=bool(config.meta.get("DEFER")) and block_m == 1,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return y

    def _configs() -> list[Config]:
        # configs[0] is what the interpreter uses: small tiles keep CPU tests fast.
        configs = [Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=2, num_stages=1)]
        # (512, 16, 4): wide rows, few per step; won the fused 28672x4096 gate/up from HBM (45.0 vs 49.5 us,
        # benchmarks/results/explore_cold_tuning_sparse.md)
        for block_n, block_k, warps in ((32, 128, 2), (64, 64, 2), (64, 128, 4), (128, 32, 4), (128, 64, 4), (256, 32, 4),
                                        (256, 64, 8), (512, 16, 4)):
            for split in (1, 2, 4, 8, 16, 32):
                configs.append(Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split}, warps, 3))
        # the K reduction deferred to the end (one token): 4096x4096 from HBM 10.6 vs 11.3 us; slower on the
        # wider fused shapes (benchmarks/results/explore_sparse_defer.md)
        configs += [Config({"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": split, "DEFER": 1}, 2, 3) for split in (8, 16)]
        return configs

    def _prune(configs, args):
        x2 = args[0]
        K = x2.shape[1]
        # A split must hold at least one K block; DEFER only changes the one-token kernel.
        return [c for c in configs if c.meta["SPLIT_K"] * c.meta["BLOCK_K"] <= max(K, c.meta["BLOCK_K"])
                and (x2.shape[0] == 1 or not c.meta.get("DEFER"))] or configs[:1]

    _tuner = Autotuner(
        "sparse_gemv",
        _configs(),
        key=lambda x2, w, b, t: (str(x2.dtype), 1 if x2.shape[0] == 1 else 8, w.shape[0], w.shape[1], b is not None),
        launch=_launch,
        prune=_prune,
    )

    

    def sparse_gemv_triton(
        x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float
    ) -> torch.Tensor:
        """The Triton sparse GEMV alone (any token count up to 16; CUDA or interpreter tensors)."""
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if weight_t.stride(-1) != 1:
            raise ValueError("sparse_gemv: weight_t must be [K, N] with contiguous rows (column-major W)")
        if x2.shape[0] > 16:
            raise ValueError(f"sparse_gemv: at most 16 tokens, got {x2.shape[0]}")
        if x2.shape[0] == 0:
            return x.new_empty((*x.shape[:-1], weight_t.shape[1]))
        y = _tuner(x2, weight_t, bias, threshold)
        return y.reshape(*x.shape[:-1], weight_t.shape[1])

    def _sparse_linear_cuda(x, weight_t, bias, threshold, sparse_prefill=True):
        if _uses_sparse_kernel(x, sparse_prefill):
            return sparse_gemv_triton(x, weight_t, bias, threshold)
        return _plain_path(x, weight_t, bias, threshold, sparse_prefill)

else:  # pragma: no cover - exercised only where Triton is missing
    sparse_gemv_triton = None
    _sparse_linear_cuda = None


def _fake(x, weight_t, bias, threshold, sparse_prefill=True):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight_t, bias, threshold, sparse_prefill = inputs
    ctx.save_for_backward(x, weight_t)
    ctx.threshold = threshold
    ctx.sparse_prefill = sparse_prefill
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Gradient for the input (and bias) only: the base weight is frozen (adapters, if any, sit beside it)."""
    x, weight_t = ctx.saved_tensors
    grad_x, grad_b = _masked_input_grads(grad, torch.matmul(grad, weight_t.t().to(grad.dtype)), x, ctx.threshold,
                                         ctx.sparse_prefill, ctx.has_bias)
    return grad_x, None, grad_b, None, None


def _masked_input_grads(grad, grad_x, x, threshold, sparse_prefill, has_bias):
    """(d/dx masked where the forward thresholded x, d/dbias) of a linear with a frozen weight."""
    if sparse_prefill or _tokens(x) <= MAX_SPARSE_TOKENS:
        grad_x = torch.where(x.abs() > threshold, grad_x, torch.zeros((), dtype=grad_x.dtype, device=grad_x.device))
    return grad_x, (grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None)


sparse_linear = define_op(
    "sparse_linear",
    sparse_linear_reference,
    cuda=_sparse_linear_cuda,
    fake=_fake,
    backward=_backward,
    setup_context=_setup_context,
)


def sparsify_decode_reference(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``s(x)`` for at most 8 tokens, ``x`` unchanged above (dense prefill); used before kernels without a
    sparse variant when the ``sparsity`` pass runs with ``sparse_prefill=False``."""
    if _tokens(x) <= MAX_SPARSE_TOKENS:
        return sparsify_reference(x, threshold)
    return x.clone()


def _sparsify_decode_cuda(x: torch.Tensor, threshold: float) -> torch.Tensor:
    if _tokens(x) <= MAX_SPARSE_TOKENS and sparsify_triton is not None:
        return sparsify_triton(x, threshold)
    return sparsify_decode_reference(x, threshold)


def _sparsify_decode_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if _tokens(x) > MAX_SPARSE_TOKENS:  # the forward passed x through
        return grad, None
    return _sparsify_backward(ctx, grad)


sparsify_decode = define_op("sparsify_decode", sparsify_decode_reference, cuda=_sparsify_decode_cuda,
                            backward=_sparsify_decode_backward, setup_context=_sparsify_setup)


# ---------------------------------------------------------------------------------------------------------
# Variant: compact the surviving columns first, then loop only over them.
#
# With masked loads every K block is still visited, and each visit waits for its (half-empty) loads, so the
# time does not fall in proportion to the bytes skipped. Here a first kernel writes, per K segment, the
# indices of the columns that survive (an exclusive prefix sum of the keep mask) and their count; the GEMV
# then walks only ``count`` rows of its segment (a loop bound loaded from memory) and gathers those rows of
# ``W^T``. Two launches instead of one; the benchmark decides which variant the op uses.
# ---------------------------------------------------------------------------------------------------------
if triton_available():

    @triton.jit
    def _compact_kernel(x_ptr, idx_ptr, count_ptr, M, K, stride_xm, threshold, seg_len,
                        BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
        seg = tl.program_id(0)
        start = seg * seg_len
        offs_m = tl.arange(0, BLOCK_M)
        base = 0
        for k0 in range(start, start + seg_len, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            in_seg = (offs < K) & (offs < start + seg_len)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs[None, :], mask=(offs_m[:, None] < M) & in_seg[None, :], other=0.0)
            keep = tl.max((tl.abs(x.to(tl.float32)) > threshold).to(tl.int32), axis=0)
            pos = tl.cumsum(keep, 0) - keep
            tl.store(idx_ptr + start + base + pos, offs, mask=keep > 0)
            base += tl.sum(keep, 0)
        tl.store(count_ptr + seg, base)

    @triton.jit
    def _gather_gemv_kernel(x_ptr, w_ptr, idx_ptr, count_ptr, b_ptr, y_ptr, work_ptr, tile_count_ptr, M, N, stride_xm,
                            stride_wk, threshold, seg_len, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                            USE_DOT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        seg = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        count = tl.load(count_ptr + seg)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, count, BLOCK_K):
            offs_i = i + tl.arange(0, BLOCK_K)
            valid = offs_i < count
            rows = tl.load(idx_ptr + seg * seg_len + offs_i, mask=valid, other=0)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=m_mask[:, None] & valid[None, :], other=0.0)
            x = tl.where(tl.abs(x.to(tl.float32)) > threshold, x, tl.zeros_like(x))
            w = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :], mask=valid[:, None] & n_mask[None, :], other=0.0)
            if USE_DOT:
                acc += tl.dot(x.to(w.dtype), w)
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        _store_tile_counted(y_ptr, b_ptr, work_ptr, tile_count_ptr, acc, offs_m, offs_n, m_mask, n_mask, M, N, pid_n,
                            seg, BLOCK_M, BLOCK_N, SPLIT_K, HAS_BIAS)

    def _launch_compact(config: Config, x2, weight_t, bias, threshold):
        M, K = x2.shape
        N = weight_t.shape[1]
        block_m = 1 if M == 1 else 16
        split = min(config.meta["SPLIT_K"], max(1, K // 64))
        seg_len = triton.cdiv(K, split)
        idx = torch.empty(K, dtype=torch.int32, device=x2.device)
        count = torch.empty(split, dtype=torch.int32, device=x2.device)
        _compact_kernel[(split,)](x2, idx, count, M, K, x2.stride(0), float(threshold), seg_len,
                                  BLOCK_M=block_m, BLOCK=512, num_warps=4)
        grid = (triton.cdiv(N, config.meta["BLOCK_N"]), split)
        y, work, tile_counts = _outputs(x2, N, grid[0], split)
        _gather_gemv_kernel[grid](
            x2, weight_t, idx, count, bias if bias is not None else weight_t, y, work, tile_counts, M, N, x2.stride(0),
            weight_t.stride(0), float(threshold), seg_len, HAS_BIAS=bias is not None, SPLIT_K=split,
            USE_DOT=block_m > 1, BLOCK_M=block_m, BLOCK_N=config.meta["BLOCK_N"], BLOCK_K=config.meta["BLOCK_K"],
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return y

    def _compact_configs() -> list[Config]:
        configs = [Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=2, num_stages=1)]
        for block_n, block_k, warps in ((64, 64, 2), (128, 32, 4), (128, 64, 4), (256, 32, 4), (256, 64, 8)):
            for split in (4, 8, 16, 32):
                configs.append(Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split}, warps, 3))
        return configs

    _compact_tuner = Autotuner(
        "sparse_gemv_compact", _compact_configs(),
        key=lambda x2, w, b, t: (str(x2.dtype), 1 if x2.shape[0] == 1 else 8, w.shape[0], w.shape[1], b is not None),
        launch=_launch_compact,
    )

    def sparse_gemv_compact_triton(x, weight_t, bias, threshold):
        """Same result as :func:`sparse_gemv_triton`, by compaction + gather (see above)."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.shape[0] > 16 or x2.shape[0] == 0:
            raise ValueError(f"sparse_gemv_compact: 1..16 tokens, got {x2.shape[0]}")
        y = _compact_tuner(x2, weight_t, bias, threshold)
        return y.reshape(*x.shape[:-1], weight_t.shape[1])

else:  # pragma: no cover
    sparse_gemv_compact_triton = None
