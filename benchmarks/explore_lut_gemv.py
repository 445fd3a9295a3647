"""Exploration: which way of decoding 4-bit LUT codes makes a decode GEMV (M = 1) fastest on the GPU.

The packed format (``transfigure.kernels.lut_format``) stores a row's 4-bit codes little-end first, so viewed as
bytes, byte ``j`` of a row holds the codes of columns ``2j`` (low nibble) and ``2j + 1`` (high nibble). The
variants differ only in how a program turns those bytes into weights:

* ``nibble``: one code per weight, looked up in the 16-entry fp32 table (one gather per weight).
* ``int``: no lookup (``code - 8``), the cost floor of the same loop without a table (not a LUT kernel).
* ``pair``: one lookup per BYTE in a 256-entry table whose entry packs the two bf16 weights of that byte
  (one gather per two weights, unpacked with a shift and a mask).
* ``slots`` / ``tile``: the two kernels of ``transfigure.kernels.lut_gemm`` (through the op's launcher).

Each variant is checked against a float32 reference and timed under CUDA-graph replay with every config of
a small grid (best reported).  ``python benchmarks/explore_lut_gemv.py --out DIR``

Result on an H100 (2026-11-24, triton 3.6; cuBLAS bf16 41.8 / 44.5 / 10.9 us for 14336x4096 / 4096x14336 /
4096x4096): nibble 84.9 / 77.5 / 23.0, int 75.8 / 75.3 / 25.3, pair 34.8 / 41.6 / 15.9, slots (a kernel that
visited the 8 nibbles of each int32 word with strided activation loads) 70.7 / 72.2 / 23.8, tile 51.7 / 53.4 /
16.4 us. Decoding without any table (``int``) was no faster than with one, so the per-weight load and unpack
work, not the lookup, dominated; the pair layout halves it and became the decode kernel of ``lut_gemm``.

Second run (2026-11-24, ``--variants pair,v2 --shapes 1b``, ``explore_lut_gemv_1b.json``): the v2 flags of
``_pair_v2_kernel`` — BLOCK_G groups per loop step, XSPLIT (one contiguous activation load split into even/odd
columns), REDUCE (per-step row sums). Best vs plain pair, us: 8192x2048 13.2 -> 11.7, 2048x8192 16.9 -> 11.7,
16384x2048 21.9 -> 18.0 (cuBLAS 25.2), 3072x2048 8.3 -> 7.5 (the tile kernel 7.4), 2048x2048 7.6 -> 6.9 (tile 6.3).
XSPLIT mattered most; the winners became configs of ``_lut_pair_gemv1_kernel``.

Third and fourth runs (2026-11-24, ``--variants v3`` / ``v4``; split-K here pays a 2.4 us memset + cast that the
production kernel does not): v3 swaps the lookup of the v2 loop — register table (``prmt``), pair-table gather,
or none (codes cast to float, a floor). 14336x4096: prmt 24.4, gather 29.7, none 21.5 us (cuBLAS 41.9); 4096x14336:
23.1 / 28.8 / 21.6 (44.5). v4 added pipelining to the prmt loop (Triton's ``tl.range(num_stages=3)``, a hand-made
register double buffer) and strided activation loads: all within 1 us of v3. The register lookup became the
REGISTER configs of ``_lut_pair_gemv1_kernel`` and ``_lut_register_mm_kernel``. Files:
``benchmarks/results/explore_lut_gemv_v{3,4}_{8b,1b}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


@triton.jit
def _gemv_bytes_kernel(x_ptr, codes_ptr, scales_ptr, table_ptr, y_ptr, N, bytes_per_row, n_groups,
                       groups_per_split, BLOCK_N: tl.constexpr, G: tl.constexpr, MODE: tl.constexpr,
                       SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_base = codes_ptr + rows[:, None].to(tl.int64) * bytes_per_row
    if MODE == 2:  # pair: one byte -> two weights
        acc = tl.zeros([BLOCK_N, G // 2], dtype=tl.float32)
        bs = tl.arange(0, G // 2)
    else:
        acc = tl.zeros([BLOCK_N, G], dtype=tl.float32)
        ks = tl.arange(0, G)
    g0 = pid_k * groups_per_split
    for g in range(g0, g0 + groups_per_split):
        s = tl.load(scales_ptr + rows * n_groups + g, mask=row_mask, other=0.0).to(tl.float32)
        if MODE == 2:
            byte = tl.load(row_base + (g * (G // 2) + bs)[None, :], mask=row_mask[:, None], other=0).to(tl.int32)
            e = tl.load(table_ptr + (byte & 255))
            lo = (e << 16).to(tl.float32, bitcast=True)
            hi = (e & -65536).to(tl.float32, bitcast=True)
            xe = tl.load(x_ptr + g * G + 2 * bs).to(tl.float32)
            xo = tl.load(x_ptr + g * G + 2 * bs + 1).to(tl.float32)
            acc += (lo * xe[None, :] + hi * xo[None, :]) * s[:, None]
        else:
            byte = tl.load(row_base + (g * (G // 2) + ks // 2)[None, :], mask=row_mask[:, None], other=0)
            code = (byte.to(tl.int32) >> ((ks % 2) * 4)[None, :]) & 15
            if MODE == 0:
                v = tl.load(table_ptr + code)
            else:
                v = code.to(tl.float32) - 8.0
            xv = tl.load(x_ptr + g * G + ks).to(tl.float32)
            acc += v * s[:, None] * xv[None, :]
    out = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.atomic_add(y_ptr + rows, out, mask=row_mask)


@triton.jit
def _pair_v2_kernel(x_ptr, codes_ptr, scales_ptr, pairs_ptr, y_ptr, N, bytes_per_row, n_groups, groups_per_split,
                    BLOCK_N: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, XSPLIT: tl.constexpr,
                    REDUCE: tl.constexpr, HALF_IS_BF16: tl.constexpr, SPLIT_K: tl.constexpr):
    """4-bit pair decode with BLOCK_G groups per loop step (more bytes in flight per iteration), optionally
    one contiguous activation load split into even/odd columns (XSPLIT) and a per-step reduction to [BLOCK_N]
    (REDUCE: fewer live registers) instead of a [BLOCK_N, BLOCK_G, NB] accumulator."""
    NB: tl.constexpr = G // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    gs = tl.arange(0, BLOCK_G)
    bs = tl.arange(0, NB)
    row_base = codes_ptr + rows[:, None, None].to(tl.int64) * bytes_per_row
    offs = gs[None, :, None] * NB + bs[None, None, :]
    if REDUCE:
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BLOCK_N, BLOCK_G, NB], dtype=tl.float32)
    g_start = pid_k * groups_per_split
    for grp in range(g_start, g_start + groups_per_split, BLOCK_G):
        byte = tl.load(row_base + grp * NB + offs, mask=row_mask[:, None, None], other=0).to(tl.int32)
        s = tl.load(scales_ptr + rows[:, None] * n_groups + grp + gs[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
        e = tl.load(pairs_ptr + byte)
        if HALF_IS_BF16:
            first = (e << 16).to(tl.float32, bitcast=True)
            second = (e & -65536).to(tl.float32, bitcast=True)
        else:
            first = (e & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            second = (e >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        col = grp * G + (gs[:, None] * NB + bs[None, :]) * 2
        if XSPLIT:
            xx = tl.load(x_ptr + grp * G + tl.arange(0, BLOCK_G * G)).to(tl.float32)
            xe, xo = tl.split(tl.reshape(xx, [BLOCK_G, NB, 2]))
        else:
            xe = tl.load(x_ptr + col).to(tl.float32)
            xo = tl.load(x_ptr + col + 1).to(tl.float32)
        t = first * xe[None, :, :] + second * xo[None, :, :]
        if REDUCE:
            acc1 += tl.sum(tl.sum(t, axis=2) * s, axis=1)
        else:
            acc3 += t * s[:, :, None]
    if REDUCE:
        out = acc1
    else:
        out = tl.sum(tl.sum(acc3, axis=2), axis=1)
    if SPLIT_K == 1:
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.atomic_add(y_ptr + rows, out, mask=row_mask)


# Register-table lookup (v3/v4): the production PTX (transfigure.kernels.lut_gemm._register_lookup_ptx): the 16
# bf16 grid values live in 8 registers and `prmt` looks codes up, no memory access per weight.
from transfigure.kernels.lut_gemm import REGISTER_LOOKUP_CONSTRAINTS, REGISTER_LOOKUP_PTX, register_table_words  # noqa: E402

_PRMT_CONSTRAINTS = tl.constexpr(REGISTER_LOOKUP_CONSTRAINTS)
_PRMT_LOOKUP_ASM = tl.constexpr(REGISTER_LOOKUP_PTX["bf16"])


def byte_tables(table: torch.Tensor) -> torch.Tensor:
    return register_table_words(table, torch.bfloat16)


@triton.jit
def _v3_kernel(x_ptr, codes_ptr, scales_ptr, aux_ptr, y_ptr, N, bytes_per_row, n_groups, groups_per_split,
               BLOCK_N: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, LOOKUP: tl.constexpr,
               ATOMIC: tl.constexpr):
    """v2 (XSPLIT, no REDUCE) with the lookup swapped: LOOKUP 0 = register table (prmt), 1 = pair-table
    gather (as v2), 2 = none (code as float: the loop's cost without any lookup)."""
    NB: tl.constexpr = G // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    gs = tl.arange(0, BLOCK_G)
    bs = tl.arange(0, NB)
    row_base = codes_ptr + rows[:, None, None].to(tl.int64) * bytes_per_row
    offs = gs[None, :, None] * NB + bs[None, None, :]
    acc3 = tl.zeros([BLOCK_N, BLOCK_G, NB], dtype=tl.float32)
    if LOOKUP == 0:
        t0 = tl.load(aux_ptr + 0)
        t1 = tl.load(aux_ptr + 1)
        t2 = tl.load(aux_ptr + 2)
        t3 = tl.load(aux_ptr + 3)
        t4 = tl.load(aux_ptr + 4)
        t5 = tl.load(aux_ptr + 5)
        t6 = tl.load(aux_ptr + 6)
        t7 = tl.load(aux_ptr + 7)
    g_start = pid_k * groups_per_split
    for grp in range(g_start, g_start + groups_per_split, BLOCK_G):
        byte = tl.load(row_base + grp * NB + offs, mask=row_mask[:, None, None], other=0)
        s = tl.load(scales_ptr + rows[:, None] * n_groups + grp + gs[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
        if LOOKUP == 0:
            first, second = tl.inline_asm_elementwise(
                _PRMT_LOOKUP_ASM, _PRMT_CONSTRAINTS,
                [byte, t0, t1, t2, t3, t4, t5, t6, t7], dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        elif LOOKUP == 1:
            e = tl.load(aux_ptr + byte.to(tl.int32))
            first = (e << 16).to(tl.float32, bitcast=True)
            second = (e & -65536).to(tl.float32, bitcast=True)
        else:
            b32 = byte.to(tl.int32)
            first = (b32 & 15).to(tl.float32)
            second = (b32 >> 4).to(tl.float32)
        xx = tl.load(x_ptr + grp * G + tl.arange(0, BLOCK_G * G)).to(tl.float32)
        xe, xo = tl.split(tl.reshape(xx, [BLOCK_G, NB, 2]))
        acc3 += (first * xe[None, :, :] + second * xo[None, :, :]) * s[:, :, None]
    out = tl.sum(tl.sum(acc3, axis=2), axis=1)
    if not ATOMIC:
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.atomic_add(y_ptr + rows, out, mask=row_mask)


@triton.jit
def _v4_tile(byte, s, x_ptr, grp, t0, t1, t2, t3, t4, t5, t6, t7, G: tl.constexpr, BLOCK_G: tl.constexpr,
             XS: tl.constexpr):
    NB: tl.constexpr = G // 2
    first, second = tl.inline_asm_elementwise(
        _PRMT_LOOKUP_ASM, _PRMT_CONSTRAINTS,
        [byte, t0, t1, t2, t3, t4, t5, t6, t7], dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    if XS:
        xx = tl.load(x_ptr + grp * G + tl.arange(0, BLOCK_G * G)).to(tl.float32)
        xe, xo = tl.split(tl.reshape(xx, [BLOCK_G, NB, 2]))
    else:
        col = grp * G + (tl.arange(0, BLOCK_G)[:, None] * NB + tl.arange(0, NB)[None, :]) * 2
        xe = tl.load(x_ptr + col).to(tl.float32)
        xo = tl.load(x_ptr + col + 1).to(tl.float32)
    return (first * xe[None, :, :] + second * xo[None, :, :]) * s[:, :, None]


@triton.jit
def _v4_kernel(x_ptr, codes_ptr, scales_ptr, aux_ptr, y_ptr, N, bytes_per_row, n_groups, groups_per_split,
               BLOCK_N: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, PIPE: tl.constexpr,
               XS: tl.constexpr, ATOMIC: tl.constexpr):
    """v3's register-table (prmt) lookup with the loads of step i + 1 in flight while step i computes:
    PIPE 1 = by hand (loop-carried registers), PIPE 2 = Triton's pipeliner (tl.range num_stages=3)."""
    NB: tl.constexpr = G // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    gs = tl.arange(0, BLOCK_G)
    row_base = codes_ptr + rows[:, None, None].to(tl.int64) * bytes_per_row
    offs = gs[None, :, None] * NB + tl.arange(0, NB)[None, None, :]
    s_base = scales_ptr + rows[:, None] * n_groups + gs[None, :]
    acc3 = tl.zeros([BLOCK_N, BLOCK_G, NB], dtype=tl.float32)
    t0 = tl.load(aux_ptr + 0)
    t1 = tl.load(aux_ptr + 1)
    t2 = tl.load(aux_ptr + 2)
    t3 = tl.load(aux_ptr + 3)
    t4 = tl.load(aux_ptr + 4)
    t5 = tl.load(aux_ptr + 5)
    t6 = tl.load(aux_ptr + 6)
    t7 = tl.load(aux_ptr + 7)
    g_start = pid_k * groups_per_split
    g_end = g_start + groups_per_split
    if PIPE == 1:
        byte = tl.load(row_base + g_start * NB + offs, mask=row_mask[:, None, None], other=0)
        s = tl.load(s_base + g_start, mask=row_mask[:, None], other=0.0)
        for grp in range(g_start, g_end, BLOCK_G):
            more = grp + BLOCK_G < g_end
            byte_next = tl.load(row_base + (grp + BLOCK_G) * NB + offs, mask=row_mask[:, None, None] & more, other=0)
            s_next = tl.load(s_base + grp + BLOCK_G, mask=row_mask[:, None] & more, other=0.0)
            acc3 += _v4_tile(byte, s.to(tl.float32), x_ptr, grp, t0, t1, t2, t3, t4, t5, t6, t7, G, BLOCK_G, XS)
            byte = byte_next
            s = s_next
    elif PIPE == 2:
        for grp in tl.range(g_start, g_end, BLOCK_G, num_stages=3):
            byte = tl.load(row_base + grp * NB + offs, mask=row_mask[:, None, None], other=0)
            s = tl.load(s_base + grp, mask=row_mask[:, None], other=0.0).to(tl.float32)
            acc3 += _v4_tile(byte, s, x_ptr, grp, t0, t1, t2, t3, t4, t5, t6, t7, G, BLOCK_G, XS)
    else:
        for grp in range(g_start, g_end, BLOCK_G):
            byte = tl.load(row_base + grp * NB + offs, mask=row_mask[:, None, None], other=0)
            s = tl.load(s_base + grp, mask=row_mask[:, None], other=0.0).to(tl.float32)
            acc3 += _v4_tile(byte, s, x_ptr, grp, t0, t1, t2, t3, t4, t5, t6, t7, G, BLOCK_G, XS)
    out = tl.sum(tl.sum(acc3, axis=2), axis=1)
    if not ATOMIC:
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.atomic_add(y_ptr + rows, out, mask=row_mask)


def launch_v4(x, codes_u8, scales, aux, n, bn, split, warps, stages, block_g, pipe, xs=1):
    n_groups = scales.shape[1]
    g = (codes_u8.shape[1] * 2) // n_groups
    y = torch.empty(n, dtype=x.dtype, device=x.device) if split == 1 else torch.zeros(n, dtype=torch.float32, device=x.device)
    _v4_kernel[(triton.cdiv(n, bn), split)](x, codes_u8, scales, aux, y, n, codes_u8.shape[1], n_groups,
                                            n_groups // split, BLOCK_N=bn, G=g, BLOCK_G=block_g, PIPE=pipe,
                                            XS=xs, ATOMIC=split > 1, num_warps=warps, num_stages=stages)
    return y if split == 1 else y.to(x.dtype)


def launch_v3(x, codes_u8, scales, aux, n, bn, split, warps, stages, block_g, lookup):
    n_groups = scales.shape[1]
    g = (codes_u8.shape[1] * 2) // n_groups
    y = torch.empty(n, dtype=x.dtype, device=x.device) if split == 1 else torch.zeros(n, dtype=torch.float32, device=x.device)
    _v3_kernel[(triton.cdiv(n, bn), split)](x, codes_u8, scales, aux, y, n, codes_u8.shape[1], n_groups,
                                            n_groups // split, BLOCK_N=bn, G=g, BLOCK_G=block_g, LOOKUP=lookup,
                                            ATOMIC=split > 1, num_warps=warps, num_stages=stages)
    return y if split == 1 else y.to(x.dtype)


def launch_v2(x, codes_u8, scales, pairs, n, bn, split, warps, stages, block_g, xsplit, reduce):
    n_groups = scales.shape[1]
    g = (codes_u8.shape[1] * 2) // n_groups
    y = torch.empty(n, dtype=x.dtype, device=x.device) if split == 1 else torch.zeros(n, dtype=torch.float32, device=x.device)
    _pair_v2_kernel[(triton.cdiv(n, bn), split)](x, codes_u8, scales, pairs, y, n, codes_u8.shape[1], n_groups,
                                                 n_groups // split, BLOCK_N=bn, G=g, BLOCK_G=block_g, XSPLIT=xsplit,
                                                 REDUCE=reduce, HALF_IS_BF16=x.dtype == torch.bfloat16,
                                                 SPLIT_K=split, num_warps=warps, num_stages=stages)
    return y if split == 1 else y.to(x.dtype)


def launch(mode, x, codes_u8, scales, table, n, bn, split, warps, stages):
    n_groups = scales.shape[1]
    g = (codes_u8.shape[1] * 2) // n_groups
    y = torch.empty(n, dtype=x.dtype, device=x.device) if split == 1 else torch.zeros(n, dtype=torch.float32, device=x.device)
    _gemv_bytes_kernel[(triton.cdiv(n, bn), split)](x, codes_u8, scales, table, y, n, codes_u8.shape[1], n_groups,
                                                     n_groups // split, BLOCK_N=bn, G=g, MODE=mode, SPLIT_K=split,
                                                     num_warps=warps, num_stages=stages)
    return y if split == 1 else y.to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/explore")
    ap.add_argument("--budget", type=float, default=200)
    ap.add_argument("--variants", default="pair,v2", help="comma list of nibble, int, pair, v2 (12 flag combinations)")
    ap.add_argument("--shapes", choices=("8b", "1b"), default="1b")
    ap.add_argument("--configs", choices=("short", "wide"), default="short")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from triton.testing import do_bench_cudagraph

    from transfigure.kernels.grids import get_grid
    from transfigure.kernels.lut_format import dequantize, pack
    from transfigure.kernels.lut_gemm import _lut_tuner, lut_linear_triton, pair_table

    dev = "cuda"
    start = time.time()
    rows_out = []
    if args.configs == "wide":
        configs = [(bn, split, warps, stages) for bn in (8, 16, 32, 64) for split in (1, 2, 4) for warps in (4, 8)
                   for stages in (1, 3)]
    else:
        configs = [(16, 4, 4, 1), (32, 4, 4, 1), (64, 4, 4, 1), (128, 4, 8, 1), (64, 2, 4, 1), (32, 8, 4, 1),
                   (64, 8, 8, 1), (32, 2, 4, 2), (16, 8, 4, 1), (128, 2, 8, 1)]
    shapes = {"8b": [(14336, 4096), (4096, 14336), (4096, 4096)],
              "1b": [(8192, 2048), (2048, 8192), (2048, 2048), (3072, 2048), (16384, 2048)]}[args.shapes]
    variants = []
    for name in args.variants.split(","):
        if name in ("nibble", "int", "pair"):
            variants.append((name, {"nibble": 0, "int": 1, "pair": 2}[name], None))
        elif name == "v2":
            variants += [(f"v2_g{bg}_x{xs}_r{red}", None, (bg, xs, red)) for bg in (1, 2, 4) for xs in (0, 1)
                         for red in (0, 1)]
        elif name == "v4":
            variants += [(f"v4_p{pipe}_g{bg}_x{xs}", None, ("v4", bg, pipe, xs)) for pipe in (0, 1, 2) for bg in (1, 2)
                         for xs in (0, 1) if f"p{pipe}_g{bg}_x{xs}" in os.environ.get("V4", "p1_g1_x1,p2_g1_x1")]
        elif name == "v3":
            variants += [(f"v3_{lk}_g{bg}", None, ("v3", bg, li)) for li, lk in enumerate(("prmt", "gather", "none"))
                         for bg in (1, 2, 4) if f"{lk}_g{bg}" in os.environ.get("V3", "prmt_g1,prmt_g2,prmt_g4,gather_g2,none_g2")]
    for n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev) * 0.02
        table = get_grid("higgs", 4, 1).table
        pk = pack(w, table, bits=4, p=1, group_size=128, hadamard_size=0, scale_mode="rms", grid="higgs")
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        wq = dequantize(pk, "rotated")
        ref = (x.float() @ wq.T).reshape(-1)
        codes_u8 = pk.codes.view(torch.uint8).reshape(n, -1)
        wb = w.to(torch.bfloat16)
        cublas = do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb), rep=30) * 1e3
        row = {"N": n, "K": k, "cublas_us": cublas}
        tables = {0: pk.table.reshape(-1).float().contiguous(), 1: pk.table.reshape(-1).float().contiguous(),
                  2: pair_table(pk.table.float(), 4, 1, torch.bfloat16), "bytes": byte_tables(pk.table.float())}
        zeros_cast = do_bench_cudagraph(lambda: torch.zeros(n, dtype=torch.float32, device=dev).to(torch.bfloat16), rep=20) * 1e3
        row["split_overhead_us"] = zeros_cast  # the explore kernels' split-K pays a memset + cast (production does not)
        for name, mode, flags in variants:
            best = (float("inf"), None)
            shape_configs = list(configs)
            if flags is not None and flags[0] in ("v3", "v4"):  # one-shot programs: 1, 2 or 4 loop steps over K
                ng = k // 128
                shape_configs += [(bn, ng // (flags[1] * it), 4, 1) for bn in (16, 32, 64) for it in (1, 2, 4)
                                  if ng % (flags[1] * it) == 0 and ng // (flags[1] * it) > 1]
                shape_configs += [(64, 4, 4, 3), (32, 8, 4, 3)]
            for bn, split, warps, stages in shape_configs:
                if time.time() - start > args.budget:
                    break
                bg = flags[1] if flags is not None and flags[0] in ("v3", "v4") else (flags[0] if flags else 1)
                if flags is not None and ((k // 128) // split) % bg:
                    continue
                try:
                    if flags is None:
                        fn = lambda: launch(mode, x.reshape(-1), codes_u8, pk.scales, tables[mode], n, bn, split, warps, stages)  # noqa: E731
                    elif flags[0] == "v4":
                        fn = lambda: launch_v4(x.reshape(-1), codes_u8, pk.scales, tables["bytes"], n, bn, split, warps, stages, flags[1], flags[2], flags[3])  # noqa: E731
                    elif flags[0] == "v3":
                        aux = tables["bytes"] if flags[2] == 0 else tables[2]
                        fn = lambda: launch_v3(x.reshape(-1), codes_u8, pk.scales, aux, n, bn, split, warps, stages, flags[1], flags[2])  # noqa: E731
                    else:
                        fn = lambda: launch_v2(x.reshape(-1), codes_u8, pk.scales, tables[2], n, bn, split, warps, stages, *flags)  # noqa: E731
                    y = fn().float()
                    if mode != 1 and not (flags is not None and flags[0] == "v3" and flags[2] == 2):
                        err = float((y - ref).norm() / ref.norm())
                        if err > 2e-2:
                            row.setdefault("errors", []).append(f"{name} {bn},{split},{warps},{stages}: rel err {err:.3g}")
                            continue
                    t = do_bench_cudagraph(fn, rep=20) * 1e3
                except Exception as e:  # noqa: BLE001
                    row.setdefault("errors", []).append(f"{name} {bn},{split},{warps},{stages}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                if t < best[0]:
                    best = (t, (bn, split, warps, stages))
            row[f"{name}_us"], row[f"{name}_config"] = best
            row[f"{name}_x_cublas"] = cublas / best[0] if best[1] else None
        a = pk.op_args()
        lut_linear_triton(x, *a)
        row["op_us"] = do_bench_cudagraph(lambda: lut_linear_triton(x, *a), rep=30) * 1e3
        row["op_families"] = {}
        for desc, ms in _lut_tuner.last_timings.items():
            fam = next((part.split("=", 1)[1] for part in desc.split(", ") if part.startswith("MODE=")), "tile")
            row["op_families"][fam] = min(row["op_families"].get(fam, 1e9), ms * 1e3)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "explore_lut_gemv.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
