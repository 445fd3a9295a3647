import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels.fwht import fwht_reference, fwht_triton, ifwht_reference


def hadamard_matrix(h: int) -> torch.Tensor:
    m = torch.ones(1, 1, dtype=torch.float64)
    while m.shape[0] < h:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    return m


@given(log_h=st.integers(0, 7), blocks=st.integers(1, 3), rows=st.integers(1, 4), signed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_reference_matches_dense_hadamard(log_h, blocks, rows, signed, seed):
    h = 2**log_h
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, blocks * h, generator=g, dtype=torch.float64)
    signs = (torch.randint(0, 2, (blocks * h,), generator=g) * 2 - 1).double() if signed else None
    y = fwht_reference(x, signs, h, 1 / math.sqrt(h))
    xs = x * signs if signed else x
    expected = (xs.view(rows, blocks, h) @ hadamard_matrix(h).T / math.sqrt(h)).view(rows, blocks * h)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ifwht_reference(y, signs, h), x, rtol=1e-5, atol=1e-5)


@given(log_h=st.integers(0, 10), blocks=st.integers(1, 2), rows=st.integers(1, 3), signed=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), scale=st.floats(0.01, 2.0), seed=st.integers(0, 2**16))
def test_triton_matches_reference(log_h, blocks, rows, signed, dtype, scale, seed):
    h = 2**log_h
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, blocks * h, generator=g).to(dtype)
    signs = (torch.randint(0, 2, (blocks * h,), generator=g) * 2 - 1).float() if signed else None
    expected = fwht_reference(x, signs, h, scale)
    actual = fwht_triton(x, signs, h, scale)
    assert actual.dtype == dtype and actual.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * math.sqrt(h))


@given(dtype=st.sampled_from([torch.float32, torch.float16]), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_largest_block_matches_reference(dtype, signed, seed):
    """h = 32768: 16384-blocks on the tensor-core path, combined pairwise (two blocks per row, two rows)."""
    h = 32768
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2 * h, generator=g).to(dtype)
    signs = (torch.randint(0, 2, (2 * h,), generator=g) * 2 - 1).float() if signed else None
    actual = fwht_triton(x, signs, h, 1 / math.sqrt(h))
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), fwht_reference(x, signs, h, 1 / math.sqrt(h)).float(), rtol=tol,
                               atol=tol)


def test_op_gradient_is_adjoint():
    h = 16
    x = torch.randn(2, 32, requires_grad=True)
    gout = torch.randn(2, 32)
    signs = (torch.randint(0, 2, (32,)) * 2 - 1).float()
    (torch.ops.transfigure.fwht(x, signs, h, 0.25) * gout).sum().backward()
    expected = (gout.double().view(2, 2, h) @ hadamard_matrix(h)).view(2, 32) * 0.25 * signs.double()
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_rejects_bad_sizes():
    import pytest

    with pytest.raises(ValueError, match="power of two"):
        fwht_reference(torch.randn(2, 12), None, 12, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        fwht_reference(torch.randn(2, 12), None, 8, 1.0)


@given(log_h=st.integers(8, 10), blocks=st.integers(1, 2), rows=st.integers(1, 21), signed=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), which=st.integers(0, 50), seed=st.integers(0, 2**16))
def test_every_kronecker_config_matches_reference(log_h, blocks, rows, signed, dtype, which, seed):
    """Large blocks: every config the tuner may pick, several rows per program included (with a partial last
    program when ROWS or BATCH does not divide the rows)."""
    from transfigure.kernels.fwht import _fwht_dot_tuner, _launch_dot

    h = 2**log_h
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, blocks * h, generator=g).to(dtype)
    signs = (torch.randint(0, 2, (blocks * h,), generator=g) * 2 - 1).float() if signed else None
    candidates = _fwht_dot_tuner.prune(_fwht_dot_tuner.configs, (x, signs, h, 0.5))
    assert any(c.meta.get("ROWS", 1) > 1 for c in candidates) == (rows >= 4)
    assert any("BATCH" in c.meta for c in candidates) == (rows >= 2)
    config = candidates[which % len(candidates)]
    actual = _launch_dot(config, x, signs, h, 0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(actual.float(), fwht_reference(x, signs, h, 0.5).float(), rtol=tol,
                               atol=tol * math.sqrt(h), msg=config.describe())


@given(log_h=st.integers(12, 15), rows=st.integers(1, 5), signed=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), which=st.integers(0, 50), seed=st.integers(0, 2**16))
def test_every_large_block_config_matches_reference(log_h, rows, signed, dtype, which, seed):
    """h = 4096 ... 32768: the three-factor kernel (H_A (x) H_B (x) H_C), the two-factor ones, and for 32768 the
    combination of 16384-blocks -- every config the tuner may pick."""
    from transfigure.kernels.fwht import _fwht_dot_tuner, _launch_dot

    h = 2**log_h
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, h, generator=g).to(dtype)
    signs = (torch.randint(0, 2, (h,), generator=g) * 2 - 1).float() if signed else None
    candidates = _fwht_dot_tuner.prune(_fwht_dot_tuner.configs, (x, signs, h, 0.5))
    assert any(c.meta.get("KRON3") for c in candidates)
    assert any(c.meta.get("COMBINE") for c in candidates) == (h > 16384)
    config = candidates[which % len(candidates)]
    actual = _launch_dot(config, x, signs, h, 0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(actual.float(), fwht_reference(x, signs, h, 0.5).float(), rtol=tol,
                               atol=tol * math.sqrt(h), msg=config.describe())


@given(log_h=st.integers(12, 14), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_round16_configs_stay_within_the_documented_precision(log_h, signed, seed):
    """ROUND16 (intermediate rounded to the 16-bit input dtype between Kronecker factors) is offered only for
    16-bit inputs with h >= 4096, and its relative L2 error stays within 2.5x of rounding the exact transform once
    to the input dtype (the docstring's claim; bf16 measured 1.4x on the GPU, fp16 here)."""
    from transfigure.kernels.fwht import _fwht_dot_tuner, _launch_dot

    h = 2**log_h
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, h, generator=g).to(torch.float16)
    signs = (torch.randint(0, 2, (h,), generator=g) * 2 - 1).float() if signed else None
    exact = fwht_reference(x.double(), signs, h, 1 / math.sqrt(h))
    once = (exact.to(torch.float16).double() - exact).norm() / exact.norm()
    candidates = _fwht_dot_tuner.prune(_fwht_dot_tuner.configs, (x, signs, h, 1 / math.sqrt(h)))
    rounding = [c for c in candidates if c.meta.get("ROUND16")]
    assert rounding and any(c.meta.get("KRON3") for c in rounding)
    for config in rounding:
        y = _launch_dot(config, x, signs, h, 1 / math.sqrt(h))
        error = (y.double() - exact).norm() / exact.norm()
        assert error <= 2.5 * once, (config.describe(), float(error), float(once))
    for dtype, size in ((torch.float32, h), (torch.float16, 2048)):
        other = torch.randn(2, size, generator=g).to(dtype)
        assert not any(c.meta.get("ROUND16") for c in _fwht_dot_tuner.prune(_fwht_dot_tuner.configs,
                                                                            (other, None, size, 1.0)))
