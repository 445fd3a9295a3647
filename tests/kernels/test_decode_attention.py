"""Decode attention (few query tokens over a KV cache, GQA native): Triton kernel vs reference vs SDPA."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels.decode_attention import (
    Config,
    decode_attention_reference,
    decode_attention_triton,
    decode_attention_with_config,
)

CONFIGS = [Config({"BLOCK_L": 64, "WAVES": 2}, num_warps=4), Config({"BLOCK_L": 16, "WAVES": 4}, num_warps=2),
           Config({"BLOCK_L": 128, "WAVES": 1}, num_warps=4)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(seed, B, Hk, G, Lq, L, D, DV, dtype, mask_kind, filled=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk * G, Lq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hk, L, D, generator=gen).to(dtype)
    v = torch.randn(B, Hk, L, DV, generator=gen).to(dtype)
    mask = None
    if mask_kind == "static-cache":  # transformers' static cache: [B, 1, Lq, L], keys up to each query's position
        filled = filled if filled is not None else torch.randint(Lq, L + 1, (B,), generator=gen)
        pos = filled[:, None] - Lq + torch.arange(Lq)[None, :]  # [B, Lq] absolute positions of the queries
        mask = (torch.arange(L)[None, None, :] <= pos[:, :, None])[:, None]
    elif mask_kind == "bool":
        mask = torch.rand(B, Hk * G, Lq, L, generator=gen) > 0.3
    elif mask_kind == "additive":
        bias = torch.randn(1, 1, Lq, L, generator=gen)
        mask = torch.where(torch.rand(1, 1, Lq, L, generator=gen) > 0.25, bias, torch.tensor(float("-inf"))).to(dtype)
    return q, k, v, mask


@given(B=st.integers(1, 2), Hk=st.integers(1, 3), G=st.sampled_from([1, 2, 4, 8]), Lq=st.integers(1, 3),
       L=st.integers(1, 200), D=st.sampled_from([16, 32, 48, 64]), DV=st.sampled_from([16, 40, 64]),
       mask_kind=st.sampled_from(["none", "static-cache", "bool", "additive"]), causal=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), config=st.sampled_from(CONFIGS),
       seed=st.integers(0, 2**16))
def test_triton_equals_reference(B, Hk, G, Lq, L, D, DV, mask_kind, causal, dtype, config, seed):
    q, k, v, mask = make(seed, B, Hk, G, Lq, L, D, DV, dtype, mask_kind)
    causal = causal and mask is None  # SDPA takes one or the other
    want = decode_attention_reference(q, k, v, mask, D**-0.5, causal)
    got = decode_attention_with_config(q, k, v, mask, D**-0.5, causal, config)
    assert got.shape == want.shape == (B, Hk * G, Lq, DV) and got.dtype == dtype
    assert rel(got, want) < (1e-5 if dtype == torch.float32 else 3e-3)


@given(G=st.sampled_from([1, 4]), Lq=st.integers(1, 2), L=st.integers(2, 90), causal=st.booleans(),
       mask_kind=st.sampled_from(["none", "static-cache", "additive"]), seed=st.integers(0, 2**16))
def test_reference_is_sdpa_over_repeated_keys(G, Lq, L, causal, mask_kind, seed):
    q, k, v, mask = make(seed, 2, 2, G, Lq, L, 32, 32, torch.float32, mask_kind)
    causal = causal and mask is None
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # what transformers' repeat_kv builds
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=0.2, is_causal=causal)
    assert rel(decode_attention_reference(q, k, v, mask, 0.2, causal), want) < 1e-5


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_hidden_cache_blocks_are_never_read(config):
    """Keys and values past the filled part of a static cache are NaN here: a kernel that loaded them would
    return NaN (0 * NaN), so equality proves the blocks the mask hides are skipped."""
    L, filled, block = 300, 37, config.meta["BLOCK_L"]
    q, k, v, mask = make(3, 1, 2, 4, 1, L, 64, 64, torch.float32, "static-cache", filled=torch.tensor([filled]))
    want = decode_attention_reference(q, k, v, mask, 0.125, False)
    first_hidden_block = -(-filled // block) * block
    k[:, :, first_hidden_block:], v[:, :, first_hidden_block:] = float("nan"), float("nan")
    got = decode_attention_with_config(q, k, v, mask, 0.125, False, config)
    assert torch.isfinite(got).all() and rel(got, want) < 1e-5


def test_rows_that_see_nothing_are_zero_and_others_unaffected():
    q, k, v, _ = make(0, 1, 2, 2, 2, 50, 16, 16, torch.float32, "none")
    mask = torch.ones(1, 4, 2, 50, dtype=torch.bool)
    mask[:, 1, 0] = False  # head 1, first query: every key hidden
    for config in CONFIGS:
        got = decode_attention_with_config(q, k, v, mask, 0.25, False, config)
        assert torch.equal(got[:, 1, 0], torch.zeros_like(got[:, 1, 0]))
        assert rel(got, decode_attention_reference(q, k, v, mask, 0.25, False)) < 1e-5


def test_strided_query_and_broadcast_mask():
    """transformers hands over q as a transposed view and a [B, 1, 1, L] mask: strides, not copies."""
    q0, k, v, mask = make(1, 2, 2, 4, 1, 70, 32, 32, torch.float32, "static-cache")
    q = q0.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, 1, D] with head stride D
    assert not q.is_contiguous() or q.shape[2] == 1
    got = decode_attention_triton(q, k, v, mask, 0.3, False)
    assert rel(got, decode_attention_reference(q0, k, v, mask, 0.3, False)) < 1e-5


def test_op_dispatches_and_differentiates():
    q, k, v, mask = make(2, 1, 2, 2, 1, 40, 16, 16, torch.float64, "static-cache")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = torch.ops.transfigure.decode_attention(q, k, v, mask, 0.25, False)
    assert out.shape == (1, 4, 1, 16)
    torch.autograd.gradcheck(lambda a, b, c: torch.ops.transfigure.decode_attention(a, b, c, mask, 0.25, False),
                             (q, k, v))
