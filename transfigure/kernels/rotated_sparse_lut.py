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

Decode kernels (one token, 4-bit scalar codes): the codes are repacked *input-major* (:func:`decode_layout`:
row ``k`` holds the codes of input ``k`` for every output, two per byte, in the tile order of the tensor-core
kernel). After the FWHT, a compaction kernel (one program per ``max(h, group)`` slice)
computes each block's mean square, keeps the surviving ``z_k``, and writes, per quantization group, their
values and indices back to back plus a count. For ``group <= h <= MAX_FUSED_ROTATION`` (from 256) one kernel
pads, rotates and compacts the raw token (``rotate_compact_triton``): a decode token saves the FWHT launch.
The GEMV then walks, per group, only the surviving rows of the codes (loads, lookups and multiplies of dropped
rows never happen). Two GEMVs, chosen by the autotuner:
the tensor-core one (``_rotated_sparse_mma_kernel``: 16 surviving inputs x 64 outputs per warp and
``mma.sync``, codes decoded through the shared pair table) and a CUDA-core one (``_rotated_sparse_gemv_kernel``:
``BLOCK_K`` surviving rows at a time, register-table lookup or a gather from the 16-entry grid, fp32 FMAs).
Both apply the group scale once per group. Split-K programs over groups reduce through the dense
GEMV's counted epilogue. Above one token the op runs the FWHT, the rotated threshold (torch ops) and the
dense LUT GEMV on the thresholded ``z``: the same math, the plain path's speed.
"""

from __future__ import annotations

import math

import torch

from .autotune import Autotuner, Config
from .lut_format import dequantize_parts, rotate_input
from .lut_gemm import SHARED_TABLE_SYMBOL, _shared_lookup_ptx
from .registry import define_op, interpreter_mode, triton_available
from .sparse_gemv import MAX_SPARSE_TOKENS, _tokens

MAX_COMPACT_SLICE = 8192
"""Largest ``max(hadamard_size, group_size)`` the compaction kernel holds in one program."""

MAX_FUSED_ROTATION = 2048
"""Largest ``hadamard_size`` whose FWHT the one-token compaction runs itself (``rotate_compact_triton``).

Up to 2048 the FWHT tuner has one candidate for a single row, the two-factor Kronecker kernel with one
rounding, so the fused kernel keeps exactly the entries the two launches keep. From 4096 on it also picks the
three-factor and ROUND16 forms (other roundings: about ten entries per 8192-block of bf16 kept differently),
the fused program spills in fp32 (496 bytes at 4096, 2.9 KB at 8192; the separate kernels 24 and 2008) and,
measured on the H100 with bf16 and CUDA graphs, is slower than the two launches (13.6 against 12.9 us at
4096, 26.1 against 23.1 at 8192; at 512: 2.7 against 3.5 us)."""


def supports(bits: int, p: int, group_size: int, hadamard_size: int) -> bool:
    """Whether the rotated sparse LUT op handles this format (4-bit scalar codes, a rotation of at most 8192)."""
    return bits == 4 and p == 1 and 0 < hadamard_size and max(hadamard_size, group_size) <= MAX_COMPACT_SLICE


def fuses_rotation(hadamard_size: int, group_size: int) -> bool:
    """Whether the one-token kernels that rotate inside their own programs cover this format
    (:func:`rotate_compact_triton` here, the prologue kernels of :mod:`.rotation_prologue`): one Hadamard block
    per program (``h >=`` group), ``h`` in the FWHT's two-factor Kronecker range (from 256; below, its tile kernel
    rotates) up to MAX_FUSED_ROTATION. Other formats keep the FWHT launch, then ``compact_rotated_triton``."""
    return 256 <= hadamard_size <= MAX_FUSED_ROTATION and group_size <= hadamard_size


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
    bias: torch.Tensor | None, codes_tm: torch.Tensor, scales_tm: torch.Tensor, bits: int, group_size: int,
    hadamard_size: int, in_features: int, tau: float, sparse_prefill: bool = True,
) -> torch.Tensor:
    """``s_R(R x) W_r^T + b`` from the row-major codes (``codes_tm``/``scales_tm``: the decode kernels' copy in
    :func:`decode_layout`).

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


