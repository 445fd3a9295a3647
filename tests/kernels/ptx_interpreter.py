"""A small interpreter of the straight-line PTX our kernels inline (``transfigure.kernels.lut_gemm``), so CI can
check the bit logic and the warp-level data layout of that PTX without a GPU (Triton's CPU interpreter cannot run
inline PTX). It runs the 32 lanes of one warp in lockstep; ``mma.sync`` combines their registers following the
fragment layouts of the PTX ISA (section "Matrix Fragments for mma.m16n8k16"), written here from the ISA text,
independently of the kernels' own bookkeeping.

Registers hold Python ints (bit patterns) for ``.b``/``.u`` types and Python floats for ``.f32``; ``.pred``
registers are bools. Memory is a flat little-endian byte array addressed from ``Memory.base``.
"""

from __future__ import annotations

import re

import numpy as np

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF


def prmt(a: int, b: int, control: int) -> int:
    """``prmt.b32`` default mode: byte ``i`` of the result is byte ``c_i & 7`` of {b, a}, or, with bit 3 of
    ``c_i`` set, that byte's sign bit replicated."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        select = (control >> (4 * i)) & 0xF
        byte = pool[select & 7]
        if select & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def lop3(a: int, b: int, c: int, table: int) -> int:
    """``lop3.b32``: bit ``i`` of the result is bit ``(a_i << 2) | (b_i << 1) | c_i`` of the 8-bit truth table
    (the ISA's encoding: the table is ``F(0xF0, 0xCC, 0xAA)`` for the function ``F`` wanted)."""
    out = 0
    for i in range(32):
        index = ((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1)
        out |= ((table >> index) & 1) << i
    return out


def half_to_float(bits: int, kind: str) -> float:
    if kind == "bf16":
        return float(np.array([(bits & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0])
    return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def float_bits(value: float) -> int:
    return int(np.array([value], dtype=np.float32).view(np.uint32)[0])


def bits_float(bits: int) -> float:
    return float(np.array([bits & MASK32], dtype=np.uint32).view(np.float32)[0])


class Memory:
    def __init__(self, size: int, base: int = 0x10000):
        self.base = base
        self.data = np.zeros(size, dtype=np.uint8)

    def write(self, address: int, array: np.ndarray) -> None:
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.data[address - self.base: address - self.base + raw.size] = raw

    def read(self, address: int, size: int) -> int:
        offset = address - self.base
        if offset < 0 or offset + size > self.data.size:
            raise AssertionError(f"load of {size} bytes at {address:#x} is outside the test memory")
        return int.from_bytes(self.data[offset: offset + size].tobytes(), "little")


def _mma_m16n8k16(lanes: list[dict], a_regs, b_regs, c_regs, d_regs, kind: str) -> None:
    """D = A B + C over the warp. Fragments (PTX ISA, mma.m16n8k16 with .bf16/.f16 A/B and .f32 C/D):
    lane l, group = l >> 2, t = l % 4. A (16 x 16, row-major): register r holds elements 2r, 2r + 1 (low half
    first) of a0..a7, where a0, a1 = A[group][2t + {0, 1}], a2, a3 = A[group + 8][2t + {0, 1}],
    a4, a5 = A[group][2t + 8 + {0, 1}], a6, a7 = A[group + 8][2t + 8 + {0, 1}]. B (16 x 8): b0, b1 =
    B[2t + {0, 1}][group], b2, b3 = B[2t + 8 + {0, 1}][group]. C, D (16 x 8): c0, c1 = C[group][2t + {0, 1}],
    c2, c3 = C[group + 8][2t + {0, 1}]."""
    a = np.zeros((16, 16))
    b = np.zeros((16, 8))
    c = np.zeros((16, 8))
    for lane, regs in enumerate(lanes):
        group, t = lane >> 2, lane % 4
        av = [half_to_float(regs[r] >> shift, kind) for r in a_regs for shift in (0, 16)]
        bv = [half_to_float(regs[r] >> shift, kind) for r in b_regs for shift in (0, 16)]
        cv = [regs[r] for r in c_regs]
        for i, (row, col) in enumerate([(group, 2 * t), (group, 2 * t + 1), (group + 8, 2 * t), (group + 8, 2 * t + 1),
                                        (group, 2 * t + 8), (group, 2 * t + 9), (group + 8, 2 * t + 8),
                                        (group + 8, 2 * t + 9)]):
            a[row, col] = av[i]
        for i, row in enumerate([2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9]):
            b[row, group] = bv[i]
        for i, (row, col) in enumerate([(group, 2 * t), (group, 2 * t + 1), (group + 8, 2 * t), (group + 8, 2 * t + 1)]):
            c[row, col] = cv[i]
    d = (a @ b + c).astype(np.float32)
    for lane, regs in enumerate(lanes):
        group, t = lane >> 2, lane % 4
        for reg, (row, col) in zip(d_regs, [(group, 2 * t), (group, 2 * t + 1), (group + 8, 2 * t),
                                            (group + 8, 2 * t + 1)]):
            regs[reg] = float(d[row, col])


def _regs_in(text: str) -> list[str]:
    return [r.strip() for r in text.strip().strip("{}").split(",")]


def bank_conflict_degree(addresses: list[int], width: int = 4) -> int:
    """Wavefronts a warp's shared-memory access of ``width`` bytes per lane needs: the most distinct 4-byte
    words that fall in one of the 32 banks (lanes reading the same word share it), per group of lanes served
    together (a 128-byte transaction: all 32 lanes for 4-byte accesses, each half warp for 8-byte ones)."""
    per_phase = 128 // width
    worst = 0
    for start in range(0, len(addresses), per_phase):
        banks: dict[int, set[int]] = {}
        for address in addresses[start:start + per_phase]:
            for word in range(address // 4, (address + width) // 4):
                banks.setdefault(word % 32, set()).add(word)
        worst = max(worst, max(len(words) for words in banks.values()))
    return worst


def run_warp(ptx: str, lanes: list[dict], memory: Memory | None = None, shared: Memory | None = None,
             shared_load_degrees: list[int] | None = None) -> list[dict]:
    """Execute ``ptx`` on every lane (a dict of operand/register values, e.g. ``{"$8": 0x1234}``), in lockstep,
    as warp 0 of a one-warp program (``bar.sync`` is then a no-op). ``shared`` is the program's shared memory,
    a static shared symbol (any name) its address 0; ``shared_load_degrees`` (if given) collects the bank-conflict degree of every
    ``ld.shared`` the warp executes. Returns the lanes' register files."""
    floats: set[str] = set()
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line.startswith(".reg .f32"):
            floats.update(_regs_in(line[len(".reg .f32"):]))
        if not line or line in "{}" or line.startswith((".reg", ".shared")):
            continue
        if line.startswith("mma.sync.aligned.m16n8k16.row.col.f32."):
            op, rest = line.split(None, 1)
            kind = op.split(".")[-3]
            groups = re.findall(r"\{([^}]*)\}", rest)
            d_regs, a_regs, b_regs, c_regs = (_regs_in(g) for g in groups)
            _mma_m16n8k16(lanes, a_regs, b_regs, c_regs, d_regs, kind)
            continue
        if shared_load_degrees is not None and line.startswith("ld.shared"):
            address = re.search(r"\[(\S+?)\]", line).group(1)
            width = 8 if line.startswith("ld.shared.v2") else 4
            shared_load_degrees.append(bank_conflict_degree([regs[address] for regs in lanes], width))
        for lane, regs in enumerate(lanes):
            regs["%laneid"] = regs["%tid.x"] = lane
            _execute(line, regs, memory, floats, shared)
    return lanes


def run_ptx(ptx: str, operands: dict[str, int], memory: Memory | None = None) -> dict:
    """One lane (PTX without warp-level instructions)."""
    return run_warp(ptx, [dict(operands)], memory)[0]


def _execute(line: str, regs: dict, memory: Memory | None, floats: set[str], shared: Memory | None) -> None:
    predicate = None
    if line.startswith("@"):
        predicate, line = line.split(None, 1)
        if not regs[predicate[1:]]:
            return
    op, rest = line.split(None, 1)

    def value(token: str):
        token = token.strip()
        if token.startswith("0f"):
            return bits_float(int(token[2:], 16))
        if token == "transfigure_lut_pairs":
            return shared.base
        return int(token, 0) if token[0].isdigit() or token[0] == "-" else regs[token]

    if op == "bar.sync":
        return
    if op == "cvt.u32.u64":
        regs[rest.split(",")[0].strip()] = regs[rest.split(",")[1].strip()] & MASK32
        return
    if op in ("st.shared.u32", "st.shared.v2.u32"):
        address, offset, src = re.match(r"\[(\w+)(?:\+(\d+))?\],\s*(\{[^}]*\}|\S+)", rest).groups()
        values = [value(r) & MASK32 for r in _regs_in(src)]
        shared.write(regs[address] + int(offset or 0), np.array(values, dtype=np.uint32))
        return
    if op.startswith("ld.shared") or op.startswith("ld.global"):
        space = shared if op.startswith("ld.shared") else memory
        dst, address = re.match(r"(\{[^}]*\}|\S+),\s*\[(\S+?)(?:\+(\d+))?\]", rest).groups()[:2]
        offset = re.match(r".*\[\S+?\+(\d+)\]", rest)
        address = regs[address] + (int(offset.group(1)) if offset else 0)
        width = 2 if op.endswith((".b16", ".u16")) else 4  # a .u16 load into a .b32 register zero-extends
        for i, reg in enumerate(_regs_in(dst)):
            raw = space.read(address + width * i, width)
            regs[reg] = bits_float(raw) if op.endswith(".f32") else raw
        return
    if op in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):  # d = {half(a) in the upper half, half(b) in the lower}
        dst, high, low = [t.strip() for t in rest.split(",")]
        as_float = lambda t: regs[t] if isinstance(regs[t], float) else bits_float(regs[t])  # noqa: E731
        kind = np.float16 if op == "cvt.rn.f16x2.f32" else None

        def half_bits(x: float) -> int:
            if kind is not None:
                return int(np.array([x], dtype=np.float16).view(np.uint16)[0])
            bits = float_bits(x)  # bf16: round the fp32 bits to nearest even at bit 16
            return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF

        regs[dst] = (half_bits(as_float(high)) << 16) | half_bits(as_float(low))
        return
    if op == "mov.b32" and rest.lstrip().startswith("{"):  # mov.b32 {h0, h1}, p: split into 16-bit halves
        halves, src = re.match(r"\{(\w+), (\w+)\}, (\S+)", rest).groups()[:2], rest.split(",")[-1]
        regs[halves[0]], regs[halves[1]] = value(src) & 0xFFFF, value(src) >> 16
        return
    dst, *srcs = [t.strip() for t in rest.split(",")]
    a = [value(t) for t in srcs]
    if op in ("mov.b32", "mov.b16", "mov.f32", "mov.u32"):
        regs[dst] = a[0]
    elif op == "mov.u64":
        regs[dst] = a[0]
    elif op in ("shr.u32",):
        regs[dst] = (a[0] & MASK32) >> a[1]
    elif op == "add.u32":
        regs[dst] = (a[0] + a[1]) & MASK32
    elif op == "mad.lo.u32":
        regs[dst] = (a[0] * a[1] + a[2]) & MASK32
    elif op == "shl.b32":
        regs[dst] = (a[0] << a[1]) & MASK32
    elif op == "shr.b32":
        regs[dst] = (a[0] & MASK32) >> a[1]
    elif op == "and.b32":
        regs[dst] = a[0] & a[1] & MASK32
    elif op == "xor.b32":
        regs[dst] = (a[0] ^ a[1]) & MASK32
    elif op == "prmt.b32":
        regs[dst] = prmt(*a)
    elif op == "lop3.b32":
        regs[dst] = lop3(*a)
    elif op == "setp.ne.b32":
        regs[dst] = a[0] != a[1]
    elif op == "mul.wide.u32":
        regs[dst] = (a[0] & MASK32) * (a[1] & MASK32)
    elif op == "add.s64":
        regs[dst] = (a[0] + a[1]) & MASK64
    elif op == "cvt.f32.f16":
        value16 = np.array([a[0] & 0xFFFF], dtype=np.uint16).view(np.float16)[0]
        result = float(np.float32(value16))
        regs[dst] = result if dst in floats else float_bits(result)  # a .b32 destination holds the bits
    elif op == "fma.rn.f32":
        regs[dst] = float(np.float32(np.float32(a[0]) * np.float32(a[1]) + np.float32(a[2])))
    else:
        raise AssertionError(f"instruction the test interpreter does not know: {line}")
