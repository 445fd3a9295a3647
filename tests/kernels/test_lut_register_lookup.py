"""The PTX of the register-table lookup (``_register_lookup_ptx``), executed by a small interpreter of the
instructions it uses (``tests/kernels/ptx_interpreter.py``), against a plain table lookup. The CPU interpreter
of Triton cannot run inline PTX (the kernel's EMULATE path stands in for it there), so this is where CI checks
the bit logic itself; the GPU runs it in ``benchmarks/check_lut_configs.py``."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.ptx_interpreter import run_ptx
from transfigure.kernels.lut_gemm import REGISTER_LOOKUP_PTX, register_table_words

MASK = 0xFFFFFFFF


def _as_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


@settings(max_examples=60, deadline=None)
@given(half=st.sampled_from(["bf16", "fp16"]), seed=st.integers(0, 2**16), word=st.integers(0, MASK))
def test_register_lookup_ptx_decodes_every_nibble(half, seed, word):
    dtype = torch.bfloat16 if half == "bf16" else torch.float16
    table = torch.randn(16, 1, generator=torch.Generator().manual_seed(seed)) * 3
    words = [int(w) & MASK for w in register_table_words(table, dtype).tolist()]
    operands = {"$8": word}
    for w, value in enumerate(words):  # each broadcast scalar arrives as four packed copies
        for copy in range(4):
            operands[f"${9 + 4 * w + copy}"] = value
    regs = run_ptx(REGISTER_LOOKUP_PTX[half], operands)
    want = table.reshape(-1).to(dtype).float()
    for i in range(4):
        byte = (word >> (8 * i)) & 0xFF
        assert _as_float(regs[f"${i}"]) == float(want[byte & 15]), (i, hex(word))
        assert _as_float(regs[f"${i + 4}"]) == float(want[byte >> 4]), (i, hex(word))


def test_register_table_words_hold_low_then_high_bytes():
    table = torch.linspace(-2, 2, 16).reshape(16, 1)
    words = register_table_words(table, torch.bfloat16)
    bits = table.reshape(-1).to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    for entry in range(16):
        low = (int(words[entry // 4]) >> (8 * (entry % 4))) & 0xFF
        high = (int(words[4 + entry // 4]) >> (8 * (entry % 4))) & 0xFF
        assert (high << 8) | low == int(bits[entry])
