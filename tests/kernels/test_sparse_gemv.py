import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels.sparse_gemv import (
    MAX_SPARSE_TOKENS,
    sparse_gemv_triton,
    sparse_linear,
    sparse_linear_reference,
)


def _problem(m, k, n, sparsity, dtype, seed, bias=True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator)
    threshold = x.abs().flatten().quantile(sparsity).item() if sparsity > 0 else 0.0
    weight_t = torch.randn(k, n, generator=generator) / k**0.5
    b = torch.randn(n, generator=generator) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(weight_t), cast(b), threshold


@given(
    m=st.integers(1, MAX_SPARSE_TOKENS),
    k=st.integers(1, 300),
    n=st.integers(1, 150),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(m, k, n, sparsity, dtype, bias, seed):
    x, weight_t, b, threshold = _problem(m, k, n, sparsity, dtype, seed, bias)
    expected = sparse_linear_reference(x.double(), weight_t.double(), None if b is None else b.double(), threshold)
    actual = sparse_gemv_triton(x, weight_t, b, threshold)
    assert actual.dtype == dtype and actual.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    scale = expected.abs().max().item() + 1.0
    assert (actual.double() - expected).abs().max().item() <= tol * scale


def test_skipped_columns_are_not_read():
    """Columns of W whose activation is below threshold are never loaded: poison them with NaN."""
    x, weight_t, b, threshold = _problem(3, 256, 96, 0.6, torch.float32, seed=1)
    dead = (x.abs() <= threshold).all(0)
    assert dead.any()
    poisoned = weight_t.clone()
    poisoned[dead] = float("nan")
    actual = sparse_gemv_triton(x, poisoned, b, threshold)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, sparse_linear_reference(x, weight_t, b, threshold), rtol=1e-5, atol=1e-5)


def test_op_shapes_and_batch_dims():
    x, weight_t, b, threshold = _problem(6, 64, 40, 0.5, torch.float32, seed=2)
    out = sparse_linear(x.reshape(2, 3, 64), weight_t, b, threshold)
    assert out.shape == (2, 3, 40)
    torch.testing.assert_close(out.reshape(6, 40), sparse_linear_reference(x, weight_t, b, threshold))


@pytest.mark.parametrize("sparse_prefill", [True, False])
def test_many_tokens_plain_path(sparse_prefill):
    x, weight_t, b, threshold = _problem(MAX_SPARSE_TOKENS + 5, 64, 40, 0.5, torch.float32, seed=3)
    out = sparse_linear(x, weight_t, b, threshold, sparse_prefill)
    source = torch.where(x.abs() > threshold, x, torch.zeros(())) if sparse_prefill else x
    torch.testing.assert_close(out, source @ weight_t + b)


def test_op_under_torch_compile_and_gradient():
    x, weight_t, b, threshold = _problem(2, 32, 16, 0.5, torch.float32, seed=4)
    compiled = torch.compile(lambda a: torch.ops.transfigure.sparse_linear(a, weight_t, b, threshold, True) * 2)
    torch.testing.assert_close(compiled(x), 2 * sparse_linear_reference(x, weight_t, b, threshold))
    x.requires_grad_(True)
    sparse_linear(x, weight_t, b, threshold).sum().backward()
    keep = (x.detach().abs() > threshold).float()
    torch.testing.assert_close(x.grad, keep * weight_t.sum(1)[None, :])
