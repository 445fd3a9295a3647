"""The PTX of one group step of the tensor-core LUT GEMV (``_mma_group_ptx``), run for a whole warp by the test
PTX interpreter (``tests/kernels/ptx_interpreter.py``, whose ``mma.sync`` follows the PTX ISA's fragment
layouts), against the group's contribution computed with numpy. This checks what the CPU interpreter of Triton
cannot: the register lookup inside the step, which lane loads which codes and activations, and that the K
order each lane uses for A matches the one it uses for B. Addresses are given to each lane as the kernel's
docstring says (``_lut_mma_gemv_kernel`` computes them the same way; its EMULATE path and the GPU check in
``benchmarks/check_lut_configs.py`` cover that side)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.ptx_interpreter import Memory, run_warp
from transfigure.kernels.lut_gemm import (MMA_GROUP_PTX, MMA_SHARED_GROUP_PTX, SHARED_TABLE_BYTES, pair_table,
                                          register_table_words, shared_table_fill_ptx)


def _layout(memory_size: int):
    cursor = [0x10000]

    def place(nbytes: int) -> int:
        address = cursor[0]
        cursor[0] += (nbytes + 255) // 256 * 256
        assert cursor[0] - 0x10000 <= memory_size
        return address

    return place


@settings(max_examples=16, deadline=None)
@given(group=st.sampled_from([64, 128, 256]), half=st.sampled_from(["bf16", "fp16"]), x_blocks=st.sampled_from([1, 2]),
       m=st.integers(1, 16), rows=st.integers(1, 16), step=st.integers(0, 2), seed=st.integers(0, 2**16),
       lookup=st.sampled_from(["register", "shared"]))
def test_mma_group_step_matches_numpy(group, half, x_blocks, m, rows, step, seed, lookup):
    """Both lookups: the register table, and the pair table copied into shared memory by
    ``shared_table_fill_ptx`` (run first by the same warp, as a one-warp program)."""
    m = min(m, 8 * x_blocks)
    rng = np.random.default_rng(seed)
    dtype = torch.bfloat16 if half == "bf16" else torch.float16
    n_groups = 3
    k = group * n_groups
    codes = rng.integers(0, 16, size=(16, k))                    # the warp's 16 rows; rows >= `rows` absent
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)  # canonical: low nibble = even column
    scales = (rng.random((16, n_groups)) + 0.5).astype(np.float16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    table = torch.randn(16, 1, generator=torch.Generator().manual_seed(seed + 1))
    words = register_table_words(table, dtype).numpy().astype(np.int32)
    pairs = pair_table(table, 4, 1, dtype).numpy().astype(np.int32)

    memory = Memory(1 << 20)
    place = _layout(1 << 20)
    codes_at, x_at, scales_at, table_at = place(packed.nbytes), place(x.numel() * 2), place(scales.nbytes), place(32)
    pairs_at = place(pairs.nbytes)
    memory.write(pairs_at, pairs)
    shared = Memory(SHARED_TABLE_BYTES, base=0)
    if lookup == "shared":
        run_warp(shared_table_fill_ptx(1), [{"$1": pairs_at} for _ in range(32)], memory, shared)
    memory.write(codes_at, packed)
    memory.write(x_at, x.view(torch.int16).numpy())
    memory.write(scales_at, scales)
    memory.write(table_at, words)

    n_acc = 4 * x_blocks
    old = rng.standard_normal((32, n_acc)).astype(np.float32)
    lanes = []
    for lane in range(32):
        g, q = lane // 4, lane % 4
        row_g, row_h = g, g + 8
        ops = {f"${n_acc + i}": float(old[lane, i]) for i in range(n_acc)}
        operand = iter(range(2 * n_acc, 2 * n_acc + 8 + x_blocks))
        ops[f"${next(operand)}"] = codes_at + row_g * (k // 2) + q * (group // 8)
        ops[f"${next(operand)}"] = codes_at + row_h * (k // 2) + q * (group // 8)
        for b in range(x_blocks):
            ops[f"${next(operand)}"] = x_at + 2 * (min(g + 8 * b, m - 1) * k + q * (group // 4))
        ops[f"${next(operand)}"] = scales_at + 2 * row_g * n_groups
        ops[f"${next(operand)}"] = scales_at + 2 * row_h * n_groups
        ops[f"${next(operand)}"] = step
        valid = int(row_g < rows) | int(row_h < rows) << 1 | sum(int(g + 8 * b < m) << (2 + b) for b in range(x_blocks))
        ops[f"${next(operand)}"] = valid
        ops[f"${next(operand)}"] = table_at
        lanes.append(ops)
    ptx = (MMA_GROUP_PTX if lookup == "register" else MMA_SHARED_GROUP_PTX)[(group, half, x_blocks)]
    degrees: list[int] = []
    out = run_warp(ptx, lanes, memory, shared, degrees)
    assert all(d == 1 for d in degrees)  # each lane reads its own copy of the table: no bank conflicts

    values = table.reshape(-1).to(dtype).double().numpy()
    cols = slice(step * group, (step + 1) * group)
    w = values[codes[:, cols]] * scales[:, step].astype(np.float64)[:, None]
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
