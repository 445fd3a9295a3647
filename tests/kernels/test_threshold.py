import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels import sparsify, sparsify_reference, sparsify_triton


@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    threshold=st.floats(0.05, 2.0),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(shape, threshold, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(dtype)
    expected = sparsify_reference(x, threshold)
    actual = sparsify_triton(x, threshold)
    assert actual.dtype == dtype and actual.shape == x.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_sparsity_matches_threshold_quantile():
    x = torch.randn(4096)
    threshold = x.abs().quantile(0.4).item()
    y = sparsify(x, threshold)
    assert abs((y == 0).float().mean().item() - 0.4) < 0.01


def test_gradient_is_masked():
    x = torch.randn(64, requires_grad=True)
    sparsify(x, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, (x.detach().abs() > 0.5).float())


def test_op_runs_under_torch_compile():
    x = torch.randn(8, 16)
    compiled = torch.compile(lambda t: torch.ops.transfigure.sparsify(t, 0.3) * 2, backend="inductor")
    torch.testing.assert_close(compiled(x), sparsify_reference(x, 0.3) * 2)
