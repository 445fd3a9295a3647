import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels.sparse_gemv import (
    MAX_SPARSE_TOKENS,
    sparse_gemv_compact_triton,
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
    k=st.integers(1, 200),
    n=st.integers(1, 96),
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


@given(
    m=st.integers(1, MAX_SPARSE_TOKENS),
    k=st.integers(1, 200),
    n=st.integers(1, 64),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_compact_variant_matches_reference(m, k, n, sparsity, dtype, seed):
    x, weight_t, b, threshold = _problem(m, k, n, sparsity, dtype, seed)
    expected = sparse_linear_reference(x.double(), weight_t.double(), b.double(), threshold)
    actual = sparse_gemv_compact_triton(x, weight_t, b, threshold)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (actual.double() - expected).abs().max().item() <= tol * (expected.abs().max().item() + 1.0)


@pytest.mark.parametrize("defer", [0, 1])
@pytest.mark.parametrize("split", [1, 3, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_split_k_partials_are_summed_once_and_counters_reset(split, bias, defer):
    """Split-K programs store partials; the last one of each output tile sums them, adds the bias once and
    resets the tile's arrival counter (shared by every later launch)."""
    from transfigure.kernels.autotune import Config
    from transfigure.kernels.lut_gemm import _COUNTERS
    from transfigure.kernels.sparse_gemv import _launch

    x, weight_t, b, threshold = _problem(1 if defer else 2, 200, 70, 0.5, torch.float32, seed=split, bias=bias)
    expected = sparse_linear_reference(x.double(), weight_t.double(), None if b is None else b.double(), threshold)
    for _ in range(2):  # a second launch sees the counters the first one left
        meta = {"BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": split, **({"DEFER": 1} if defer else {})}
        actual = _launch(Config(meta, 1, 1), x, weight_t, b, threshold)
        assert actual.dtype == x.dtype
        assert (actual.double() - expected).abs().max().item() <= 1e-5 * (expected.abs().max().item() + 1.0)
    if split > 1:
        assert int(_COUNTERS[x.device].abs().sum()) == 0


def test_skipped_columns_are_not_read():
    """Columns of W whose activation is below threshold are never loaded: poison them with NaN."""
    x, weight_t, b, threshold = _problem(3, 256, 96, 0.6, torch.float32, seed=1)
    dead = (x.abs() <= threshold).all(0)
    assert dead.any()
    poisoned = weight_t.clone()
    poisoned[dead] = float("nan")
    actual = sparse_gemv_triton(x, poisoned, b, threshold)
    assert torch.isfinite(actual).all()
    assert torch.isfinite(sparse_gemv_compact_triton(x, poisoned, b, threshold)).all()
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


# -- sparse GEMV over LUT-quantized weights ------------------------------------------------------------
from transfigure.kernels.lut_format import dequantize, pack  # noqa: E402
from transfigure.kernels.sparse_lut_gemv import (  # noqa: E402
    repack_column_major,
    sparse_lut_gemv_triton,
    sparse_lut_linear,
    sparse_lut_linear_reference,
    supports,
    unpack_column_major,
)
from transfigure.kernels.lut_format import unpack_codes  # noqa: E402


def _lut_problem(m, k, n, bits, group, sparsity, dtype, seed, bias=True):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    table = torch.linspace(-2.0, 2.0, 2**bits)
    packed = pack(weight, table, bits=bits, group_size=group)
    codes_t, scales_t = repack_column_major(packed.codes, packed.scales, bits)
    x = torch.randn(m, k, generator=generator)
    threshold = x.abs().flatten().quantile(sparsity).item() if sparsity > 0 else 0.0
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    return x.to(dtype), packed, codes_t, scales_t, b, threshold


@given(
    m=st.integers(1, MAX_SPARSE_TOKENS),
    k=st.integers(1, 160),
    n=st.integers(1, 64),
    bits=st.sampled_from([b for b in (1, 2, 3, 4) if supports(b, 1)]),
    group=st.sampled_from([32, 64, 128]),
    sparsity=st.sampled_from([0.0, 0.5, 0.8]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_lut_triton_matches_reference(m, k, n, bits, group, sparsity, dtype, seed):
    x, packed, codes_t, scales_t, b, threshold = _lut_problem(m, k, n, bits, group, sparsity, dtype, seed)
    expected = sparse_lut_linear_reference(x.double(), packed.codes, packed.scales, packed.table,
                                           None if b is None else b.double(), codes_t, scales_t, bits, group, k, threshold)
    # the reference itself is s(x) @ dequantize(W)^T + b
    dense = torch.where(x.double().abs() > threshold, x.double(), 0.0) @ dequantize(packed).double().T + b.double()
    torch.testing.assert_close(expected, dense, rtol=1e-4, atol=1e-4)
    actual = sparse_lut_gemv_triton(x, codes_t, scales_t, packed.table, b, bits, group, k, threshold)
    assert actual.dtype == dtype and actual.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert (actual.double() - expected).abs().max().item() <= tol * (expected.abs().max().item() + 1.0)


@given(n=st.integers(1, 80), k=st.integers(1, 200), bits=st.sampled_from([1, 2, 4]), seed=st.integers(0, 999))
def test_column_major_repack_roundtrip(n, k, bits, seed):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    packed = pack(weight, torch.linspace(-1, 1, 2**bits), bits=bits, group_size=64)
    codes_t, scales_t = repack_column_major(packed.codes, packed.scales, bits)
    row_major = unpack_codes(packed.codes, bits, packed.padded_in_features)
    assert torch.equal(unpack_column_major(codes_t, bits, n), row_major)
    assert torch.equal(scales_t, packed.scales.t())
    assert codes_t.shape == (packed.padded_in_features, -(-n // 32) * bits)


def test_lut_skipped_columns_are_not_read():
    x, packed, codes_t, scales_t, b, threshold = _lut_problem(2, 256, 64, 4, 64, 0.6, torch.float32, seed=5)
    dead = (x.abs() <= threshold).all(0)
    poisoned = codes_t.clone()
    poisoned[:256][dead] = -1  # all codes 15: would change the result if read
    table = packed.table.clone()
    actual = sparse_lut_gemv_triton(x, poisoned, scales_t, table, b, 4, 64, 256, threshold)
    expected = sparse_lut_gemv_triton(x, codes_t, scales_t, table, b, 4, 64, 256, threshold)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_lut_op_many_tokens_and_compile():
    x, packed, codes_t, scales_t, b, threshold = _lut_problem(12, 96, 40, 4, 32, 0.5, torch.float32, seed=6)
    args = (packed.codes, packed.scales, packed.table, b, codes_t, scales_t, 4, 32, 96, threshold)
    dense_w = dequantize(packed)
    torch.testing.assert_close(sparse_lut_linear(x, *args, True), torch.where(x.abs() > threshold, x, 0.0) @ dense_w.T + b)
    torch.testing.assert_close(sparse_lut_linear(x, *args, False), x @ dense_w.T + b)  # dense prefill
    compiled = torch.compile(lambda a: torch.ops.transfigure.sparse_lut_linear(a, *args, True) + 1)
    torch.testing.assert_close(compiled(x[:3]), sparse_lut_linear(x[:3], *args, True) + 1)


@pytest.mark.parametrize("m,sparse_prefill", [(3, True), (12, True), (12, False)])
def test_lut_op_gradients_equal_the_reference_autograd(m, sparse_prefill):
    """QLoRA-style training through a sparsified LUT linear: d/dx and d/dbias, codes frozen."""
    x, packed, codes_t, scales_t, b, threshold = _lut_problem(m, 96, 40, 4, 32, 0.5, torch.float32, seed=7)
    args = (packed.codes, packed.scales, packed.table)
    rest = (codes_t, scales_t, 4, 32, 96, threshold, sparse_prefill)
    xs, bs = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    xr, br = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    torch.ops.transfigure.sparse_lut_linear(xs, *args, bs, *rest).square().sum().backward()
    sparse_lut_linear_reference(xr, *args, br, *rest).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(bs.grad, br.grad)


@pytest.mark.parametrize("m", [2, 12])
def test_sparsify_decode_gradient(m):
    from transfigure.kernels.sparse_gemv import sparsify_decode_reference

    x = torch.randn(m, 16, generator=torch.Generator().manual_seed(m))
    a, r = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (torch.ops.transfigure.sparsify_decode(a, 0.5) * torch.arange(16.0)).sum().backward()
    (sparsify_decode_reference(r, 0.5) * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(a.grad, r.grad)
