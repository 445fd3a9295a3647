"""The packed format of a lookup-table (LUT) quantized linear weight, and pack / unpack / dequantize.

This module is the contract between the quantization pass (issue 3), the LUT GEMV/GEMM kernels
(:mod:`transfigure.kernels.lut_gemm`), the sparse LUT GEMV (issue 4) and adapters over quantized linears
(issue 6). The layout below is stable: change it only together with every reader.

Math (HIGGS-style, Malinovskii et al. 2024; FLUTE-style lookup, Guo et al. 2024)
--------------------------------------------------------------------------------
A linear ``y = x W^T + b`` with ``W`` of shape ``[N, K]`` (out_features, in_features):

1. Pad ``K`` with zero columns to ``K_pad`` (a multiple of ``group_size``, ``hadamard_size`` and ``32 * p``).
2. Optional rotation (``hadamard_size = h > 0``): every row is cut into blocks of ``h`` and each block ``v``
   becomes ``R v = H_h (d * v) / sqrt(h)`` (``d`` = ``signs``, +-1, one per padded input column). ``R`` is
   orthogonal, so ``x W^T = (R x)(R W)^T``: the kernel rotates the activation online the same way.
3. Groups: each row of the (rotated) weight is cut into groups of ``group_size`` consecutive columns; each group
   gets one fp16 scale ``s`` (RMS of the group for Gaussian grids, abs-max for NF4 / uniform grids).
4. Vector quantization: each group is cut into ``p``-dim vectors (``p`` consecutive columns, p = 1 or 2) and
   each vector ``u / s`` is replaced by the index of its nearest point in ``table`` (``2**(p*bits)`` points
   of dimension ``p``). The code of one vector therefore has ``c = p * bits`` bits.

Dequantized (rotated basis): ``W_r[n, k] = table[code[n, k // p], k % p] * scales[n, k // group_size]``.
Original basis: ``W[n, :K] = R^{-1} W_r[n, :]`` = ``d * (H_h W_r / sqrt(h))`` blockwise, then cut to ``K``.

Storage layout (all tensors contiguous, on the weight's device)
----------------------------------------------------------------
* ``codes``: ``int32 [N, words_per_row]``. A ``c``-bit code is split into bit-planes of widths
  ``PLANES[c]`` (low bits first): c=2 -> (2,), 3 -> (2, 1), 4 -> (4,), 6 -> (4, 2), 8 -> (8,). Plane ``j``
  holds bits ``[off_j, off_j + w_j)`` of every code. The planes of one row are stored one after the other
  along dim 1: plane ``j`` occupies ``K_pad / p * w_j / 32`` words starting at the sum of the previous planes'
  words. Inside a plane, word ``i`` holds the codes of vectors ``i * (32 // w) + t`` for
  ``t = 0 .. 32 // w - 1``, the ``t``-th at bits ``[t * w, (t + 1) * w)`` (little end first). Values are the
  raw 32-bit patterns (may read negative as int32; always mask after shifting). 3-bit codes thus cost
  exactly 3 bits per weight (a 2-bit plane + a 1-bit plane), FLUTE's trick for non-power-of-two widths.
* ``scales``: ``float16 [N, K_pad // group_size]``.
* ``table``: ``float32 [2**(p*bits), p]`` (the grid; row ``i`` is the point with code ``i``).
* ``signs``: ``float32 [K_pad]`` of +-1, or ``None`` (no rotation, or rotation without random signs when
  ``hadamard_size > 0``).

The op (registered by :mod:`transfigure.kernels.lut_gemm`; the signature is stable)
------------------------------------------------------------------------------------
``torch.ops.transfigure.lut_linear(x, codes, scales, table, signs, bias, bits, p, group_size,
hadamard_size, in_features) -> Tensor``

* ``x``: ``[..., in_features]`` fp16 / bf16 / fp32 activations in the ORIGINAL basis (the op pads and, when
  ``hadamard_size > 0``, rotates them itself); ``codes``, ``scales``, ``table``, ``signs`` as above;
  ``bias``: ``[N]`` or ``None``; ints as in :class:`PackedWeight`. ``out_features = scales.shape[0]`` and
  ``K_pad = scales.shape[1] * group_size``.
* Returns ``[..., N]`` in ``x.dtype``: ``x @ dequantize(packed, "original").T + bias`` (fp32 accumulation).
* Differentiable w.r.t. ``x`` and ``bias`` (so LoRA adapters can sit on top); the codes are constants.

For a sparse GEMV over this format: with ``hadamard_size == 0`` zero entries of ``x`` skip whole weight
columns (``k``), i.e. code ``k // p`` bits in each plane and scale ``k // group_size``; with rotation the
rotated activation ``R x`` is dense, so sparsify after :func:`rotate_input` if at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from .fwht import fwht_reference, ifwht_reference
from .scale_search import search_scales

PLANES: dict[int, tuple[int, ...]] = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 6: (4, 2), 8: (8,)}
SUPPORTED_BITS = (1, 2, 3, 4)
SUPPORTED_P = (1, 2)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeight:
    """A packed LUT-quantized weight ``[out_features, in_features]`` (see the module docstring)."""

    codes: torch.Tensor  # int32 [N, words_per_row]
    scales: torch.Tensor  # float16 [N, padded_in_features // group_size]
    table: torch.Tensor  # float32 [2**(p*bits), p]
    signs: torch.Tensor | None  # float32 [padded_in_features] of +-1, or None
    bits: int
    p: int
    group_size: int
    hadamard_size: int  # 0 = no rotation
    out_features: int
    in_features: int
    padded_in_features: int
    grid: str = "custom"  # name of the grid, for reports

    @property
    def code_bits(self) -> int:
        return self.p * self.bits

    @property
    def planes(self) -> tuple[int, ...]:
        return PLANES[self.code_bits]

    @property
    def bits_per_weight(self) -> float:
        """Storage cost including the fp16 scales (the table is shared and negligible)."""
        return self.bits + 16.0 / self.group_size

    def nbytes(self) -> int:
        total = self.codes.numel() * 4 + self.scales.numel() * 2 + self.table.numel() * 4
        return total + (self.signs.numel() * 4 if self.signs is not None else 0)

    def op_args(self) -> tuple:
        """Positional arguments of ``lut_linear`` after ``x``, with ``bias=None`` (insert your bias)."""
        return (self.codes, self.scales, self.table, self.signs, None, self.bits, self.p, self.group_size,
                self.hadamard_size, self.in_features)

    def to(self, device=None) -> PackedWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, codes=move(self.codes), scales=move(self.scales),
                                   table=move(self.table), signs=move(self.signs))


def padded_size(in_features: int, group_size: int, hadamard_size: int, p: int) -> int:
    unit = math.lcm(group_size, max(hadamard_size, 1), 32 * p)
    return -(-in_features // unit) * unit


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1


# ---------------------------------------------------------------------------------------------------------
# bit-plane packing of integer codes
# ---------------------------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, code_bits: int) -> torch.Tensor:
    """``codes`` int [N, C] (C a multiple of 32, values < 2**code_bits) -> int32 [N, words] (see layout)."""
    if code_bits not in PLANES:
        raise ValueError(f"unsupported code width {code_bits} bits (supported: {sorted(PLANES)})")
    n, c = codes.shape
    if c % 32:
        raise ValueError(f"number of codes per row ({c}) must be a multiple of 32")
    codes = codes.to(torch.int64)
    out, offset = [], 0
    for w in PLANES[code_bits]:
        per = 32 // w
        plane = (codes >> offset) & ((1 << w) - 1)
        plane = plane.view(n, c // per, per)
        shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * w
        words = (plane << shifts).sum(-1)  # < 2**32, fits int64
        words = torch.where(words >= 2**31, words - 2**32, words)
        out.append(words.to(torch.int32))
        offset += w
    return torch.cat(out, dim=1).contiguous()


def unpack_codes(words: torch.Tensor, code_bits: int, codes_per_row: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 [N, words] -> int64 [N, codes_per_row]."""
    n = words.shape[0]
    words = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(n, codes_per_row, dtype=torch.int64, device=words.device)
    start, offset = 0, 0
    for w in PLANES[code_bits]:
        per = 32 // w
        count = codes_per_row // per
        plane = words[:, start:start + count]
        shifts = torch.arange(per, device=words.device, dtype=torch.int64) * w
        vals = (plane[:, :, None] >> shifts) & ((1 << w) - 1)
        codes |= vals.reshape(n, codes_per_row) << offset
        start += count
        offset += w
    return codes


