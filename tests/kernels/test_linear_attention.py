import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from transfigure.kernels.linear_attention import (
    _linear_attn_bwd_reference,
    linear_attention,
    linear_attention_bidirectional,
    linear_attention_decode_reference,
    linear_attention_decode_step,
    linear_attn_decode_triton,
    linear_attention_recurrent,
    linear_attention_reference,
    linear_attn_bwd_triton,
    linear_attn_triton,
)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(seed, B, Hk, G, T, K, V, gated, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk * G, T, K, generator=gen)
    k = torch.randn(B, Hk, T, K, generator=gen)
    v = torch.randn(B, Hk, T, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, Hk, T, K, generator=gen) + 2.0) if gated else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g)


shapes = dict(
    B=st.integers(1, 2),
    Hk=st.integers(1, 2),
    G=st.sampled_from([1, 2, 3]),
    T=st.integers(1, 80),
    K=st.sampled_from([8, 16, 20, 32]),
    V=st.sampled_from([8, 16, 24]),
    chunk=st.sampled_from([16, 32]),
    gated=st.booleans(),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=6)
@given(**shapes)
def test_chunked_reference_matches_recurrent_definition(B, Hk, G, T, K, V, chunk, gated, seed):
    q, k, v, g = make(seed, B, Hk, G, T, K, V, gated, torch.float64)
    expected, _ = linear_attention_recurrent(q, k, v, g, scale=0.3)
    actual = linear_attention_reference(q, k, v, g, 0.3, chunk)
    assert rel(actual, expected) < 1e-12


@settings(max_examples=6)
@given(**shapes, dtype=st.sampled_from([torch.float32, torch.float16]))
def test_triton_forward_matches_reference(B, Hk, G, T, K, V, chunk, gated, seed, dtype):
    q, k, v, g = make(seed, B, Hk, G, T, K, V, gated, dtype)
    expected, _ = linear_attention_recurrent(q.double(), k.double(), v.double(), None if g is None else g.double(), 0.3)
    actual = linear_attn_triton(q, k, v, g, 0.3, chunk)
    assert actual.dtype == dtype and actual.shape == (B, Hk * G, T, V)
    assert rel(actual, expected) < (2e-6 if dtype == torch.float32 else 3e-3)


@settings(max_examples=6)
@given(**shapes)
def test_triton_backward_matches_fp64_reference_gradients(B, Hk, G, T, K, V, chunk, gated, seed):
    q, k, v, g = make(seed, B, Hk, G, T, K, V, gated)
    do = torch.randn(B, Hk * G, T, V, generator=torch.Generator().manual_seed(seed + 1))
    d64 = lambda x: None if x is None else x.double()  # noqa: E731
    expected = _linear_attn_bwd_reference(d64(q), d64(k), d64(v), d64(g), do.double(), 0.3, chunk)
    actual = linear_attn_bwd_triton(q, k, v, g, do, 0.3, chunk)
    names = ["dq", "dk", "dv", "dg"]
    for name, a, e in zip(names, actual, expected):
        if e.numel() == 0:
            assert a.numel() == 0
            continue
        assert a.shape == e.shape, name
        assert rel(a, e) < 5e-6, (name, rel(a, e))


def test_gate_gradient_fp16_inputs():
    q, k, v, g = make(3, 1, 2, 2, 50, 16, 16, True, torch.float16)
    do = torch.randn(1, 4, 50, 16).half()
    expected = _linear_attn_bwd_reference(q.double(), k.double(), v.double(), g.double(), do.double(), 1.0, 16)
    actual = linear_attn_bwd_triton(q, k, v, g, do, 1.0, 16)
    for a, e in zip(actual, expected):
        assert rel(a, e) < 5e-3


def test_reference_op_gradcheck_fp64():
    q, k, v, g = make(0, 1, 1, 2, 7, 3, 2, True, torch.float64)  # 2 chunks of 4, the last one ragged
    inputs = [x.requires_grad_(True) for x in (q, k, v, g)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, g: torch.ops.transfigure.linear_attn(q, k, v, g, 0.5, 4), inputs, eps=1e-6, atol=1e-6
    )


