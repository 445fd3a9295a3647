"""Softmax attention of a few query tokens over a KV cache, with grouped-query heads read once (decode steps).

``out = softmax(scale * q k^T + mask) v`` per query head, where query head ``h`` reads key/value head
``h // G`` (``G = Hq / Hk``), exactly ``scaled_dot_product_attention`` over ``repeat_kv``-expanded keys and
values. ``q: [B, Hq, Lq, D]``, ``k: [B, Hk, L, D]``, ``v: [B, Hk, L, Dv]``; ``attn_mask`` is None, bool (True =
attend) or additive, broadcastable to ``[B, Hq, Lq, L]``; ``is_causal`` is SDPA's (top-left aligned: query ``i``
sees keys ``j <= i``). A query row that may attend to nothing gets zeros (as SDPA's math path does).

Why a kernel of our own for decoding (Lq of 1 to a few tokens): transformers' static cache hands SDPA the whole
``max_cache_len`` cache with a bool mask, and with a mask it expands GQA keys and values (``repeat_kv``: two
copies of the cache per layer per token) because SDPA's ``enable_gqa`` only applies without one. Here one
program takes all ``G * Lq`` query rows of one key/value head (one read of each cache block for the whole
group, the flash-decoding split of Dao et al. over the key axis for parallelism), and a key block whose mask
is all False is skipped before its keys and values are loaded -- so the cost follows the filled part of the
cache, not its capacity. The splits' partial ``(max, sum, acc)`` are merged by the last program of each head to
arrive (an arrival counter), so a call is one launch.

Reference: PyTorch in fp32 (the CPU path and the test oracle); the Triton path keeps scores and sums in fp32
and multiplies probabilities rounded to the value dtype by ``v`` (as flash attention does).
"""

from __future__ import annotations

from typing import Optional

import torch

from .registry import define_op, triton_available

MAX_QUERY_ROWS = 64  # G * Lq rows of one program: beyond that the plain SDPA path is the better kernel