# ---------------------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------------------
def rotate_input(x: torch.Tensor, signs: torch.Tensor | None, hadamard_size: int, padded_in_features: int) -> torch.Tensor:
    """Pad the last dim of ``x`` to ``padded_in_features`` and apply ``R`` (reference; keeps ``x.dtype``)."""
    if x.shape[-1] < padded_in_features:
        x = torch.nn.functional.pad(x, (0, padded_in_features - x.shape[-1]))
    if hadamard_size:
        x = fwht_reference(x, signs, hadamard_size, 1.0 / math.sqrt(hadamard_size))
    return x


def nearest(values: torch.Tensor, table: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Index of the nearest table point for each row of ``values`` ``[V, p]`` (Euclidean), int64 ``[V]``."""
    p = table.shape[1]
    table = table.to(values.device, torch.float32)
    if p == 1:
        order = torch.argsort(table[:, 0])
        sorted_t = table[order, 0]
        mids = (sorted_t[1:] + sorted_t[:-1]) / 2
        return order[torch.bucketize(values[:, 0].contiguous(), mids)]
    out = torch.empty(values.shape[0], dtype=torch.int64, device=values.device)
    t2 = (table * table).sum(1)
    for i in range(0, values.shape[0], chunk):
        v = values[i:i + chunk]
        out[i:i + chunk] = (t2[None, :] - 2 * v @ table.T).argmin(1)
    return out


PACK_BLOCK_ELEMENTS = 1 << 24


def pack(
    weight: torch.Tensor,
    table: torch.Tensor,
    *,
    bits: int,
    p: int = 1,
    group_size: int = 128,
    hadamard_size: int = 0,
    signs_seed: int | None = 0,
    scale_mode: str = "rms",
    grid: str = "custom",
    scale_search: int = 0,
) -> PackedWeight:
    """Quantize ``weight [N, K]`` onto ``table`` (``[2**(p*bits), p]``, normalized: scale 1 <-> RMS 1 or
    abs-max 1 per ``scale_mode``) and pack it. ``signs_seed=None`` rotates without random signs.

    ``scale_search = n > 1``: each group's scale is the one of ``n`` multiples (0.6x to 1.4x, and exactly 1x)
    of its RMS / abs-max whose quantized group has the least squared error. The grid is MSE-optimal for a
    Gaussian of known variance; a group of ``g`` weights only estimates its variance, and the best scale for
    the weights at hand differs (4-bit, g128, Gaussian weights: relative MSE 0.0094 -> 0.0079)."""
    if bits not in SUPPORTED_BITS or p not in SUPPORTED_P or p * bits not in PLANES:
        raise ValueError(f"unsupported bits={bits}, p={p}")
    table = torch.as_tensor(table, dtype=torch.float32).reshape(-1, p)
    if table.shape[0] != 2 ** (p * bits):
        raise ValueError(f"table has {table.shape[0]} points, expected 2**(p*bits) = {2 ** (p * bits)}")
    if group_size < 32 * p or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= {32 * p}, got {group_size}")
    if hadamard_size and (hadamard_size & (hadamard_size - 1)):
        raise ValueError(f"hadamard_size must be 0 or a power of two, got {hadamard_size}")
    if scale_mode not in ("rms", "absmax"):
        raise ValueError(f"scale_mode must be 'rms' or 'absmax', got {scale_mode!r}")
    n, k = weight.shape
    kp = padded_size(k, group_size, hadamard_size, p)
    device = weight.device
    signs = None
    if hadamard_size and signs_seed is not None:
        signs = random_signs(kp, signs_seed).to(device)
    # rows are independent: packing them in blocks bounds the fp32 / int64 temporaries (the tied 128256 x 2048
    # output layer of the 1B shape peaked at 11 GiB on the GPU in one piece)
    rows = max(1, PACK_BLOCK_ELEMENTS // kp)
    codes_parts, scale_parts = [], []
    for r0 in range(0, n, rows):
        block = weight[r0:r0 + rows].detach().to(torch.float32)
        w = rotate_input(block, signs, hadamard_size, kp)
        groups = w.view(block.shape[0], kp // group_size, group_size)
        if scale_mode == "rms":
            scale = groups.pow(2).mean(-1).sqrt()
        else:
            scale = groups.abs().amax(-1)
        if scale_search > 1:
            scale = search_scales(groups, scale, table.to(device), p, scale_search)
        scale = scale.clamp(min=1e-8, max=6.0e4).to(torch.float16)
        normalized = groups / scale.to(torch.float32)[..., None]
        idx = nearest(normalized.reshape(-1, p), table).view(block.shape[0], kp // p)
        codes_parts.append(pack_codes(idx, p * bits))
        scale_parts.append(scale)
    codes = torch.cat(codes_parts) if len(codes_parts) > 1 else codes_parts[0]
    scale = torch.cat(scale_parts) if len(scale_parts) > 1 else scale_parts[0]
    return PackedWeight(codes=codes, scales=scale.contiguous(), table=table.to(device).contiguous(), signs=signs,
                        bits=bits, p=p, group_size=group_size, hadamard_size=hadamard_size, out_features=n,
                        in_features=k, padded_in_features=kp, grid=grid)


def dequantize_parts(codes, scales, table, signs, bits: int, p: int, group_size: int, hadamard_size: int,
                     in_features: int, basis: str = "original") -> torch.Tensor:
    """Dense float32 weight from the raw op arguments. ``basis="rotated"``: ``[N, K_pad]`` in the rotated
    basis (what the kernel multiplies with ``R x``); ``"original"``: ``[N, in_features]``, ``≈ weight``."""
    n, n_groups = scales.shape
    kp = n_groups * group_size
    idx = unpack_codes(codes, p * bits, kp // p)
    vals = table.to(torch.float32)[idx].reshape(n, n_groups, group_size)
    w = (vals * scales.to(torch.float32)[..., None]).reshape(n, kp)
    if basis == "rotated":
        return w
    if basis != "original":
        raise ValueError(f"basis must be 'original' or 'rotated', got {basis!r}")
    if hadamard_size:
        w = ifwht_reference(w, signs, hadamard_size)
    return w[:, :in_features].contiguous()


def dequantize(packed: PackedWeight, basis: str = "original") -> torch.Tensor:
    """Dense float32 weight; see :func:`dequantize_parts` for ``basis``."""
    return dequantize_parts(packed.codes, packed.scales, packed.table, packed.signs, packed.bits, packed.p,
                            packed.group_size, packed.hadamard_size, packed.in_features, basis)


# splitmix64's finalizer constants (as signed int64: torch has no uint64 arithmetic on every device)
_MIX_MULTIPLIERS = (-4658895280553007687, -7723592293110705685)  # 0xbf58476d1ce4e5b9, 0x94d049bb133111eb
_FINGERPRINT_SEEDS = (0x5851F42D4C957F2D, 0x14057B7EF767814F)  # one 64-bit lane each: 128 bits in all
_FINGERPRINT_CHUNK = 1 << 24  # words per step: bounds the int64 temporaries to a few hundred MB
_FINGERPRINT_MAX_WORDS = 1 << 32  # position and word share one int64; larger tensors hash on the host


def _logical_shift_right(v: torch.Tensor, s: int) -> torch.Tensor:
    """``v >>> s`` on int64 (torch's ``>>`` is arithmetic: mask off the copied sign bits)."""
    return (v >> s) & ((1 << (64 - s)) - 1)


def _mix64(v: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer, a bijection of 64-bit words, on int64 with wrap-around multiplication."""
    v = v ^ _logical_shift_right(v, 30)
    v = v * _MIX_MULTIPLIERS[0]
    v = v ^ _logical_shift_right(v, 27)
    v = v * _MIX_MULTIPLIERS[1]
    return v ^ _logical_shift_right(v, 31)


def device_fingerprint(tensor: torch.Tensor) -> bytes:
    """128-bit fingerprint of a tensor's bytes computed where the tensor lives (no copy to the host).

    The bytes are read as 32-bit words ``w_i`` (16- or 8-bit when the size is not a multiple of 4); each
    position-tagged word ``u_i = i * 2**32 + w_i`` (injective for fewer than 2**32 words) goes through a
    bijective 64-bit mixer, ``mix(u_i ^ seed)``, and the lane is the sum of those mod 2**64 -- a sum of
    pseudo-random values, so two tensors that differ anywhere collide in one lane with probability about
    2**-64, and integer sums do not depend on the reduction order (the same bytes give the same fingerprint on
    any GPU). Not a cryptographic hash: it keys a cache of the user's own weights, where the threat is an
    accidental collision, not a crafted one."""
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    for dtype, width in ((torch.int32, 4), (torch.int16, 2), (torch.uint8, 1)):
        if raw.numel() % width == 0:
            words = raw.view(dtype)
            break
    if words.numel() >= _FINGERPRINT_MAX_WORDS:
        raise ValueError(f"device_fingerprint: {words.numel()} words is more than 2**32")
    lanes = [torch.zeros((), dtype=torch.int64, device=flat.device) for _ in _FINGERPRINT_SEEDS]
    for start in range(0, words.numel(), _FINGERPRINT_CHUNK):
        chunk = words[start:start + _FINGERPRINT_CHUNK].to(torch.int64) & ((1 << (8 * width)) - 1)
        position = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=flat.device)
        tagged = (position << 32) | chunk
        for lane, seed in enumerate(_FINGERPRINT_SEEDS):
            lanes[lane] = lanes[lane] + _mix64(tagged ^ seed).sum()
    digest = torch.stack(lanes).cpu()
    return digest.numpy().tobytes() + f"|{width}|{words.numel()}".encode()


def content_key(weight: torch.Tensor, **options) -> str:
    """A stable key of a weight's bytes, shape, dtype and the quantization options (for the disk cache).

    CUDA weights are fingerprinted on the GPU (:func:`device_fingerprint`): hashing them on the host cost more
    than quantizing them (8B model: ~27 s of copies and SHA-256 against ~6 s of packing,
    benchmarks/results/profile_cold_compile_*). Other devices hash the bytes with SHA-256 on the host."""
    h = hashlib.sha256()
    h.update(str((tuple(weight.shape), str(weight.dtype))).encode())
    n_bytes = weight.numel() * weight.element_size()
    if weight.device.type == "cuda" and n_bytes < 4 * _FINGERPRINT_MAX_WORDS:
        h.update(b"cuda-fingerprint-v1:" + device_fingerprint(weight))
    elif weight.numel():
        # a copy even on the CPU: Tensor.numpy() marks the storage it exports as not resizable, and
        # ``release_dense`` frees the parameter's storage by resizing it to zero
        t = weight.detach().to("cpu", copy=True).contiguous()
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    h.update(repr(sorted(options.items())).encode())
    return h.hexdigest()[:32]
