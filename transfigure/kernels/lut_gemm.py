"""LUT GEMV / GEMM: ``y = x @ W^T + b`` where ``W`` is stored as packed codes + group scales + a lookup table.

Format and op signature: :mod:`transfigure.kernels.lut_format` (stable contract). The op

    torch.ops.transfigure.lut_linear(x, codes, scales, table, signs, bias, bits, p, group_size,
                                     hadamard_size, in_features) -> Tensor

pads ``x`` to ``K_pad`` and, when ``hadamard_size > 0``, rotates it online (``torch.ops.transfigure.fwht``),
then multiplies by the rotated quantized weight ``W_r[n, k] = table[code[n, k//p], k%p] * scale[n, k//g]``.

Reference (CPU path and oracle): dequantize to dense float32, one matmul.
"""

from __future__ import annotations

import functools
import math

import torch

from .lut_format import PLANES, dequantize_parts, rotate_input
from .registry import define_op, interpreter_mode, triton_available


def lut_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    table: torch.Tensor,
    signs: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    p: int,
    group_size: int,
    hadamard_size: int,
    in_features: int,
) -> torch.Tensor:
    kp = scales.shape[1] * group_size
    w = dequantize_parts(codes, scales, table, signs, bits, p, group_size, hadamard_size, in_features, "rotated")
    xr = rotate_input(x.to(torch.float32), signs, hadamard_size, kp)
    y = xr @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def _fake(x, codes, scales, table, signs, bias, bits, p, group_size, hadamard_size, in_features):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, scales, table, signs, bias, bits, p, group_size, hadamard_size, in_features = inputs
    ctx.save_for_backward(codes, scales, table, signs)
    ctx.meta = (bits, p, group_size, hadamard_size, in_features)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    codes, scales, table, signs = ctx.saved_tensors
    bits, p, group_size, hadamard_size, in_features = ctx.meta
    w = dequantize_parts(codes, scales, table, signs, bits, p, group_size, hadamard_size, in_features, "original")
    grad_x = (grad.to(torch.float32) @ w).to(ctx.x_dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_b, None, None, None, None, None


def _lookup_pairs_ptx(word: str, pairs: list[str], table: list[str]) -> list[str]:
    """PTX lines decoding the eight 4-bit codes of register ``word`` (low nibble first) through the 16-entry
    table held in the eight registers ``table`` (``register_table_words``) into four registers ``pairs`` of
    packed 16-bit weights: codes 0 and 1 in ``pairs[0]`` (code 0 in the low half), 2 and 3 in ``pairs[1]``...

    ``prmt`` selects bytes by the low 3 bits of each code from the 8-entry halves of the table (low bytes of
    entries 0-7 / 8-15, high bytes likewise), its sign-replicate mode turns each code's top bit into a byte
    mask that picks the half, and a last ``prmt`` interleaves low and high bytes into two 16-bit values per
    register. No memory access per weight (a gather into an L1-resident table costs one wavefront per
    distinct line a warp touches; the 4-bit GEMV was bound by them). Scratch registers: s, t, m, la, lb, ha,
    hb, lo, hi."""
    t0, t1, t2, t3, t4, t5, t6, t7 = table
    lines = [f"shl.b32 t, {word}, 4;"]
    for half_word, (shift, mask_select) in enumerate(((0, "0xD9C8"), (16, "0xFBEA"))):
        lines += [f"shr.b32 s, {word}, {shift};", "and.b32 s, s, 0x7777;", f"prmt.b32 m, t, {word}, {mask_select};",
                  f"prmt.b32 la, {t0}, {t1}, s;", f"prmt.b32 lb, {t2}, {t3}, s;", f"prmt.b32 ha, {t4}, {t5}, s;",
                  f"prmt.b32 hb, {t6}, {t7}, s;", "xor.b32 lb, lb, la;", "and.b32 lb, lb, m;", "xor.b32 lo, la, lb;",
                  "xor.b32 hb, hb, ha;", "and.b32 hb, hb, m;", "xor.b32 hi, ha, hb;"]
        for byte_in_half, interleave in enumerate(("0x5140", "0x7362")):
            lines.append(f"prmt.b32 {pairs[2 * half_word + byte_in_half]}, lo, hi, {interleave};")
    return lines


_LOOKUP_SCRATCH = ".reg .b32 s, t, m, la, lb, ha, hb, lo, hi;"


def _register_lookup_ptx(half: str) -> str:
    """PTX of the register-table lookup of 4-bit scalar codes for ``inline_asm_elementwise(pack=4)``: operand
    8 holds four code bytes (8 codes, low nibble first), operands 9-40 the eight table words of
    ``register_table`` (each repeated four times, as ``inline_asm_elementwise`` passes a broadcast scalar once
    per packed element; only the first copy is read). Outputs 0-3 are the fp32 values of the low nibbles of
    bytes 0-3, outputs 4-7 of the high nibbles. The lookup itself: ``_lookup_pairs_ptx``."""
    if half == "bf16":  # a bf16 is the top half of the fp32 with the same value
        widen = ["shl.b32 {first}, {pair}, 16;", "and.b32 {second}, {pair}, 0xFFFF0000;"]
    else:
        widen = ["mov.b32 {{h0, h1}}, {pair};", "cvt.f32.f16 {first}, h0;", "cvt.f32.f16 {second}, h1;"]
    pairs = ["p0", "p1", "p2", "p3"]
    lines = ["{", _LOOKUP_SCRATCH, ".reg .b32 p0, p1, p2, p3;", ".reg .b16 h0, h1;"]
    lines += _lookup_pairs_ptx("$8", pairs, [f"${9 + 4 * w}" for w in range(8)])
    for byte, pair in enumerate(pairs):  # pair j holds the low and high nibble of byte j
        lines += [line.format(first=f"${byte}", second=f"${byte + 4}", pair=pair) for line in widen]
    return "\n".join(lines + ["}"])


def _mma_lane_registers(group_size: int, x_blocks: int, weights_per_byte: int = 2
                        ) -> tuple[list[str], list[str], list[list[str]]]:
    """Names of a lane's code words for rows g and g + 8 and its activation words (per block of 8 rows of x)
    in one group step."""
    code_words = group_size // (16 * weights_per_byte)  # per lane and row: group_size / 4 weights
    x_words = group_size // 8      # group_size / 4 activations, two per word
    return ([f"w{i}" for i in range(code_words)], [f"v{i}" for i in range(code_words)],
            [[f"x{b}_{i}" for i in range(x_words)] for b in range(x_blocks)])


SHARED_TABLE_COPIES = 32          # one per lane: lane l reads bank l whatever the code
SHARED_TABLE_BYTES = 256 * 4 * SHARED_TABLE_COPIES
SHARED_TABLE_SYMBOL = "transfigure_lut_pairs"


def _shared_lookup_ptx(word: str, out: list[str], lane_base: str, weights_per_byte: int = 2) -> list[str]:
    """PTX lines decoding the four code bytes of ``word`` by loads from a copy of the byte table in shared
    memory (``shared_table_fill_ptx``). Two weights per byte (4-bit codes: ``pair_table``): four registers
    ``out[j]`` of packed 16-bit weight pairs, entry u of copy c at byte ``128 u + 4 c``, ``lane_base`` =
    table start + 4 lane, so the 32 lanes of a warp read 32 different banks (no conflict) whatever their
    codes. Four weights per byte (2-bit codes: ``quad_table``): eight registers, ``out[2 j]`` / ``out[2 j + 1]``
    the first / last two weights of byte j, entries of 8 bytes, 16 copies (a 64-bit access is served per
    half warp, so 16 copies keep it conflict-free), ``lane_base`` = table start + 8 (lane % 16).

    One ``prmt``, one ``mad`` and one shared load per byte, against ~5 ALU instructions per two weights for
    the register lookup: the register lookup keeps the integer pipe (half the FMA pipe's rate) busy; this
    moves the work to the FMA pipe and the shared-memory unit."""
    lines = []
    for j in range(4):
        lines += [f"prmt.b32 f, {word}, 0, 0x444{j};", f"mad.lo.u32 f, f, 128, {lane_base};"]
        if weights_per_byte == 2:
            lines.append(f"ld.shared.u32 {out[j]}, [f];")
        else:
            lines.append(f"ld.shared.v2.u32 {{{out[2 * j]}, {out[2 * j + 1]}}}, [f];")
    return lines


# lop3 truth table of "bits of b where the mask c is set, bits of a elsewhere" (F(0xF0, 0xCC, 0xAA) = 0xD8)
_LOP3_SELECT_B_UNDER_C = "0xD8"
# bits 4-5 of every byte: where a 3-bit pair index keeps the pair's two plane-1 (high) bits
_HIGH_PAIR_BITS = "0x30303030"


def _three_bit_spread_ptx(plane1: str, halves: list[str]) -> list[str]:
    """PTX lines that spread the plane-1 bits of 3-bit codes (``plane1``: one bit per code, 16 codes per
    16-bit half, as loaded) to the bytes they meet in plane 0: ``halves[h]`` (one or two registers) gets, in byte
    ``b`` bits 4-7, nibble ``b`` of half ``h`` of ``plane1`` -- the high bits of the four codes whose low bits
    are byte ``b`` of the ``h``-th plane-0 word. Nibbles 0 / 2 of a half sit at bits 0-3 of its bytes (taken
    from ``plane1 << 4``), nibbles 1 / 3 already at bits 4-7 (taken in place): one shift and one ``prmt`` per
    half. The other bits of each byte are left as they come (the index words below mask them off)."""
    lines = [f"shl.b32 spread_src, {plane1}, 4;"]
    for half, selector in zip(halves, ("0x5140", "0x7362")):
        lines.append(f"prmt.b32 {half}, spread_src, {plane1}, {selector};")
    return lines


def _three_bit_pair_indices_ptx(plane0: str, spread: str, even: str, odd: str) -> list[str]:
    """PTX lines assembling the 6-bit PAIR indices of the sixteen 3-bit codes of plane-0 word ``plane0``
    (2 low bits per code) and their high bits ``spread`` (``_three_bit_spread_ptx``): byte ``b`` of ``even``
    indexes codes ``4b, 4b + 1`` and byte ``b`` of ``odd`` codes ``4b + 2, 4b + 3``, both as the pair table's
    ``u = lo_a | lo_b << 2 | hi_a << 4 | hi_b << 5`` (``pair_table``'s 3-bit order). Bits 6-7 of each byte are
    NOT cleared (they hold other codes' bits): the shared table repeats its 64 pairs four times
    (``three_bit_byte_table``), so a byte indexes it as it is. Even pairs: their low bits are already bits 0-3
    of the byte and their high bits bits 4-5 of ``spread``: one ``lop3``. Odd pairs: both move down (``>> 4``,
    ``>> 2``), then one ``lop3``."""
    return [f"lop3.b32 {even}, {plane0}, {spread}, {_HIGH_PAIR_BITS}, {_LOP3_SELECT_B_UNDER_C};",
            f"shr.b32 odd_low, {plane0}, 4;", f"shr.b32 odd_high, {spread}, 2;",
            f"lop3.b32 {odd}, odd_low, odd_high, {_HIGH_PAIR_BITS}, {_LOP3_SELECT_B_UNDER_C};"]


@functools.cache  # the launcher passes it per call: build (and hash, as a constexpr) each string once
def shared_table_fill_ptx(warps: int, weights_per_byte: int = 2) -> str:
    """PTX run once by every thread of a program before the shared-lookup steps: copies the 256-entry byte
    table (operand 1, global address: ``pair_table`` for two weights per byte, ``quad_table`` for four) into
    its copies in shared memory (``_shared_lookup_ptx``: 32 copies of 4-byte entries or 16 of 8-byte
    ones, 32 KB either way), then waits for the whole program (``bar.sync``). Output 0 is 0: later steps take
    it as an input so they stay after this.

    The table is a static shared array declared here, at the kernel's scope (outside the braces), so the
    later steps' inline PTX can name it: Triton's own shared memory (``global_smem``) is sized by Triton and
    cannot be asked for more."""
    lines = [f".shared .align 16 .b8 {SHARED_TABLE_SYMBOL}[{SHARED_TABLE_BYTES}];", "{",
             ".reg .b32 tid, lane, quad, v0, v1, v2, v3, a;", ".reg .b64 o, src;", "mov.u32 tid, %tid.x;",
             f"mov.u64 o, {SHARED_TABLE_SYMBOL};", "cvt.u32.u64 a, o;"]
    if weights_per_byte == 2:  # lane l fills copy l; warp w entries 4 quad .. 4 quad + 3, quad = w, w + warps..
        lines += ["and.b32 lane, tid, 31;", "shr.u32 quad, tid, 5;", "mad.lo.u32 lane, lane, 4, a;"]
        for _ in range(256 // (4 * warps)):
            lines += ["mul.wide.u32 o, quad, 16;", "add.s64 src, $1, o;",
                      "ld.global.nc.v4.u32 {v0, v1, v2, v3}, [src];", "mad.lo.u32 a, quad, 512, lane;"]
            lines += [f"st.shared.u32 [a+{128 * j}], v{j};" for j in range(4)]
            lines.append(f"add.u32 quad, quad, {warps};")
    else:  # thread t fills copy t % 16 with entries 2 k, 2 k + 1, k = t / 16, t / 16 + 2 warps, ...
        lines += ["and.b32 lane, tid, 15;", "shr.u32 quad, tid, 4;", "mad.lo.u32 lane, lane, 8, a;"]
        for _ in range(128 // (2 * warps)):
            lines += ["mul.wide.u32 o, quad, 16;", "add.s64 src, $1, o;",
                      "ld.global.nc.v4.u32 {v0, v1, v2, v3}, [src];", "mad.lo.u32 a, quad, 256, lane;",
                      "st.shared.v2.u32 [a], {v0, v1};", "st.shared.v2.u32 [a+128], {v2, v3};",
                      f"add.u32 quad, quad, {2 * warps};"]
    return "\n".join(lines + ["bar.sync 0;", "mov.u32 $0, 0;", "}"])


def _mma_group_ptx(group_size: int, half: str, x_blocks: int = 1, lookup: str = "register",
                   weights_per_byte: int = 2, l2_prefetch: int = 0, three_bit: bool = False) -> str:
    """PTX of one group step of the tensor-core LUT GEMV (``_lut_mma_gemv_kernel``), run by every lane of a
    warp for one group of ``group_size`` columns and 16 weight rows, as ``inline_asm_elementwise(pack=1)``.

    Lane ``l = 4 g + q`` holds rows ``g`` and ``g + 8`` of the warp's 16 rows and the ``group_size / 4`` columns
    ``[q * group_size / 4, (q + 1) * group_size / 4)`` of the group: it loads those codes itself (contiguous in
    the canonical layout), decodes each code word into four registers of 16-bit weights
    (``_lookup_pairs_ptx``) and runs ``mma.sync.m16n8k16`` with the weights as A (rows = output features)
    and the activations as B (columns = rows of ``x``; lane ``l`` supplies ``x`` row ``g`` -- and ``g + 8`` for
    a second mma per step when ``x_blocks = 2`` -- or zeros where ``x`` has no such row). The K order inside
    an mma is free as long as A and B agree: mma step ``s`` takes columns ``4 s .. 4 s + 3`` of each lane's
    slice, the first two as A/B columns ``2 q, 2 q + 1``, the last two as ``2 q + 8, 2 q + 9``, so every
    lane's operands are whole registers of its own contiguous loads. The group's partial (C/D fragment:
    rows g, g + 8 x columns 2 q, 2 q + 1 of each x block) is scaled by the two rows' group scales and added
    to the running sums.

    Operands (A = 4 * x_blocks): outputs ``0 .. A-1`` the new sums (block-major: y[2q][row g],
    y[2q + 1][row g], y[2q][row g + 8], y[2q + 1][row g + 8], then the same for x rows 8 + 2q, 8 + 2q + 1);
    inputs ``A .. 2A-1`` the old sums, then: the addresses of the lane's first code byte in rows g / g + 8
    of group 0, of its first ``x`` element in group 0 for each x block (row g, then row g + 8), of rows
    g / g + 8's group-0 scales, the group index, validity bits (1: row g exists, 2: row g + 8 exists,
    4 << b: ``x`` row g + 8 b exists) and the address of the eight table words (``register_table_words``,
    16-byte aligned; loaded per step from L1: held in registers across steps, ptxas moves half of them to
    uniform registers and copies each back before every ``prmt``).

    ``lookup="shared"``: codes are decoded from the byte table in shared memory (``_shared_lookup_ptx``,
    filled by ``shared_table_fill_ptx``) instead of registers; the last operand is then unused. With
    ``weights_per_byte = 4`` (2-bit codes, scalar or 2-dim) one byte holds an mma step's four columns of a
    row: one 8-byte load gives both A registers of that row.

    ``l2_prefetch`` (128 or 256) puts the ``.L2::<n>B`` prefetch-size qualifier on the code loads: a miss fetches
    the aligned ``n`` bytes around it, so a row's next groups are in L2 when the lane reaches them. From HBM it
    took the 8B down projection (4096x14336, persistent programs) from 18.7 to 16.3 us and cost 5-8% on the
    short-K shapes (``benchmarks/results/explore_lut_prefetch.md``): a tuner choice, not a default.

    ``three_bit`` (3-bit scalar codes, shared lookup; ``weights_per_byte`` is then 4, plane 0's density): the
    codes have a second bit-plane, one bit per code, ``K_pad / 4`` bytes after plane 0 in the same row. The
    lane's slice of it (``group_size / 32`` bytes per row: a 16-bit load at group size 64) lies at its plane-0
    address plus the last operand (``table``, unused otherwise by the shared lookup), the same distance for
    rows g and g + 8, advancing ``group_size / 8`` bytes per group. Per plane-0 word (16 codes) the step
    builds two words of 6-bit pair indices (``_three_bit_spread_ptx``, ``_three_bit_pair_indices_ptx``) and
    looks up each byte in the 256-entry table of 16-bit pairs exactly as for 4-bit codes
    (``three_bit_byte_table``, 32 copies, conflict-free): the even pairs' byte j and the odd pairs' byte j
    are the two A registers of mma step j of that word, so the K order and the activation operands are those
    of the 2-bit codes."""
    assert group_size in (64, 128, 256) and x_blocks in (1, 2) and lookup in ("register", "shared")
    assert l2_prefetch in (0, 128, 256)
    assert weights_per_byte == 2 or lookup == "shared"
    assert not three_bit or (lookup == "shared" and weights_per_byte == 4)
    codes_g, codes_h, xs = _mma_lane_registers(group_size, x_blocks, weights_per_byte)
    # plane-1 registers of rows g / g + 8: one per 32 codes of the lane's slice (16 bits of one at group size 64)
    high_g = [f"hig{i}" for i in range(max(1, group_size // 128))] if three_bit else []
    high_h = [f"hih{i}" for i in range(len(high_g))]
    n_acc = 4 * x_blocks
    operand = iter(f"${i}" for i in range(2 * n_acc, 2 * n_acc + 7 + x_blocks))
    code_g, code_h = next(operand), next(operand)
    x_addr = [next(operand) for _ in range(x_blocks)]
    scale_g, scale_h, group, valid, table = (next(operand) for _ in range(5))
    plane1_distance = table  # what the last operand carries for 3-bit codes
    kind = "bf16" if half == "bf16" else "f16"
    lines = ["{", _LOOKUP_SCRATCH, ".reg .b32 t0, t1, t2, t3, t4, t5, t6, t7, f;", ".reg .pred pg, ph, px0, px1;",
             ".reg .b64 o, ag, ah, ax0, ax1, sg, sh;", ".reg .b16 hg, hh;", ".reg .f32 scg, sch;",
             ".reg .f32 " + ", ".join(f"d{b}_{i}" for b in range(x_blocks) for i in range(4)) + ";",
             ".reg .b32 " + ", ".join(codes_g + codes_h + sum(xs, [])) + ";",
             ".reg .b32 " + ", ".join(f"p{r}{i}" for r in "gh" for i in range(8)) + ";"]
    if three_bit:
        lines += [".reg .b64 bg, bh;", ".reg .b32 " + ", ".join(high_g + high_h) + ";",
                  ".reg .b32 spread_src, spreadg0, spreadg1, spreadh0, spreadh1, even, odd, odd_low, odd_high;"]
    for bit, pred in [(1, "pg"), (2, "ph")] + [(4 << b, f"px{b}") for b in range(x_blocks)]:
        lines += [f"and.b32 f, {valid}, {bit};", f"setp.ne.b32 {pred}, f, 0;"]
    lines += [f"mul.wide.u32 o, {group}, {group_size // weights_per_byte};", f"add.s64 ag, {code_g}, o;",
              f"add.s64 ah, {code_h}, o;",
              f"mul.wide.u32 o, {group}, {group_size * 2};"]
    lines += [f"add.s64 ax{b}, {x_addr[b]}, o;" for b in range(x_blocks)]
    lines += [f"mul.wide.u32 o, {group}, 2;", f"add.s64 sg, {scale_g}, o;", f"add.s64 sh, {scale_h}, o;"]
    if three_bit:  # plane 1: the lane's plane-0 address + the plane distance (operand ``table``) + G / 8 per group
        lines += [f"add.s64 bg, {code_g}, {plane1_distance};", f"add.s64 bh, {code_h}, {plane1_distance};",
                  f"mul.wide.u32 o, {group}, {group_size // 8};", "add.s64 bg, bg, o;", "add.s64 bh, bh, o;"]
    lines += [f"mov.b32 {r}, 0;" for r in codes_g + codes_h + sum(xs, []) + high_g + high_h]
    lines += ["mov.b16 hg, 0;", "mov.b16 hh, 0;"]
    code_hint = f".L2::{l2_prefetch}B" if l2_prefetch else ""
    loads = [("pg", codes_g, "ag", code_hint), ("ph", codes_h, "ah", code_hint)] + [
        (f"px{b}", xs[b], f"ax{b}", "") for b in range(x_blocks)]
    if three_bit:
        loads += [("pg", high_g, "bg", code_hint), ("ph", high_h, "bh", code_hint)]
    for pred, regs, address, hint in loads:
        if address in ("bg", "bh") and group_size == 64:  # 16 codes of one bit: a 16-bit load, zero-extended
            lines.append(f"@{pred} ld.global.nc{hint}.u16 {regs[0]}, [{address}];")
            continue
        for start in range(0, len(regs), 4):
            chunk = regs[start:start + 4]
            vec = f".v{len(chunk)}" if len(chunk) > 1 else ""
            lines.append(f"@{pred} ld.global.nc{hint}{vec}.u32 {{{', '.join(chunk)}}}, [{address}+{4 * start}];")
    lines += ["@pg ld.global.nc.b16 hg, [sg];", "@ph ld.global.nc.b16 hh, [sh];", "cvt.f32.f16 scg, hg;",
              "cvt.f32.f16 sch, hh;"]
    if lookup == "register":
        lines += [f"ld.global.nc.v4.u32 {{t0, t1, t2, t3}}, [{table}];",
                  f"ld.global.nc.v4.u32 {{t4, t5, t6, t7}}, [{table}+16];"]
    else:
        lines += ["mov.u32 f, %laneid;", f"mov.u64 o, {SHARED_TABLE_SYMBOL};", "cvt.u32.u64 t0, o;"]
        if weights_per_byte == 2 or three_bit:  # 4-byte pair entries, 32 copies
            lines.append("mad.lo.u32 t0, f, 4, t0;")
        else:
            lines += ["and.b32 f, f, 15;", "mad.lo.u32 t0, f, 8, t0;"]
    lines += [f"mov.f32 d{b}_{i}, 0f00000000;" for b in range(x_blocks) for i in range(4)]
    words = [f"t{w}" for w in range(8)]
    row_g_regs, row_h_regs = [f"pg{i}" for i in range(8)], [f"ph{i}" for i in range(8)]
    steps_per_word = weights_per_byte  # 4 bytes of weights_per_byte weights, 4 columns per mma step
    for word, (row_g, row_h) in enumerate(zip(codes_g, codes_h)):
        if lookup == "register":
            lines += _lookup_pairs_ptx(row_g, row_g_regs[:4], words)
            lines += _lookup_pairs_ptx(row_h, row_h_regs[:4], words)
        elif three_bit:  # even pairs -> p{r}0, 2, 4, 6, odd pairs -> p{r}1, 3, 5, 7: step j takes pairs 2j, 2j + 1
            for row, plane0, high, regs in (("g", row_g, high_g, row_g_regs), ("h", row_h, high_h, row_h_regs)):
                if word % 2 == 0:  # one plane-1 word serves two plane-0 words (16 bits at group size 64)
                    spread = [f"spread{row}0", f"spread{row}1"][:1 + (group_size > 64)]
                    lines += _three_bit_spread_ptx(high[word // 2], spread)
                lines += _three_bit_pair_indices_ptx(plane0, f"spread{row}{word % 2}", "even", "odd")
                lines += _shared_lookup_ptx("even", regs[0::2], "t0", 2)
                lines += _shared_lookup_ptx("odd", regs[1::2], "t0", 2)
        else:
            lines += _shared_lookup_ptx(row_g, row_g_regs, "t0", weights_per_byte)
            lines += _shared_lookup_ptx(row_h, row_h_regs, "t0", weights_per_byte)
        for step_in_word in range(steps_per_word):  # columns 4 s .. 4 s + 3 of the lane's slice: one mma step
            step = steps_per_word * word + step_in_word
            first, second = 2 * step_in_word, 2 * step_in_word + 1
            for b in range(x_blocks):
                d = ", ".join(f"d{b}_{i}" for i in range(4))
                lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{{d}}}, "
                             f"{{pg{first}, ph{first}, pg{second}, ph{second}}}, "
                             f"{{x{b}_{2 * step}, x{b}_{2 * step + 1}}}, {{{d}}};")
    for b in range(x_blocks):
        for i, scale in enumerate(("scg", "scg", "sch", "sch")):
            lines.append(f"fma.rn.f32 ${4 * b + i}, d{b}_{i}, {scale}, ${n_acc + 4 * b + i};")
    return "\n".join(lines + ["}"])


def _mma_constraints(x_blocks: int) -> str:
    n_acc = 4 * x_blocks
    return ",".join(["=f"] * n_acc + ["f"] * n_acc + ["l"] * (2 + x_blocks + 2) + ["r", "r", "l"])


MMA_GROUP_PTX = {(g, half, xb): _mma_group_ptx(g, half, xb)
                 for g in (64, 128, 256) for half in ("bf16", "fp16") for xb in (1, 2)}
MMA_SHARED_GROUP_PTX = {(g, half, xb, wpb): _mma_group_ptx(g, half, xb, "shared", wpb)
                        for g in (64, 128, 256) for half in ("bf16", "fp16") for xb in (1, 2) for wpb in (2, 4)}
MMA_GROUP_CONSTRAINTS = {xb: _mma_constraints(xb) for xb in (1, 2)}
# 3-bit scalar codes (two bit-planes) through the shared pair table, without / with the L2 prefetch hint
MMA_THREE_BIT_GROUP_PTX = {(g, half, xb): _mma_group_ptx(g, half, xb, "shared", 4, 0, three_bit=True)
                           for g in (64, 128, 256) for half in ("bf16", "fp16") for xb in (1, 2)}
MMA_THREE_BIT_GROUP_PTX_L2 = {(g, half, xb): _mma_group_ptx(g, half, xb, "shared", 4, 256, three_bit=True)
                              for g in (64, 128, 256) for half in ("bf16", "fp16") for xb in (1, 2)}
# the shared-table step with 256-byte L2 prefetches on the code loads (configs with L2=256)
MMA_SHARED_GROUP_PTX_L2 = {(g, half, xb, wpb): _mma_group_ptx(g, half, xb, "shared", wpb, 256)
                           for g in (64, 128, 256) for half in ("bf16", "fp16") for xb in (1, 2) for wpb in (2, 4)}


REGISTER_LOOKUP_PTX = {"bf16": _register_lookup_ptx("bf16"), "fp16": _register_lookup_ptx("fp16")}
REGISTER_LOOKUP_CONSTRAINTS = "=r,=r,=r,=r,=r,=r,=r,=r," + ",".join(["r"] * 33)


def register_table_words(table: torch.Tensor, half: torch.dtype) -> torch.Tensor:
    """``int32 [8]``: the 16 entries of a 4-bit scalar grid as ``half`` bit patterns; words 0-3 hold their
    low bytes (entry ``4 w + i`` in byte ``i`` of word ``w``), words 4-7 their high bytes."""
    bits = table.reshape(-1).to(half).view(torch.int16).to(torch.int64) & 0xFFFF
    shifts = torch.tensor([0, 8, 16, 24], device=table.device)
    words = torch.cat([((bits & 0xFF).reshape(4, 4) << shifts).sum(1), ((bits >> 8).reshape(4, 4) << shifts).sum(1)])
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Three kernels, chosen per shape by the autotuner:
#
# * the pair kernel (decode, M <= 4, every code format, 16-bit activations): reads a row's code bytes
#   contiguously and looks up two weights at once in a table of packed 16-bit pairs (``pair_table``), so there
#   is one gather per two weights and no reordering of codes in registers (3-bit codes add one byte load from
#   their 1-bit plane). For 4-bit scalar codes at M = 1 its REGISTER configs replace the gather by a lookup in
#   registers (``_register_lookup_ptx``): 1.8-2.0x cuBLAS bf16 on the 8B shapes (the gather: 1.2x; 2-bit
#   1.4-1.6x; benchmarks/results/quant.md, variants in benchmarks/explore_lut_gemv.py).
# * the register small-M kernel (2 <= M <= 64, 4-bit scalar codes): the same register lookup, group scales,
#   then ``tl.dot`` on the tensor cores; reads only the codes (1.1-1.3x cuBLAS at M = 4..64 on the 8B shapes,
#   where the tile kernel and dequantize + cuBLAS took 0.3-0.7x).
# * the tile kernel (every format): a program owns BLOCK_N output features x BLOCK_M rows of x and walks its
#   share of K (split-K: SPLIT_K programs per output tile, fp32 atomics) in BLOCK_K steps. Each step loads
#   the packed words of the weight tile (one int32 load per 32/w codes of each bit-plane), unpacks them with
#   shifts and masks (a broadcast shift + reshape), looks the codes up in the fp32 table (a small global array
#   that stays in L1; for p = 2 one code gives two weights), applies the group scales, and either reduces
#   ``x * w`` over K in registers (M <= 4) or feeds the dequantized tile to ``tl.dot`` (M > 4). For large M
#   the autotuner also tries "dequantize to a dense buffer + cuBLAS", so that path never loses to it.
# ---------------------------------------------------------------------------------------------------------
lut_linear_triton = None
dequantize_triton = None

if triton_available():
    import triton
    import triton.language as tl

    from .autotune import Autotuner, Config

    @triton.jit
    def _store_tile(y_ptr, bias_ptr, acc, ms, rows, m_mask, row_mask, N, SPLIT_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
        """Write an fp32 [BLOCK_M, BLOCK_N] tile of ``y`` (plus bias), or add it atomically under split-K."""
        out = y_ptr + ms[:, None].to(tl.int64) * N + rows[None, :]
        mask = m_mask[:, None] & row_mask[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)

    @triton.jit
    def _store_tile_counted(y_ptr, bias_ptr, work_ptr, count_ptr, acc, ms, rows, m_mask, row_mask, M, N, pid_n, pid_k,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                            HAS_BIAS: tl.constexpr):
        """``_store_tile`` without atomics on ``y``: under split-K each program stores its fp32 partial tile to
        ``work`` ([SPLIT_K, M, N]), and the LAST program of the output tile to arrive (a per-tile counter, reset
        by that program) sums the partials, adds the bias and writes ``y`` -- no zeroed fp32 output and no
        cast kernel (two extra launches per linear, 4-5% of an 8B decode step), and a deterministic sum."""
        if SPLIT_K == 1:
            _store_tile(y_ptr, bias_ptr, acc, ms, rows, m_mask, row_mask, N, 1, HAS_BIAS)
        else:
            out = y_ptr + ms[:, None].to(tl.int64) * N + rows[None, :]
            mask = m_mask[:, None] & row_mask[None, :]
            tl.store(work_ptr + pid_k * M * N + ms[:, None] * N + rows[None, :], acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the release below
            arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for part in tl.static_range(SPLIT_K):
                    total += tl.load(work_ptr + part * M * N + ms[:, None] * N + rows[None, :], mask=mask, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
                tl.store(out, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(count_ptr + pid_n, 0)

    @triton.jit
    def _unpack_pair(e, HALF_IS_BF16: tl.constexpr):
        """int32 entry of ``pair_table`` -> its two weights as fp32 (low half first)."""
        if HALF_IS_BF16:  # a bf16 is the top half of the fp32 with the same value
            first = (e << 16).to(tl.float32, bitcast=True)
            second = (e & -65536).to(tl.float32, bitcast=True)
        else:
            first = (e & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            second = (e >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return first, second

    @triton.jit
    def _w_tile(codes_ptr, table_ptr, scales_ptr, rows, row_mask, k0, words_per_row, plane1_base, n_groups,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, P: tl.constexpr, W0: tl.constexpr,
                W1: tl.constexpr, G: tl.constexpr):
        """Dequantized fp32 weight tile [BLOCK_N, BLOCK_K] (rotated basis) starting at column k0."""
        NC: tl.constexpr = BLOCK_K // P
        NW0: tl.constexpr = NC * W0 // 32
        row_off = rows[:, None] * words_per_row
        w_off = (k0 // P) * W0 // 32 + tl.arange(0, NW0)
        words = tl.load(codes_ptr + row_off + w_off[None, :], mask=row_mask[:, None], other=0)
        shifts = (tl.arange(0, 32 // W0) * W0)[None, None, :]
        code = tl.reshape((words[:, :, None] >> shifts) & ((1 << W0) - 1), [BLOCK_N, NC])
        if W1 > 0:
            NW1: tl.constexpr = NC * W1 // 32
            w1_off = plane1_base + (k0 // P) * W1 // 32 + tl.arange(0, NW1)
            words1 = tl.load(codes_ptr + row_off + w1_off[None, :], mask=row_mask[:, None], other=0)
            shifts1 = (tl.arange(0, 32 // W1) * W1)[None, None, :]
            code1 = tl.reshape((words1[:, :, None] >> shifts1) & ((1 << W1) - 1), [BLOCK_N, NC])
            code = code | (code1 << W0)
        if P == 1:
            vals = tl.load(table_ptr + code)
        else:
            pair = tl.load(table_ptr + code[:, :, None] * 2 + tl.arange(0, 2)[None, None, :])
            vals = tl.reshape(pair, [BLOCK_N, BLOCK_K])
        if BLOCK_K <= G:
            s = tl.load(scales_ptr + rows * n_groups + k0 // G, mask=row_mask, other=0.0).to(tl.float32)
            w = vals * s[:, None]
        else:
            gi = k0 // G + tl.arange(0, BLOCK_K // G)
            s = tl.load(scales_ptr + rows[:, None] * n_groups + gi[None, :], mask=row_mask[:, None], other=0.0)
            w = tl.reshape(tl.reshape(vals, [BLOCK_N, BLOCK_K // G, G]) * s.to(tl.float32)[:, :, None],
                           [BLOCK_N, BLOCK_K])
        return w

    @triton.jit
    def _lut_mm_kernel(x_ptr, codes_ptr, scales_ptr, table_ptr, bias_ptr, y_ptr, M, N, Kp, words_per_row,
                       plane1_base, n_groups, k_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, P: tl.constexpr,
                       W0: tl.constexpr, W1: tl.constexpr, G: tl.constexpr, USE_DOT: tl.constexpr,
                       SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = ms < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_start = pid_k * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            w = _w_tile(codes_ptr, table_ptr, scales_ptr, rows, row_mask, k0, words_per_row, plane1_base,
                        n_groups, BLOCK_N, BLOCK_K, P, W0, W1, G)
            ks = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + ms[:, None].to(tl.int64) * Kp + ks[None, :], mask=m_mask[:, None], other=0.0)
            if USE_DOT:
                acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
            else:
                acc += tl.sum(xt.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        _store_tile(y_ptr, bias_ptr, acc, ms, rows, m_mask, row_mask, N, SPLIT_K, HAS_BIAS)

    @triton.jit
    def _dequant_kernel(codes_ptr, scales_ptr, table_ptr, w_ptr, N, Kp, words_per_row, plane1_base, n_groups,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, P: tl.constexpr, W0: tl.constexpr,
                        W1: tl.constexpr, G: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        k0 = tl.program_id(1) * BLOCK_K
        w = _w_tile(codes_ptr, table_ptr, scales_ptr, rows, row_mask, k0, words_per_row, plane1_base, n_groups,
                    BLOCK_N, BLOCK_K, P, W0, W1, G)
        ks = k0 + tl.arange(0, BLOCK_K)
        tl.store(w_ptr + rows[:, None].to(tl.int64) * Kp + ks[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=row_mask[:, None])

    @triton.jit
    def _pair_unit(row_base, row_mask, plane1_bytes, byte, bs, grp, u, LO: tl.constexpr, HI: tl.constexpr,
                   G: tl.constexpr):
        """Pair code ``u`` of each loaded plane-0 byte: its LO plane-0 bits, plus HI bits from plane 1."""
        UPB: tl.constexpr = 8 // LO
        unit = (byte >> (u * LO)) & ((1 << LO) - 1)
        if HI > 0:
            PPB1: tl.constexpr = 8 // HI       # pairs per plane-1 byte
            NB1: tl.constexpr = G * HI // 16   # plane-1 bytes per group
            pair = bs * UPB + u
            hi = tl.load(row_base + plane1_bytes + (grp * NB1 + pair // PPB1)[None, :], mask=row_mask[:, None],
                         other=0).to(tl.int32)
            unit = unit | (((hi >> ((pair % PPB1) * HI)[None, :]) & ((1 << HI) - 1)) << LO)
        return unit

    @triton.jit
    def _lut_pair_kernel(x_ptr, codes_ptr, scales_ptr, pairs_ptr, bias_ptr, y_ptr, M, N, Kp, bytes_per_row,
                         plane1_bytes, n_groups, groups_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, LO: tl.constexpr,
                         HI: tl.constexpr, HALF_IS_BF16: tl.constexpr, SPLIT_K: tl.constexpr,
                         HAS_BIAS: tl.constexpr):
        """Decode GEMV (M <= 4): one lookup per PAIR of weights, for every code format.

        Two consecutive weights (two scalar codes, or one p = 2 code) take LO bits of bit-plane 0 and HI
        bits of bit-plane 1 (HI = 0 for the single-plane 1/2/4-bit formats; 3-bit codes are a 2-bit plane
        plus a 1-bit plane, so LO = 4, HI = 2). Those bits index ``pairs``, a table of ``2**(LO + HI)`` int32
        entries packing both dequantized values as 16-bit floats (low half = first weight): one gather yields
        two weights, unpacked with a shift or a mask. Plane-0 bytes are loaded contiguously (no shuffle of
        codes in registers) and the group scale multiplies the pair sum.
        """
        UPB: tl.constexpr = 8 // LO         # pairs per plane-0 byte
        NB: tl.constexpr = G * LO // 16     # plane-0 bytes per group and row
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        ms = tl.arange(0, BLOCK_M)
        m_mask = ms < M
        bs = tl.arange(0, NB)
        row_base = codes_ptr + rows[:, None].to(tl.int64) * bytes_per_row
        x_rows = x_ptr + ms[:, None].to(tl.int64) * Kp
        acc = tl.zeros([BLOCK_M, BLOCK_N, NB], dtype=tl.float32)
        g_start = pid_k * groups_per_split
        for grp in range(g_start, g_start + groups_per_split):
            byte = tl.load(row_base + (grp * NB + bs)[None, :], mask=row_mask[:, None], other=0).to(tl.int32)
            s = tl.load(scales_ptr + rows * n_groups + grp, mask=row_mask, other=0.0).to(tl.float32)
            part = tl.zeros([BLOCK_M, BLOCK_N, NB], dtype=tl.float32)
            for u in tl.static_range(UPB):
                e = tl.load(pairs_ptr + _pair_unit(row_base, row_mask, plane1_bytes, byte, bs, grp, u, LO, HI, G))
                first, second = _unpack_pair(e, HALF_IS_BF16)
                col = grp * G + (bs * UPB + u) * 2
                x_first = tl.load(x_rows + col[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
                x_second = tl.load(x_rows + (col + 1)[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
                part += x_first[:, None, :] * first[None, :, :] + x_second[:, None, :] * second[None, :, :]
            acc += part * s[None, :, None]
        _store_tile(y_ptr, bias_ptr, tl.sum(acc, axis=2), ms, rows, m_mask, row_mask, N, SPLIT_K, HAS_BIAS)

    _REGISTER_LOOKUP_BF16 = tl.constexpr(REGISTER_LOOKUP_PTX["bf16"])
    _REGISTER_LOOKUP_FP16 = tl.constexpr(REGISTER_LOOKUP_PTX["fp16"])
    _REGISTER_LOOKUP_CONSTRAINTS = tl.constexpr(REGISTER_LOOKUP_CONSTRAINTS)

    @triton.jit
    def _emulated_register_entry(words_ptr, code, HALF_IS_BF16: tl.constexpr):
        """Entry ``code`` of a ``register_table`` as fp32, rebuilt from its low and high bytes."""
        shift = (code % 4) * 8
        low = (tl.load(words_ptr + code // 4) >> shift) & 255
        high = (tl.load(words_ptr + 4 + code // 4) >> shift) & 255
        if HALF_IS_BF16:
            return ((high << 24) | (low << 16)).to(tl.float32, bitcast=True)
        return ((high << 8) | low).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _register_lookup(code_bytes, words_ptr, HALF_IS_BF16: tl.constexpr, EMULATE: tl.constexpr):
        """fp32 weights of the low and high nibble of every code byte (``register_table`` at ``words_ptr``)."""
        if EMULATE:
            byte = code_bytes.to(tl.int32)
            first = _emulated_register_entry(words_ptr, byte & 15, HALF_IS_BF16)
            second = _emulated_register_entry(words_ptr, byte >> 4, HALF_IS_BF16)
        else:
            t0 = tl.load(words_ptr + 0)
            t1 = tl.load(words_ptr + 1)
            t2 = tl.load(words_ptr + 2)
            t3 = tl.load(words_ptr + 3)
            t4 = tl.load(words_ptr + 4)
            t5 = tl.load(words_ptr + 5)
            t6 = tl.load(words_ptr + 6)
            t7 = tl.load(words_ptr + 7)
            first, second = tl.inline_asm_elementwise(
                _REGISTER_LOOKUP_BF16 if HALF_IS_BF16 else _REGISTER_LOOKUP_FP16, _REGISTER_LOOKUP_CONSTRAINTS,
                [code_bytes, t0, t1, t2, t3, t4, t5, t6, t7], dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        return first, second

    @triton.jit
    def _lut_pair_gemv1_kernel(x_ptr, codes_ptr, scales_ptr, pairs_ptr, bias_ptr, y_ptr, work_ptr, count_ptr, N,
                               bytes_per_row, plane1_bytes, n_groups, groups_per_split, BLOCK_N: tl.constexpr,
                               G: tl.constexpr,
                               LO: tl.constexpr, HI: tl.constexpr, HALF_IS_BF16: tl.constexpr,
                               SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr,
                               XSPLIT: tl.constexpr, NIBBLE: tl.constexpr, REGISTER: tl.constexpr,
                               EMULATE: tl.constexpr):
        """``_lut_pair_kernel`` for exactly one row of ``x``, with 2-D tiles (the 3-D [1, BLOCK_N, bytes]
        tiles of the general kernel measured 1.4x slower at M = 1 on an H100).

        For one-byte pairs (LO = 8: 4-bit scalar and 4-bit p = 2 codes) two refinements measured faster on
        an H100 (``benchmarks/explore_lut_gemv.py``, 1B shapes): BLOCK_G groups per loop step (more code bytes
        in flight) and XSPLIT, one contiguous activation load split into even / odd columns instead of two
        strided loads (1.2x on 16384 x 2048). NIBBLE (4-bit scalar codes only): two lookups per byte in the
        16-entry fp32 grid (``pairs_ptr`` is then the grid) instead of one in the 256-entry pair table: twice
        the gathers, but each warp's gather touches one 64-byte line instead of up to eight 128-byte lines of
        a 1 KB table, which is what an L1 gather pays for. REGISTER (4-bit scalar codes only): no memory access
        per weight; the grid lives in eight registers (``pairs_ptr`` is then ``register_table``) and ``prmt``
        looks codes up (``_register_lookup_ptx``): 1.25x faster than the pair-table gather on the 8B shapes
        (explore_lut_gemv.py, v3). EMULATE does the same lookup with loads, for the CPU interpreter (no PTX)."""
        UPB: tl.constexpr = 8 // LO
        NB: tl.constexpr = G * LO // 16
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        bs = tl.arange(0, NB)
        g_start = pid_k * groups_per_split
        if BLOCK_G == 1 and XSPLIT == 0 and NIBBLE == 0:
            row_base = codes_ptr + rows[:, None].to(tl.int64) * bytes_per_row
            acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
            for grp in range(g_start, g_start + groups_per_split):
                byte = tl.load(row_base + (grp * NB + bs)[None, :], mask=row_mask[:, None], other=0).to(tl.int32)
                s = tl.load(scales_ptr + rows * n_groups + grp, mask=row_mask, other=0.0).to(tl.float32)
                for u in tl.static_range(UPB):
                    e = tl.load(pairs_ptr + _pair_unit(row_base, row_mask, plane1_bytes, byte, bs, grp, u, LO, HI, G))
                    first, second = _unpack_pair(e, HALF_IS_BF16)
                    col = grp * G + (bs * UPB + u) * 2
                    x_first = tl.load(x_ptr + col).to(tl.float32)
                    x_second = tl.load(x_ptr + col + 1).to(tl.float32)
                    acc += (first * x_first[None, :] + second * x_second[None, :]) * s[:, None]
            out_acc = tl.sum(acc, axis=1)
        else:  # one-byte pairs only (LO = 8, HI = 0; the launcher checks)
            gs = tl.arange(0, BLOCK_G)
            row_base3 = codes_ptr + rows[:, None, None].to(tl.int64) * bytes_per_row
            offs = gs[None, :, None] * NB + bs[None, None, :]
            acc3 = tl.zeros([BLOCK_N, BLOCK_G, NB], dtype=tl.float32)
            for grp in range(g_start, g_start + groups_per_split, BLOCK_G):
                code_bytes = tl.load(row_base3 + grp * NB + offs, mask=row_mask[:, None, None], other=0)
                byte = code_bytes.to(tl.int32)
                s = tl.load(scales_ptr + rows[:, None] * n_groups + grp + gs[None, :], mask=row_mask[:, None],
                            other=0.0).to(tl.float32)
                if REGISTER:
                    first, second = _register_lookup(code_bytes, pairs_ptr, HALF_IS_BF16, EMULATE)
                elif NIBBLE:
                    first = tl.load(pairs_ptr + (byte & 15))
                    second = tl.load(pairs_ptr + (byte >> 4))
                else:
                    first, second = _unpack_pair(tl.load(pairs_ptr + byte), HALF_IS_BF16)
                if XSPLIT:
                    xx = tl.load(x_ptr + grp * G + tl.arange(0, BLOCK_G * G)).to(tl.float32)
                    x_first, x_second = tl.split(tl.reshape(xx, [BLOCK_G, NB, 2]))
                else:
                    col = grp * G + (gs[:, None] * NB + bs[None, :]) * 2
                    x_first = tl.load(x_ptr + col).to(tl.float32)
                    x_second = tl.load(x_ptr + col + 1).to(tl.float32)
                acc3 += (first * x_first[None, :, :] + second * x_second[None, :, :]) * s[:, :, None]
            out_acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
        one = tl.arange(0, 1)
        _store_tile_counted(y_ptr, bias_ptr, work_ptr, count_ptr, out_acc[None, :], one, rows, one < 1, row_mask, 1, N,
                            pid_n, pid_k, 1, BLOCK_N, SPLIT_K, HAS_BIAS)

    @triton.jit
    def _lut_register_mm_kernel(x_ptr, codes_ptr, scales_ptr, words_ptr, bias_ptr, y_ptr, work_ptr, count_ptr, M, N,
                                Kp, bytes_per_row, n_groups, groups_per_split, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                                HALF_IS_BF16: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                                EMULATE: tl.constexpr):
        """Small-M GEMM (2 <= M <= 64) over 4-bit scalar codes: each program reads its codes ONCE, decodes them
        with the register-table lookup (``_register_lookup_ptx``), scales them per group, and multiplies the
        [BLOCK_N, BLOCK_G * G] tile with the activations on the tensor cores (``tl.dot``; rows of ``x`` past M
        are zeros). Bytes read are the codes' (a quarter of bf16), so it wins where cuBLAS is bandwidth-bound
        and the dequantize + cuBLAS path pays for writing and re-reading a dense weight. Split-K partials are
        reduced by the last program of each output tile (``_store_tile_counted``)."""
        NB: tl.constexpr = G // 2
        KB: tl.constexpr = BLOCK_G * G
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        ms = tl.arange(0, BLOCK_M)
        m_mask = ms < M
        byte_cols = tl.arange(0, BLOCK_G * NB)
        gs = tl.arange(0, BLOCK_G)
        row_base = codes_ptr + rows[:, None].to(tl.int64) * bytes_per_row
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        g_start = pid_k * groups_per_split
        for grp in range(g_start, g_start + groups_per_split, BLOCK_G):
            code_bytes = tl.load(row_base + grp * NB + byte_cols[None, :], mask=row_mask[:, None], other=0)
            s = tl.load(scales_ptr + rows[:, None] * n_groups + grp + gs[None, :], mask=row_mask[:, None],
                        other=0.0).to(tl.float32)
            first, second = _register_lookup(code_bytes, words_ptr, HALF_IS_BF16, EMULATE)
            w = tl.reshape(tl.interleave(first, second), [BLOCK_N, BLOCK_G, G]) * s[:, :, None]
            w = tl.reshape(w, [BLOCK_N, KB]).to(x_ptr.dtype.element_ty)
            xt = tl.load(x_ptr + ms[:, None].to(tl.int64) * Kp + grp * G + tl.arange(0, KB)[None, :],
                         mask=m_mask[:, None], other=0.0)
            acc = tl.dot(xt, tl.trans(w), acc)
        _store_tile_counted(y_ptr, bias_ptr, work_ptr, count_ptr, acc, ms, rows, m_mask, row_mask, M, N, pid_n, pid_k,
                            BLOCK_M, BLOCK_N, SPLIT_K, HAS_BIAS)

    @triton.jit
    def _thread_index(like):
        """The executing thread's index in its program (``%tid.x``), once per element of ``like`` (a 1-D
        tensor with one element per thread)."""
        return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [like], dtype=tl.int32, is_pure=False,
                                         pack=1)

    @triton.jit
    def _mma_group(acc0, acc1, acc2, acc3, code_g, code_h, x_lane, scale_g, scale_h, grp, valid, table,
                   ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, PURE: tl.constexpr):
        """One group step (``_mma_group_ptx``) for one block of 8 rows of ``x``."""
        return tl.inline_asm_elementwise(
            ASM, CONSTRAINTS,
            [acc0, acc1, acc2, acc3, code_g, code_h, x_lane, scale_g, scale_h, grp + tl.zeros_like(valid), valid,
             table],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=PURE, pack=1)

    @triton.jit
    def _mma_group2(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, code_g, code_h, x_lane, x_lane8, scale_g,
                    scale_h, grp, valid, table, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, PURE: tl.constexpr):
        """One group step for two blocks of 8 rows of ``x`` (M = 9..16): two mmas per decoded fragment."""
        return tl.inline_asm_elementwise(
            ASM, CONSTRAINTS,
            [acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, code_g, code_h, x_lane, x_lane8, scale_g, scale_h,
             grp + tl.zeros_like(valid), valid, table],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=PURE, pack=1)

    @triton.jit
    def _fill_shared_table(pairs_ptr, like, FILL_ASM: tl.constexpr):
        """``shared_table_fill_ptx``: the pair table into shared memory, once per program; returns zeros."""
        source = (pairs_ptr + tl.zeros_like(like)).to(tl.int64, bitcast=True)
        return tl.inline_asm_elementwise(FILL_ASM, "=r,l", [source], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _emulated_group_rows(words_ptr, scales_ptr, table_ptr, rows, N, words_per_row, plane1_base, n_groups, grp,
                             G: tl.constexpr, P: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr):
        """Weights ``[len(rows), G]`` of group ``grp`` (rotated basis, scaled, fp32 grid), zeros past N."""
        return _w_tile(words_ptr, table_ptr, scales_ptr, rows, rows < N, grp * G, words_per_row, plane1_base, n_groups,
                       rows.shape[0], G, P, W0, W1, G)

    @triton.jit
    def _emulated_x_rows(x_ptr, x_rows, M, Kp, grp, G: tl.constexpr):
        return tl.load(x_ptr + x_rows[:, None].to(tl.int64) * Kp + grp * G + tl.arange(0, G)[None, :],
                       mask=(x_rows < M)[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _emulated_mma_group(acc0, acc1, acc2, acc3, x_ptr, words_ptr, scales_ptr, table_ptr, row_g, row_h, x_even_row,
                            M, N, Kp, words_per_row, n_groups, grp, G: tl.constexpr, P: tl.constexpr,
                            W0: tl.constexpr, W1: tl.constexpr):
        """What ``_mma_group`` leaves in lane (g, q), computed from memory by the lane alone: the group's
        contribution to y[e][row_g], y[e + 1][row_g], y[e][row_h], y[e + 1][row_h], e = ``x_even_row``
        (2q, or 8 + 2q for the second block of x rows). W1: width of the codes' second bit-plane (0: none)."""
        plane1_base = (Kp // P) * W0 // 32  # words of plane 0 per row
        w_g = _emulated_group_rows(words_ptr, scales_ptr, table_ptr, row_g, N, words_per_row, plane1_base, n_groups,
                                   grp, G, P, W0, W1)
        w_h = _emulated_group_rows(words_ptr, scales_ptr, table_ptr, row_h, N, words_per_row, plane1_base, n_groups,
                                   grp, G, P, W0, W1)
        x_even = _emulated_x_rows(x_ptr, x_even_row, M, Kp, grp, G)
        x_odd = _emulated_x_rows(x_ptr, x_even_row + 1, M, Kp, grp, G)
        return (acc0 + tl.sum(w_g * x_even, axis=1), acc1 + tl.sum(w_g * x_odd, axis=1),
                acc2 + tl.sum(w_h * x_even, axis=1), acc3 + tl.sum(w_h * x_odd, axis=1))

    @triton.jit
    def _store_mma_block(y_ptr, bias_ptr, work_ptr, acc_even_g, acc_odd_g, acc_even_h, acc_odd_h, col, row_g, row_h,
                         M, N, pid_k, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Lane results y[col][row_g], y[col + 1][row_g], y[col][row_h], y[col + 1][row_h] -> ``y`` (plus bias),
        or this program's split-K partial -> ``work[pid_k]``."""
        ok_g = row_g < N
        ok_h = row_h < N
        if SPLIT_K == 1:
            if HAS_BIAS:
                bias_g = tl.load(bias_ptr + row_g, mask=ok_g, other=0.0).to(tl.float32)
                bias_h = tl.load(bias_ptr + row_h, mask=ok_h, other=0.0).to(tl.float32)
                acc_even_g += bias_g
                acc_odd_g += bias_g
                acc_even_h += bias_h
                acc_odd_h += bias_h
            out = y_ptr
            kind = y_ptr.dtype.element_ty
        else:
            out = work_ptr + pid_k * M * N
            kind = tl.float32
        tl.store(out + col * N + row_g, acc_even_g.to(kind), mask=ok_g & (col < M))
        tl.store(out + (col + 1) * N + row_g, acc_odd_g.to(kind), mask=ok_g & (col + 1 < M))
        tl.store(out + col * N + row_h, acc_even_h.to(kind), mask=ok_h & (col < M))
        tl.store(out + (col + 1) * N + row_h, acc_odd_h.to(kind), mask=ok_h & (col + 1 < M))

    @triton.jit
    def _mma_item(x_ptr, codes_ptr, code_words_ptr, scales_ptr, words_ptr, grid_ptr, bias_ptr, y_ptr, work_ptr,
                  count_ptr, M, N, Kp, bytes_per_row, n_groups, groups_per_split, pid_n, pid_k, tid, ready,
                  WARPS: tl.constexpr, G: tl.constexpr, P: tl.constexpr, WEIGHTS_PER_BYTE: tl.constexpr,
                  X_BLOCKS: tl.constexpr, HALF_IS_BF16: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                  UNROLL: tl.constexpr, SHARED_LOOKUP: tl.constexpr, GROUP_ASM: tl.constexpr,
                  GROUP_CONSTRAINTS: tl.constexpr, EMULATE: tl.constexpr, THREE_BIT: tl.constexpr):
        """One work item of ``_lut_mma_gemv_kernel``: row block ``pid_n`` over K split ``pid_k``."""
        ROWS: tl.constexpr = 16 * WARPS
        lane = tid % 32
        g = lane // 4
        q = lane % 4
        row_g = pid_n * ROWS + (tid // 32) * 16 + g
        row_h = row_g + 8
        valid = ((row_g < N).to(tl.int32) | ((row_h < N).to(tl.int32) << 1) | ((g < M).to(tl.int32) << 2)
                 | ((g + 8 < M).to(tl.int32) << 3)) + ready
        g_start = pid_k * groups_per_split
        lane_bytes = q * (G // (4 * WEIGHTS_PER_BYTE)) + g_start * (G // WEIGHTS_PER_BYTE)
        code_g = (codes_ptr + row_g.to(tl.int64) * bytes_per_row + lane_bytes).to(tl.int64, bitcast=True)
        code_h = (codes_ptr + row_h.to(tl.int64) * bytes_per_row + lane_bytes).to(tl.int64, bitcast=True)
        x_lane = (x_ptr + tl.minimum(g, M - 1).to(tl.int64) * Kp + q * (G // 4) + g_start * G).to(tl.int64,
                                                                                                bitcast=True)
        x_lane8 = (x_ptr + tl.minimum(g + 8, M - 1).to(tl.int64) * Kp + q * (G // 4) + g_start * G).to(tl.int64,
                                                                                                      bitcast=True)
        scale_g = (scales_ptr + row_g.to(tl.int64) * n_groups + g_start).to(tl.int64, bitcast=True)
        scale_h = (scales_ptr + row_h.to(tl.int64) * n_groups + g_start).to(tl.int64, bitcast=True)
        # the step's last operand: for 3-bit codes the bytes from the lane's plane-0 codes to its plane-1 codes
        # (the same for rows g and h; plane 1 starts K_pad / 4 bytes into a row), else the register table's
        # address (unused by the shared lookup)
        if THREE_BIT:
            lookup_operand = Kp // 4 - (g_start * G + q * (G // 4)).to(tl.int64) // 8
        else:
            lookup_operand = (words_ptr + tl.zeros_like(tid)).to(tl.int64, bitcast=True)
        W1: tl.constexpr = 1 if THREE_BIT else 0
        acc0 = tl.zeros([32 * WARPS], dtype=tl.float32)
        acc1 = tl.zeros([32 * WARPS], dtype=tl.float32)
        acc2 = tl.zeros([32 * WARPS], dtype=tl.float32)
        acc3 = tl.zeros([32 * WARPS], dtype=tl.float32)
        acc4 = tl.zeros([32 * WARPS], dtype=tl.float32)
        acc5 = tl.zeros([32 * WARPS], dtype=tl.float32)
        acc6 = tl.zeros([32 * WARPS], dtype=tl.float32)
        acc7 = tl.zeros([32 * WARPS], dtype=tl.float32)
        for first in range(0, groups_per_split, UNROLL):
            for step in tl.static_range(UNROLL):
                grp = first + step
                if EMULATE:
                    acc0, acc1, acc2, acc3 = _emulated_mma_group(
                        acc0, acc1, acc2, acc3, x_ptr, code_words_ptr, scales_ptr, grid_ptr, row_g, row_h, 2 * q, M, N,
                        Kp, bytes_per_row // 4, n_groups, g_start + grp, G, P, 8 * P // WEIGHTS_PER_BYTE, W1)
                    if X_BLOCKS == 2:
                        acc4, acc5, acc6, acc7 = _emulated_mma_group(
                            acc4, acc5, acc6, acc7, x_ptr, code_words_ptr, scales_ptr, grid_ptr, row_g, row_h,
                            8 + 2 * q, M, N, Kp, bytes_per_row // 4, n_groups, g_start + grp, G, P,
                            8 * P // WEIGHTS_PER_BYTE, W1)
                elif X_BLOCKS == 1:
                    acc0, acc1, acc2, acc3 = _mma_group(acc0, acc1, acc2, acc3, code_g, code_h, x_lane, scale_g,
                                                        scale_h, grp, valid, lookup_operand, GROUP_ASM,
                                                        GROUP_CONSTRAINTS, not SHARED_LOOKUP)
                else:
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _mma_group2(
                        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, code_g, code_h, x_lane, x_lane8, scale_g,
                        scale_h, grp, valid, lookup_operand, GROUP_ASM, GROUP_CONSTRAINTS, not SHARED_LOOKUP)

        # lane (g, q) holds y[2q][row_g], y[2q + 1][row_g], y[2q][row_h], y[2q + 1][row_h] (and rows 8 + 2q ...)
        _store_mma_block(y_ptr, bias_ptr, work_ptr, acc0, acc1, acc2, acc3, 2 * q, row_g, row_h, M, N, pid_k, SPLIT_K,
                         HAS_BIAS)
        if X_BLOCKS == 2:
            _store_mma_block(y_ptr, bias_ptr, work_ptr, acc4, acc5, acc6, acc7, 8 + 2 * q, row_g, row_h, M, N, pid_k,
                             SPLIT_K, HAS_BIAS)
        if SPLIT_K > 1:
            tl.debug_barrier()  # every thread's partial is written before the release below
            arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                ms = tl.arange(0, 8 * X_BLOCKS)
                rows = pid_n * ROWS + tl.arange(0, ROWS)
                mask = (ms[:, None] < M) & (rows[None, :] < N)
                total = tl.zeros([8 * X_BLOCKS, ROWS], dtype=tl.float32)
                for piece in tl.static_range(SPLIT_K):
                    total += tl.load(work_ptr + piece * M * N + ms[:, None] * N + rows[None, :], mask=mask,
                                     other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + ms[:, None] * N + rows[None, :], total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(count_ptr + pid_n, 0)

    @triton.jit
    def _lut_mma_gemv_kernel(x_ptr, codes_ptr, code_words_ptr, scales_ptr, words_ptr, pairs_ptr, grid_ptr, bias_ptr,
                             y_ptr, work_ptr, count_ptr, M, N, Kp, bytes_per_row, n_groups, groups_per_split,
                             WARPS: tl.constexpr, G: tl.constexpr, P: tl.constexpr, WEIGHTS_PER_BYTE: tl.constexpr,
                             X_BLOCKS: tl.constexpr, HALF_IS_BF16: tl.constexpr,
                             SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, UNROLL: tl.constexpr,
                             SHARED_LOOKUP: tl.constexpr, GROUP_ASM: tl.constexpr, GROUP_CONSTRAINTS: tl.constexpr,
                             FILL_ASM: tl.constexpr, PERSISTENT: tl.constexpr, EMULATE: tl.constexpr,
                             THREE_BIT: tl.constexpr = False):
        """Decode GEMM on the tensor cores (M <= 8 * X_BLOCKS <= 16, 16-bit activations; 4-bit scalar codes, and
        through the shared tables also 4-bit 2-dim, 2-bit and 3-bit scalar codes):
        each warp owns 16 output features, each lane decodes its own contiguous slice of their codes in
        registers and feeds ``mma.sync`` directly (``_mma_group_ptx``: no shared memory, no layout conversion,
        no per-weight FMA); the rows of ``x`` are the mma's 8 columns (two mmas per fragment for M > 8), so
        M = 1..8 cost the same. Every tensor here has exactly one element per thread, and which thread holds
        which rows comes from ``%tid.x`` -- not from Triton's layout -- so the fragments are right whatever
        layout Triton picks for them. Split-K partials are reduced by the last program of each row block (as
        ``_store_tile_counted``). UNROLL group steps per loop iteration (one basic block, so ptxas can issue
        the later steps' loads early). EMULATE (the CPU interpreter, which cannot run PTX) computes each lane's
        share of the result directly (``_emulated_mma_group``): it checks this kernel's lane bookkeeping and
        epilogue; the PTX itself is checked by a simulator in the tests. GROUP_ASM is the step's PTX
        (``MMA_GROUP_PTX`` / ``MMA_SHARED_GROUP_PTX`` for this G, half type and X_BLOCKS). SHARED_LOOKUP: the
        codes are decoded from copies of the pair table in shared memory (``_shared_lookup_ptx``), filled at
        the start by FILL_ASM (which declares that memory). The grid is 1-D over (row block, K split) work
        items; PERSISTENT programs take several (a grid smaller than the items, so the table fill is paid once
        per program). THREE_BIT: 3-bit scalar codes, whose plane-0 bytes (WEIGHTS_PER_BYTE = 4) are read as the
        2-bit codes' are and whose plane-1 bits are found through the step's last operand (``_mma_group_ptx``)."""
        ROWS: tl.constexpr = 16 * WARPS
        if EMULATE:
            tid = tl.arange(0, 32 * WARPS)
        else:
            tid = _thread_index(tl.zeros([32 * WARPS], dtype=tl.int32))
        ready = tl.zeros_like(tid)
        if SHARED_LOOKUP and not EMULATE:
            ready = _fill_shared_table(pairs_ptr, tid, FILL_ASM)  # zeros; orders the steps after the fill
        if PERSISTENT:
            items = tl.cdiv(N, ROWS) * SPLIT_K
            for item in range(tl.program_id(0), items, tl.num_programs(0)):
                _mma_item(x_ptr, codes_ptr, code_words_ptr, scales_ptr, words_ptr, grid_ptr, bias_ptr, y_ptr, work_ptr,
                          count_ptr, M, N, Kp, bytes_per_row, n_groups, groups_per_split, item // SPLIT_K,
                          item % SPLIT_K, tid, ready, WARPS, G, P, WEIGHTS_PER_BYTE, X_BLOCKS, HALF_IS_BF16, SPLIT_K,
                          HAS_BIAS, UNROLL, SHARED_LOOKUP, GROUP_ASM, GROUP_CONSTRAINTS, EMULATE, THREE_BIT)
        else:  # one item per program (a loop around the item costs registers: 75 -> 121 at G = 128)
            item = tl.program_id(0)
            _mma_item(x_ptr, codes_ptr, code_words_ptr, scales_ptr, words_ptr, grid_ptr, bias_ptr, y_ptr, work_ptr,
                      count_ptr, M, N, Kp, bytes_per_row, n_groups, groups_per_split, item // SPLIT_K, item % SPLIT_K,
                      tid, ready, WARPS, G, P, WEIGHTS_PER_BYTE, X_BLOCKS, HALF_IS_BF16, SPLIT_K, HAS_BIAS, UNROLL,
                      SHARED_LOOKUP, GROUP_ASM, GROUP_CONSTRAINTS, EMULATE, THREE_BIT)

    def _geometry(codes, scales, bits, p, group_size):
        planes = PLANES[bits * p]
        n, n_groups = scales.shape
        kp = n_groups * group_size
        w0 = planes[0]
        w1 = planes[1] if len(planes) > 1 else 0
        plane1_base = (kp // p) * w0 // 32
        return n, kp, n_groups, w0, w1, plane1_base

    def dequantize_triton(codes, scales, table, bits: int, p: int, group_size: int, dtype=torch.float16,
                          block_n: int = 32, block_k: int = 128) -> torch.Tensor:
        """Dense weight in the ROTATED basis, ``[N, K_pad]`` in ``dtype`` (the large-M fallback's first half)."""
        n, kp, n_groups, w0, w1, plane1_base = _geometry(codes, scales, bits, p, group_size)
        block_k = min(block_k, kp)
        w = torch.empty(n, kp, dtype=dtype, device=codes.device)
        _dequant_kernel[(triton.cdiv(n, block_n), kp // block_k)](
            codes, scales, table, w, n, kp, codes.shape[1], plane1_base, n_groups,
            BLOCK_N=block_n, BLOCK_K=block_k, P=p, W0=w0, W1=w1, G=group_size, num_warps=4)
        return w

    _PAIR_TABLES: dict = {}

    def _pair_bits(bits: int, p: int) -> tuple[int, int]:
        """(LO, HI): bits of a weight pair in bit-plane 0 and bit-plane 1."""
        planes = PLANES[bits * p]
        return 2 * planes[0] // p, (2 * planes[1] // p if len(planes) > 1 else 0)

    def _build_pair_table(table: torch.Tensor, bits: int, p: int, half: torch.dtype) -> torch.Tensor:
        lo_bits, hi_bits = _pair_bits(bits, p)
        units = torch.arange(1 << (lo_bits + hi_bits), device=table.device)
        if p == 1:  # two scalar codes: code t = its plane-0 bits | its plane-1 bits << w0
            planes = PLANES[bits]
            w0, w1 = planes[0], (planes[1] if len(planes) > 1 else 0)
            lo, hi = units & ((1 << lo_bits) - 1), units >> lo_bits
            code = [((lo >> (t * w0)) & ((1 << w0) - 1)) | (((hi >> (t * w1)) & ((1 << w1) - 1)) << w0) for t in (0, 1)]
            flat = table.reshape(-1)
            first, second = flat[code[0]], flat[code[1]]
        else:  # one 2-dim code, whose bits are the pair's bits in the same order
            first, second = table[units, 0], table[units, 1]
        as16 = lambda t: t.to(half).view(torch.int16).to(torch.int32) & 0xFFFF  # noqa: E731
        return (as16(first) | (as16(second) << 16)).to(torch.int32).contiguous()

    def pair_table(table: torch.Tensor, bits: int, p: int, half: torch.dtype) -> torch.Tensor:
        """``int32 [2**(2 * bits)]``: entry ``u`` packs the two weights that pair code ``u`` decodes to, as
        ``half`` (bf16 or fp16) bit patterns, first weight in the low 16 bits. For p = 1 a pair is two scalar
        codes; for p = 2 it is one code of a 2-dim table. ``u`` = the pair's bit-plane-0 bits, then its
        bit-plane-1 bits (3-bit codes: 4 + 2 bits).

        Cached per table storage and version (the entry holds the table, so its address cannot be reused
        while cached), so decode steps only gather; built outside CUDA-graph pools (``_outside_graph_pools``).
        """
        return _derived_table(table, ("pair", half, bits, p), lambda: _build_pair_table(table, bits, p, half))

    def three_bit_byte_table(table: torch.Tensor, half: torch.dtype) -> torch.Tensor:
        """``int32 [256]``: the 3-bit scalar ``pair_table`` (64 entries) repeated four times, so that a whole byte
        whose bits 6-7 belong to other codes indexes it (``_three_bit_pair_indices_ptx``: one instruction fewer
        per index word than masking them). 1 KB like the 4-bit pair table, so the same shared-memory fill and
        copies serve it. Cached like ``pair_table``."""
        return _derived_table(table, ("pair-byte", half),
                              lambda: _build_pair_table(table, 3, 1, half).repeat(4).contiguous())

    def _build_quad_table(table: torch.Tensor, bits: int, p: int, half: torch.dtype) -> torch.Tensor:
        units = torch.arange(256, device=table.device)
        if p == 1:  # four 2-bit codes, lowest bits first
            flat = table.reshape(-1)
            weights = [flat[(units >> (2 * t)) & 3] for t in range(4)]
        else:  # two 4-bit codes of 2-dim vectors
            weights = [table[units & 15, 0], table[units & 15, 1], table[units >> 4, 0], table[units >> 4, 1]]
        as16 = lambda t: t.to(half).view(torch.int16).to(torch.int64) & 0xFFFF  # noqa: E731
        words = torch.stack([as16(weights[0]) | (as16(weights[1]) << 16),
                             as16(weights[2]) | (as16(weights[3]) << 16)], 1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()

    def quad_table(table: torch.Tensor, bits: int, p: int, half: torch.dtype) -> torch.Tensor:
        """``int32 [256, 2]`` for codes with four weights per byte (2-bit scalar, 2-bit 2-dim): entry ``u``
        packs the four weights of byte ``u`` as ``half`` bit patterns, first two in word 0 (first weight in
        the low 16 bits). Cached like ``pair_table``."""
        return _derived_table(table, ("quad", half, bits, p), lambda: _build_quad_table(table, bits, p, half))

    def register_table(table: torch.Tensor, half: torch.dtype) -> torch.Tensor:
        """``register_table_words`` of a 4-bit scalar grid for the REGISTER lookup, cached like ``pair_table``."""
        return _derived_table(table, ("register", half), lambda: register_table_words(table, half))

    def _derived_table(table: torch.Tensor, kind: tuple, build) -> torch.Tensor:
        """A small tensor derived from ``table``, cached per table storage and version (the entry holds the
        table, so its address cannot be reused while cached) and built outside CUDA-graph pools."""
        key = (table.device, table.data_ptr(), table._version, tuple(table.shape), kind)
        hit = _PAIR_TABLES.get(key)
        if hit is not None:
            return hit[1]
        if table.is_cuda and torch.cuda.is_current_stream_capturing():
            return build()  # part of the captured graph, not cached
        derived = _outside_graph_pools(table.device, build)
        if len(_PAIR_TABLES) >= 64:  # a few tables per model; bound the cache if tables keep changing
            _PAIR_TABLES.pop(next(iter(_PAIR_TABLES)))
        _PAIR_TABLES[key] = (table, derived)
        return derived

    def _outside_graph_pools(device: torch.device, build):
        """``build()`` for a tensor that outlives this call (a cache entry). On CUDA it runs on a short-lived
        helper thread: during warm-up, CUDA-graph trees route every allocation of the calling THREAD into
        their private pool (``_cuda_beginAllocateCurrentThreadToPool``), and a cached tensor living there is an
        untracked live allocation that the next replay may overwrite (Inductor refuses it)."""
        if device.type != "cuda":
            return build()
        import threading

        torch.cuda.current_stream(device).synchronize()  # the helper may read what this stream wrote
        built: list[torch.Tensor] = []

        def run() -> None:
            with torch.cuda.device(device):
                built.append(build())
                torch.cuda.current_stream().synchronize()

        helper = threading.Thread(target=run, name="transfigure-cache-alloc")
        helper.start()
        helper.join()
        if not built:
            raise RuntimeError("building a cached tensor failed on its helper thread")
        return built[0]

    _COUNTERS: dict = {}

    def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
        """Zeroed int32 arrival counters of split-K tiles, one per output tile, shared by every launch on
        ``device`` (launches on one stream run one after another; each kernel leaves its counters at zero)."""
        counters = _COUNTERS.get(device)
        if counters is None or counters.numel() < tiles:
            size = max(tiles, 1 << 16)
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("LUT split-K counters must exist before CUDA-graph capture (run once eagerly)")
            counters = _COUNTERS[device] = _outside_graph_pools(
                device, lambda: torch.zeros(size, dtype=torch.int32, device=device))
        return counters

    def _launch_pair(config, x2, codes, scales, bias, table, n, kp, n_groups, plane1_base, bits, p, group_size):
        meta = config.meta
        m = x2.shape[0]
        bn, split = meta["BLOCK_N"], meta["SPLIT_K"]
        nibble, register = meta.get("NIBBLE", 0), meta.get("REGISTER", 0)
        if register:
            pairs = register_table(table, x2.dtype)
        else:
            pairs = table.reshape(-1) if nibble else pair_table(table, bits, p, x2.dtype)  # fp32 grid for NIBBLE
        code_bytes = codes.view(torch.uint8)
        grid = (triton.cdiv(n, bn), split)
        bias_arg = bias if bias is not None else scales
        lo_bits, hi_bits = _pair_bits(bits, p)
        plane1_bytes = 4 * plane1_base  # words -> bytes
        if m == 1:
            y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
            work = torch.empty(split, n, dtype=torch.float32, device=x2.device) if split > 1 else y
            counts = _tile_counters(x2.device, grid[0]) if split > 1 else y
            _lut_pair_gemv1_kernel[grid](
                x2, code_bytes, scales, pairs, bias_arg, y, work, counts, n, code_bytes.shape[1], plane1_bytes, n_groups,
                n_groups // split, BLOCK_N=bn, G=group_size, LO=lo_bits, HI=hi_bits,
                HALF_IS_BF16=x2.dtype == torch.bfloat16, SPLIT_K=split, HAS_BIAS=bias is not None,
                BLOCK_G=meta.get("BLOCK_G", 1), XSPLIT=meta.get("XSPLIT", 0), NIBBLE=nibble, REGISTER=register,
                EMULATE=interpreter_mode(),
                num_warps=config.num_warps, num_stages=config.num_stages)
            return y
        if split == 1:
            y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        else:
            y = torch.zeros(m, n, dtype=torch.float32, device=x2.device)
        _lut_pair_kernel[grid](
            x2, code_bytes, scales, pairs, bias_arg, y, m, n, kp, code_bytes.shape[1], plane1_bytes, n_groups,
            n_groups // split, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=bn, G=group_size, LO=lo_bits,
            HI=hi_bits, HALF_IS_BF16=x2.dtype == torch.bfloat16, SPLIT_K=split, HAS_BIAS=bias is not None,
            num_warps=config.num_warps, num_stages=config.num_stages)
        if split > 1:
            if bias is not None:
                y += bias.to(torch.float32)
            y = y.to(x2.dtype)
        return y

    def _launch_register_mm(config, x2, codes, scales, bias, table, n, kp, n_groups, group_size):
        meta = config.meta
        m = x2.shape[0]
        bn, split = meta["BLOCK_N"], meta["SPLIT_K"]
        grid = (triton.cdiv(n, bn), split)
        y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        work = torch.empty(split, m, n, dtype=torch.float32, device=x2.device) if split > 1 else y
        counts = _tile_counters(x2.device, grid[0]) if split > 1 else y
        _lut_register_mm_kernel[grid](
            x2, codes.view(torch.uint8), scales, register_table(table, x2.dtype), bias if bias is not None else scales,
            y, work, counts, m, n, kp, codes.shape[1] * 4, n_groups, n_groups // split,
            BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=bn, G=group_size, BLOCK_G=meta["BLOCK_G"],
            HALF_IS_BF16=x2.dtype == torch.bfloat16, SPLIT_K=split, HAS_BIAS=bias is not None,
            EMULATE=interpreter_mode(), num_warps=config.num_warps, num_stages=config.num_stages)
        return y

    _SM_COUNTS: dict = {}

    def _sm_count(device: torch.device) -> int:
        """Streaming multiprocessors of ``device`` (1 on the CPU interpreter, so programs take several items)."""
        if device.type != "cuda":
            return 1
        count = _SM_COUNTS.get(device)
        if count is None:
            count = _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return count

    def _launch_mma(config, x2, codes, scales, bias, table, n, n_groups, group_size, bits, p):
        meta = config.meta
        m = x2.shape[0]
        warps, split = meta["WARPS"], meta["SPLIT_K"]
        shared = meta.get("LOOKUP") == "shared"
        three_bit = (bits, p) == (3, 1)  # plane 0 holds their low 2 bits: read like 2-bit codes, plus plane 1
        weights_per_byte = 4 if three_bit else 8 // bits
        tiles = triton.cdiv(n, 16 * warps)
        programs = tiles * split
        if meta.get("PER_SM"):  # persistent programs
            programs = min(programs, meta["PER_SM"] * _sm_count(x2.device))
        y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        work = torch.empty(split, m, n, dtype=torch.float32, device=x2.device) if split > 1 else y
        counts = _tile_counters(x2.device, tiles) if split > 1 else y
        emulate = interpreter_mode()
        half = "bf16" if x2.dtype == torch.bfloat16 else "fp16"
        x_blocks = 1 if m <= 8 else 2
        if shared and three_bit:
            ptx = (MMA_THREE_BIT_GROUP_PTX_L2 if meta.get("L2") else MMA_THREE_BIT_GROUP_PTX)[
                (group_size, half, x_blocks)]
            bytes_table = three_bit_byte_table(table, x2.dtype)
        elif shared:
            ptx = (MMA_SHARED_GROUP_PTX_L2 if meta.get("L2") else MMA_SHARED_GROUP_PTX)[
                (group_size, half, x_blocks, weights_per_byte)]
            bytes_table = (pair_table if weights_per_byte == 2 else quad_table)(table, bits, p, x2.dtype)
        else:
            ptx, bytes_table = MMA_GROUP_PTX[(group_size, half, x_blocks)], scales
        words = register_table(table, x2.dtype) if (bits, p) == (4, 1) else scales
        # without a register cap ptxas keeps half the table words in uniform registers and copies them
        # back before each prmt (61 extra instructions per group step at 56 registers; 75 without)
        extra = {} if emulate else {"maxnreg": 128}
        _lut_mma_gemv_kernel[(programs,)](
            x2, codes.view(torch.uint8), codes, scales, words, bytes_table, table, bias if bias is not None else scales,
            y, work, counts, m, n, x2.shape[1], codes.shape[1] * 4, n_groups, n_groups // split, WARPS=warps,
            G=group_size, P=p, WEIGHTS_PER_BYTE=weights_per_byte, X_BLOCKS=x_blocks,
            HALF_IS_BF16=x2.dtype == torch.bfloat16, SPLIT_K=split, HAS_BIAS=bias is not None, UNROLL=meta["UNROLL"],
            SHARED_LOOKUP=shared, GROUP_ASM=ptx, GROUP_CONSTRAINTS=MMA_GROUP_CONSTRAINTS[x_blocks],
            FILL_ASM=shared_table_fill_ptx(warps, 2 if three_bit else weights_per_byte) if shared else "",
            PERSISTENT=programs < tiles * split,
            EMULATE=emulate, THREE_BIT=three_bit, num_warps=warps, num_stages=1, **extra)
        return y

    def _launch(config: Config, x2, codes, scales, table, bias, bits, p, group_size):
        """x2: [M, K_pad] contiguous, already padded + rotated. Returns [M, N] in x2.dtype."""
        n, kp, n_groups, w0, w1, plane1_base = _geometry(codes, scales, bits, p, group_size)
        m = x2.shape[0]
        meta = config.meta
        if meta.get("MODE") == "dequant":
            w = dequantize_triton(codes, scales, table, bits, p, group_size, dtype=x2.dtype)
            return torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x2.dtype))
        if meta.get("MODE") == "mma":
            return _launch_mma(config, x2, codes, scales, bias, table, n, n_groups, group_size, bits, p)
        if meta.get("MODE") == "register_mm":
            return _launch_register_mm(config, x2, codes, scales, bias, table, n, kp, n_groups, group_size)
        if meta.get("MODE") == "pair":
            return _launch_pair(config, x2, codes, scales, bias, table, n, kp, n_groups, plane1_base, bits, p,
                                group_size)
        bm, bn, bk, split = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["SPLIT_K"]
        use_dot = bm >= 16
        if not use_dot:
            bm = max(1, min(bm, triton.next_power_of_2(m)))
        grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split)
        if split == 1:
            y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        else:
            y = torch.zeros(m, n, dtype=torch.float32, device=x2.device)
        _lut_mm_kernel[grid](
            x2, codes, scales, table, bias if bias is not None else scales, y, m, n, kp, codes.shape[1],
            plane1_base, n_groups, kp // split,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, P=p, W0=w0, W1=w1, G=group_size, USE_DOT=use_dot,
            SPLIT_K=split, HAS_BIAS=bias is not None, num_warps=config.num_warps, num_stages=config.num_stages)
        if split > 1:
            if bias is not None:
                y += bias.to(torch.float32)
            y = y.to(x2.dtype)
        return y

    def _reg_mm(bn, split, block_g, warps, stages):
        return Config({"MODE": "register_mm", "BLOCK_N": bn, "SPLIT_K": split, "BLOCK_G": block_g}, warps, stages)

    # 2 <= M <= 64, 4-bit scalar codes, 16-bit activations (not measured on a GPU before their first run)
    _REGISTER_MM_CONFIGS = [
        _reg_mm(64, 4, 1, 4, 1), _reg_mm(32, 4, 1, 4, 1), _reg_mm(64, 8, 1, 4, 1), _reg_mm(64, 2, 2, 4, 1),
        _reg_mm(128, 4, 1, 8, 1), _reg_mm(64, 16, 1, 4, 1), _reg_mm(32, 8, 2, 4, 1), _reg_mm(64, 4, 1, 4, 3),
        _reg_mm(128, 2, 1, 4, 1), _reg_mm(32, 16, 1, 4, 1),
    ]

    def _mma(warps, split, unroll, lookup="register", per_sm=0, l2=0):
        meta = {"MODE": "mma", "WARPS": warps, "SPLIT_K": split, "UNROLL": unroll}
        if lookup != "register":
            meta["LOOKUP"] = lookup
        if per_sm:
            meta["PER_SM"] = per_sm
        if l2:
            meta["L2"] = l2
        return Config(meta, warps, 1)

    # M <= 16, 16-bit activations, group sizes 64 / 128 / 256. The register lookup (4-bit scalar codes) wins
    # the 1B shapes, the shared byte tables (every 4-bit and 2-bit format) the 8B ones, persistent programs
    # (PER_SM) the long-K ones (benchmarks/results/explore_lut_mma_*.md, H100). A cp.async ring for the codes
    # was tried and never won (explore_lut_mma_ring*.md): the steps are not bound by load latency. 3-bit scalar
    # codes take the shared-table configs too (their 6-bit pair indices): from HBM 1.78-2.52x cuBLAS at M = 1,
    # 1-11% behind 4-bit (benchmarks/results/explore_lut_mma_3bit.md).
    _MMA_CONFIGS = [
        _mma(4, 4, 1), _mma(4, 8, 1), _mma(4, 16, 1), _mma(4, 8, 2), _mma(4, 4, 2), _mma(8, 8, 1), _mma(2, 16, 1),
        _mma(4, 1, 2), _mma(8, 1, 1), _mma(4, 2, 1),
        _mma(4, 1, 1, "shared"), _mma(4, 2, 1, "shared"), _mma(4, 4, 1, "shared"), _mma(8, 2, 1, "shared"),
        _mma(8, 4, 1, "shared"), _mma(4, 2, 2, "shared"), _mma(4, 4, 2, "shared"), _mma(8, 2, 2, "shared"),
        _mma(8, 8, 1, "shared", 3), _mma(8, 4, 1, "shared", 3), _mma(4, 8, 1, "shared", 6), _mma(4, 4, 1, "shared", 4),
        # 256-byte L2 prefetches on the code loads: the long-K shapes from HBM (explore_lut_prefetch.md)
        _mma(8, 8, 1, "shared", 3, 256), _mma(8, 4, 1, "shared", 3, 256), _mma(4, 8, 1, "shared", 6, 256),
        _mma(4, 4, 2, "shared", 0, 256), _mma(8, 2, 2, "shared", 0, 256), _mma(4, 2, 2, "shared", 0, 256),
    ]

    def _c(bm, bn, bk, split, warps, stages):
        return Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, warps, stages)

    def _pair(bn, split, warps, stages, block_g=1, xsplit=0, nibble=0, register=0):
        meta = {"MODE": "pair", "BLOCK_N": bn, "SPLIT_K": split}
        if block_g > 1 or xsplit or nibble or register:  # M = 1, one-byte pairs (4-bit codes): _lut_pair_gemv1_kernel
            meta.update(BLOCK_G=block_g, XSPLIT=xsplit)
        if nibble:  # 4-bit scalar codes only
            meta["NIBBLE"] = 1
        if register:  # 4-bit scalar codes only
            meta["REGISTER"] = 1
        return Config(meta, warps, stages)

    # configs[0] of each regime is what interpreter mode (CI) uses. The pair kernel (first 12) is 1.1-1.5x
    # faster than the tile kernel on an H100 at M = 1 (benchmarks/explore_lut_gemv.py); it covers every format
    # with 16-bit activations, the tile kernel fp32 activations and larger M.
    _GEMV_CONFIGS = [
        _pair(16, 4, 4, 3), _pair(64, 4, 4, 1), _pair(16, 1, 4, 1), _pair(32, 1, 4, 1), _pair(32, 2, 4, 1),
        _pair(16, 2, 4, 3), _pair(64, 2, 4, 1), _pair(32, 4, 4, 3), _pair(16, 8, 4, 1), _pair(64, 8, 4, 1),
        _pair(128, 4, 8, 1), _pair(8, 4, 4, 1),
        # best per 1B shape in the exploration (H100): 8192x2048, 2048x8192, 3072x2048, 16384x2048
        _pair(16, 4, 4, 1, 2, 1), _pair(32, 4, 4, 1, 4, 0), _pair(32, 8, 4, 1, 2, 1), _pair(64, 2, 4, 1, 1, 1),
        _pair(64, 4, 4, 1, 1, 1), _pair(32, 8, 4, 1, 1, 1),
        _pair(16, 4, 4, 1, 2, 1, 1), _pair(32, 4, 4, 1, 4, 0, 1), _pair(32, 8, 4, 1, 2, 1, 1),
        _pair(64, 2, 4, 1, 1, 1, 1), _pair(64, 4, 4, 1, 1, 1, 1), _pair(32, 8, 4, 1, 1, 1, 1),
        _pair(128, 4, 8, 1, 1, 1, 1), _pair(64, 8, 8, 1, 2, 1, 1),
        # register-table lookup, best per shape in explore_lut_gemv.py v3/v4 (H100, 8B and 1B shapes)
        _pair(64, 4, 4, 1, 1, 1, 0, 1), _pair(64, 8, 4, 1, 1, 1, 0, 1), _pair(64, 16, 4, 1, 1, 1, 0, 1),
        _pair(64, 32, 4, 1, 1, 1, 0, 1), _pair(64, 28, 4, 1, 1, 1, 0, 1), _pair(64, 112, 4, 1, 1, 1, 0, 1),
        _pair(64, 64, 4, 1, 1, 1, 0, 1), _pair(128, 2, 8, 1, 1, 1, 0, 1), _pair(64, 4, 4, 3, 1, 1, 0, 1),
        _pair(32, 4, 4, 1, 2, 1, 0, 1), _pair(64, 4, 4, 1, 2, 1, 0, 1), _pair(32, 2, 4, 2, 2, 1, 0, 1),
        _c(4, 16, 128, 1, 4, 2), _c(4, 16, 256, 1, 4, 2), _c(4, 32, 256, 1, 4, 2), _c(4, 16, 512, 1, 4, 2),
        _c(4, 32, 128, 1, 4, 3), _c(4, 8, 512, 1, 2, 2), _c(4, 16, 256, 2, 4, 2), _c(4, 32, 256, 2, 4, 2),
        _c(4, 16, 256, 4, 4, 2), _c(4, 64, 128, 1, 8, 2), _c(4, 32, 512, 1, 8, 2), _c(4, 16, 64, 1, 4, 2),
    ]
    _SMALL_CONFIGS = [
        _c(16, 32, 128, 1, 4, 2), _c(16, 64, 128, 1, 4, 3), _c(16, 64, 256, 1, 4, 2), _c(16, 128, 128, 1, 4, 3),
        _c(16, 32, 256, 2, 4, 2), _c(16, 64, 128, 2, 4, 3), _c(16, 64, 128, 4, 4, 3), _c(32, 64, 128, 1, 4, 3),
        _c(64, 64, 128, 1, 4, 3), _c(32, 128, 64, 1, 4, 4), _c(64, 128, 64, 1, 4, 3), _c(16, 32, 64, 1, 4, 2),
        Config({"MODE": "dequant"}),
    ]
    _LARGE_CONFIGS = [
        _c(64, 64, 64, 1, 4, 3), _c(64, 128, 64, 1, 4, 3), _c(128, 128, 64, 1, 8, 3), _c(128, 64, 64, 1, 4, 3),
        _c(128, 256, 64, 1, 8, 3), _c(64, 256, 64, 1, 8, 3), _c(128, 128, 128, 1, 8, 2),
        Config({"MODE": "dequant"}),
    ]

    def _register_lookup_available() -> bool:
        """The register-table kernels are inline NVIDIA PTX: CUDA devices, or the CPU interpreter (emulated)."""
        return torch.version.hip is None

    def _prune(configs, args):
        x2, codes, scales, table, bias, bits, p, group_size = args
        m = x2.shape[0]
        register_ok = _register_lookup_available()
        kp = scales.shape[1] * group_size
        if m <= 4:
            pool = _MMA_CONFIGS + _GEMV_CONFIGS + _REGISTER_MM_CONFIGS
        elif m <= 16:
            pool = _MMA_CONFIGS + _SMALL_CONFIGS + _REGISTER_MM_CONFIGS
        elif m <= 64:
            pool = _SMALL_CONFIGS + _REGISTER_MM_CONFIGS
        else:
            pool = _LARGE_CONFIGS
        keep = []
        for c in pool:
            if c.meta.get("MODE") == "dequant":
                keep.append(c)
                continue
            if c.meta.get("MODE") == "mma":
                n_groups = kp // group_size
                shared = c.meta.get("LOOKUP") == "shared"
                # 3-bit: scalar codes only (their 6-bit pair indices; 3-bit p = 2 codes are 4 + 2 bit-planes)
                codes_ok = (bits, p) == (4, 1) or (shared and (bits in (2, 4) or (bits, p) == (3, 1)))
                if (register_ok and m <= 16 and codes_ok and group_size in (64, 128, 256)
                        and x2.dtype in (torch.float16, torch.bfloat16) and n_groups % c.meta["SPLIT_K"] == 0
                        and (n_groups // c.meta["SPLIT_K"]) % c.meta["UNROLL"] == 0
                        and (c.meta["UNROLL"] == 1 or group_size < 256)  # unrolled 256-groups spill
                        and (not c.meta.get("PER_SM") or m <= 8)):  # persistent + two x blocks spill
                    keep.append(c)
                continue
            if c.meta.get("MODE") == "register_mm":
                per_split = (kp // group_size) // c.meta["SPLIT_K"]
                if (register_ok and 2 <= m and (bits, p) == (4, 1) and x2.dtype in (torch.float16, torch.bfloat16)
                        and (kp // group_size) % c.meta["SPLIT_K"] == 0 and per_split % c.meta["BLOCK_G"] == 0):
                    keep.append(c)
                continue
            if c.meta.get("MODE") == "pair":
                # the table holds 16-bit pairs: as exact as 16-bit activations need, not fp32
                usable = x2.dtype in (torch.float16, torch.bfloat16)
                per_split = (kp // group_size) // c.meta["SPLIT_K"]
                if "BLOCK_G" in c.meta:  # the one-byte-pair refinements: M = 1 and LO = 8, HI = 0
                    usable = usable and m == 1 and _pair_bits(bits, p) == (8, 0)
                    usable = usable and (not c.meta.get("NIBBLE") or (bits, p) == (4, 1))
                    usable = usable and (not c.meta.get("REGISTER") or (register_ok and (bits, p) == (4, 1)))
                    usable = usable and per_split % c.meta["BLOCK_G"] == 0
                if usable and (kp // group_size) % c.meta["SPLIT_K"] == 0:
                    keep.append(c)
                continue
            bk, split = c.meta["BLOCK_K"], c.meta["SPLIT_K"]
            if bk < 32 * p or kp % (bk * split):
                continue
            if c.meta["BLOCK_M"] >= 16 and c.meta["BLOCK_M"] > max(16, triton.next_power_of_2(m)):
                continue
            keep.append(c)
        if register_ok and (bits, p) == (4, 1) and x2.dtype == torch.bfloat16 and m <= 64:
            # On the H100 the tensor-core configs won every 1B and 8B shape at M = 1..16 (the pair kernel's
            # register configs came within 0.1 us once, 512 x 2048), register_mm above (quant.json,
            # explore_lut_mma_*.json); the others only cost compile and tuning time. dequant stays as a floor.
            fast = ("mma",) if m <= 16 else ("register_mm", "dequant")
            register = [c for c in keep if c.meta.get("MODE") in fast + ("dequant",)]
            if any(c.meta.get("MODE") != "dequant" for c in register):
                keep = register
        return keep

    def _key(x2, codes, scales, table, bias, bits, p, group_size):
        m = x2.shape[0]
        bucket = m if m <= 16 else triton.next_power_of_2(m)
        return (bucket, scales.shape[0], scales.shape[1] * group_size, bits, p, group_size, str(x2.dtype),
                bias is not None)

    _lut_tuner = Autotuner("lut_linear", _MMA_CONFIGS + _GEMV_CONFIGS + _SMALL_CONFIGS + _LARGE_CONFIGS
                           + _REGISTER_MM_CONFIGS, key=_key,
                           launch=_launch, prune=_prune)

    _CHOSEN: dict = {}

    def prepare_input(x, signs, hadamard_size: int, kp: int) -> torch.Tensor:
        """``x [..., K]`` -> ``[M, K_pad]`` contiguous, padded and rotated (Triton FWHT on CUDA)."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[1] < kp:
            x2 = torch.nn.functional.pad(x2, (0, kp - x2.shape[1]))
        if hadamard_size:
            x2 = torch.ops.transfigure.fwht(x2, signs, hadamard_size, 1.0 / math.sqrt(hadamard_size))
        return x2.contiguous()

    def lut_linear_triton(x, codes, scales, table, signs, bias, bits: int, p: int, group_size: int,
                          hadamard_size: int, in_features: int, config: Config | None = None) -> torch.Tensor:
        """Triton path (CUDA, or CPU with TRITON_INTERPRET=1). ``config`` forces one config (tests)."""
        kp = scales.shape[1] * group_size
        x2 = prepare_input(x, signs, hadamard_size, kp)
        table = table.to(device=x.device, dtype=torch.float32).contiguous()
        args = (x2, codes.contiguous(), scales.contiguous(), table, bias, bits, p, group_size)
        if x2.shape[0] == 0:
            y = x2.new_empty(0, scales.shape[0])
        elif config is not None:
            y = _launch(config, *args)
        else:
            # remember the tuner's choice per (shape key, device): later calls skip the tuner's key building
            fast_key = (_key(*args), x2.device)
            chosen = _CHOSEN.get(fast_key)
            if chosen is None:
                chosen = _CHOSEN[fast_key] = _lut_tuner.best_config(*args)
            y = _launch(chosen, *args)
        return y.reshape(*x.shape[:-1], scales.shape[0])

    def configs_for(m: int, kp: int, p: int, group_size: int = 64, bits: int = 4,
                    dtype: torch.dtype = torch.float32) -> list[Config]:
        """The candidate configs the autotuner would try for ``m`` rows (tests iterate over them)."""
        fake = torch.empty(m, 0, dtype=dtype)
        return _prune(None, (fake, None, torch.empty(1, kp // group_size), None, None, bits, p, group_size))

lut_linear = define_op(
    "lut_linear",
    lut_linear_reference,
    cuda=lut_linear_triton,
    fake=_fake,
    backward=_backward,
    setup_context=_setup_context,
)