def _expanded_mask(attn_mask: torch.Tensor, q: torch.Tensor, L: int) -> torch.Tensor:
    B, H, Lq, _ = q.shape
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask.expand(B, H, Lq, L)


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    B, H, Lq, _ = q.shape
    Hk, L = k.shape[1], k.shape[2]
    if H % Hk:
        raise ValueError(f"decode_attention: {H} query heads are not a multiple of {Hk} key/value heads")
    G = H // Hk
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(compute).repeat_interleave(G, dim=1)
    vf = v.to(compute).repeat_interleave(G, dim=1)
    s = scale * (q.to(compute) @ kf.transpose(-1, -2))
    allowed = torch.ones(B, H, Lq, L, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed & torch.ones(Lq, L, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        mask = _expanded_mask(attn_mask, q, L)
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.to(compute)
            allowed = allowed & (mask > float("-inf"))
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = (s - m).exp()
    den = p.sum(-1, keepdim=True)
    out = (p @ vf) / torch.where(den > 0, den, torch.ones_like(den))
    return out.to(q.dtype)


def _fake(q, k, v, attn_mask, scale, is_causal):
    B, H, Lq, _ = q.shape
    return q.new_empty((B, H, Lq, v.shape[-1]))


def rotate_half_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as transformers' Llama applies it: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``; computed in fp32 (fp64 for fp64), rounded once to
    ``x``'s dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if cos.dim() == x.dim() - 1:  # [B, Lq, D] tables: shared by every head
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    xf = x.to(compute)
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos.to(compute) + rotated * sin.to(compute)).to(x.dtype)


def decode_attention_update_reference(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: Optional[torch.Tensor],
    fill: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    """A static-cache decode step's whole attention update, as one op.

    The new tokens go to ``positions`` (``[Lq]`` consecutive integers, as a static cache writes them) or, without
    them, to ``fill + arange(Lq)``, and then
    ``fill`` (a 0-d int64 counter, transformers' ``StaticLayer.cumulative_length``) advances by ``Lq``. With
    ``cos``/``sin`` (``[B, Lq, D]`` or ``[B, 1, Lq, D]``, batch 1 broadcast) the query and the
    new keys are rotary-embedded (:func:`rotate_half_embedding`); the new keys/values (``[B, Hk, Lq, D]``) are
    written into ``k_cache``/``v_cache`` (``[B, Hk, L, D]``) along dim 2; the result is
    :func:`decode_attention_reference` of the query over the updated cache. Mutates ``k_cache``, ``v_cache`` and
    ``fill``, exactly as ``StaticLayer.update`` does. (A counter that other parts of the graph read is not passed:
    Inductor may recompute those reads after the op, so the graph keeps its own increment and passes positions.)"""
    Lq = q.shape[2]
    if cos is not None and sin is not None:
        q = rotate_half_embedding(q, cos, sin)
        k_new = rotate_half_embedding(k_new, cos, sin)
    if (positions is None) == (fill is None):
        raise ValueError("decode_attention_update: give exactly one of positions and fill")
    if positions is None:
        positions = fill.reshape(()) + torch.arange(Lq, device=fill.device, dtype=fill.dtype)
    positions = positions.reshape(-1).long()
    if positions.device.type == "cpu" and not torch.equal(positions, positions[0] + torch.arange(Lq)):
        raise ValueError(f"decode_attention_update: positions must be consecutive, got {positions.tolist()}")
    if int(positions.max()) >= k_cache.shape[2]:
        raise IndexError(f"decode_attention_update: cache of {k_cache.shape[2]} positions is full (writing up to "
                         f"{int(positions[-1])})")
    k_cache.index_copy_(2, positions, k_new.to(k_cache.dtype))
    v_cache.index_copy_(2, positions, v_new.to(v_cache.dtype))
    if fill is not None:
        fill.add_(Lq)
    return decode_attention_reference(q, k_cache, v_cache, attn_mask, scale, is_causal)


def update_supported(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, fill) -> bool:
    """What the fused update launch covers: new keys/values of the cache's dtype and head dims, unit-stride
    caches (written in place), one of a 0-d / 1-element integer counter or ``Lq`` integer positions,
    ``cos``/``sin`` both or neither, of width ``D`` and even ``D`` when rotating."""
    B, H, Lq, D = q.shape
    rope = cos is not None and sin is not None
    return (k_new.shape == (B, k_cache.shape[1], Lq, D) and v_new.shape[:3] == k_new.shape[:3]
            and v_new.shape[-1] == v_cache.shape[-1] and k_new.dtype == k_cache.dtype and v_new.dtype == v_cache.dtype
            and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and (positions is None) != (fill is None)
            and (fill is None or (fill.numel() == 1 and fill.dtype in (torch.int32, torch.int64)))
            and (positions is None or (positions.numel() == Lq and positions.dtype in (torch.int32, torch.int64)))
            and (cos is None) == (sin is None)
            and (not rope or (D % 2 == 0 and cos.shape[-1] == D and sin.shape[-1] == D
                              and all(t.dim() == 3 or (t.dim() == 4 and t.shape[1] == 1) for t in (cos, sin)))))


def _fake_update(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, fill, attn_mask, scale, is_causal):
    B, H, Lq, _ = q.shape
    return q.new_empty((B, H, Lq, v_cache.shape[-1]))


def triton_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Few query rows per key/value head (``G * Lq <= MAX_QUERY_ROWS``), head dims <= 256, 16-bit or fp32."""
    B, H, Lq, D = q.shape
    G = H // max(k.shape[1], 1)
    return (G * Lq <= MAX_QUERY_ROWS and D <= 256 and v.shape[-1] <= 256 and k.shape[2] > 0
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype and v.dtype == q.dtype)


decode_attention_triton = None
decode_attention_update_triton = None

if triton_available():
    import triton
    import triton.language as tl

    from .autotune import Autotuner, Config
    from .lut_gemm import _sm_count, _tile_counters

    @triton.jit
    def _key_mask(allowed, cols, pos, mask_rows, sms, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
        """``allowed`` (``[rows, keys]``) narrowed by causality and the mask at key positions ``cols``, and the
        additive bias (zeros unless ``MASK_KIND`` is 2)."""
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= pos[:, None])
        bias = tl.where(allowed, 0.0, 0.0)
        if MASK_KIND == 1:
            keep = tl.load(mask_rows[:, None] + cols[None, :].to(tl.int64) * sms, mask=allowed, other=0)
            allowed = allowed & (keep != 0)
        if MASK_KIND == 2:
            bias = tl.load(mask_rows[:, None] + cols[None, :].to(tl.int64) * sms, mask=allowed,
                           other=float("-inf")).to(tl.float32)
            allowed = allowed & (bias > float("-inf"))
        return allowed, bias

    @triton.jit
    def _online_softmax_step(q, k, vals, allowed, bias, m, den, acc, scale, MASK_KIND: tl.constexpr,
                             IEEE: tl.constexpr):
        """One key block into the running ``(max, sum, acc)`` of the query rows (scores and sums in fp32)."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if MASK_KIND == 2:
            s = s + tl.where(allowed, bias, 0.0)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        p = tl.where(allowed, tl.exp(s - m_ref[:, None]), 0.0)
        den = den * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vals.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals)
        return m_new, den, acc

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, work_ptr, stat_ptr, count_ptr,
                                 knew_ptr, vnew_ptr, cos_ptr, sin_ptr, fill_ptr, launch_ptr,
                                 Hk, Lq, L, span, splits, scale,
                                 sqb, sqh, sql, skb, skh, skl, svb, svh, svl, smb, smh, sml, sms,
                                 snb, snh, snl, swb, swh, swl, scb, scl, ssb, ssl,
                                 G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
                                 BDV: tl.constexpr, ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
                                 MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                                 UPDATE: tl.constexpr, ADVANCE: tl.constexpr, ROPE: tl.constexpr,
                                 BLQ: tl.constexpr):
        """One program: the ``G * Lq`` query rows of key/value head ``program_id(0)`` over key split
        ``program_id(1)`` (``span`` keys). ``MASK_KIND``: 0 none, 1 bool, 2 additive. Rows are query
        (head, position) pairs, row ``r`` = head ``hk * G + r // Lq``, position ``r % Lq``.

        ``UPDATE``: the step's new keys/values (``knew``/``vnew``, ``Lq`` tokens) belong at positions
        ``fill[0] + t`` (the fill counter; with ``ADVANCE`` the last program of the launch advances it by ``Lq``).
        The program whose split holds a position attends to that token from registers and writes its cache row
        for later steps. ``ROPE``: queries and new keys are
        rotary-embedded on load (``x * cos + rotate_half(x) * sin``, in fp32)."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // Hk
        hk = bh % Hk
        r = tl.arange(0, ROWS)
        row_ok = r < G * Lq
        head = hk * G + r // Lq
        pos = r % Lq
        dq = tl.arange(0, BD)
        dv = tl.arange(0, BDV)
        q_rows = q_ptr + b.to(tl.int64) * sqb + head[:, None] * sqh + pos[:, None] * sql
        q = tl.load(q_rows + dq[None, :], mask=row_ok[:, None] & (dq[None, :] < D), other=0.0)
        if ROPE:
            # rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after
            partner = (dq + D // 2) % D
            sign = tl.where(dq < D // 2, -1.0, 1.0)
            q_partner = tl.load(q_rows + partner[None, :], mask=row_ok[:, None] & (dq[None, :] < D), other=0.0)
            cos_q = tl.load(cos_ptr + b.to(tl.int64) * scb + pos[:, None] * scl + dq[None, :],
                            mask=row_ok[:, None] & (dq[None, :] < D), other=0.0).to(tl.float32)
            sin_q = tl.load(sin_ptr + b.to(tl.int64) * ssb + pos[:, None] * ssl + dq[None, :],
                            mask=row_ok[:, None] & (dq[None, :] < D), other=0.0).to(tl.float32)
            q = (q.to(tl.float32) * cos_q + sign[None, :] * q_partner.to(tl.float32) * sin_q).to(q_ptr.dtype.element_ty)
        k_base = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
        v_base = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
        mask_rows = mask_ptr + b.to(tl.int64) * smb + head.to(tl.int64) * smh + pos * sml
        m = tl.full([ROWS], float("-inf"), tl.float32)
        den = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, BDV], dtype=tl.float32)
        lo = split * span
        hi = tl.minimum(lo + span, L)
        if UPDATE:
            # The new tokens are attended from registers, as one more key block of this program's split; their
            # cache rows are written for later steps and not read back here, so writes and reads need no order.
            t = tl.arange(0, BLQ)
            first_new = tl.load(fill_ptr)  # the fill counter, or the first of the consecutive positions
            if ADVANCE:
                # arrive as soon as ``fill`` is read (the operand depends on the loaded value, so the atomic
                # cannot be issued before the load returns): the last reader advances it at its end, and the
                # atomic's latency hides behind the attention instead of ending the launch
                arrived_all = tl.atomic_add(launch_ptr, 1 + (first_new >> 62).to(tl.int32), sem="relaxed")
            cache_pos = first_new + t
            t_ok = t < Lq
            new_rows = knew_ptr + b.to(tl.int64) * snb + hk.to(tl.int64) * snh + t[:, None] * snl
            k_ok = t_ok[:, None] & (dq[None, :] < D)
            k_new = tl.load(new_rows + dq[None, :], mask=k_ok, other=0.0)
            if ROPE:
                k_partner = tl.load(new_rows + partner[None, :], mask=k_ok, other=0.0).to(tl.float32)
                cos_k = tl.load(cos_ptr + b.to(tl.int64) * scb + t[:, None] * scl + dq[None, :], mask=k_ok,
                                other=0.0).to(tl.float32)
                sin_k = tl.load(sin_ptr + b.to(tl.int64) * ssb + t[:, None] * ssl + dq[None, :], mask=k_ok,
                                other=0.0).to(tl.float32)
                k_new = k_new.to(tl.float32) * cos_k + sign[None, :] * k_partner * sin_k
            k_new = k_new.to(k_ptr.dtype.element_ty)
            v_ok = t_ok[:, None] & (dv[None, :] < DV)
            v_new = tl.load(vnew_ptr + b.to(tl.int64) * swb + hk.to(tl.int64) * swh + t[:, None] * swl
                            + dv[None, :], mask=v_ok, other=0.0).to(v_ptr.dtype.element_ty)
            mine = t_ok & (cache_pos >= lo) & (cache_pos < hi)
            tl.store(k_base + cache_pos[:, None].to(tl.int64) * skl + dq[None, :], k_new,
                     mask=mine[:, None] & (dq[None, :] < D))
            tl.store(v_base + cache_pos[:, None].to(tl.int64) * svl + dv[None, :], v_new,
                     mask=mine[:, None] & (dv[None, :] < DV))
            fresh_ok, fresh_bias = _key_mask(row_ok[:, None] & mine[None, :], cache_pos, pos, mask_rows, sms,
                                             CAUSAL, MASK_KIND)
            m, den, acc = _online_softmax_step(q, k_new, v_new, fresh_ok, fresh_bias, m, den, acc, scale,
                                               MASK_KIND, IEEE)
        for start in range(lo, hi, BLOCK_L):
            cols = start + tl.arange(0, BLOCK_L)
            allowed = row_ok[:, None] & (cols[None, :] < hi)
            if UPDATE:  # the new tokens' cache rows are stale here: they were attended from registers
                allowed = allowed & ((cols[None, :] < first_new) | (cols[None, :] >= first_new + Lq))
            allowed, bias = _key_mask(allowed, cols, pos, mask_rows, sms, CAUSAL, MASK_KIND)
            # a block nobody may attend to (the empty tail of a static cache) costs its mask, not its keys
            if tl.max(allowed.to(tl.int32)) > 0:
                col_ok = cols < hi
                k = tl.load(k_base + cols[:, None].to(tl.int64) * skl + dq[None, :],
                            mask=col_ok[:, None] & (dq[None, :] < D), other=0.0)
                vals = tl.load(v_base + cols[:, None].to(tl.int64) * svl + dv[None, :],
                               mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
                m, den, acc = _online_softmax_step(q, k, vals, allowed, bias, m, den, acc, scale, MASK_KIND, IEEE)
        out_rows = out_ptr + (b.to(tl.int64) * (Hk * G) + head) * Lq * DV + pos * DV
        out_mask = row_ok[:, None] & (dv[None, :] < DV)
        if splits == 1:
            result = acc / tl.where(den > 0, den, 1.0)[:, None]
            tl.store(out_rows[:, None] + dv[None, :], result.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            piece = bh * splits + split
            tl.store(work_ptr + piece.to(tl.int64) * ROWS * BDV + r[:, None] * BDV + dv[None, :], acc)
            tl.store(stat_ptr + piece * 2 * ROWS + r, m)
            tl.store(stat_ptr + piece * 2 * ROWS + ROWS + r, den)
            tl.debug_barrier()  # every thread's partial is written before the release below
            arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")
            if arrived == splits - 1:
                first = bh * splits
                top = tl.full([ROWS], float("-inf"), tl.float32)
                for other in range(0, splits):
                    top = tl.maximum(top, tl.load(stat_ptr + (first + other) * 2 * ROWS + r, cache_modifier=".cg"))
                top_ref = tl.where(top == float("-inf"), 0.0, top)
                total = tl.zeros([ROWS, BDV], dtype=tl.float32)
                total_den = tl.zeros([ROWS], dtype=tl.float32)
                for other in range(0, splits):
                    stats = stat_ptr + (first + other) * 2 * ROWS
                    weight = tl.exp(tl.load(stats + r, cache_modifier=".cg") - top_ref)
                    total_den += weight * tl.load(stats + ROWS + r, cache_modifier=".cg")
                    part = tl.load(work_ptr + (first + other).to(tl.int64) * ROWS * BDV + r[:, None] * BDV
                                   + dv[None, :], cache_modifier=".cg")
                    total += weight[:, None] * part
                result = total / tl.where(total_den > 0, total_den, 1.0)[:, None]
                tl.store(out_rows[:, None] + dv[None, :], result.to(out_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(count_ptr + bh, 0)
        if ADVANCE:
            if arrived_all == tl.num_programs(0) * tl.num_programs(1) - 1:
                tl.store(fill_ptr, first_new + Lq)
                tl.atomic_xchg(launch_ptr, 0)

    def _prepared(q, k, v, attn_mask):
        """Inner dims made unit-stride (the kernel assumes it for the head dim) and the mask as 4-D strides."""
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        if attn_mask is None:
            return q, k, v, None, 0, (0, 0, 0, 0)
        mask = _expanded_mask(attn_mask, q, k.shape[2])
        if mask.dtype == torch.bool:
            mask, kind = mask.view(torch.uint8), 1
        else:
            kind = 2
        return q, k, v, mask, kind, tuple(mask.stride())

    def _splits(config: Config, heads: int, L: int, device: torch.device) -> int:
        # on the CPU interpreter, as if 4 SMs: the tests still split the key axis and merge the partials
        sms = _sm_count(device) if device.type == "cuda" else 4
        wanted = -(-config.meta["WAVES"] * sms // max(heads, 1))
        return max(1, min(wanted, triton.cdiv(L, config.meta["BLOCK_L"])))

    def _launch(config: Config, q, k, v, mask, kind, mask_strides, scale: float, is_causal: bool, update=None):
        """``update``: None, or ``(k_new, v_new, cos, sin, positions, fill)`` of :func:`decode_attention_update`."""
        B, H, Lq, D = q.shape
        Hk, L, DV = k.shape[1], k.shape[2], v.shape[-1]
        G = H // Hk
        block_l = config.meta["BLOCK_L"]
        rows = max(16, triton.next_power_of_2(G * Lq))
        bdv = max(16, triton.next_power_of_2(DV))
        splits = _splits(config, B * Hk, L, q.device)
        span = triton.cdiv(triton.cdiv(L, splits), block_l) * block_l
        splits = triton.cdiv(L, span)
        out = torch.empty(B, H, Lq, DV, device=q.device, dtype=q.dtype)
        pieces = B * Hk * splits if splits > 1 else 1  # one split writes ``out`` directly: no partials
        work = torch.empty(pieces * rows * bdv, device=q.device, dtype=torch.float32)
        stats = torch.empty(pieces * 2 * rows, device=q.device, dtype=torch.float32)
        counts = _tile_counters(q.device, B * Hk + 1)
        if update is None:
            k_new = v_new = cos = sin = fill = q
            new_strides, rope, advance = (0,) * 10, False, False
        else:
            k_new, v_new, cos, sin, positions, fill = update
            advance = fill is not None
            fill = fill if advance else positions
            rope = cos is not None
            tables = (*_rope_strides(cos, B, Lq), *_rope_strides(sin, B, Lq)) if rope else (0,) * 4
            cos, sin = (cos, sin) if rope else (q, q)
            new_strides = (k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1),
                           v_new.stride(2), *tables)
        _decode_attention_kernel[(B * Hk, splits)](
            q, k, v, mask if mask is not None else q, out, work, stats, counts,
            k_new, v_new, cos, sin, fill, counts[B * Hk:], Hk, Lq, L, span, splits, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *mask_strides, *new_strides,
            G=G, D=D, DV=DV, BD=max(16, triton.next_power_of_2(D)), BDV=bdv, ROWS=rows, BLOCK_L=block_l,
            MASK_KIND=kind, CAUSAL=bool(is_causal), IEEE=q.dtype == torch.float32,
            UPDATE=update is not None, ADVANCE=advance, ROPE=rope, BLQ=max(16, triton.next_power_of_2(Lq)),
            num_warps=config.num_warps, num_stages=config.num_stages)
        return out

    def _rope_strides(table: torch.Tensor, B: int, Lq: int) -> tuple[int, int]:
        """Batch and position strides of a ``cos``/``sin`` table broadcast to ``[B, 1, Lq, D]`` (0 where broadcast)."""
        table = table.unsqueeze(1) if table.dim() == 3 else table
        table = table.expand(B, 1, Lq, table.shape[-1])
        return table.stride(0), table.stride(2)

    def _configs() -> list[Config]:
        # every winner of the 16 H100 tunings in benchmarks/results/decode_attention.json is here: 4 warps, key
        # blocks of 64 or 128 (32 and 2 warps, also tried, never won); the list is short because each new cache
        # shape is tuned at the first decode step, inside the cold compile
        return [Config({"BLOCK_L": block_l, "WAVES": waves}, num_warps=4, num_stages=stages)
                for block_l in (64, 128) for waves in (2, 1, 4) for stages in (2, 1)]

    def _prune(configs, args):
        q, k = args[0], args[1]
        G = q.shape[1] // k.shape[1]
        wide = max(q.shape[-1], args[2].shape[-1]) > 128 or G * q.shape[2] > 32
        return [c for c in configs if not (wide and c.meta["BLOCK_L"] == 128)] or configs[:1]

    def _key(q, k, v, mask, kind, mask_strides, scale, is_causal):
        B, H, Lq, D = q.shape
        # the cache length in powers of two: the static cache's capacity, not what is filled, sets the launch
        return (str(q.dtype), B * k.shape[1], H // k.shape[1] * Lq, D, v.shape[-1],
                triton.next_power_of_2(k.shape[2]), kind, bool(is_causal))

    _tuner = Autotuner("decode_attention", _configs(), key=_key, launch=_launch, prune=_prune)

    def decode_attention_triton(q, k, v, attn_mask, scale: float, is_causal: bool):
        """Triton path (CUDA, or CPU with TRITON_INTERPRET=1); shapes it does not cover fall back to the
        reference (``triton_supported``)."""
        if not triton_supported(q, k, v):
            return decode_attention_reference(q, k, v, attn_mask, scale, is_causal)
        return _tuner(*_prepared(q, k, v, attn_mask), scale, is_causal)

    def decode_attention_with_config(q, k, v, attn_mask, scale: float, is_causal: bool, config: Config):
        """One forced config (tests and benchmarks)."""
        return _launch(config, *_prepared(q, k, v, attn_mask), scale, is_causal)

    def _prepared_update(q, k_new, v_new, cos, sin):
        """Unit-stride inner dims (the kernel assumes them for the head dim), None kept."""
        return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (q, k_new, v_new, cos, sin)]

    def decode_attention_update_triton(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, fill, attn_mask,
                                       scale: float, is_causal: bool, config: Optional[Config] = None):
        """Triton path of :func:`decode_attention_update`: one launch writes the new keys/values into the cache,
        attends, and advances ``fill`` (if given). The launch shape is the plain decode attention's (same tuning: the
        writes are ``Lq`` rows); shapes the kernel does not cover run the reference."""
        if not (update_supported(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, fill)
                and triton_supported(q, k_cache, v_cache)):
            return decode_attention_update_reference(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, fill,
                                                     attn_mask, scale, is_causal)
        q, k_new, v_new, cos, sin = _prepared_update(q, k_new, v_new, cos, sin)
        plain = _prepared(q, k_cache, v_cache, attn_mask)
        if config is None:
            # tuned as the plain attention of the same shapes (the tuner must not run a call that mutates)
            config = _tuner.best_config(*plain, scale, is_causal)
        if positions is not None and positions.stride(-1) != 1:
            positions = positions.contiguous()
        return _launch(config, *plain, scale, is_causal, update=(k_new, v_new, cos, sin, positions, fill))



def _cuda(q, k, v, attn_mask, scale, is_causal):
    if decode_attention_triton is None:
        return decode_attention_reference(q, k, v, attn_mask, scale, is_causal)
    return decode_attention_triton(q, k, v, attn_mask, scale, is_causal)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale, is_causal = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.meta = (scale, is_causal)


def _backward(ctx, grad):
    """Through the reference (decode attention is an inference kernel; gradients stay correct, not fast)."""
    q, k, v, attn_mask = ctx.saved_tensors
    scale, is_causal = ctx.meta
    wants = ctx.needs_input_grad[:3]
    leaves = [t.detach().requires_grad_(bool(w)) for t, w in zip((q, k, v), wants)]
    with torch.enable_grad():
        out = decode_attention_reference(*leaves, attn_mask, scale, is_causal)
        inputs = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(out, inputs, grad) if inputs else []
    by_leaf = dict(zip(map(id, inputs), grads))
    return (*(by_leaf.get(id(t)) for t in leaves), None, None, None)


decode_attention = define_op(
    "decode_attention",
    decode_attention_reference,
    cuda=_cuda,
    fake=_fake,
    backward=_backward,
    setup_context=_setup_context,
)


def _cuda_update(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, fill, attn_mask, scale, is_causal):
    if decode_attention_update_triton is None:
        return decode_attention_update_reference(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, fill,
                                                 attn_mask, scale, is_causal)
    return decode_attention_update_triton(q, k_new, v_new, cos, sin, k_cache, v_cache, positions, fill, attn_mask,
                                          scale, is_causal)


# Inference op (no autograd formula): the pass that inserts it leaves graphs traced for training alone.
decode_attention_update = define_op(
    "decode_attention_update",
    decode_attention_update_reference,
    cuda=_cuda_update,
    fake=_fake_update,
    mutates_args=("k_cache", "v_cache", "fill"),
)


def shared_step_inputs_reference(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors``: one buffer each for the rotary tables and the mask that every layer's decode op
    reads. Inductor recomputes a small pointwise result (``cos(pos * inv_freq)``, ``kv_index <= q_index``) in a
    kernel of its own for each extern op that reads it -- 16 launches per 1B step; routed through this op they are
    computed once, and the copies are what the layers read."""
    return [t.clone() for t in tensors]


def _fake_shared(tensors):
    return [torch.empty_like(t) for t in tensors]


shared_step_inputs = define_op("shared_step_inputs", shared_step_inputs_reference, fake=_fake_shared)