def test_op_autograd_gives_recurrent_gradients():
    q, k, v, g = make(1, 1, 2, 2, 21, 8, 8, True, torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
    torch.ops.transfigure.linear_attn(*leaves, 0.7, 8).square().sum().backward()
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
    linear_attention_recurrent(*ref_leaves, scale=0.7)[0].square().sum().backward()
    for a, e in zip(leaves, ref_leaves):
        assert rel(a.grad, e.grad) < 1e-10


def test_normalized_linear_attention_matches_definition():
    q, k, v, _ = make(2, 2, 1, 2, 33, 8, 8, False)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    g = F.logsigmoid(torch.randn(2, 1, 33, 8)) / 8
    out = linear_attention(q, k, v, g, chunk_size=16, normalize=True)
    kk = k.repeat_interleave(2, 1)
    vv = v.repeat_interleave(2, 1)
    gg = g.repeat_interleave(2, 1)
    B = gg.cumsum(2)
    w = torch.einsum("bhik,bhjk->bhij", q.double(), kk.double()) * 0
    decay = (B[:, :, :, None, :] - B[:, :, None, :, :]).double()
    mask = torch.ones(33, 33, dtype=torch.bool).tril()
    w = torch.einsum("bhik,bhjk,bhijk->bhij", q.double(), kk.double(), decay.masked_fill(~mask[..., None], -1e9).exp())
    expected = (w @ vv.double()) / w.sum(-1, keepdim=True)
    assert rel(out, expected) < 1e-5


def test_bidirectional_matches_quadratic_form():
    q, k, v, _ = make(4, 2, 2, 2, 17, 8, 8, False)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    w = q @ kk.transpose(-1, -2)
    torch.testing.assert_close(linear_attention_bidirectional(q, k, v, scale=0.5), 0.5 * w @ vv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        linear_attention_bidirectional(q, k, v, normalize=True), (w @ vv) / (w.sum(-1, keepdim=True) + 1e-6), rtol=1e-5, atol=1e-5
    )


def test_op_under_torch_compile_with_backward():
    q, k, v, g = make(5, 1, 1, 2, 20, 8, 8, True)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g)]

    def f(q, k, v, g):
        return torch.ops.transfigure.linear_attn(q, k, v, g, 1.0, 16).sum(-1)

    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).sum().backward()
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
    f(*ref_leaves).sum().backward()
    for a, e in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, e.grad)


def test_shape_errors_are_clear():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        linear_attention_reference(q, k, k, None, 1.0, 16)


@settings(max_examples=5)
@given(B=st.integers(1, 2), Hk=st.integers(1, 2), G=st.sampled_from([1, 2, 3]), T=st.integers(1, 40),
       K=st.sampled_from([8, 20, 32]), V=st.sampled_from([8, 24, 72]), gated=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_steps_equal_chunked_forward(B, Hk, G, T, K, V, gated, seed):
    """T recurrent steps of the Triton decode kernel (GQA: one fp32 state per key/value head) reproduce the
    chunked forward's outputs and the definition's final state."""
    q, k, v, g = make(seed, B, Hk, G, T, K, V, gated)
    expected = linear_attention_reference(q, k, v, g, 0.3, 16)
    _, final = linear_attention_recurrent(q.double(), k.double(), v.double(), None if g is None else g.double(), 0.3)
    S = torch.zeros(B, Hk, K, V)
    outs = []
    for t in range(T):
        o, S = linear_attn_decode_triton(q[:, :, t], k[:, :, t], v[:, :, t], None if g is None else g[:, :, t], S, 0.3)
        outs.append(o)
    assert rel(torch.stack(outs, 2), expected) < 2e-6
    assert rel(S, final[:, ::G]) < 2e-6 and rel(S, final[:, G - 1 :: G]) < 2e-6  # shared by the group's heads


def test_decode_op_reference_and_inplace_update():
    q, k, v, g = make(7, 2, 2, 2, 1, 16, 12, True)
    S = torch.randn(2, 2, 16, 12, generator=torch.Generator().manual_seed(8))
    args = (q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0])
    o_ref, S_ref = linear_attention_decode_reference(*args, S, 0.5)
    o_op, S_op = linear_attention_decode_step(*args, S, 0.5)  # CPU: the op's reference kernel
    S_in = S.clone()
    o_tr, S_tr = linear_attn_decode_triton(*args, S_in, 0.5, out_state=S_in)
    assert S_tr.data_ptr() == S_in.data_ptr()
    for a in (o_op, o_tr):
        assert rel(a, o_ref) < 2e-6
    for a in (S_op, S_tr):
        assert rel(a, S_ref) < 2e-6
    with pytest.raises(ValueError, match="fp32"):
        linear_attention_decode_reference(*args, S.half(), 0.5)


