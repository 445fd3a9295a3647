import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels import lut_format
from transfigure.kernels import rotation_prologue
from transfigure.kernels.fwht import fwht_triton
from transfigure.kernels.lut_gemm import lut_linear_reference
from transfigure.kernels.rotation_prologue import (
    _rmsnorm_lut_linear_cuda,
    _rmsnorm_rotated_sparse_cuda,
    _silu_mul_lut_linear_cuda,
    _silu_mul_rotated_sparse_cuda,
    add_rmsnorm_reference,
    add_rmsnorm_rotate,
    rmsnorm_lut_linear_reference,
    rmsnorm_rotated_sparse_lut_linear_reference,
    silu_mul_lut_linear_reference,
    silu_mul_reference,
    silu_mul_rotate,
    silu_mul_rotated_sparse_lut_linear_reference,
)
from transfigure.kernels.rotated_sparse_lut import compact_rotated, decode_layout, fuses_rotation

GAUSSIAN_HALF = 0.6745


def _token(k, dtype, generator, spread=4.0):
    """A heavy-tailed residual stream, a sublayer output and a norm weight around 1 (never zeros)."""
    residual = (torch.randn(1, k, generator=generator) * (1 + spread * torch.rand(1, k, generator=generator).pow(4)))
    delta = torch.randn(1, k, generator=generator) * 0.5
    weight = 1 + 0.2 * torch.randn(k, generator=generator)
    return residual.to(dtype), delta.to(dtype), weight.to(dtype)


def test_reference_is_transformers_llama_norm_after_the_residual_add():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        residual, delta, weight = _token(96, dtype, generator)
        norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
            x, h = add_rmsnorm_reference(residual, delta, weight, 1e-5)
            assert torch.equal(h, residual + delta)
            assert torch.equal(x, norm(residual + delta))


@given(
    h=st.sampled_from([256, 512, 1024]),
    blocks=st.integers(1, 3),
    pad=st.integers(0, 255),
    signed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    eps=st.sampled_from([1e-6, 1e-5]),
    seed=st.integers(0, 2**16),
)
def test_fused_norm_rotation_equals_the_norm_then_the_fwht_kernel(h, blocks, pad, signed, dtype, eps, seed):
    """z from one launch == the FWHT kernel on the reference norm's output (same roundings), and h is the
    rounded residual sum; inputs past ``in_features`` are padding."""
    kp = blocks * h
    k = kp - pad
    generator = torch.Generator().manual_seed(seed)
    residual, delta, weight = _token(k, dtype, generator)
    signs = lut_format.random_signs(kp, seed) if signed else None
    z, h_new = add_rmsnorm_rotate(residual, delta, weight, eps, signs, h, kp)
    x, h_ref = add_rmsnorm_reference(residual, delta, weight, eps)
    assert torch.equal(h_new, h_ref)
    expected = fwht_triton(torch.nn.functional.pad(x, (0, kp - k)), signs, h, 1.0 / math.sqrt(h))
    assert z.shape == (1, kp) and z.dtype == dtype
    # the kernel's mean square sums in another order than torch's mean: x may differ by one rounding
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (z.double() - expected.double()).abs().max().item() <= tol * (expected.abs().max().item() + 1)


@given(
    h=st.sampled_from([256, 512]),
    group=st.sampled_from([64, 128, 256]),
    blocks=st.integers(1, 2),
    tau=st.sampled_from([0.0, 0.5, GAUSSIAN_HALF, 1.2]),
    seed=st.integers(0, 2**16),
)
def test_fused_norm_compaction_keeps_what_the_compaction_of_its_z_keeps(h, group, blocks, tau, seed):
    kp = blocks * h
    generator = torch.Generator().manual_seed(seed)
    residual, delta, weight = _token(kp, torch.float32, generator)
    signs = lut_format.random_signs(kp, seed)
    (vals, idx, counts), h_new = add_rmsnorm_rotate(residual, delta, weight, 1e-6, signs, h, kp, tau=tau,
                                                    group_size=group)
    z, _ = add_rmsnorm_rotate(residual, delta, weight, 1e-6, signs, h, kp)
    for name, a, b in zip(("values", "indices", "counts"), (vals, idx, counts), compact_rotated(z, tau, h, group)):
        assert torch.equal(a, b), name
    assert torch.equal(h_new, residual + delta)


