"""The PTX of one step of the tensor-core sparse LUT GEMV (``sparse_mma_step_ptx``: 16 surviving inputs x the
warp's 64 outputs), run for a whole warp by the test PTX interpreter against numpy: which lane loads which
index, value and code word (``decode_layout``), the shared pair-table decode, the re-pairing into A fragments
(two inputs of one row per register) and the matching B column. The Triton side (addresses per lane, scales,
split-K epilogue) is covered by the kernel's EMULATE path in ``test_rotated_sparse_lut.py``."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.ptx_interpreter import Memory, half_to_float, run_warp
from transfigure.kernels.lut_format import pack_codes
from transfigure.kernels.lut_gemm import SHARED_TABLE_BYTES, pair_table, shared_table_fill_ptx
from transfigure.kernels.rotated_sparse_lut import SPARSE_MMA_STEP_PTX, decode_layout


@settings(max_examples=12, deadline=None)
@given(half=st.sampled_from(["bf16", "fp16"]), count=st.integers(1, 16), rows=st.integers(1, 64),
       seed=st.integers(0, 2**16))
def test_sparse_mma_step_matches_numpy(half, count, rows, seed):
    rng = np.random.default_rng(seed)
    dtype = torch.bfloat16 if half == "bf16" else torch.float16
    k = 64
    codes = torch.from_numpy(rng.integers(0, 16, size=(rows, k)))
    codes_tm, _ = decode_layout(pack_codes(codes, 4), torch.ones(rows, 1, dtype=torch.float16))
    table = torch.randn(16, 1, generator=torch.Generator().manual_seed(seed))
    chosen = rng.permutation(k)[:16].astype(np.int32)  # the step's (surviving) inputs, in any order
    values = rng.standard_normal(16).astype(np.float32)
    values[count:] = 0.0  # past the group's count: dropped inputs with value 0 (compact_rotated_triton's tail)

    memory = Memory(1 << 16)
    idx_at, vals_at, codes_at, bytes_at = 0x10000, 0x10100, 0x10200, 0x10200 + codes_tm.numel()
    memory.write(idx_at, chosen)
    memory.write(vals_at, values)
    memory.write(codes_at, codes_tm.numpy())
    memory.write(bytes_at, pair_table(table, 4, 1, dtype).numpy())
    shared = Memory(SHARED_TABLE_BYTES, base=0)
    run_warp(shared_table_fill_ptx(1, 2), [{"$1": bytes_at} for _ in range(32)], memory, shared)

    old = rng.standard_normal((32, 16)).astype(np.float32)
    lanes = []
    for lane in range(32):
        g, q = lane // 4, lane % 4
        ops = {f"${16 + i}": float(old[lane, i]) for i in range(16)}
        ops.update({"$32": idx_at + 16 * q, "$33": vals_at + 16 * q, "$34": codes_at + 4 * g, "$35": codes_tm.shape[1],
                    "$36": int(g == 0)})
        lanes.append(ops)
    degrees: list[int] = []
    run_warp(SPARSE_MMA_STEP_PTX[half], lanes, memory, shared, degrees)
    assert degrees and max(degrees) == 1  # every lane reads its own bank of the pair table

    # numpy: y[r] = sum over the first ``count`` entries of half(v) * half(table[code(r, k)]), column 0 only
    # (rows past ``rows`` are the layout's zero padding: code 0, outputs the kernel does not store)
    rounded = lambda a: torch.tensor(a, dtype=torch.float32).to(dtype).double().numpy()  # noqa: E731
    padded = np.zeros((64, k), dtype=np.int64)
    padded[:rows] = codes.numpy()
    y = rounded(table.reshape(-1).numpy())[padded[:, chosen[:count]]] @ rounded(values[:count])
    for lane, regs in enumerate(lanes):
        g, q = lane // 4, lane % 4
        for t in range(4):
            for i, (row, col) in enumerate([(g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q), (g + 8, 2 * q + 1)]):
                expected = old[lane, 4 * t + i] + (y[16 * t + row] if col == 0 else 0.0)
                assert abs(regs[f"${4 * t + i}"] - expected) <= 1e-4 * (1 + abs(expected)), (lane, t, i)
    assert half_to_float(0x3F80, "bf16") == 1.0
