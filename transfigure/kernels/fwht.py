"""Fast Walsh-Hadamard transform over blocks of the last dimension, with optional random signs and scale.

For a block ``v`` of power-of-two length ``h`` the transform is ``y = scale * H_h (d * v)`` where ``H_h`` is
the Sylvester Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, entries +-1, symmetric,
``H_h H_h = h I``) and ``d`` is an optional +-1 sign vector. With ``scale = 1/sqrt(h)`` the map is orthogonal;
HIGGS / QuIP# use it to make weight rows (and, online, activations) close to Gaussian before quantizing.

The last dimension ``K`` must be a multiple of ``h``: each consecutive block of ``h`` entries is transformed
independently (``signs`` has length ``K``, one sign per entry, so every block can have its own signs).

* :func:`fwht_reference` — plain PyTorch, ``log2(h)`` butterfly stages on reshaped views (CPU path, oracle).
* :func:`fwht_triton` — one Triton program per (row, block); the whole block is held in registers and
  the butterflies are done as reshapes + sums (``h`` up to 32768).
* ``torch.ops.transfigure.fwht(x, signs, hadamard_size, scale)`` — the op (CPU -> reference, CUDA -> Triton).
  Its adjoint is itself with the signs applied after instead of before, see :func:`ifwht_reference`.
"""

from __future__ import annotations

import math

import torch

from .autotune import Autotuner, Config
from .registry import define_op, triton_available

MAX_HADAMARD_SIZE = 32768


def _check(x: torch.Tensor, hadamard_size: int) -> None:
    h = hadamard_size
    if h < 1 or h & (h - 1) or h > MAX_HADAMARD_SIZE:
        raise ValueError(f"hadamard_size must be a power of two in [1, {MAX_HADAMARD_SIZE}], got {h}")
    if x.shape[-1] % h:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of hadamard_size {h}")


def fwht_reference(x: torch.Tensor, signs: torch.Tensor | None, hadamard_size: int, scale: float) -> torch.Tensor:
    """``scale * H (signs * x)`` blockwise over the last dim; computed in float32, returned in ``x.dtype``."""
    _check(x, hadamard_size)
    h = hadamard_size
    shape = x.shape
    y = x.to(torch.float32)
    if signs is not None:
        y = y * signs.to(torch.float32)
    y = y.reshape(-1, h)
    rows = y.shape[0]
    step = 1
    while step < h:
        y = y.view(rows, h // (2 * step), 2, step)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        step *= 2
    return (y.reshape(shape) * scale).to(x.dtype)


def ifwht_reference(x: torch.Tensor, signs: torch.Tensor | None, hadamard_size: int) -> torch.Tensor:
    """Inverse of the orthogonal transform ``H (signs * x) / sqrt(h)``: ``signs * H x / sqrt(h)``."""
    y = fwht_reference(x.to(torch.float32), None, hadamard_size, 1.0 / math.sqrt(hadamard_size))
    if signs is not None:
        y = y * signs.to(torch.float32)
    return y.to(x.dtype)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _fwht_kernel(x_ptr, s_ptr, y_ptr, K, scale, H: tl.constexpr, LOG_H: tl.constexpr, HAS_SIGNS: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        cols = block * H + tl.arange(0, H)
        v = tl.load(x_ptr + row.to(tl.int64) * K + cols).to(tl.float32)
        if HAS_SIGNS:
            v = v * tl.load(s_ptr + cols).to(tl.float32)
        # Butterfly stage with stride s: view as [H/(2s), 2, s]; new[i,0,:] = a+b, new[i,1,:] = a-b.
        # Written as a sum over the middle axis with a +-1 pattern so it stays a pure register reshape.
        for stage in tl.static_range(LOG_H):
            v3 = tl.reshape(v, [H >> (stage + 1), 2, 1 << stage])
            a = tl.sum(v3, axis=1)  # a + b
            sgn = 1.0 - 2.0 * (tl.arange(0, 2)[None, :, None] == 1).to(tl.float32)
            d = tl.sum(v3 * sgn, axis=1)  # a - b
            v = tl.reshape(tl.join(a, d), [H >> (stage + 1), 1 << stage, 2])
            v = tl.reshape(tl.permute(v, [0, 2, 1]), [H])
        tl.store(y_ptr + row.to(tl.int64) * K + cols, (v * scale).to(y_ptr.dtype.element_ty))

    def _launch(config: Config, x: torch.Tensor, signs: torch.Tensor | None, h: int, scale: float) -> torch.Tensor:
        K = x.shape[-1]
        x2 = x.contiguous().view(-1, K)
        y = torch.empty_like(x2)
        if x2.numel():
            _fwht_kernel[(x2.shape[0], K // h)](
                x2, signs if signs is not None else x2, y, K, float(scale),
                H=h, LOG_H=int(math.log2(h)), HAS_SIGNS=signs is not None,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )
        return y.view(x.shape)

    def _prune(configs, args):
        h = args[2]
        # a block of h fp32 values over 32 * num_warps threads: keep 8..128 values per thread
        ok = [c for c in configs if 8 <= h // (32 * c.num_warps) <= 128]
        return ok or [min(configs, key=lambda c: abs(math.log2(max(1, h // (32 * c.num_warps))) - 4))]

    _fwht_tuner = Autotuner(
        "fwht",
        [Config({}, num_warps=w, num_stages=1) for w in (4, 1, 2, 8, 16, 32)],
        key=lambda x, signs, h, scale: (x.dtype, h, x.numel() // x.shape[-1] > 64, signs is not None),
        launch=_launch,
        prune=_prune,
    )

    def fwht_triton(x: torch.Tensor, signs: torch.Tensor | None, hadamard_size: int, scale: float) -> torch.Tensor:
        _check(x, hadamard_size)
        if signs is not None:
            signs = signs.to(device=x.device, dtype=torch.float32).contiguous()
        return _fwht_tuner(x, signs, hadamard_size, scale)

else:  # pragma: no cover
    fwht_triton = None


def _fwht_op_reference(x: torch.Tensor, signs: torch.Tensor | None, hadamard_size: int, scale: float) -> torch.Tensor:
    return fwht_reference(x, signs, hadamard_size, scale)


def _fwht_setup(ctx, inputs, output):
    _, signs, h, scale = inputs
    ctx.save_for_backward(signs)
    ctx.h, ctx.scale, ctx.has_signs = h, scale, signs is not None


def _fwht_backward(ctx, grad):
    # y = scale * H D x  =>  dx = scale * D H^T g = scale * D H g  (H symmetric)
    (signs,) = ctx.saved_tensors
    g = torch.ops.transfigure.fwht(grad, None, ctx.h, ctx.scale)
    if ctx.has_signs:
        g = g * signs.to(g.dtype)
    return g, None, None, None


fwht = define_op("fwht", _fwht_op_reference, cuda=fwht_triton, backward=_fwht_backward, setup_context=_fwht_setup)