def test_fused_kernel_covers_only_whole_kronecker_blocks():
    assert fuses_rotation(256, 64) and fuses_rotation(2048, 2048)
    assert not fuses_rotation(128, 64) and not fuses_rotation(4096, 128) and not fuses_rotation(256, 512)
    with pytest.raises(ValueError, match="no fused kernel"):
        add_rmsnorm_rotate(torch.randn(1, 128), torch.randn(1, 128), torch.ones(128), 1e-6, None, 128, 128)
    with pytest.raises(ValueError, match="one token"):
        add_rmsnorm_rotate(torch.randn(2, 256), torch.randn(2, 256), torch.ones(256), 1e-6, None, 256, 256)


def _packed(n, k, h, group, signed=True, seed=3):
    generator = torch.Generator().manual_seed(seed)
    table = torch.sort(torch.randn(16, generator=generator))[0].reshape(16, 1)
    return lut_format.pack(torch.randn(n, k, generator=generator), table, bits=4, group_size=group,
                           hadamard_size=h, signs_seed=seed if signed else None)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k,h,dtype", [(512, 256, torch.float32), (700, 256, torch.float16),
                                       (1024, 512, torch.float16)])
def test_dense_op_launcher_matches_its_reference(m, k, h, dtype, monkeypatch):
    """What the op runs on CUDA (interpreter here): one token through the fused kernel + the LUT GEMV without
    its rotation, more tokens through the reference norm and the plain LUT op."""
    packed = _packed(72, k, h, 64)
    generator = torch.Generator().manual_seed(m)
    residual = torch.randn(m, k, generator=generator).to(dtype)
    delta = torch.randn(m, k, generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(k, generator=generator)).to(dtype)
    bias = torch.randn(72, generator=generator).to(dtype)
    calls = []
    fused = rotation_prologue.add_rmsnorm_rotate
    monkeypatch.setattr(rotation_prologue, "add_rmsnorm_rotate", lambda *a, **kw: calls.append(a) or fused(*a, **kw))
    args = (residual, delta, weight, 1e-5, packed.codes, packed.scales, packed.table, packed.signs, bias, 4, 1, 64,
            h, k)
    y, h_new = _rmsnorm_lut_linear_cuda(*args)
    y_ref, h_ref = rmsnorm_lut_linear_reference(*args)
    assert len(calls) == (m == 1)
    assert torch.equal(h_new, h_ref) and y.shape == (m, 72) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    assert (y.double() - y_ref.double()).abs().max().item() <= tol * (y_ref.abs().max().item() + 1)
    x, _ = add_rmsnorm_reference(residual, delta, weight, 1e-5)
    plain = lut_linear_reference(x, packed.codes, packed.scales, packed.table, packed.signs, bias, 4, 1, 64, h, k)
    assert torch.equal(y_ref, plain)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("k,h,group,dtype", [(512, 256, 64, torch.float32), (1000, 512, 128, torch.float16)])
def test_rotated_sparse_op_launcher_matches_its_reference(m, k, h, group, dtype):
    packed = _packed(64, k, h, group)
    codes_tm, scales_tm = decode_layout(packed.codes, packed.scales)
    generator = torch.Generator().manual_seed(m)
    residual = torch.randn(m, k, generator=generator).to(dtype)
    delta = torch.randn(m, k, generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(k, generator=generator)).to(dtype)
    args = (residual, delta, weight, 1e-6, packed.codes, packed.scales, packed.table, packed.signs, None, codes_tm,
            scales_tm, 4, group, h, k, GAUSSIAN_HALF, True)
    y, h_new = _rmsnorm_rotated_sparse_cuda(*args)
    y_ref, h_ref = rmsnorm_rotated_sparse_lut_linear_reference(*args)
    assert torch.equal(h_new, h_ref)
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    assert (y.double() - y_ref.double()).abs().max().item() <= tol * (y_ref.abs().max().item() + 1)


def test_ops_are_registered_with_shapes_for_the_tracer():
    packed = _packed(40, 256, 256, 64)
    residual, delta = torch.randn(2, 1, 256), torch.randn(2, 1, 256)
    y, h = torch.ops.transfigure.rmsnorm_lut_linear(residual, delta, torch.ones(256), 1e-6, packed.codes,
                                                    packed.scales, packed.table, packed.signs, None, 4, 1, 64, 256,
                                                    256)
    assert y.shape == (2, 1, 40) and h.shape == residual.shape
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.empty(3, 1, 256)
        y, h = torch.ops.transfigure.rmsnorm_lut_linear(fake, fake, torch.ones(256), 1e-6, packed.codes,
                                                        packed.scales, packed.table, packed.signs, None, 4, 1, 64,
                                                        256, 256)
        assert y.shape == (3, 1, 40) and h.shape == (3, 1, 256)


