"""The windowed-softmax half of the hybrid linearized attention: Triton kernel vs reference vs dense softmax."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels.window_attention import window_attention_reference, window_attention_triton


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(seed, B, Hk, G, T, D, DV, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk * G, T, D, generator=gen).to(dtype)
    k = torch.randn(B, Hk, T, D, generator=gen).to(dtype)
    v = torch.randn(B, Hk, T, DV, generator=gen).to(dtype)
    valid = torch.rand(B, T, generator=gen) > 0.15
    valid[:, 0] = True
    factor = torch.randn(Hk * G, generator=gen)
    return q, k, v, valid, factor


@given(mode=st.sampled_from(["lolcats", "liger"]), B=st.integers(1, 2), Hk=st.integers(1, 2), G=st.sampled_from([1, 2, 4]),
       T=st.integers(1, 80), D=st.sampled_from([8, 16, 32]), DV=st.sampled_from([8, 24]), W=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_triton_equals_reference(mode, B, Hk, G, T, D, DV, W, dtype, seed):
    q, k, v, valid, factor = make(seed, B, Hk, G, T, D, DV, dtype)
    factor = factor if mode == "lolcats" else None
    want = window_attention_reference(q, k, v, valid, factor, W, D**-0.5, mode)
    got = window_attention_triton(q, k, v, valid, factor, W, D**-0.5, mode)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float32
        assert rel(g, w) < (1e-5 if dtype == torch.float32 else 2e-3)


def dense_window_softmax(q, k, v, valid, allowed):
    """Plain softmax attention with an explicit [T, T] mask (the definition the blockwise code implements)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1).float(), v.repeat_interleave(G, 1).float()
    s = (q.float() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~(allowed[None, None] & valid[:, None, None, :]), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


@given(T=st.integers(2, 70), W=st.sampled_from([16, 32]), seed=st.integers(0, 2**16))
def test_windows_mean_what_the_papers_say(T, W, seed):
    q, k, v, valid, factor = make(seed, 1, 2, 2, T, 16, 8)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    # liger: the last W positions, normalized
    liger, ones = window_attention_reference(q, k, v, valid, None, W, 16**-0.5, "liger")
    assert rel(liger, dense_window_softmax(q, k, v, valid, (j <= i) & (i - j < W))) < 1e-5
    assert torch.equal(ones, torch.ones_like(ones))
    # lolcats: the current and the previous block; num / den is the softmax over that terraced window
    num, den = window_attention_reference(q, k, v, valid, factor, W, 16**-0.5, "lolcats")
    terraced = (j <= i) & (j >= (i // W - 1) * W)
    assert rel(num / den.clamp_min(1e-30), dense_window_softmax(q, k, v, valid, terraced)) < 1e-5


def test_op_gradients_equal_the_reference_autograd():
    q, k, v, valid, factor = make(3, 1, 2, 2, 40, 16, 8)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, factor)]
    num, den = torch.ops.transfigure.window_attention(*leaves[:3], valid, leaves[3], 16, 0.25, "lolcats")
    (num.square().sum() + den.sum()).backward()
    refs = [t.clone().requires_grad_(True) for t in (q, k, v, factor)]
    rnum, rden = window_attention_reference(*refs[:3], valid, refs[3], 16, 0.25, "lolcats")
    (rnum.square().sum() + rden.sum()).backward()
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad)


def test_gradient_to_values_only():
    """Only v wants a gradient (frozen q/k/window factor): den depends on none of the inputs that need one."""
    q, k, v, valid, factor = make(4, 1, 2, 2, 40, 16, 8)
    v_leaf, v_ref = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    num, den = torch.ops.transfigure.window_attention(q, k, v_leaf, valid, factor, 16, 0.25, "lolcats")
    (num.square().sum() + den.sum()).backward()
    rnum, rden = window_attention_reference(q, k, v_ref, valid, factor, 16, 0.25, "lolcats")
    (rnum.square().sum() + rden.sum()).backward()
    torch.testing.assert_close(v_leaf.grad, v_ref.grad)
