"""Fast Walsh-Hadamard transform over blocks of the last dimension, with optional random signs and scale.

For a block ``v`` of power-of-two length ``h`` the transform is ``y = scale * H_h (d * v)`` where ``H_h`` is
the Sylvester Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, entries +-1, symmetric,
``H_h H_h = h I``) and ``d`` is an optional +-1 sign vector. With ``scale = 1/sqrt(h)`` the map is orthogonal;
HIGGS / QuIP# use it to make weight rows (and, online, activations) close to Gaussian before quantizing.

The last dimension ``K`` must be a multiple of ``h``: each consecutive block of ``h`` entries is transformed
independently (``signs`` has length ``K``, one sign per entry, so every block can have its own signs).

* :func:`fwht_reference` — plain PyTorch, ``log2(h)`` butterfly stages on reshaped views (CPU path, oracle).
* :func:`fwht_triton` — for 16 <= h <= 128, tiles of R blocks times the h x h Hadamard matrix (built in
  registers from bit parities) on tensor cores; for 256 <= h <= 16384, ``H_h = H_A (x) H_B`` so a block seen
  as an ``[A, B]`` matrix ``X`` becomes ``H_A X H_B`` (two small ``tl.dot``; 16-bit inputs keep fp32 accuracy
  by splitting the intermediate into hi + lo halves), from 4096 on also three factors of 16..32; h = 32768:
  three factors or 16384-blocks combined; h < 16: butterflies on a register-resident block.
  Precision: fp32 inputs get fp32-accurate sums. 16-bit inputs: for h < 4096 the result is the fp32 transform
  rounded once to the input dtype; for h >= 4096 the tuner may also pick ROUND16 configs that round the
  intermediate to the input dtype between factors -- bf16 relative L2 error 2.4e-3 against 1.7e-3 for the
  single rounding (H100, ``benchmarks/results/explore_fwht_*.md``), for 10-30% more bandwidth.
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

    @triton.jit
    def _hadamard(N: tl.constexpr, LOG_N: tl.constexpr):
        """The N x N Sylvester Hadamard matrix, H[i, j] = (-1)^popcount(i & j), as fp32."""
        both = tl.arange(0, N)[:, None] & tl.arange(0, N)[None, :]
        parity = tl.zeros([N, N], dtype=tl.int32)
        for b in tl.static_range(LOG_N):
            parity = parity ^ ((both >> b) & 1)
        return 1.0 - 2.0 * parity.to(tl.float32)

    @triton.jit
    def _dot_fp32_accurate(h, t, dtype: tl.constexpr):
        """``h @ t`` for a +-1 matrix ``h`` and fp32 ``t`` on 16-bit tensor cores, to about fp32 accuracy: ``t``
        is split into hi + lo 16-bit parts (the products by +-1 are exact, the sums fp32)."""
        t_hi = t.to(dtype)
        t_lo = (t - t_hi.to(tl.float32)).to(dtype)
        h16 = h.to(dtype)
        return tl.dot(h16, t_hi) + tl.dot(h16, t_lo)

    @triton.jit
    def _dot_16(h, t, dtype: tl.constexpr, ROUND16: tl.constexpr):
        """``h @ t`` on 16-bit tensor cores: fp32-accurate (hi + lo split), or with ``t`` rounded to ``dtype``
        (ROUND16: one product instead of two, half the operand traffic through shared memory; one more rounding
        of the input's precision per factor)."""
        if ROUND16:
            return tl.dot(h.to(dtype), t.to(dtype))
        return _dot_fp32_accurate(h, t, dtype)

    @triton.jit
    def _fwht_rows_kernel(x_ptr, s_ptr, y_ptr, n_blocks, blocks_per_row, scale, R: tl.constexpr, H: tl.constexpr,
                          LOG_H: tl.constexpr, HAS_SIGNS: tl.constexpr, LOWP: tl.constexpr):
        """Small blocks (16 <= h <= 128): R consecutive blocks as an [R, h] tile, Y = X @ H_h (tensor cores)."""
        blocks = tl.program_id(0) * R + tl.arange(0, R)
        bmask = blocks < n_blocks
        cols = tl.arange(0, H)
        offs = blocks[:, None].to(tl.int64) * H + cols[None, :]
        x = tl.load(x_ptr + offs, mask=bmask[:, None], other=0.0)
        if HAS_SIGNS:
            sidx = (blocks % blocks_per_row)[:, None] * H + cols[None, :]
            x = x * tl.load(s_ptr + sidx, mask=bmask[:, None], other=1.0).to(x.dtype)
        hm = _hadamard(H, LOG_H)
        if LOWP:
            y = tl.dot(x, hm.to(x.dtype))
        else:
            y = tl.dot(x, hm, input_precision="ieee")
        tl.store(y_ptr + offs, (y * scale).to(y_ptr.dtype.element_ty), mask=bmask[:, None])

    @triton.jit
    def _kron_rotate(x, ha, hb, LOWP: tl.constexpr, ROUND16: tl.constexpr):
        """``H_A X H_B`` of one block ``X [A, B]``, fp32 and unscaled: the products by +-1 are exact on 16-bit
        tensor cores (LOWP, fp32 sums; the second factor fp32-accurate or, with ROUND16, on ``t`` rounded), or
        IEEE fp32 dots for fp32 inputs."""
        # one return after a constexpr if/else: Triton compiles statements after a returning branch too, and
        # the fp32 dots do not type-check on 16-bit inputs
        if LOWP:
            t = tl.dot(x, hb.to(x.dtype))  # exact products, fp32 sums
            y = _dot_16(ha, t, x.dtype, ROUND16)
        else:
            t = tl.dot(x, hb, input_precision="ieee")
            y = tl.dot(ha, t, input_precision="ieee")
        return y

    @triton.jit
    def _fwht_kron_kernel(x_ptr, s_ptr, y_ptr, rows, K, scale, A: tl.constexpr, B: tl.constexpr, LOG_A: tl.constexpr,
                          LOG_B: tl.constexpr, HAS_SIGNS: tl.constexpr, LOWP: tl.constexpr, ROWS: tl.constexpr,
                          ROUND16: tl.constexpr):
        """Large blocks h = A * B (256..16384): H_h = H_A (x) H_B, so a block seen as X [A, B] maps to H_A X H_B.

        A program transforms block ``program_id(1)`` of ROWS consecutive rows: the two Hadamard factors (built
        from bit parities) and the block's signs are made once and reused, so a 1 KB block no longer pays for
        them alone."""
        block = tl.program_id(1) * (A * B)
        inner = tl.arange(0, A)[:, None] * B + tl.arange(0, B)[None, :]
        hb = _hadamard(B, LOG_B)
        ha = _hadamard(A, LOG_A)
        if HAS_SIGNS:
            signs = tl.load(s_ptr + block + inner)
        for i in range(ROWS):
            row = tl.program_id(0) * ROWS + i
            ok = (row + inner * 0) < rows  # a tensor mask (the interpreter takes no scalar one)
            base = row.to(tl.int64) * K + block
            x = tl.load(x_ptr + base + inner, mask=ok, other=0.0)
            if HAS_SIGNS:
                x = x * signs.to(x.dtype)
            y = _kron_rotate(x, ha, hb, LOWP, ROUND16)
            tl.store(y_ptr + base + inner, (y * scale).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _fwht_kron_batch_kernel(x_ptr, s_ptr, y_ptr, rows, K, scale, A: tl.constexpr, B: tl.constexpr,
                                LOG_A: tl.constexpr, LOG_B: tl.constexpr, HAS_SIGNS: tl.constexpr, LOWP: tl.constexpr,
                                BATCH: tl.constexpr, ROUND16: tl.constexpr):
        """The Kronecker form over BATCH rows at once: X [BATCH, A, B] -> H_A X H_B per row, as ONE [BATCH*A, B]
        tensor-core product for H_B and one batched product for H_A. The row-loop kernel above runs one small
        (A x B) block per iteration, latency-bound for h <= 4096 (45-60% of copy bandwidth on the H100)."""
        block = tl.program_id(1) * (A * B)
        r = tl.program_id(0) * BATCH + tl.arange(0, BATCH)
        inner = tl.arange(0, A)[:, None] * B + tl.arange(0, B)[None, :]
        offs = r[:, None, None].to(tl.int64) * K + block + inner[None, :, :]
        ok = (r[:, None, None] + inner[None, :, :] * 0) < rows
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        if HAS_SIGNS:
            x = x * tl.load(s_ptr + block + inner)[None, :, :].to(x.dtype)
        hb = _hadamard(B, LOG_B)
        ha = tl.broadcast_to(_hadamard(A, LOG_A)[None, :, :], [BATCH, A, A])
        x2 = tl.reshape(x, [BATCH * A, B])
        if LOWP:
            t = tl.reshape(tl.dot(x2, hb.to(x.dtype)), [BATCH, A, B])  # exact products, fp32 sums
            y = _dot_16(ha, t, x.dtype, ROUND16)
        else:
            t = tl.reshape(tl.dot(x2, hb, input_precision="ieee"), [BATCH, A, B])
            y = tl.dot(ha, t, input_precision="ieee")
        tl.store(y_ptr + offs, (y * scale).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _fwht_kron3_kernel(x_ptr, s_ptr, y_ptr, rows, K, scale, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
                           LOG_A: tl.constexpr, LOG_B: tl.constexpr, LOG_C: tl.constexpr, HAS_SIGNS: tl.constexpr,
                           LOWP: tl.constexpr, ROWS: tl.constexpr, ROUND16: tl.constexpr):
        """h = A * B * C (4096..32768, each factor 16 or 32): H_h = H_A (x) H_B (x) H_C, a block seen as X [A, B, C].
        H_C acts on the last axis ([A*B, C] @ H_C), H_B as one batched product over A, H_A on the first axis
        (H_A @ [A, B*C]) -- three tensor-core products with no transposes, where the two-factor split needs
        64..128-wide factors that held these sizes at 33-50% of copy bandwidth."""
        block = tl.program_id(1) * (A * B * C)
        inner = (tl.arange(0, A)[:, None, None] * (B * C) + tl.arange(0, B)[None, :, None] * C
                 + tl.arange(0, C)[None, None, :])
        hc = _hadamard(C, LOG_C)
        hb = tl.broadcast_to(_hadamard(B, LOG_B)[None, :, :], [A, B, B])
        ha = _hadamard(A, LOG_A)
        if HAS_SIGNS:
            signs = tl.load(s_ptr + block + inner)
        for i in range(ROWS):
            row = tl.program_id(0) * ROWS + i
            ok = (row + inner * 0) < rows  # a tensor mask (the interpreter takes no scalar one)
            base = row.to(tl.int64) * K + block
            x = tl.load(x_ptr + base + inner, mask=ok, other=0.0)
            if HAS_SIGNS:
                x = x * signs.to(x.dtype)
            if LOWP:
                t = tl.reshape(tl.dot(tl.reshape(x, [A * B, C]), hc.to(x.dtype)), [A, B, C])  # exact, fp32 sums
                u = _dot_16(hb, t, x.dtype, ROUND16)
                y = _dot_16(ha, tl.reshape(u, [A, B * C]), x.dtype, ROUND16)
            else:
                t = tl.reshape(tl.dot(tl.reshape(x, [A * B, C]), hc, input_precision="ieee"), [A, B, C])
                u = tl.dot(hb, t, input_precision="ieee")
                y = tl.dot(ha, tl.reshape(u, [A, B * C]), input_precision="ieee")
            tl.store(y_ptr + base + inner, tl.reshape(y * scale, [A, B, C]).to(y_ptr.dtype.element_ty), mask=ok)

    def _split3(h: int) -> tuple[int, int, int]:
        log = int(math.log2(h))
        log_c = min(5, log - 8)
        log_b = min(5, log - 4 - log_c)
        return h >> (log_b + log_c), 1 << log_b, 1 << log_c

    def _combine_halves(tuner, x: torch.Tensor, signs: torch.Tensor | None, h: int, scale: float) -> torch.Tensor:
        """H_2n = [[H_n, H_n], [H_n, -H_n]]: transform h/2-blocks, then combine neighbours (in torch)."""
        y = tuner(x, signs, h // 2, scale) if h // 2 <= 32768 else _combine_halves(tuner, x, signs, h // 2, scale)
        pairs = y.view(*y.shape[:-1], y.shape[-1] // h, 2, h // 2)
        top, bottom = pairs.unbind(-2)
        return torch.stack((top + bottom, top - bottom), dim=-2).view(x.shape)

    def _split(h: int) -> tuple[int, int]:
        log = int(math.log2(h))
        log_b = min(7, log - 4)
        log_b = max(4, min(log_b, (log + 1) // 2))
        return h >> log_b, 1 << log_b

    def _launch_dot(config: Config, x: torch.Tensor, signs: torch.Tensor | None, h: int, scale: float) -> torch.Tensor:
        K = x.shape[-1]
        x2 = x.contiguous().view(-1, K)
        y = torch.empty_like(x2)
        lowp = x.dtype in (torch.float16, torch.bfloat16)
        round16 = lowp and bool(config.meta.get("ROUND16"))
        s = signs if signs is not None else x2
        if x2.numel() == 0:
            return y.view(x.shape)
        if config.meta.get("COMBINE"):
            return _combine_halves(_fwht_dot_tuner, x, signs, h, scale)
        if h <= 128:
            n_blocks = x2.numel() // h
            r = config.meta["R"]
            _fwht_rows_kernel[(triton.cdiv(n_blocks, r),)](
                x2, s, y, n_blocks, K // h, float(scale), R=r, H=h, LOG_H=int(math.log2(h)),
                HAS_SIGNS=signs is not None, LOWP=lowp, num_warps=config.num_warps, num_stages=config.num_stages)
        elif config.meta.get("KRON3"):
            a, b, c = _split3(h)
            rows_per_program = config.meta.get("ROWS", 1)
            _fwht_kron3_kernel[(triton.cdiv(x2.shape[0], rows_per_program), K // h)](
                x2, s, y, x2.shape[0], K, float(scale), A=a, B=b, C=c, LOG_A=int(math.log2(a)),
                LOG_B=int(math.log2(b)), LOG_C=int(math.log2(c)), HAS_SIGNS=signs is not None, LOWP=lowp,
                ROWS=rows_per_program, ROUND16=round16, num_warps=config.num_warps, num_stages=config.num_stages)
        elif "BATCH" in config.meta:
            a, b = _split(h)
            batch = config.meta["BATCH"]
            _fwht_kron_batch_kernel[(triton.cdiv(x2.shape[0], batch), K // h)](
                x2, s, y, x2.shape[0], K, float(scale), A=a, B=b, LOG_A=int(math.log2(a)), LOG_B=int(math.log2(b)),
                HAS_SIGNS=signs is not None, LOWP=lowp, BATCH=batch, ROUND16=round16, num_warps=config.num_warps,
                num_stages=config.num_stages)
        else:
            a, b = _split(h)
            rows_per_program = config.meta.get("ROWS", 1)
            _fwht_kron_kernel[(triton.cdiv(x2.shape[0], rows_per_program), K // h)](
                x2, s, y, x2.shape[0], K, float(scale), A=a, B=b, LOG_A=int(math.log2(a)), LOG_B=int(math.log2(b)),
                HAS_SIGNS=signs is not None, LOWP=lowp, ROWS=rows_per_program, ROUND16=round16,
                num_warps=config.num_warps, num_stages=config.num_stages)
        return y.view(x.shape)

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

    def _prune_dot(configs, args):
        x, h = args[0], args[2]
        if h <= 128:
            return [c for c in configs if "R" in c.meta]
        rows = x.numel() // max(x.shape[-1], 1)
        if h > 16384:  # two factors would need a 256-wide one: three factors, or 16384-blocks combined
            return [c for c in configs if c.meta.get("COMBINE")
                    or (c.meta.get("KRON3") and c.num_warps >= 8 and c.meta["ROWS"] <= max(rows, 1))]
        # 16-bit inputs with h >= 4096 may round the intermediate product to the input dtype (ROUND16): measured
        # on the H100 (explore_fwht_large.md, explore_fwht_16384_wide.md) relative L2 error 2.4e-3 against 1.7e-3
        # for bf16's own output rounding, and 4096 / 8192 / 16384 at 0.89 / 0.82 / 0.83 of copy bandwidth against
        # 0.82 / 0.71 / 0.63 without it
        round16_ok = h >= 4096 and x.dtype in (torch.float16, torch.bfloat16)
        configs = [c for c in configs if round16_ok or not c.meta.get("ROUND16")]
        # Kronecker kernel: several rows per program only pay off with many rows (prefill); never more than rows.
        # 4 warps won every size up to 8192 on the H100; 8 at 16384
        keep = [c for c in configs if "ROWS" in c.meta and not c.meta.get("KRON3")
                and (c.num_warps == 4 if h <= 2048 else c.num_warps in (4, 8))
                and (c.meta["ROWS"] == 1 or c.meta["ROWS"] <= rows)]
        # three factors of 16..32 from h = 4096 on
        keep += [c for c in configs if c.meta.get("KRON3") and h >= 4096 and c.meta["ROWS"] <= max(rows, 1)
                 and c.num_warps >= (8 if h >= 16384 else 4)]
        # batched Kronecker tiles: 2..16 rows, at most 16K values per program (registers), only with that many rows
        keep += [c for c in configs if "BATCH" in c.meta and c.meta["BATCH"] <= rows
                 and c.meta["BATCH"] * h <= (8192 if c.num_warps == 4 else 16384)]
        return keep

    _fwht_dot_tuner = Autotuner(
        "fwht_dot",
        [Config({"R": 64}, num_warps=4, num_stages=1), Config({"R": 32}, num_warps=4, num_stages=1),
         Config({"R": 128}, num_warps=8, num_stages=1), Config({"R": 64}, num_warps=8, num_stages=1),
         Config({"R": 16}, num_warps=2, num_stages=1)]
        + [Config({"ROWS": r}, num_warps=w, num_stages=st) for r in (1, 4, 16) for w in (4, 8)
           for st in ((1,) if r == 1 else (1, 2, 3))]
        + [Config({"BATCH": b}, num_warps=w, num_stages=1) for b in (2, 4, 8, 16, 32, 64) for w in (4, 8)]
        + [Config({"KRON3": 1, "ROWS": r}, num_warps=w, num_stages=1) for r in (1, 4) for w in (4, 8, 16)]
        # three stages: the next rows' loads in flight during this row's products (16384: 0.58 -> 0.83 of copy)
        + [Config({"ROWS": r, "ROUND16": 1}, num_warps=w, num_stages=st) for r in (1, 4, 16) for w in (4, 8)
           for st in ((1,) if r == 1 else (1, 2, 3))]
        + [Config({"KRON3": 1, "ROWS": r, "ROUND16": 1}, num_warps=w, num_stages=1) for r in (1, 4) for w in (4, 8)]
        + [Config({"COMBINE": 1})],
        key=lambda x, signs, h, scale: (x.dtype, h, x.numel() // x.shape[-1] > 64, signs is not None),
        launch=_launch_dot,
        prune=_prune_dot,
    )

    def fwht_triton(x: torch.Tensor, signs: torch.Tensor | None, hadamard_size: int, scale: float) -> torch.Tensor:
        """Tensor-core path (16 <= h <= 32768: ``X @ H_h``, ``H_A X H_B`` or three factors; 32768 may also be
        16384-blocks combined pairwise; larger h: combined halves), butterflies below 16."""
        _check(x, hadamard_size)
        if signs is not None:
            signs = signs.to(device=x.device, dtype=torch.float32).contiguous()
        if 16 <= hadamard_size <= 32768:
            return _fwht_dot_tuner(x, signs, hadamard_size, scale)
        if hadamard_size > 32768:
            return _combine_halves(_fwht_dot_tuner, x, signs, hadamard_size, scale)
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