def test_silu_reference_is_transformers_swiglu_product():
    from transformers.activations import ACT2FN

    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        gate, up = (torch.randn(3, 80, generator=generator) * 3).to(dtype), torch.randn(3, 80, generator=generator).to(dtype)
        assert torch.equal(silu_mul_reference(gate, up), ACT2FN["silu"](gate) * up)


@given(
    h=st.sampled_from([256, 512, 1024]),
    blocks=st.integers(1, 3),
    pad=st.integers(0, 255),
    signed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_fused_swiglu_rotation_equals_the_product_then_the_fwht_kernel(h, blocks, pad, signed, dtype, seed):
    kp = blocks * h
    k = kp - pad
    generator = torch.Generator().manual_seed(seed)
    gate = (torch.randn(1, k, generator=generator) * 4).to(dtype)
    up = (torch.randn(1, k, generator=generator) * (1 + 3 * torch.rand(1, k, generator=generator).pow(4))).to(dtype)
    signs = lut_format.random_signs(kp, seed) if signed else None
    z = silu_mul_rotate(gate, up, signs, h, kp)
    expected = fwht_triton(torch.nn.functional.pad(silu_mul_reference(gate, up), (0, kp - k)), signs, h,
                           1.0 / math.sqrt(h))
    # the kernel's exp differs from torch's silu by an ulp at most: x may differ by one rounding
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert z.shape == (1, kp) and (z.double() - expected.double()).abs().max().item() <= tol * (
        expected.abs().max().item() + 1)
    tau = GAUSSIAN_HALF
    vals, idx, counts = silu_mul_rotate(gate, up, signs, h, kp, tau=tau, group_size=min(h, 128))
    for name, a, b in zip(("values", "indices", "counts"), (vals, idx, counts),
                          compact_rotated(z, tau, h, min(h, 128))):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("sparse", [False, True])
def test_swiglu_op_launchers_match_their_references(m, sparse):
    k, h, group = 768, 256, 64
    packed = _packed(48, k, h, group)
    generator = torch.Generator().manual_seed(m)
    gate = (torch.randn(m, 1, k, generator=generator) * 3).to(torch.float16)
    up = torch.randn(m, 1, k, generator=generator).to(torch.float16)
    bias = torch.randn(48, generator=generator).to(torch.float16)
    if sparse:
        codes_tm, scales_tm = decode_layout(packed.codes, packed.scales)
        args = (gate, up, packed.codes, packed.scales, packed.table, packed.signs, bias, codes_tm, scales_tm, 4,
                group, h, k, GAUSSIAN_HALF, True)
        y, y_ref = _silu_mul_rotated_sparse_cuda(*args), silu_mul_rotated_sparse_lut_linear_reference(*args)
    else:
        args = (gate, up, packed.codes, packed.scales, packed.table, packed.signs, bias, 4, 1, group, h, k)
        y, y_ref = _silu_mul_lut_linear_cuda(*args), silu_mul_lut_linear_reference(*args)
    assert y.shape == (m, 1, 48) and y.dtype == torch.float16
    assert (y.double() - y_ref.double()).abs().max().item() <= 3e-3 * (y_ref.abs().max().item() + 1)
    assert torch.ops.transfigure.silu_mul_lut_linear(
        gate.float(), up.float(), packed.codes, packed.scales, packed.table, packed.signs, None, 4, 1, group, h,
        k).shape == (m, 1, 48)


def test_rows_wider_than_one_chunk_sum_their_squares_over_several(monkeypatch):
    """Rows above MAX_ROW_CHUNK take several chunks for the mean square (here forced with a 256-wide chunk)."""
    monkeypatch.setattr(rotation_prologue, "MAX_ROW_CHUNK", 256)
    generator = torch.Generator().manual_seed(5)
    residual, delta, weight = _token(1000, torch.float32, generator)
    z, h = add_rmsnorm_rotate(residual, delta, weight, 1e-6, None, 256, 1024)
    x, _ = add_rmsnorm_reference(residual, delta, weight, 1e-6)
    expected = fwht_triton(torch.nn.functional.pad(x, (0, 24)), None, 256, 1 / 16)
    assert torch.allclose(z, expected, rtol=1e-5, atol=1e-5) and torch.equal(h, residual + delta)
