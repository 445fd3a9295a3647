"""The fused decode-step update (RoPE + KV-cache write + fill counter + attention): Triton kernel vs reference,
and the reference vs the unfused ops transformers' static cache runs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels.decode_attention import (
    Config,
    decode_attention_reference,
    decode_attention_update,
    decode_attention_update_reference,
    decode_attention_update_triton,
)

CONFIGS = [Config({"BLOCK_L": 64, "WAVES": 2}, num_warps=4), Config({"BLOCK_L": 16, "WAVES": 4}, num_warps=2),
           Config({"BLOCK_L": 128, "WAVES": 1}, num_warps=4)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_step(seed, B, Hk, G, Lq, L, D, DV, dtype, rope, shared_tables, filled):
    """A decode step against a static cache holding ``filled`` tokens: its query, new keys/values, rotary
    tables, the cache (random everywhere, also past the filled part) and transformers' mask."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk * G, Lq, D, generator=gen).to(dtype)
    k_new = torch.randn(B, Hk, Lq, D, generator=gen).to(dtype)
    v_new = torch.randn(B, Hk, Lq, DV, generator=gen).to(dtype)
    k_cache = torch.randn(B, Hk, L, D, generator=gen).to(dtype)
    v_cache = torch.randn(B, Hk, L, DV, generator=gen).to(dtype)
    cos = sin = None
    if rope:
        angles = torch.rand(1 if shared_tables else B, 1, Lq, D // 2, generator=gen) * 6.3
        cos, sin = (torch.cat((f(angles), f(angles)), -1).to(dtype) for f in (torch.cos, torch.sin))
    fill = torch.tensor(filled, dtype=torch.int64)
    positions = filled + torch.arange(Lq)
    mask = (torch.arange(L)[None, None, None, :] <= positions[None, None, :, None]).expand(B, 1, Lq, L)
    return q, k_new, v_new, cos, sin, k_cache, v_cache, fill, mask


def clone_state(step):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in step]


@given(B=st.integers(1, 2), Hk=st.integers(1, 3), G=st.sampled_from([1, 2, 4]), Lq=st.integers(1, 3),
       L=st.integers(4, 200), D=st.sampled_from([16, 32, 64]), DV=st.sampled_from([16, 40]), rope=st.booleans(),
       shared_tables=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       config=st.sampled_from(CONFIGS), fill_at=st.floats(0, 1), counter=st.booleans(), flat_tables=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triton_equals_reference(B, Hk, G, Lq, L, D, DV, rope, shared_tables, dtype, config, fill_at, counter,
                                 flat_tables, seed):
    """With the fill counter (advanced by the launch) or with explicit positions (the counter untouched); rotary
    tables as ``[B, 1, Lq, D]`` or ``[B, Lq, D]``."""
    filled = int(fill_at * (L - Lq))
    step = make_step(seed, B, Hk, G, Lq, L, D, DV, dtype, rope, shared_tables, filled)
    if rope and flat_tables:
        step = (*step[:3], step[3][:, 0], step[4][:, 0], *step[5:])
    want_state, got_state = clone_state(step), clone_state(step)

    def where(state):
        return (None, state[7]) if counter else (state[7] + torch.arange(Lq), None)

    want = decode_attention_update_reference(*want_state[:7], *where(want_state), want_state[8], D**-0.5, False)
    got = decode_attention_update_triton(*got_state[:7], *where(got_state), got_state[8], D**-0.5, False,
                                         config=config)
    assert got.shape == want.shape == (B, Hk * G, Lq, DV) and got.dtype == dtype
    assert rel(got, want) < (1e-5 if dtype == torch.float32 else 3e-3)
    # the fill counter advanced once per launch, or not at all
    assert int(got_state[7]) == int(want_state[7]) == filled + (Lq if counter else 0)
    tol = 0 if dtype == torch.float32 else 1e-3
    for cache in (5, 6):  # the written rows match and nothing else in the cache moved
        torch.testing.assert_close(got_state[cache], want_state[cache], rtol=tol, atol=tol)
    untouched = torch.ones(L, dtype=torch.bool)
    untouched[filled:filled + Lq] = False
    assert torch.equal(got_state[5][:, :, untouched], step[5][:, :, untouched])


def test_reference_is_the_unfused_static_cache_step():
    """RoPE as transformers' ``apply_rotary_pos_emb``, then ``StaticLayer.update`` (index_copy_ at
    ``cumulative_length + arange``, counter advanced), then attention over the whole cache."""
    B, Hk, G, Lq, L, D = 2, 2, 3, 2, 40, 32
    q, k_new, v_new, cos, sin, k_cache, v_cache, fill, mask = make_step(7, B, Hk, G, Lq, L, D, D, torch.float64,
                                                                        True, False, 11)

    def rotate_half(x):
        return torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)

    q_rot, k_rot = q * cos + rotate_half(q) * sin, k_new * cos + rotate_half(k_new) * sin
    keys, values, counter = k_cache.clone(), v_cache.clone(), fill.clone()
    positions = torch.arange(Lq) + counter
    counter.add_(Lq)
    keys.index_copy_(2, positions, k_rot)
    values.index_copy_(2, positions, v_new)
    expected = decode_attention_reference(q_rot, keys, values, mask, 0.3, False)
    got = decode_attention_update(q, k_new, v_new, cos, sin, k_cache, v_cache, None, fill, mask, 0.3, False)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(k_cache, keys)
    torch.testing.assert_close(v_cache, values)
    assert int(fill) == 13


def test_successive_steps_fill_the_cache_in_order():
    """Four one-token steps from an empty cache through the kernel: the same cache, counter and outputs as the
    reference, each step's new key visible to its own query."""
    B, Hk, G, L, D = 1, 2, 2, 24, 16
    state = {}
    for path in ("reference", "triton"):
        k_cache, v_cache = torch.zeros(B, Hk, L, D), torch.zeros(B, Hk, L, D)
        fill, outs = torch.tensor(0), []
        for t in range(4):
            step = make_step(100 + t, B, Hk, G, 1, L, D, D, torch.float32, True, True, t)
            q, k_new, v_new, cos, sin, _, _, _, mask = step
            fn = decode_attention_update_reference if path == "reference" else decode_attention_update_triton
            outs.append(fn(q, k_new, v_new, cos, sin, k_cache, v_cache, None, fill, mask, 0.25, False))
        state[path] = (k_cache, v_cache, int(fill), torch.stack(outs))
    assert state["triton"][2] == state["reference"][2] == 4
    for a, b in zip(state["triton"], state["reference"]):
        if isinstance(a, torch.Tensor):
            assert rel(a, b) < 1e-5


def test_full_cache_is_an_error():
    step = make_step(0, 1, 1, 1, 2, 8, 16, 16, torch.float32, False, True, 6)
    step[7].fill_(7)
    with pytest.raises(IndexError, match="full"):
        decode_attention_update_reference(*step[:7], None, step[7], None, 0.25, False)
    with pytest.raises(ValueError, match="exactly one"):
        decode_attention_update_reference(*step[:7], torch.arange(2), step[7], None, 0.25, False)


def test_shared_step_inputs_are_fresh_copies():
    from transfigure.kernels.decode_attention import shared_step_inputs

    tables = [torch.randn(1, 3, 8), torch.rand(1, 1, 1, 9) > 0.5]
    copies = shared_step_inputs(tables)
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(copies, tables))
