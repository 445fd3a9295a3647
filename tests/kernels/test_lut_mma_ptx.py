"""The PTX of one group step of the tensor-core LUT GEMV (``_mma_group_ptx``), run for a whole warp by the test
PTX interpreter (``tests/kernels/ptx_interpreter.py``, whose ``mma.sync`` follows the PTX ISA's fragment
layouts), against the group's contribution computed from the canonical format (``pack_codes`` /
``dequantize_parts``). This checks what the CPU interpreter of Triton cannot: the table lookups inside the step
(registers, or the byte table that ``shared_table_fill_ptx`` copies into shared memory, with no bank
conflicts), which lane loads which codes and activations, and that the K order each lane uses for A matches
the one it uses for B. Addresses are given to each lane as the kernel's docstring says
(``_lut_mma_gemv_kernel`` computes them the same way; its EMULATE path and the GPU check in
``benchmarks/check_lut_configs.py`` cover that side)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.ptx_interpreter import Memory, run_warp
from transfigure.kernels.lut_format import dequantize_parts, pack_codes
from transfigure.kernels.lut_gemm import (MMA_GROUP_PTX, MMA_SHARED_GROUP_PTX, MMA_SHARED_GROUP_PTX_L2,
                                          MMA_THREE_BIT_GROUP_PTX, MMA_THREE_BIT_GROUP_PTX_L2, SHARED_TABLE_BYTES,
                                          pair_table, quad_table, register_table_words, shared_table_fill_ptx,
                                          three_bit_byte_table)

# (bits, p, lookup): the register lookup decodes 4-bit scalar codes; the shared byte tables every format whose
# bytes hold two (4-bit codes) or four (2-bit codes) weights, and 3-bit scalar codes (two bit-planes) through
# 6-bit pair indices
FORMATS = [(4, 1, "register"), (4, 1, "shared"), (4, 2, "shared"), (2, 1, "shared"), (2, 2, "shared"),
           (3, 1, "shared")]


def _layout():
    cursor = [0x10000]

    def place(nbytes: int) -> int:
        address = cursor[0]
        cursor[0] += (nbytes + 255) // 256 * 256
        return address

    return place


@settings(max_examples=24, deadline=None)
@given(fmt=st.sampled_from(FORMATS), group=st.sampled_from([64, 128, 256]), half=st.sampled_from(["bf16", "fp16"]),
       x_blocks=st.sampled_from([1, 2]), m=st.integers(1, 16), rows=st.integers(1, 16), step=st.integers(0, 2),
       seed=st.integers(0, 2**16), l2_prefetch=st.booleans())
def test_mma_group_step_matches_numpy(fmt, group, half, x_blocks, m, rows, step, seed, l2_prefetch):
    bits, p, lookup = fmt
    l2_prefetch = l2_prefetch and lookup == "shared"
    if lookup == "register":
        ptx = MMA_GROUP_PTX[(group, half, x_blocks)]
    elif (bits, p) == (3, 1):
        ptx = (MMA_THREE_BIT_GROUP_PTX_L2 if l2_prefetch else MMA_THREE_BIT_GROUP_PTX)[(group, half, x_blocks)]
    else:
        ptx = (MMA_SHARED_GROUP_PTX_L2 if l2_prefetch else MMA_SHARED_GROUP_PTX)[(group, half, x_blocks, 8 // bits)]
    assert (".L2::256B" in ptx) == l2_prefetch
    _check_group_step(ptx, bits, p, lookup, group, half, x_blocks, min(m, 8 * x_blocks), rows, step, seed)


@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("half", ["bf16", "fp16"])
@pytest.mark.parametrize("x_blocks", [1, 2])
def test_three_bit_group_step_every_variant(group, half, x_blocks):
    """Every 3-bit step variant the launcher can pick (group sizes, half types, one or two blocks of x rows, with
    and without the L2 hint), with all 16 rows and the most x rows: the plane-1 bits of every byte position."""
    for table in (MMA_THREE_BIT_GROUP_PTX, MMA_THREE_BIT_GROUP_PTX_L2):
        _check_group_step(table[(group, half, x_blocks)], 3, 1, "shared", group, half, x_blocks, 8 * x_blocks, 16,
                          1, seed=group + x_blocks)


@pytest.mark.parametrize("original,mutant", [
    ("0x5140;", "0x7362;"),                              # the spread takes the other half of the plane-1 word
    ("0x30303030, 0xD8;", "0x0C0C0C0C, 0xD8;"),           # high bits put where the index does not keep them
    ("shr.b32 odd_high, spreadg0, 2;", "shr.b32 odd_high, spreadg0, 4;"),  # odd pairs take the even pairs' bits
    ("mul.wide.u32 o, $13, 16;", "mul.wide.u32 o, $13, 32;"),  # plane 1 advances at plane 0's pace
])
def test_three_bit_group_step_catches_mutations(original, mutant):
    """The check above is sharp: each of these one-token changes to the 3-bit step makes it fail."""
    ptx = MMA_THREE_BIT_GROUP_PTX[(128, "bf16", 1)]
    assert original in ptx
    with pytest.raises(AssertionError):
        _check_group_step(ptx.replace(original, mutant), 3, 1, "shared", 128, "bf16", 1, 8, 16, 1, seed=3)


def _check_group_step(ptx, bits, p, lookup, group, half, x_blocks, m, rows, step, seed):
    """Run one group step ``ptx`` (group index ``step`` of three) for a warp's 16 rows on the PTX interpreter and
    compare every lane's sums with the group's contribution computed from ``pack_codes`` / ``dequantize_parts``;
    also asserts that every shared-memory load is free of bank conflicts."""
    rng = np.random.default_rng(seed)
    dtype = torch.bfloat16 if half == "bf16" else torch.float16
    n_groups = 3
    k = group * n_groups
    codes = torch.from_numpy(rng.integers(0, 2 ** (bits * p), size=(16, k // p)))  # the warp's 16 rows
    words = pack_codes(codes, bits * p)
    scales = torch.from_numpy((rng.random((16, n_groups)) + 0.5).astype(np.float16))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    table = torch.randn(2 ** (bits * p), p, generator=torch.Generator().manual_seed(seed + 1))
    three_bit = (bits, p) == (3, 1)
    weights_per_byte = 4 if three_bit else 8 // bits  # of plane 0: a 3-bit code keeps its low 2 bits there
    if three_bit:
        byte_table = three_bit_byte_table(table, dtype)
    else:
        byte_table = (pair_table if weights_per_byte == 2 else quad_table)(table, bits, p, dtype)

    memory = Memory(1 << 20)
    place = _layout()
    codes_at, x_at, scales_at, table_at = place(words.numel() * 4), place(x.numel() * 2), place(32 * 2 * 3), place(32)
    bytes_at = place(byte_table.numel() * 4)
    memory.write(codes_at, words.numpy())
    memory.write(x_at, x.view(torch.int16).numpy())
    memory.write(scales_at, scales.numpy())
    if lookup == "register":
        memory.write(table_at, register_table_words(table, dtype).numpy().astype(np.int32))
    memory.write(bytes_at, byte_table.numpy())
    shared = Memory(SHARED_TABLE_BYTES, base=0)
    if lookup == "shared":
        run_warp(shared_table_fill_ptx(1, 2 if three_bit else weights_per_byte), [{"$1": bytes_at} for _ in range(32)],
                 memory, shared)

    row_bytes = k * bits // 8
    n_acc = 4 * x_blocks
    old = rng.standard_normal((32, n_acc)).astype(np.float32)
    lanes = []
    for lane in range(32):
        g, q = lane // 4, lane % 4
        row_g, row_h = g, g + 8
        ops = {f"${n_acc + i}": float(old[lane, i]) for i in range(n_acc)}
        operand = iter(range(2 * n_acc, 2 * n_acc + 8 + x_blocks))
        lane_bytes = q * group // (4 * weights_per_byte)
        ops[f"${next(operand)}"] = codes_at + row_g * row_bytes + lane_bytes
        ops[f"${next(operand)}"] = codes_at + row_h * row_bytes + lane_bytes
        for b in range(x_blocks):
            ops[f"${next(operand)}"] = x_at + 2 * (min(g + 8 * b, m - 1) * k + q * (group // 4))
        ops[f"${next(operand)}"] = scales_at + 2 * row_g * n_groups
        ops[f"${next(operand)}"] = scales_at + 2 * row_h * n_groups
        ops[f"${next(operand)}"] = step
        valid = int(row_g < rows) | int(row_h < rows) << 1 | sum(int(g + 8 * b < m) << (2 + b) for b in range(x_blocks))
        ops[f"${next(operand)}"] = valid
        # 3-bit: bytes from the lane's plane-0 codes to its plane-1 codes (plane 1 starts k / 4 bytes into the row)
        ops[f"${next(operand)}"] = k // 4 + q * group // 32 - lane_bytes if three_bit else table_at
        lanes.append(ops)
    degrees: list[int] = []
    out = run_warp(ptx, lanes, memory, shared, degrees)
    assert all(d == 1 for d in degrees)  # each lane reads its own copy of the table: no bank conflicts

    rounded = table.to(dtype).float()  # the kernel's tables hold 16-bit weights
    w = dequantize_parts(words, scales, rounded, None, bits, p, group, 0, k, "rotated").double().numpy()
    cols = slice(step * group, (step + 1) * group)
    w = w[:, cols]
    w[rows:] = 0.0
    xs = np.zeros((16, group))
    xs[:m] = x.double().numpy()[:, cols]
    contribution = w @ xs.T                                       # [16 rows, 16 x rows]
    for lane in range(32):
        g, q = lane // 4, lane % 4
        for b in range(x_blocks):
            for i, (row, col) in enumerate([(g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q), (g + 8, 2 * q + 1)]):
                col += 8 * b
                want = old[lane, 4 * b + i] + (contribution[row, col] if col < m else 0.0)
                got = out[lane][f"${4 * b + i}"]
                assert got == pytest.approx(want, rel=1e-4, abs=1e-4), (lane, b, i, row, col)
