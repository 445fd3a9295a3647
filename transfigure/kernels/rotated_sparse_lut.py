"""Activation sparsity in the rotated basis of a Hadamard-rotated LUT linear, with a sparse LUT GEMV.

A rotated LUT linear (:mod:`transfigure.kernels.lut_gemm`) computes ``y = (R x) W_r^T + b`` with
``R = H_h D / sqrt(h)`` blockwise over the (padded) input and ``W_r = W R^T`` quantized. Thresholding ``x``
before the rotation (TEAL's site) leaves ``R s(x)`` dense, so no weight column can be skipped. Here the
*rotated* activation ``z = R x`` is thresholded instead (as LaRoSA does with its rotations):

    s_R(z)_k = z_k * 1[z_k^2 > tau^2 * mean_{j in block(k)} z_j^2],   y = s_R(R x) W_r^T + b

one scalar ``tau`` per input, relative to the root-mean-square of the token's ``h``-block of ``z`` (equal to
``||x_block|| / sqrt(h)``, since ``R`` is orthogonal). After a random-sign Hadamard transform the entries of a
block are close to Gaussian whatever the distribution of ``x``, so ``|z| / rms`` has nearly the same law for
every token and ``tau`` fixes the sparsity token by token (``tau`` = 0.674 gives about 50%); it is calibrated
per input as a quantile of ``|z| / rms`` (:func:`transfigure.passes.teal_calibration.calibrate`,
``rotations=``). The comparison is made on squares in fp32 so that every path decides identically.

Decode kernel (one token, 4-bit scalar codes): the codes are repacked *column-major* (``codes_t``: row ``k``
holds the codes of input ``k`` for every output, two per byte, output ``2j`` in the low nibble of byte ``j``;
``scales_t``: ``[groups, N]``). After the FWHT, a compaction kernel (one program per ``max(h, group)`` slice)
computes each block's mean square, keeps the surviving ``z_k``, and writes, per quantization group, their
values and indices back to back plus a count. The GEMV then walks, per group, only the surviving rows of
``codes_t`` (``BLOCK_K`` at a time; loads, lookups and multiplies of dropped rows never happen), decodes the
nibbles with the register-table lookup of the dense GEMV (or a gather from the 16-entry grid), accumulates
in fp32 and applies the group scale once per group. Split-K programs over groups reduce through the dense
GEMV's counted epilogue. Above one token the op runs the FWHT, the rotated threshold (torch ops) and the
dense LUT GEMV on the thresholded ``z``: the same math, the plain path's speed.
"""

from __future__ import annotations

import torch

from .autotune import Autotuner, Config
from .lut_format import dequantize_parts, rotate_input
from .registry import define_op, interpreter_mode, triton_available
from .sparse_gemv import MAX_SPARSE_TOKENS, _tokens

MAX_COMPACT_SLICE = 8192
"""Largest ``max(hadamard_size, group_size)`` the compaction kernel holds in one program."""


def supports(bits: int, p: int, group_size: int, hadamard_size: int) -> bool:
    """Whether the rotated sparse LUT op handles this format (4-bit scalar codes, a rotation of at most 8192)."""
    return bits == 4 and p == 1 and 0 < hadamard_size and max(hadamard_size, group_size) <= MAX_COMPACT_SLICE


