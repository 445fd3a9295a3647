"""The disk cache's weight key: a host SHA-256 on the CPU, an on-device fingerprint for CUDA weights.

CI has no GPU, so the fingerprint (plain torch ops, device-agnostic) is checked on CPU tensors against a
pure-Python evaluation of its definition, and for sensitivity to every kind of change a cache must notice."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from transfigure.kernels import lut_format
from transfigure.kernels.lut_format import content_key, device_fingerprint

MASK64 = (1 << 64) - 1


def _mix64_python(v: int) -> int:
    v ^= v >> 30
    v = (v * 0xBF58476D1CE4E5B9) & MASK64
    v ^= v >> 27
    v = (v * 0x94D049BB133111EB) & MASK64
    return v ^ (v >> 31)


def _fingerprint_python(words: list[int], width: int) -> bytes:
    lanes = []
    for seed in lut_format._FINGERPRINT_SEEDS:
        total = 0
        for i, w in enumerate(words):
            total = (total + _mix64_python(((i << 32) | w) ^ seed)) & MASK64
        lanes.append(total)
    signed = torch.tensor([lane - (1 << 64) if lane >> 63 else lane for lane in lanes], dtype=torch.int64)
    return signed.numpy().tobytes() + f"|{width}|{len(words)}".encode()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.uint8]),
       seed=st.integers(0, 2**31 - 1))
def test_fingerprint_equals_its_definition(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=g) * 100).to(dtype) if dtype.is_floating_point else \
        torch.randint(1, 256, (n,), generator=g, dtype=dtype)
    raw = t.view(torch.uint8)
    width = 4 if raw.numel() % 4 == 0 else 2 if raw.numel() % 2 == 0 else 1
    words = [int.from_bytes(bytes(raw[i:i + width].tolist()), "little") for i in range(0, raw.numel(), width)]
    assert device_fingerprint(t) == _fingerprint_python(words, width)


def test_fingerprint_sees_every_change(monkeypatch):
    monkeypatch.setattr(lut_format, "_FINGERPRINT_CHUNK", 1000)  # several chunks: positions must run on
    w = torch.randn(64, 48).to(torch.bfloat16)
    base = device_fingerprint(w)
    assert device_fingerprint(w.clone()) == base
    seen = {base}
    for row, col in ((0, 0), (63, 47), (20, 33)):
        changed = w.clone()
        changed.view(torch.int16)[row, col] ^= 1  # the lowest mantissa bit of one weight
        seen.add(device_fingerprint(changed))
    swapped = w.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    seen.add(device_fingerprint(swapped))
    seen.add(device_fingerprint(w.reshape(48, 64)))  # same bytes: the key adds the shape (below)
    assert len(seen) == 5
    assert content_key(w, quant="a") != content_key(w.reshape(48, 64), quant="a")
    assert content_key(w, quant="a") != content_key(w, quant="b")
    assert content_key(w, quant="a") == content_key(w.clone(), quant="a")