def decode_layout(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major 4-bit LUT codes ``[N, words]`` + group scales ``[N, groups]`` -> the decode kernels' layout
    ``(codes_tm, scales_tm)``, with ``N_pad`` = N rounded up to 64:

    * ``codes_tm``: uint8 ``[K_pad, N_pad / 2]``; per input ``k`` (a row: a dropped input skips it whole), tile
      ``T`` of 64 outputs owns bytes ``[32 T, 32 T + 32)``, and byte ``4 g + t`` holds output ``64 T + 16 t + g``
      in its low nibble and output ``64 T + 16 t + g + 8`` in its high nibble -- so mma lane group ``g`` loads
      the codes of its rows ``g`` and ``g + 8`` in all four m16 tiles as one word;
    * ``scales_tm``: ``[groups, N_pad]``, entry ``2 j + h`` the scale of byte ``j``'s low (h = 0) / high output.
    """
    from .lut_format import unpack_codes

    n, groups = scales.shape
    k_pad = codes.shape[1] * 8
    idx = unpack_codes(codes, 4, k_pad)  # [N, K_pad]
    n_pad = -(-n // 64) * 64
    full = torch.zeros(n_pad, k_pad, dtype=torch.int64, device=codes.device)
    full[:n] = idx
    tiles = full.reshape(n_pad // 64, 4, 2, 8, k_pad)  # [T, t, row g / g + 8, g, K]
    byte = tiles[:, :, 0] | (tiles[:, :, 1] << 4)  # [T, t, g, K]
    codes_tm = byte.permute(3, 0, 2, 1).reshape(k_pad, n_pad // 2).to(torch.uint8).contiguous()
    padded = torch.zeros(n_pad, groups, dtype=scales.dtype, device=scales.device)
    padded[:n] = scales
    # [T, t, h, g, groups] -> [groups, T, g, t, h]
    scales_tm = padded.reshape(n_pad // 64, 4, 2, 8, groups).permute(4, 0, 3, 1, 2).reshape(groups, n_pad)
    return codes_tm, scales_tm.contiguous()


def sparse_mma_step_ptx(half: str) -> str:
    """PTX of one step of the tensor-core kernel: 16 surviving inputs of one group x the warp's 64 outputs
    (four m16 tiles), run by every lane as ``inline_asm_elementwise(pack=1)``.

    The K order inside an ``mma.m16n8k16`` is free as long as A and B agree: lane ``(g, q)`` takes entries
    ``4 q .. 4 q + 3`` of the step (A/B columns ``2 q, 2 q + 1, 2 q + 8, 2 q + 9``). Per entry it loads the
    index and value, then ONE word of codes from that input's row (``decode_layout``: its rows ``g`` and
    ``g + 8`` of all four m-tiles), decodes each byte through the shared pair table (``_shared_lookup_ptx``:
    (row g, row g + 8) at that input) and re-pairs them with ``prmt`` into A registers (two inputs of one row).
    B is the activations as column ``g`` -- nonzero only in lane group 0 (one token). Every slot of a group
    holds a valid index (``compact_rotated_triton`` puts the dropped inputs, value 0, after the survivors), so
    the loads need no masks: four indices and four values are one 16-byte load each. Operands: outputs 0-15 the
    new accumulators (tile-major, 4 per tile: D[g][2q], D[g][2q+1], D[g+8][2q], D[g+8][2q+1]), inputs 16-31 the
    old ones, 32 the address of the lane's first index (16-byte aligned), 33 of its first value, 34 of its code
    word in row 0, 35 the row pitch in bytes, 36 nonzero where the lane supplies the activations (lane group 0
    of a step that is not past the group's count)."""
    kind = "bf16" if half == "bf16" else "f16"
    pairs = [[f"p{e}{t}" for t in range(4)] for e in range(4)]
    lines = ["{", ".reg .b32 f, base, row, xb0, xb1, a0, a1, a2, a3;",
             ".reg .b32 " + ", ".join(f"i{e}, w{e}" for e in range(4)) + ";",
             ".reg .b32 " + ", ".join(sum(pairs, [])) + ";", ".reg .f32 x0, x1, x2, x3;",
             ".reg .pred px;", ".reg .b64 o, ac;",
             "mov.u32 f, %laneid;", f"mov.u64 o, {SHARED_TABLE_SYMBOL};", "cvt.u32.u64 base, o;",
             "mad.lo.u32 base, f, 4, base;", "mov.b32 row, $35;", "setp.ne.b32 px, $36, 0;",
             "ld.global.nc.v4.u32 {i0, i1, i2, i3}, [$32];", "mov.f32 x0, 0f00000000;", "mov.f32 x1, 0f00000000;",
             "mov.f32 x2, 0f00000000;", "mov.f32 x3, 0f00000000;", "@px ld.global.nc.v4.f32 {x0, x1, x2, x3}, [$33];"]
    for e in range(4):
        lines += [f"mul.wide.u32 o, i{e}, row;", "add.s64 ac, $34, o;", f"ld.global.nc.u32 w{e}, [ac];"]
    lines += ["mov.b32 xb0, 0;", "mov.b32 xb1, 0;", f"@px cvt.rn.{kind}x2.f32 xb0, x1, x0;",
              f"@px cvt.rn.{kind}x2.f32 xb1, x3, x2;"]
    for e in range(4):
        lines += _shared_lookup_ptx(f"w{e}", pairs[e], "base")
    for t in range(4):
        lines += [f"prmt.b32 a0, {pairs[0][t]}, {pairs[1][t]}, 0x5410;",
                  f"prmt.b32 a1, {pairs[0][t]}, {pairs[1][t]}, 0x7632;",
                  f"prmt.b32 a2, {pairs[2][t]}, {pairs[3][t]}, 0x5410;",
                  f"prmt.b32 a3, {pairs[2][t]}, {pairs[3][t]}, 0x7632;"]
        new = ", ".join(f"${4 * t + i}" for i in range(4))
        old = ", ".join(f"${16 + 4 * t + i}" for i in range(4))
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{{new}}}, {{a0, a1, a2, a3}}, "
                     f"{{xb0, xb1}}, {{{old}}};")
    return "\n".join(lines + ["}"])