def rotated_keep(z: torch.Tensor, tau: float, hadamard_size: int) -> torch.Tensor:
    """Bool mask of the entries ``s_R`` keeps: ``z_k^2 > tau^2 * mean(z^2 over its h-block)`` (fp32 squares)."""
    h = hadamard_size
    zf = z.to(torch.float32).reshape(*z.shape[:-1], z.shape[-1] // h, h)
    square = zf * zf
    keep = square > (tau * tau) * (square.sum(-1, keepdim=True) / h)
    return keep.reshape(z.shape)


def rotated_sparsify_reference(z: torch.Tensor, tau: float, hadamard_size: int) -> torch.Tensor:
    """``s_R(z)``: ``z`` where :func:`rotated_keep`, else 0."""
    return torch.where(rotated_keep(z, tau, hadamard_size), z, torch.zeros((), dtype=z.dtype, device=z.device))


def rotated_sparsity(x: torch.Tensor, signs: torch.Tensor | None, hadamard_size: int, tau: float) -> float:
    """Fraction of rotated entries ``s_R`` drops for ``x`` (padding to a multiple of ``h`` not counted)."""
    k = x.shape[-1]
    kp = -(-k // hadamard_size) * hadamard_size
    z = rotate_input(x.to(torch.float32), None if signs is None else signs[:kp], hadamard_size, kp)
    return float((rotated_sparsify_reference(z, tau, hadamard_size) == 0).float().mean())


def _dense_rotated_weight(codes, scales, table, signs, bits, group_size, hadamard_size, in_features):
    return dequantize_parts(codes, scales, table, signs, bits, 1, group_size, hadamard_size, in_features, "rotated")


def rotated_sparse_lut_linear_reference(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, signs: torch.Tensor | None,
    bias: torch.Tensor | None, codes_t: torch.Tensor, scales_t: torch.Tensor, bits: int, group_size: int,
    hadamard_size: int, in_features: int, tau: float, sparse_prefill: bool = True,
) -> torch.Tensor:
    """``s_R(R x) W_r^T + b`` from the row-major codes (``codes_t``/``scales_t`` are the decode kernel's copy).

    ``z = R x`` is rounded to ``x.dtype`` before thresholding, as the FWHT kernel returns it."""
    kp = scales.shape[1] * group_size
    z = rotate_input(x, signs, hadamard_size, kp)
    if sparse_prefill or _tokens(x) <= MAX_SPARSE_TOKENS:
        z = rotated_sparsify_reference(z, tau, hadamard_size)
    w = _dense_rotated_weight(codes, scales, table, signs, bits, group_size, hadamard_size, in_features)
    y = z.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


compact_rotated = None
rotated_sparse_gemv_triton = None
_rotated_sparse_lut_linear_cuda = None

if triton_available():
    import triton
    import triton.language as tl

    from .lut_gemm import (_register_lookup, _store_tile_counted, _tile_counters, lut_linear_triton, prepare_input,
                           register_table)

    @triton.jit
    def _compact_kernel(z_ptr, vals_ptr, idx_ptr, count_ptr, tau2, L: tl.constexpr, H: tl.constexpr,
                        G: tl.constexpr):
        """One ``L = max(H, G)`` slice of ``z``: rotated threshold, then per group the surviving values and
        their indices back to back (positions from a running count), and the group's count."""
        pid = tl.program_id(0)
        offs = pid * L + tl.arange(0, L)
        z = tl.load(z_ptr + offs).to(tl.float32)
        square = z * z
        blocks = tl.reshape(square, [L // H, H])
        mean_square = tl.sum(blocks, axis=1) / H
        keep = tl.reshape(blocks > tau2 * mean_square[:, None], [L // G, G])
        ones = keep.to(tl.int32)
        pos = tl.cumsum(ones, axis=1) - 1
        groups = pid * (L // G) + tl.arange(0, L // G)
        dest = groups[:, None] * G + pos
        tl.store(idx_ptr + dest, tl.reshape(offs, [L // G, G]), mask=keep)
        tl.store(vals_ptr + dest, tl.reshape(z, [L // G, G]), mask=keep)
        tl.store(count_ptr + groups, tl.sum(ones, axis=1))

    @triton.jit
    def _rotated_sparse_gemv_kernel(vals_ptr, idx_ptr, count_ptr, codes_ptr, scales_ptr, table_ptr, bias_ptr, y_ptr,
                                    work_ptr, tile_count_ptr, N, row_bytes, n_groups, groups_per_split,
                                    G: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_K: tl.constexpr,
                                    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HALF_IS_BF16: tl.constexpr,
                                    REGISTER: tl.constexpr, EMULATE: tl.constexpr, SCALE_EACH: tl.constexpr):
        """Program: ``2 * BLOCK_NB`` outputs (``BLOCK_NB`` code bytes per row) x its share of the groups.

        SCALE_EACH: multiply each surviving activation by the group scales before the multiply-add and reduce
        over K once at the end (one more multiply per weight) instead of reducing every group's partial sums
        across threads (a shuffle tree per group)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_n * BLOCK_NB + tl.arange(0, BLOCK_NB)
        col_mask = cols < row_bytes
        acc_lo = tl.zeros([BLOCK_NB], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_NB], dtype=tl.float32)
        g_start = pid_k * groups_per_split
        g_stop = tl.minimum(g_start + groups_per_split, n_groups)
        all_lo = tl.zeros([BLOCK_K, BLOCK_NB], dtype=tl.float32)
        all_hi = tl.zeros([BLOCK_K, BLOCK_NB], dtype=tl.float32)
        for grp in range(g_start, g_stop):
            count = tl.load(count_ptr + grp)
            s_lo = tl.load(scales_ptr + grp * N + 2 * cols, mask=2 * cols < N, other=0.0).to(tl.float32)
            s_hi = tl.load(scales_ptr + grp * N + 2 * cols + 1, mask=2 * cols + 1 < N, other=0.0).to(tl.float32)
            part_lo = tl.zeros([BLOCK_K, BLOCK_NB], dtype=tl.float32)
            part_hi = tl.zeros([BLOCK_K, BLOCK_NB], dtype=tl.float32)
            for c0 in range(0, count, BLOCK_K):
                offs = c0 + tl.arange(0, BLOCK_K)
                valid = offs < count
                k = tl.load(idx_ptr + grp * G + offs, mask=valid, other=0)
                v = tl.load(vals_ptr + grp * G + offs, mask=valid, other=0.0)
                code_bytes = tl.load(codes_ptr + k[:, None].to(tl.int64) * row_bytes + cols[None, :],
                                     mask=valid[:, None] & col_mask[None, :], other=0)
                if REGISTER:
                    lo, hi = _register_lookup(code_bytes, table_ptr, HALF_IS_BF16, EMULATE)
                else:
                    byte = code_bytes.to(tl.int32)
                    lo = tl.load(table_ptr + (byte & 15))
                    hi = tl.load(table_ptr + (byte >> 4))
                if SCALE_EACH:
                    all_lo += lo * (v[:, None] * s_lo[None, :])
                    all_hi += hi * (v[:, None] * s_hi[None, :])
                else:
                    part_lo += lo * v[:, None]
                    part_hi += hi * v[:, None]
            if not SCALE_EACH:
                acc_lo += tl.sum(part_lo, axis=0) * s_lo
                acc_hi += tl.sum(part_hi, axis=0) * s_hi
        if SCALE_EACH:
            acc_lo = tl.sum(all_lo, axis=0)
            acc_hi = tl.sum(all_hi, axis=0)
        rows = pid_n * (2 * BLOCK_NB) + tl.arange(0, 2 * BLOCK_NB)
        one = tl.arange(0, 1)
        out = tl.interleave(acc_lo, acc_hi)
        _store_tile_counted(y_ptr, bias_ptr, work_ptr, tile_count_ptr, out[None, :], one, rows, one < 1, rows < N, 1,
                            N, pid_n, pid_k, 1, 2 * BLOCK_NB, SPLIT_K, HAS_BIAS)

    def compact_rotated_triton(z: torch.Tensor, tau: float, hadamard_size: int, group_size: int):
        """``z [K_pad]`` (one rotated token) -> ``(values fp32 [K_pad], indices int32 [K_pad], counts int32
        [groups])``: group ``g``'s surviving entries sit at ``[g * G, g * G + counts[g])``."""
        z = z.reshape(-1).contiguous()
        kp = z.numel()
        slice_len = max(hadamard_size, group_size)
        vals = torch.empty(kp, dtype=torch.float32, device=z.device)
        idx = torch.empty(kp, dtype=torch.int32, device=z.device)
        counts = torch.empty(kp // group_size, dtype=torch.int32, device=z.device)
        _compact_kernel[(kp // slice_len,)](z, vals, idx, counts, float(tau) * float(tau), L=slice_len,
                                             H=hadamard_size, G=group_size, num_warps=4 if slice_len <= 2048 else 8)
        return vals, idx, counts

    compact_rotated = compact_rotated_triton

    def _launch(config: Config, vals, idx, counts, codes_t, scales_t, table, bias, group_size, half):
        meta = config.meta
        n = scales_t.shape[1]
        n_groups = scales_t.shape[0]
        code_bytes = codes_t.view(torch.uint8)
        row_bytes = code_bytes.shape[1]
        block_nb, split = meta["BLOCK_NB"], min(meta["SPLIT_K"], n_groups)
        per_split = triton.cdiv(n_groups, split)
        split = triton.cdiv(n_groups, per_split)
        grid = (triton.cdiv(row_bytes, block_nb), split)
        register = meta["REGISTER"]
        lookup = register_table(table, half) if register else table.reshape(-1).to(torch.float32).contiguous()
        y = torch.empty(1, n, dtype=half, device=vals.device)
        work = torch.empty(split, n, dtype=torch.float32, device=vals.device) if split > 1 else y
        tile_counts = _tile_counters(vals.device, grid[0]) if split > 1 else y
        _rotated_sparse_gemv_kernel[grid](
            vals, idx, counts, code_bytes, scales_t, lookup, bias if bias is not None else scales_t, y, work,
            tile_counts, n, row_bytes, n_groups, per_split, G=group_size, BLOCK_NB=block_nb,
            BLOCK_K=meta["BLOCK_K"], SPLIT_K=split, HAS_BIAS=bias is not None, HALF_IS_BF16=half == torch.bfloat16,
            REGISTER=register, EMULATE=interpreter_mode(), SCALE_EACH=meta.get("SCALE_EACH", 0), num_warps=config.num_warps, num_stages=config.num_stages)
        return y

    def _configs() -> list[Config]:
        configs = [Config({"BLOCK_NB": 64, "BLOCK_K": 16, "SPLIT_K": 4, "REGISTER": 0}, num_warps=4, num_stages=2)]
        for register in (1, 0):
            for scale_each in (0, 1):
                for block_nb, block_k, warps in ((64, 16, 2), (64, 32, 4), (128, 16, 4), (128, 32, 4), (256, 16, 4),
                                                 (256, 32, 8)):
                    for split in (1, 2, 4, 8, 16):
                        configs.append(Config({"BLOCK_NB": block_nb, "BLOCK_K": block_k, "SPLIT_K": split,
                                               "REGISTER": register, "SCALE_EACH": scale_each}, warps, 2))
        return configs

    def _prune(configs, args):
        vals, idx, counts, codes_t, scales_t, table, bias, group_size, half = args
        if half not in (torch.float16, torch.bfloat16):  # the register table holds 16-bit weights
            configs = [c for c in configs if not c.meta["REGISTER"]]
        n_groups = scales_t.shape[0]
        kept = [c for c in configs if c.meta["SPLIT_K"] <= n_groups]
        return kept or configs[:1]

    _tuner = Autotuner(
        "rotated_sparse_lut_gemv",
        _configs(),
        key=lambda vals, idx, counts, ct, st, t, b, g, half: (str(half), st.shape[1], st.shape[0], g, b is not None),
        launch=_launch,
        prune=_prune,
    )

    def rotated_sparse_gemv(vals, idx, counts, codes_t, scales_t, table, bias, group_size: int, half: torch.dtype,
                            config: Config | None = None) -> torch.Tensor:
        """The GEMV over compacted rotated activations (``compact_rotated_triton``): ``[1, N]`` in ``half``."""
        table = table.to(device=vals.device, dtype=torch.float32).contiguous()
        args = (vals, idx, counts, codes_t, scales_t, table, bias, group_size, half)
        return _launch(config, *args) if config is not None else _tuner(*args)

    rotated_sparse_gemv_triton = rotated_sparse_gemv

    def _rotated_sparse_lut_linear_cuda(x, codes, scales, table, signs, bias, codes_t, scales_t, bits, group_size,
                                        hadamard_size, in_features, tau, sparse_prefill=True):
        kp = scales.shape[1] * group_size
        n = scales.shape[0]
        if _tokens(x) == 1:
            z = prepare_input(x, signs, hadamard_size, kp)
            vals, idx, counts = compact_rotated_triton(z, tau, hadamard_size, group_size)
            y = rotated_sparse_gemv(vals, idx, counts, codes_t, scales_t, table, bias, group_size, x.dtype)
            return y.reshape(*x.shape[:-1], n)
        z = prepare_input(x, signs, hadamard_size, kp)
        if sparse_prefill or _tokens(x) <= MAX_SPARSE_TOKENS:
            z = rotated_sparsify_reference(z, tau, hadamard_size)
        y = lut_linear_triton(z, codes, scales, table, None, bias, bits, 1, group_size, 0, kp)
        return y.reshape(*x.shape[:-1], n)


def _fake(x, codes, scales, table, signs, bias, codes_t, scales_t, bits, group_size, hadamard_size, in_features, tau,
          sparse_prefill=True):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, scales, table, signs, bias, codes_t, scales_t, bits, group_size, hadamard_size, in_features, tau, *rest = inputs
    ctx.save_for_backward(x, codes, scales, table, signs)
    ctx.meta = (bits, group_size, hadamard_size, in_features, tau, rest[0] if rest else True)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """``d/dx = R^T (mask * (grad W_r))``: the mask (which entries of ``z`` survived) is piecewise constant in
    ``x``, so this is the gradient almost everywhere; the codes are constants (QLoRA-style training)."""
    x, codes, scales, table, signs = ctx.saved_tensors
    bits, group_size, h, in_features, tau, sparse_prefill = ctx.meta
    kp = scales.shape[1] * group_size
    w = _dense_rotated_weight(codes, scales, table, signs, bits, group_size, h, in_features)
    grad_z = grad.to(torch.float32) @ w
    if sparse_prefill or _tokens(x) <= MAX_SPARSE_TOKENS:
        keep = rotated_keep(rotate_input(x, signs, h, kp), tau, h)
        grad_z = torch.where(keep, grad_z, torch.zeros((), dtype=grad_z.dtype, device=grad_z.device))
    from .fwht import ifwht_reference

    grad_x = ifwht_reference(grad_z, signs, h)[..., :in_features].to(x.dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return (grad_x, None, None, None, None, grad_b, None, None, None, None, None, None, None, None)


rotated_sparse_lut_linear = define_op(
    "rotated_sparse_lut_linear", rotated_sparse_lut_linear_reference, cuda=_rotated_sparse_lut_linear_cuda,
    fake=_fake, backward=_backward, setup_context=_setup_context)

__all__ = ["supports", "rotated_keep", "rotated_sparsify_reference", "rotated_sparsity", "rotated_sparse_lut_linear",
           "compact_rotated", "rotated_sparse_gemv_triton"]
