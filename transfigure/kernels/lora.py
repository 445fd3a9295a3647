"""Fused base GEMM + low-rank update: ``y = x W^T + b + s (x A^T) B^T`` (LoRA, Hu et al. 2021).

Shapes: ``x`` (..., K), ``W`` (N, K), ``A`` (r, K), ``B`` (N, r), optional bias (N,), adapter scale ``s``.
The same op serves GaLore's one-sided adapters (``W = W0 + s P Z``: ``A = Z, B = P`` for a left projector,
``A = P, B = Z`` for a right one), which is why the scale applied to the *adapter gradients* is a separate
argument ``grad_scale`` (LoRA: ``grad_scale = s``, the true gradient; GaLore: ``1``, so the optimizer sees
exactly GaLore's projected gradient ``P^T G`` and the step size ``s`` is applied on the way back).

Forward, with ``T = x A^T`` (M x r, a thin GEMM):   ``y = x W^T + s T B^T (+ b)``
Backward, with ``U = dy B`` (M x r):               ``dx = dy W + s U A``
                                                   ``dA = g U^T x``,  ``dB = g dy^T T``   (``g = grad_scale``)

The Triton kernel :func:`lowrank_addmm_triton` computes ``C = X @ Wm + s * T @ Bm (+ bias)`` with arbitrary
strides: one tiled GEMM whose epilogue adds the rank-r product of the current tile before the single store,
so the low-rank branch never writes or re-reads an (M, N) intermediate. It serves both the forward
(``Wm = W^T``, ``Bm = B^T``) and the input gradient (``Wm = W``, ``Bm = A``). The thin products ``T``, ``U``,
``dA``, ``dB`` (each O(M r K) or O(M r N), r <= 128) go to cuBLAS through torch.

Every path has a plain-PyTorch reference here (the CPU path and the test oracle).
"""

from __future__ import annotations

import torch

from .autotune import Autotuner, Config
from .registry import define_op, triton_available