def test_backward_autotune_prunes_the_configs_that_crashed_in_bf16():
    """BV_DQKV=32 hit an illegal memory access in bf16 on the H100 (triton 3.6): never tuned for 16-bit operands."""
    from transfigure.kernels import linear_attention as la

    q, k, v, g = make(0, 1, 1, 1, 4, 8, 8, True)
    for dtype, gated, want_all in [(torch.float32, False, True), (torch.float32, True, True), (torch.bfloat16, False, False),
                                   (torch.bfloat16, True, False), (torch.float16, False, False)]:
        args = (q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype) if gated else None)
        kept = la._prune_bwd(la._bwd_configs, args)
        assert (len(kept) == len(la._bwd_configs)) == want_all
        assert want_all or all(c.meta["BV_DQKV"] >= 64 for c in kept) and kept


@settings(max_examples=6)
@given(**shapes)
def test_every_forward_config_matches_reference(B, Hk, G, T, K, V, chunk, gated, seed):
    """The two-phase kernels and the fused segment walks (segments from a zero state plus the scan of their
    totals, gated or not) agree with the definition."""
    from transfigure.kernels.linear_attention import _all_fwd_configs, _fwd_launch

    q, k, v, g = make(seed, B, Hk, G, T + 3 * chunk, K, V, gated)
    expected = linear_attention_reference(q.double(), k.double(), v.double(), None if g is None else g.double(), 0.5, chunk)
    assert any(c.meta.get("FUSED") for c in _all_fwd_configs) and any(not c.meta.get("FUSED") for c in _all_fwd_configs)
    for config in _all_fwd_configs:
        assert rel(_fwd_launch(config, q, k, v, g, 0.5, chunk), expected) < 1e-4, config.describe()


@settings(max_examples=4)
@given(**shapes)
def test_every_backward_config_matches_reference(B, Hk, G, T, K, V, chunk, gated, seed):
    """Segment-parallel state walks (prefix of totals for h, suffix for dh) and the sequential ones give the
    reference gradients, gated (decays carried across segment boundaries) or not."""
    from transfigure.kernels.linear_attention import _all_bwd_configs, _bwd_launch

    q, k, v, g = make(seed, B, Hk, G, T + 3 * chunk, K, V, gated)
    do = torch.randn(q.shape[:3] + (V,), generator=torch.Generator().manual_seed(seed + 1))
    expected = _linear_attn_bwd_reference(q.double(), k.double(), v.double(), None if g is None else g.double(), do.double(),
                                          0.5, chunk)
    assert any(c.meta.get("SEG", 1) > 1 for c in _all_bwd_configs)
    for config in _all_bwd_configs:
        for got, want in zip(_bwd_launch(config, q, k, v, g, do, 0.5, chunk), expected):
            assert rel(got, want) < 1e-4, config.describe()


@pytest.mark.parametrize("gated,chunk", [(False, 16), (True, 16), (False, 64), (True, 64)])
def test_fused_forward_segments_fp16(gated, chunk):
    """The fused forward (state in registers, segments from the prefix of totals) in fp16 over many segments,
    gated inputs through the fp32-dot path; every fused config agrees with the fp64 definition, including those
    that walk 32-token chunks when 64 were asked for."""
    from transfigure.kernels.linear_attention import _all_fwd_configs, _fwd_launch

    q, k, v, g = make(3, 1, 2, 2, 300, 32, 16, gated)
    expected, _ = linear_attention_recurrent(q.double(), k.double(), v.double(), None if g is None else g.double(), 0.25)
    fused = [c for c in _all_fwd_configs if c.meta.get("FUSED")]
    assert fused and min(c.meta["CPS"] for c in fused) * 16 < 300  # some config runs several segments
    for config in fused:
        cast = lambda x: None if x is None else x.half()  # noqa: E731
        assert rel(_fwd_launch(config, cast(q), cast(k), cast(v), cast(g), 0.25, chunk), expected) < 3e-3, config.describe()