SPARSE_MMA_STEP_PTX = {half: sparse_mma_step_ptx(half) for half in ("bf16", "fp16")}
SPARSE_MMA_STEP_CONSTRAINTS = ",".join(["=f"] * 16 + ["f"] * 16 + ["l", "l", "l", "r", "r"])

compact_rotated = None
rotate_compact_triton = None
rotated_sparse_gemv_triton = None
_rotated_sparse_lut_linear_cuda = None

if triton_available():
    import triton
    import triton.language as tl

    from .fwht import _hadamard, _kron_rotate, _split
    from .lut_gemm import (_fill_shared_table, _register_lookup, _thread_index, _tile_counters,
                           lut_linear_triton, pair_table, prepare_input, register_table, shared_table_fill_ptx)

    @triton.jit
    def _emulated_sparse_mma_step(acc, vals_ptr, idx_ptr, codes_ptr, grid_ptr, row_bytes, base, count, c0, tile, g,
                                  t: tl.constexpr, h: tl.constexpr, HALF_IS_BF16: tl.constexpr):
        """What ``sparse_mma_step_ptx`` leaves in D[g + 8 h][0] of m-tile ``t``, for the interpreter: the step's
        16 entries times the lane's row, with the activations and weights rounded to the 16-bit type."""
        for e in tl.static_range(16):
            entry = c0 + e + tl.zeros_like(g)
            ok = entry < count
            k = tl.load(idx_ptr + base + entry, mask=ok, other=0)
            v = tl.load(vals_ptr + base + entry, mask=ok, other=0.0)
            if HALF_IS_BF16:
                v = v.to(tl.bfloat16).to(tl.float32)
            else:
                v = v.to(tl.float16).to(tl.float32)
            byte = tl.load(codes_ptr + k.to(tl.int64) * row_bytes + tile * 32 + 4 * g + t).to(tl.int32)
            code = (byte >> (4 * h)) & 15
            acc += v * tl.load(grid_ptr + code)
        return acc

    @triton.jit
    def _sparse_mma_step(d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12, d13, d14, d15, idx_addr, vals_addr,
                         code_addr, row_bytes, valid, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr):
        return tl.inline_asm_elementwise(
            ASM, CONSTRAINTS,
            [d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12, d13, d14, d15, idx_addr, vals_addr, code_addr,
             row_bytes + tl.zeros_like(valid), valid],
            dtype=(tl.float32,) * 16, is_pure=True, pack=1)

    @triton.jit
    def _rotated_sparse_mma_kernel(vals_ptr, idx_ptr, count_ptr, codes_ptr, scales_ptr, pairs_ptr, grid_ptr, bias_ptr,
                                   y_ptr, work_ptr, tile_count_ptr, N, n_pad, row_bytes, n_groups, groups_per_split,
                                   WARPS: tl.constexpr, G: tl.constexpr, SPLIT_K: tl.constexpr,
                                   HAS_BIAS: tl.constexpr, HALF_IS_BF16: tl.constexpr, STEP_ASM: tl.constexpr,
                                   STEP_CONSTRAINTS: tl.constexpr, FILL_ASM: tl.constexpr, UNROLL: tl.constexpr,
                                   EMULATE: tl.constexpr):
        """Tensor-core sparse LUT GEMV over compacted rotated activations (one token, 4-bit codes in
        ``decode_layout`` layout): warp ``w`` of program ``pid_n`` owns outputs ``[64 T, 64 T + 64)``,
        ``T = pid_n * WARPS + w``; per group it runs ``ceil(count / 16)`` steps of ``sparse_mma_step_ptx`` (16
        surviving inputs each, the group's accumulators in the mma fragments), then lane group ``q = 0`` (column 0
        = the token) scales its 8 outputs by the group scales. Every tensor has one element per thread (roles from
        ``%tid.x``), as in the dense tensor-core GEMV. EMULATE: the interpreter computes the same per-lane sums
        directly (``_emulated_sparse_mma_step``)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        if EMULATE:
            tid = tl.arange(0, 32 * WARPS)
        else:
            tid = _thread_index(tl.zeros([32 * WARPS], dtype=tl.int32))
        ready = tl.zeros_like(tid)
        if not EMULATE:
            ready = _fill_shared_table(pairs_ptr, tid, FILL_ASM)
        lane = tid % 32
        g = lane // 4
        q = lane % 4
        tile = pid_n * WARPS + tid // 32
        code_addr = (codes_ptr + tile * 32 + 4 * g).to(tl.int64, bitcast=True)
        lead = q == 0
        a00 = tl.zeros([32 * WARPS], dtype=tl.float32)
        a01 = tl.zeros([32 * WARPS], dtype=tl.float32)
        a10 = tl.zeros([32 * WARPS], dtype=tl.float32)
        a11 = tl.zeros([32 * WARPS], dtype=tl.float32)
        a20 = tl.zeros([32 * WARPS], dtype=tl.float32)
        a21 = tl.zeros([32 * WARPS], dtype=tl.float32)
        a30 = tl.zeros([32 * WARPS], dtype=tl.float32)
        a31 = tl.zeros([32 * WARPS], dtype=tl.float32)
        g_start = pid_k * groups_per_split
        g_stop = tl.minimum(g_start + groups_per_split, n_groups)
        for grp in range(g_start, g_stop):
            count = tl.load(count_ptr + grp)
            zero = tl.zeros([32 * WARPS], dtype=tl.float32)
            d0, d1, d2, d3, d4, d5, d6, d7 = zero, zero, zero, zero, zero, zero, zero, zero
            d8, d9, d10, d11, d12, d13, d14, d15 = zero, zero, zero, zero, zero, zero, zero, zero
            for c_first in range(0, count, 16 * UNROLL):
                for u in tl.static_range(UNROLL):
                    # a step past the count (UNROLL > 1) reads in-group slots and adds nothing (x = 0 there)
                    c0 = tl.minimum(c_first + 16 * u, G - 16)
                    active = c_first + 16 * u < count
                    if EMULATE:
                        if active:
                            d0 = _emulated_sparse_mma_step(d0, vals_ptr, idx_ptr, codes_ptr, grid_ptr, row_bytes, grp * G,
                                                           count, c0, tile, g, 0, 0, HALF_IS_BF16)
                            d2 = _emulated_sparse_mma_step(d2, vals_ptr, idx_ptr, codes_ptr, grid_ptr, row_bytes, grp * G,
                                                           count, c0, tile, g, 0, 1, HALF_IS_BF16)
                            d4 = _emulated_sparse_mma_step(d4, vals_ptr, idx_ptr, codes_ptr, grid_ptr, row_bytes, grp * G,
                                                           count, c0, tile, g, 1, 0, HALF_IS_BF16)
                            d6 = _emulated_sparse_mma_step(d6, vals_ptr, idx_ptr, codes_ptr, grid_ptr, row_bytes, grp * G,
                                                           count, c0, tile, g, 1, 1, HALF_IS_BF16)
                            d8 = _emulated_sparse_mma_step(d8, vals_ptr, idx_ptr, codes_ptr, grid_ptr, row_bytes, grp * G,
                                                           count, c0, tile, g, 2, 0, HALF_IS_BF16)
                            d10 = _emulated_sparse_mma_step(d10, vals_ptr, idx_ptr, codes_ptr, grid_ptr, row_bytes, grp * G,
                                                            count, c0, tile, g, 2, 1, HALF_IS_BF16)
                            d12 = _emulated_sparse_mma_step(d12, vals_ptr, idx_ptr, codes_ptr, grid_ptr, row_bytes, grp * G,
                                                            count, c0, tile, g, 3, 0, HALF_IS_BF16)
                            d14 = _emulated_sparse_mma_step(d14, vals_ptr, idx_ptr, codes_ptr, grid_ptr, row_bytes, grp * G,
                                                            count, c0, tile, g, 3, 1, HALF_IS_BF16)
                    else:
                        lane_x = ((g == 0) & active).to(tl.int32) + ready
                        idx_addr = (idx_ptr + grp * G + c0 + 4 * q).to(tl.int64, bitcast=True)
                        vals_addr = (vals_ptr + grp * G + c0 + 4 * q).to(tl.int64, bitcast=True)
                        d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12, d13, d14, d15 = _sparse_mma_step(
                            d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12, d13, d14, d15, idx_addr, vals_addr,
                            code_addr, row_bytes, lane_x, STEP_ASM, STEP_CONSTRAINTS)
            s_base = scales_ptr + grp * n_pad + tile * 64 + 8 * g
            a00 += d0 * tl.load(s_base + 0, mask=lead, other=0.0).to(tl.float32)
            a01 += d2 * tl.load(s_base + 1, mask=lead, other=0.0).to(tl.float32)
            a10 += d4 * tl.load(s_base + 2, mask=lead, other=0.0).to(tl.float32)
            a11 += d6 * tl.load(s_base + 3, mask=lead, other=0.0).to(tl.float32)
            a20 += d8 * tl.load(s_base + 4, mask=lead, other=0.0).to(tl.float32)
            a21 += d10 * tl.load(s_base + 5, mask=lead, other=0.0).to(tl.float32)
            a30 += d12 * tl.load(s_base + 6, mask=lead, other=0.0).to(tl.float32)
            a31 += d14 * tl.load(s_base + 7, mask=lead, other=0.0).to(tl.float32)
        row0 = tile * 64 + g
        _store_sparse_mma(y_ptr, bias_ptr, work_ptr, a00, row0, lead, N, pid_k, SPLIT_K, HAS_BIAS)
        _store_sparse_mma(y_ptr, bias_ptr, work_ptr, a01, row0 + 8, lead, N, pid_k, SPLIT_K, HAS_BIAS)
        _store_sparse_mma(y_ptr, bias_ptr, work_ptr, a10, row0 + 16, lead, N, pid_k, SPLIT_K, HAS_BIAS)
        _store_sparse_mma(y_ptr, bias_ptr, work_ptr, a11, row0 + 24, lead, N, pid_k, SPLIT_K, HAS_BIAS)
        _store_sparse_mma(y_ptr, bias_ptr, work_ptr, a20, row0 + 32, lead, N, pid_k, SPLIT_K, HAS_BIAS)
        _store_sparse_mma(y_ptr, bias_ptr, work_ptr, a21, row0 + 40, lead, N, pid_k, SPLIT_K, HAS_BIAS)
        _store_sparse_mma(y_ptr, bias_ptr, work_ptr, a30, row0 + 48, lead, N, pid_k, SPLIT_K, HAS_BIAS)
        _store_sparse_mma(y_ptr, bias_ptr, work_ptr, a31, row0 + 56, lead, N, pid_k, SPLIT_K, HAS_BIAS)
        if SPLIT_K > 1:
            tl.debug_barrier()  # every thread's partial is written before the release below
            arrived = tl.atomic_add(tile_count_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                rows = pid_n * (64 * WARPS) + tl.arange(0, 64 * WARPS)
                mask = rows < N
                total = tl.zeros([64 * WARPS], dtype=tl.float32)
                for piece in tl.static_range(SPLIT_K):
                    total += tl.load(work_ptr + piece * N + rows, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rows, mask=mask, other=0.0).to(tl.float32)
                tl.store(y_ptr + rows, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(tile_count_ptr + pid_n, 0)

    @triton.jit
    def _store_sparse_mma(y_ptr, bias_ptr, work_ptr, acc, row, lead, N, pid_k, SPLIT_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr):
        mask = lead & (row < N)
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + row, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + row, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(work_ptr + pid_k * N + row, acc, mask=mask)

    @triton.jit
    def _compact_slice(z, offs, pid, vals_ptr, idx_ptr, count_ptr, tau2, L: tl.constexpr, H: tl.constexpr,
                       G: tl.constexpr):
        """Slice ``pid`` of ``z`` (fp32 ``[L]``, ``L = max(H, G)``, at inputs ``offs``): rotated threshold, then
        per group the surviving values and their indices back to back (positions from a running count), the
        dropped ones after them with value 0, and the group's count."""
        square = z * z
        blocks = tl.reshape(square, [L // H, H])
        mean_square = tl.sum(blocks, axis=1) / H
        keep = tl.reshape(blocks > tau2 * mean_square[:, None], [L // G, G])
        ones = keep.to(tl.int32)
        kept_before = tl.cumsum(ones, axis=1)
        count = tl.sum(ones, axis=1)
        # survivors first, then the dropped entries with value 0: every slot of a group holds a valid index, so
        # the GEMVs may read whole steps past the count without masks (those entries add nothing)
        within = tl.arange(0, G)[None, :]
        pos = tl.where(keep, kept_before - 1, count[:, None] + within - kept_before)
        groups = pid * (L // G) + tl.arange(0, L // G)
        dest = groups[:, None] * G + pos
        tl.store(idx_ptr + dest, tl.reshape(offs, [L // G, G]))
        tl.store(vals_ptr + dest, tl.where(keep, tl.reshape(z, [L // G, G]), 0.0))
        tl.store(count_ptr + groups, count)

    @triton.jit
    def _compact_kernel(z_ptr, vals_ptr, idx_ptr, count_ptr, tau2, L: tl.constexpr, H: tl.constexpr,
                        G: tl.constexpr):
        """One ``L = max(H, G)`` slice of an already rotated ``z`` per program (``_compact_slice``)."""
        pid = tl.program_id(0)
        offs = pid * L + tl.arange(0, L)
        z = tl.load(z_ptr + offs).to(tl.float32)
        _compact_slice(z, offs, pid, vals_ptr, idx_ptr, count_ptr, tau2, L, H, G)

    @triton.jit
    def _rotate_compact_kernel(x_ptr, s_ptr, vals_ptr, idx_ptr, count_ptr, in_features, scale, tau2,
                               A: tl.constexpr, B: tl.constexpr, LOG_A: tl.constexpr, LOG_B: tl.constexpr,
                               G: tl.constexpr, HAS_SIGNS: tl.constexpr, LOWP: tl.constexpr):
        """One Hadamard block ``H = A * B`` (>= G) of the raw token per program: the rotation of
        ``_fwht_kron_kernel`` (its one-row, single-rounding form), then ``_compact_slice`` -- so a decode token
        skips the FWHT launch and the round trip of ``z`` through memory.

        Inputs past ``in_features`` read as 0, the zero padding ``prepare_input`` writes; ``z`` is rounded to
        the input dtype before the threshold, as the FWHT kernel stores it, so both paths keep the same entries
        with the same values."""
        pid = tl.program_id(0)
        block = pid * (A * B)
        inner = tl.arange(0, A)[:, None] * B + tl.arange(0, B)[None, :]
        x = tl.load(x_ptr + block + inner, mask=(block + inner) < in_features, other=0.0)
        if HAS_SIGNS:
            x = x * tl.load(s_ptr + block + inner).to(x.dtype)
        hb = _hadamard(B, LOG_B)
        ha = _hadamard(A, LOG_A)
        y = _kron_rotate(x, ha, hb, LOWP, False)
        z = tl.reshape((y * scale).to(x.dtype).to(tl.float32), [A * B])
        _compact_slice(z, block + tl.arange(0, A * B), pid, vals_ptr, idx_ptr, count_ptr, tau2, A * B, A * B, G)

    @triton.jit
    def _rotated_sparse_gemv_kernel(vals_ptr, idx_ptr, count_ptr, codes_ptr, scales_ptr, table_ptr, bias_ptr, y_ptr,
                                    work_ptr, tile_count_ptr, N, n_pad, row_bytes, n_groups, groups_per_split,
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
            s_lo = tl.load(scales_ptr + grp * n_pad + 2 * cols, mask=col_mask, other=0.0).to(tl.float32)
            s_hi = tl.load(scales_ptr + grp * n_pad + 2 * cols + 1, mask=col_mask, other=0.0).to(tl.float32)
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
        # byte column j = 32 T + 4 g + t holds outputs 64 T + 16 t + g (low nibble) and + 8 (decode_layout)
        rows_lo = (cols // 32) * 64 + (cols % 4) * 16 + (cols % 32) // 4
        rows_hi = rows_lo + 8
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc_lo += tl.load(bias_ptr + rows_lo, mask=rows_lo < N, other=0.0).to(tl.float32)
                acc_hi += tl.load(bias_ptr + rows_hi, mask=rows_hi < N, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows_lo, acc_lo.to(y_ptr.dtype.element_ty), mask=rows_lo < N)
            tl.store(y_ptr + rows_hi, acc_hi.to(y_ptr.dtype.element_ty), mask=rows_hi < N)
        else:
            tl.store(work_ptr + pid_k * N + rows_lo, acc_lo, mask=rows_lo < N)
            tl.store(work_ptr + pid_k * N + rows_hi, acc_hi, mask=rows_hi < N)
            tl.debug_barrier()  # every thread's partial is written before the release below
            arrived = tl.atomic_add(tile_count_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:  # BLOCK_NB covers whole tiles: this program's rows are contiguous
                rows = pid_n * (2 * BLOCK_NB) + tl.arange(0, 2 * BLOCK_NB)
                total = tl.zeros([2 * BLOCK_NB], dtype=tl.float32)
                for piece in tl.static_range(SPLIT_K):
                    total += tl.load(work_ptr + piece * N + rows, mask=rows < N, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
                tl.store(y_ptr + rows, total.to(y_ptr.dtype.element_ty), mask=rows < N)
                tl.atomic_xchg(tile_count_ptr + pid_n, 0)

    def compact_rotated_triton(z: torch.Tensor, tau: float, hadamard_size: int, group_size: int):
        """``z [K_pad]`` (one rotated token) -> ``(values fp32 [K_pad], indices int32 [K_pad], counts int32
        [groups])``: group ``g``'s surviving entries sit at ``[g * G, g * G + counts[g])``, its dropped ones
        (value 0) after them."""
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

    def rotate_compact_triton(x: torch.Tensor, signs: torch.Tensor | None, tau: float, hadamard_size: int,
                              group_size: int, kp: int, in_features: int):
        """One raw token ``x [..., in_features]`` -> the ``(values, indices, counts)`` of
        ``compact_rotated_triton(prepare_input(x, signs, hadamard_size, kp), ...)`` in one launch (padding,
        signs, FWHT and compaction fused; :func:`fuses_rotation` says for which formats)."""
        if not fuses_rotation(hadamard_size, group_size):
            raise ValueError(f"no fused rotation + compaction for hadamard_size={hadamard_size}, "
                             f"group_size={group_size}")
        x = x.reshape(-1).contiguous()
        if x.numel() != in_features or kp % hadamard_size or in_features > kp:
            raise ValueError(f"one token of {in_features} inputs padded to a multiple {kp} of {hadamard_size} "
                             f"expected, got {x.numel()} inputs")
        if signs is not None:
            signs = signs.to(device=x.device, dtype=torch.float32).contiguous()
        a, b = _split(hadamard_size)
        vals = torch.empty(kp, dtype=torch.float32, device=x.device)
        idx = torch.empty(kp, dtype=torch.int32, device=x.device)
        counts = torch.empty(kp // group_size, dtype=torch.int32, device=x.device)
        # four warps: what the FWHT tuner runs one row of these block sizes with, and the compaction kernel too
        _rotate_compact_kernel[(kp // hadamard_size,)](
            x, signs if signs is not None else x, vals, idx, counts, in_features, 1.0 / math.sqrt(hadamard_size),
            float(tau) * float(tau), A=a, B=b, LOG_A=int(math.log2(a)), LOG_B=int(math.log2(b)), G=group_size,
            HAS_SIGNS=signs is not None, LOWP=x.dtype in (torch.float16, torch.bfloat16), num_warps=4, num_stages=1)
        return vals, idx, counts

    def _launch(config: Config, vals, idx, counts, codes_tm, scales_tm, table, bias, group_size, half, n):
        meta = config.meta
        n_groups, n_pad = scales_tm.shape
        row_bytes = codes_tm.shape[1]
        split = min(meta["SPLIT_K"], n_groups)
        per_split = triton.cdiv(n_groups, split)
        split = triton.cdiv(n_groups, per_split)
        y = torch.empty(1, n, dtype=half, device=vals.device)
        work = torch.empty(split, n, dtype=torch.float32, device=vals.device) if split > 1 else y
        bias_arg = bias if bias is not None else scales_tm
        if meta.get("MODE") == "mma":
            warps = config.num_warps
            grid = (triton.cdiv(n_pad // 64, warps), split)
            tile_counts = _tile_counters(vals.device, grid[0]) if split > 1 else y
            # the interpreter's emulation reads the grid rounded like the pair table; the GPU never does
            grid_half = table.reshape(-1).to(half).to(torch.float32).contiguous() if interpreter_mode() else table
            _rotated_sparse_mma_kernel[grid](
                vals, idx, counts, codes_tm, scales_tm, pair_table(table, 4, 1, half), grid_half, bias_arg, y, work,
                tile_counts, n, n_pad, row_bytes, n_groups, per_split, WARPS=warps, G=group_size, SPLIT_K=split,
                HAS_BIAS=bias is not None, HALF_IS_BF16=half == torch.bfloat16,
                STEP_ASM=SPARSE_MMA_STEP_PTX["bf16" if half == torch.bfloat16 else "fp16"],
                STEP_CONSTRAINTS=SPARSE_MMA_STEP_CONSTRAINTS, FILL_ASM=shared_table_fill_ptx(warps, 2),
                UNROLL=meta.get("UNROLL", 1), EMULATE=interpreter_mode(), num_warps=warps, num_stages=1)
            return y
        block_nb = meta["BLOCK_NB"]
        grid = (triton.cdiv(row_bytes, block_nb), split)
        tile_counts = _tile_counters(vals.device, grid[0]) if split > 1 else y
        register = meta["REGISTER"]
        lookup = register_table(table, half) if register else table.reshape(-1).to(torch.float32).contiguous()
        _rotated_sparse_gemv_kernel[grid](
            vals, idx, counts, codes_tm, scales_tm, lookup, bias_arg, y, work, tile_counts, n, n_pad, row_bytes,
            n_groups, per_split, G=group_size, BLOCK_NB=block_nb, BLOCK_K=meta["BLOCK_K"], SPLIT_K=split,
            HAS_BIAS=bias is not None, HALF_IS_BF16=half == torch.bfloat16, REGISTER=register,
            EMULATE=interpreter_mode(), SCALE_EACH=meta.get("SCALE_EACH", 0), num_warps=config.num_warps,
            num_stages=config.num_stages)
        return y

    def _configs() -> list[Config]:
        configs = [Config({"BLOCK_NB": 64, "BLOCK_K": 16, "SPLIT_K": 4, "REGISTER": 0}, num_warps=4, num_stages=2)]
        for warps in (2, 4, 8):
            for split in (1, 4, 8, 16, 32):
                for unroll in (1, 2, 4):
                    configs.append(Config({"MODE": "mma", "SPLIT_K": split, "UNROLL": unroll}, warps, 1))
        for register in (1, 0):
            for scale_each in (0, 1):
                for block_nb, block_k, warps in ((64, 16, 2), (64, 32, 4), (128, 16, 4), (128, 32, 4), (256, 16, 4),
                                                 (256, 32, 8)):
                    for split in (1, 4, 16):
                        configs.append(Config({"BLOCK_NB": block_nb, "BLOCK_K": block_k, "SPLIT_K": split,
                                               "REGISTER": register, "SCALE_EACH": scale_each}, warps, 2))
        return configs

    def _prune(configs, args):
        vals, idx, counts, codes_tm, scales_tm, table, bias, group_size, half, n = args
        if half not in (torch.float16, torch.bfloat16):  # register and pair tables hold 16-bit weights
            configs = [c for c in configs if not c.meta.get("REGISTER") and c.meta.get("MODE") != "mma"]
        n_groups, n_pad = scales_tm.shape
        # a tensor-core program's warps each own one 64-output tile, unmasked: a warp past the last tile would
        # read codes and scales beyond the buffers (an illegal address on the GPU, N = 128 with 4 warps)
        configs = [c for c in configs if c.meta.get("MODE") != "mma" or (n_pad // 64) % c.num_warps == 0]
        if half in (torch.float16, torch.bfloat16) and not interpreter_mode():
            # the tensor-core kernel won every shape tuned on the H100 (rotated_sparsity.json: 8 of 8), and the
            # 73 CUDA-core candidates tripled the first-step tuning (a 1B decode's cold start ran past 150 s)
            tensor_core = [c for c in configs if c.meta.get("MODE") == "mma"]
            configs = tensor_core or configs
        kept = [c for c in configs if c.meta["SPLIT_K"] <= n_groups]
        return kept or configs[:1]

    _tuner = Autotuner(
        "rotated_sparse_lut_gemv",
        _configs(),
        key=lambda vals, idx, counts, ct, st, t, b, g, half, n: (str(half), n, st.shape[0], g, b is not None),
        launch=_launch,
        prune=_prune,
    )

    def rotated_sparse_gemv(vals, idx, counts, codes_tm, scales_tm, table, bias, group_size: int, half: torch.dtype,
                            n: int, config: Config | None = None) -> torch.Tensor:
        """The GEMV over compacted rotated activations (``compact_rotated_triton``) and tile-major codes /
        scales (``decode_layout``): ``[1, n]`` in ``half``."""
        table = table.to(device=vals.device, dtype=torch.float32).contiguous()
        args = (vals, idx, counts, codes_tm, scales_tm, table, bias, group_size, half, n)
        return _launch(config, *args) if config is not None else _tuner(*args)

    rotated_sparse_gemv_triton = rotated_sparse_gemv

    def _rotated_sparse_lut_linear_cuda(x, codes, scales, table, signs, bias, codes_tm, scales_tm, bits, group_size,
                                        hadamard_size, in_features, tau, sparse_prefill=True):
        kp = scales.shape[1] * group_size
        n = scales.shape[0]
        if _tokens(x) == 1:
            if fuses_rotation(hadamard_size, group_size):
                vals, idx, counts = rotate_compact_triton(x, signs, tau, hadamard_size, group_size, kp, in_features)
            else:
                z = prepare_input(x, signs, hadamard_size, kp)
                vals, idx, counts = compact_rotated_triton(z, tau, hadamard_size, group_size)
            y = rotated_sparse_gemv(vals, idx, counts, codes_tm, scales_tm, table, bias, group_size, x.dtype, n)
        else:
            z = prepare_input(x, signs, hadamard_size, kp)
            if sparse_prefill or _tokens(x) <= MAX_SPARSE_TOKENS:
                z = rotated_sparsify_reference(z, tau, hadamard_size)
            y = lut_linear_triton(z, codes, scales, table, None, bias, bits, 1, group_size, 0, kp)
        return y.reshape(*x.shape[:-1], n)


def _fake(x, codes, scales, table, signs, bias, codes_tm, scales_tm, bits, group_size, hadamard_size, in_features, tau,
          sparse_prefill=True):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, scales, table, signs, bias, codes_tm, scales_tm, bits, group_size, hadamard_size, in_features, tau, *rest = inputs
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

__all__ = ["supports", "decode_layout", "rotated_keep", "rotated_sparsify_reference", "rotated_sparsity", "rotated_sparse_lut_linear",
           "compact_rotated", "rotate_compact_triton", "fuses_rotation", "rotated_sparse_gemv_triton"]