MAX_RANK = 128


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def lowrank_addmm_reference(
    x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, b: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ w + scale * (t @ b) (+ bias)`` for 2-D ``x`` (M, K), ``w`` (K, N), ``t`` (M, r), ``b`` (r, N)."""
    out = x @ w + (t @ b) * scale
    if bias is not None:
        out = out + bias
    return out


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    grad_scale: float,
) -> torch.Tensor:
    """``F.linear(x, W, b) + scale * F.linear(F.linear(x, A), B)`` in plain torch (dtype of ``x``)."""
    base = torch.nn.functional.linear(x, weight, bias)
    low = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return base + low * scale


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _lowrank_addmm_kernel(
        x_ptr, w_ptr, t_ptr, b_ptr, bias_ptr, c_ptr,
        M, N, K, R, scale,
        sxm, sxk, swk, swn, stm, str_, sbr, sbn, scm, scn,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # grouped ordering: consecutive programs share the same W columns (L2 reuse)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + kk[:, None] * swk + rn[None, :] * swn, mask=(kk[:, None] < K) & mask_n[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        # epilogue: the rank-r update of this tile, added before the single store
        rr = tl.arange(0, BLOCK_R)
        t = tl.load(t_ptr + rm[:, None] * stm + rr[None, :] * str_, mask=mask_m[:, None] & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rr[:, None] * sbr + rn[None, :] * sbn, mask=(rr[:, None] < R) & mask_n[None, :], other=0.0)
        if IEEE:
            low = tl.dot(t, b, input_precision="ieee")
        else:
            low = tl.dot(t, b)
        acc += low * scale
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    def _block_r(r: int) -> int:
        return max(16, triton.next_power_of_2(r))

    def _launch(config: Config, x, w, t, b, scale, bias):
        if config.meta.get("CUBLAS"):
            # candidate the tuner may pick where cuBLAS' base GEMM beats ours: base GEMM, then the rank-r update
            # accumulated in place (beta = 1: one extra read+write of C, no separate (M, N) low-rank tensor)
            c = torch.addmm(bias, x, w) if bias is not None else x @ w
            return c.addmm_(t, b, alpha=scale)
        M, K = x.shape
        N = w.shape[1]
        R = t.shape[1]
        c = torch.empty((M, N), dtype=x.dtype, device=x.device)
        if M == 0 or N == 0:
            return c
        meta = config.meta
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _lowrank_addmm_kernel[grid](
            x, w, t, b, bias if bias is not None else c, c,
            M, N, K, R, float(scale),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), t.stride(0), t.stride(1),
            b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
            BLOCK_R=_block_r(R), num_warps=config.num_warps, num_stages=config.num_stages, **meta,
        )
        return c

    _CONFIGS = [
        Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2),
        Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        Config({"CUBLAS": True}, num_warps=0, num_stages=0),
    ]

    def _prune(configs, args):
        x, w = args[0], args[1]
        M, N = x.shape[0], w.shape[1]
        if x.device.type != "cuda":
            return configs[:1]
        small = [c for c in configs if c.meta.get("CUBLAS") or (c.meta["BLOCK_M"] <= max(32, triton.next_power_of_2(M))
                 and c.meta["BLOCK_N"] <= max(32, triton.next_power_of_2(N)))]
        return small or configs[:1]

    _tuner = Autotuner(
        "lowrank_addmm",
        _CONFIGS,
        key=lambda x, w, t, b, scale, bias: (
            x.dtype, triton.next_power_of_2(max(x.shape[0], 1)), x.shape[1], w.shape[1], _block_r(t.shape[1]),
            bias is not None,
        ),
        launch=_launch,
        prune=_prune,
    )

    _CHOICE: dict = {}

    def lowrank_addmm_triton(x, w, t, b, scale: float, bias=None):
        """Triton path of :func:`lowrank_addmm_reference` (CUDA tensors, or CPU with ``TRITON_INTERPRET=1``)."""
        if t.shape[1] > MAX_RANK:
            raise ValueError(f"lowrank_addmm: rank {t.shape[1]} > {MAX_RANK}")
        t = t.to(x.dtype)
        b = b.to(x.dtype)
        w = w.to(x.dtype)
        # memoize the tuner's choice per launch signature: Autotuner.best_config builds a string key (device
        # name, Triton version) on every call, tens of microseconds that showed in the step time on the H100
        key = (x.device, x.dtype, tuple(x.shape), tuple(w.shape), w.stride(), t.shape[1], bias is not None)
        config = _CHOICE.get(key)
        if config is None:
            config = _CHOICE[key] = _tuner.best_config(x, w, t, b, scale, bias)
        return _launch(config, x, w, t, b, scale, bias)

else:  # pragma: no cover - exercised only where Triton is missing
    lowrank_addmm_triton = None


# -- torch ops ---------------------------------------------------------------------------------------


def _addmm_ref(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, b: torch.Tensor, scale: float,
               bias: torch.Tensor | None) -> torch.Tensor:
    return lowrank_addmm_reference(x, w, t, b, scale, bias).clone()


def _addmm_cuda(x, w, t, b, scale, bias):
    if lowrank_addmm_triton is None or t.shape[1] > MAX_RANK:
        return _addmm_ref(x, w, t, b, scale, bias)
    return lowrank_addmm_triton(x, w, t, b, scale, bias)


def _addmm_fake(x, w, t, b, scale, bias):
    return x.new_empty((x.shape[0], w.shape[1]))


lowrank_addmm = define_op("lowrank_addmm", _addmm_ref, cuda=_addmm_cuda, fake=_addmm_fake)


def _lora_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    grad_scale: float,
) -> torch.Tensor:
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, grad_scale).clone()


def lora_linear_fused(x, weight, bias, lora_a, lora_b, scale: float, grad_scale: float = 1.0):
    """The fused forward (Triton launcher when available), for any leading shape of ``x``."""
    x2 = _flat(x)
    t = x2 @ lora_a.to(x.dtype).t()
    out = (lowrank_addmm_triton or lowrank_addmm_reference)(x2, weight.t(), t, lora_b.t(), scale, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _lora_cuda(x, weight, bias, lora_a, lora_b, scale, grad_scale):
    if lowrank_addmm_triton is None or lora_a.shape[0] > MAX_RANK:
        return _lora_cpu(x, weight, bias, lora_a, lora_b, scale, grad_scale)
    return lora_linear_fused(x, weight, bias, lora_a, lora_b, scale, grad_scale)


def _lora_fake(x, weight, bias, lora_a, lora_b, scale, grad_scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def lora_linear_backward_reference(grad, x, weight, lora_a, lora_b, scale, grad_scale):
    """(dx, dW, dA, dB) of :func:`lora_linear_reference` in plain torch; adapter grads scaled by ``grad_scale``."""
    g2 = _flat(grad)
    x2 = _flat(x).to(grad.dtype)
    a = lora_a.to(grad.dtype)
    b = lora_b.to(grad.dtype)
    u = g2 @ b
    t = x2 @ a.t()
    dx = (g2 @ weight.to(grad.dtype) + (u @ a) * scale).reshape(x.shape)
    dw = g2.t() @ x2
    da = (u.t() @ x2) * grad_scale
    db = (g2.t() @ t) * grad_scale
    return dx, dw, da, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, grad_scale = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.scale = scale
    ctx.grad_scale = grad_scale
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    s, g = ctx.scale, ctx.grad_scale
    need_x, need_w, need_bias, need_a, need_b = (ctx.needs_input_grad[i] for i in range(5))
    g2 = _flat(grad)
    x2 = _flat(x)
    a = lora_a.to(grad.dtype)
    b = lora_b.to(grad.dtype)
    dx = dw = dbias = da = db = None
    u = g2 @ b if (need_x or need_a) else None
    if need_x:
        dx = torch.ops.transfigure.lowrank_addmm(g2, weight.to(grad.dtype), u, a, s, None).reshape(x.shape)
    if need_w:
        dw = (g2.t() @ x2.to(grad.dtype)).to(weight.dtype)
    if need_bias and ctx.has_bias:
        dbias = g2.sum(0)
    if need_a:
        da = ((u.t() @ x2.to(grad.dtype)) * g).to(lora_a.dtype)
    if need_b:
        t = x2.to(grad.dtype) @ a.t()
        db = ((g2.t() @ t) * g).to(lora_b.dtype)
    return dx, dw, dbias, da, db, None, None


lora_linear = define_op(
    "lora_linear",
    _lora_cpu,
    cuda=_lora_cuda,
    fake=_lora_fake,
    backward=_backward,
    setup_context=_setup_context,
)


# -- GaLore: the same fused op with a gradient tap for the projector refresh ------------------------------
#
# GaLore (W = W0 + s P Z, one-sided) needs the *full* gradient G = dy^T x of the base weight only at refresh
# steps (every T steps) -- the base weight itself is frozen, so autograd never forms G. The op below is
# lora_linear with grad_scale = 1 whose backward, when the control tensor ``ctl`` (int64, CPU, [armed, count])
# is armed, also adds G (fp32) into a side store read by the optimizer wrapper (see passes/galore.py). The
# tap is a custom op that mutates ``ctl`` (count += 1), so no compiler eliminates it.

_GRAD_STORE: dict[int, torch.Tensor] = {}


def _grad_stash_ref(ctl: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> None:
    if int(ctl[0]) == 0:
        return
    g = _flat(grad).float().t() @ _flat(x).float()
    key = ctl.data_ptr()
    previous = _GRAD_STORE.get(key)
    _GRAD_STORE[key] = g if previous is None else previous + g
    ctl[1] += 1


def _grad_stash_fake(ctl, grad, x):
    return None


# GaLore's refresh is host-driven: ctl is a CPU tensor armed by the optimizer wrapper, and the stash keeps G in a
# Python dict -- a CUDA-graph replay would skip both (and recording fails on the CPU tensor the forward saves).
# The tag makes Inductor run graphs holding these ops without CUDA graphs under mode="reduce-overhead".
_NOT_CUDA_GRAPHABLE = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)
grad_stash = define_op("grad_stash", _grad_stash_ref, fake=_grad_stash_fake, mutates_args=("ctl",), tags=_NOT_CUDA_GRAPHABLE)


def take_stashed_gradient(ctl: torch.Tensor) -> torch.Tensor | None:
    """The full fp32 gradient accumulated through ``ctl`` since the last take (None if none), removed."""
    ctl[1] = 0
    return _GRAD_STORE.pop(ctl.data_ptr(), None)


def _galore_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    ctl: torch.Tensor,
) -> torch.Tensor:
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, 1.0).clone()


def _galore_cuda(x, weight, bias, lora_a, lora_b, scale, ctl):
    return _lora_cuda(x, weight, bias, lora_a, lora_b, scale, 1.0)


def _galore_fake(x, weight, bias, lora_a, lora_b, scale, ctl):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _galore_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, ctl = inputs
    _setup_context(ctx, (x, weight, bias, lora_a, lora_b, scale, 1.0), output)
    ctx.ctl = ctl


def _galore_backward(ctx, grad):
    torch.ops.transfigure.grad_stash(ctx.ctl, grad, ctx.saved_tensors[0])
    return (*_backward(ctx, grad)[:5], None, None)


galore_linear = define_op(
    "galore_linear",
    _galore_cpu,
    cuda=_galore_cuda,
    fake=_galore_fake,
    backward=_galore_backward,
    setup_context=_galore_setup,
    tags=_NOT_CUDA_GRAPHABLE,
)
