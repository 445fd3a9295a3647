"""Activation thresholding ``s(x) = x * 1[|x| > t]`` (TEAL's sparsification of projection inputs).

The reference is two torch ops; the Triton kernel does it in one pass over memory (read x, write y), which
matters at prefill where the thresholded tensor is large. The op is differentiable: the gradient is the
incoming gradient masked the same way (the threshold is a constant).
"""

from __future__ import annotations

import torch

from .autotune import Autotuner, Config
from .registry import define_op, triton_available


def sparsify_reference(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _sparsify_kernel(x_ptr, y_ptr, n_elements, threshold, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_bounds = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0)
        keep = tl.abs(x.to(tl.float32)) > threshold
        tl.store(y_ptr + offsets, tl.where(keep, x, tl.zeros_like(x)), mask=in_bounds)

    def _launch(config: Config, x: torch.Tensor, threshold: float) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        if n:
            block = config.meta["BLOCK"]
            _sparsify_kernel[(triton.cdiv(n, block),)](
                x, y, n, float(threshold), BLOCK=block, num_warps=config.num_warps, num_stages=config.num_stages
            )
        return y

    _sparsify_tuner = Autotuner(
        "sparsify",
        [Config({"BLOCK": 1024}, num_warps=4), Config({"BLOCK": 2048}, num_warps=8), Config({"BLOCK": 4096}, num_warps=8)],
        key=lambda x, threshold: (x.dtype, x.numel() // 65536),
        launch=_launch,
    )

    def sparsify_triton(x: torch.Tensor, threshold: float) -> torch.Tensor:
        """Triton path: works on CUDA tensors, and on CPU tensors with ``TRITON_INTERPRET=1``."""
        return _sparsify_tuner(x, threshold)

else:  # pragma: no cover - exercised only where Triton is missing
    sparsify_triton = None


def _setup_context(ctx, inputs, output):
    x, threshold = inputs
    ctx.save_for_backward(x)
    ctx.threshold = threshold


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.where(x.abs() > ctx.threshold, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


sparsify = define_op(
    "sparsify",
    sparsify_reference,
    cuda=sparsify_triton,
    backward=_backward,
    setup_context=_setup_context,
)
