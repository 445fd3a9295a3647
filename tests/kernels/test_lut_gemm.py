import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels.lut_format import (PLANES, dequantize, pack, pack_codes, padded_size, rotate_input,
                                              unpack_codes)
from transfigure.kernels.fwht import ifwht_reference
from transfigure.kernels.lut_gemm import configs_for, dequantize_triton, lut_linear_reference, lut_linear_triton


def _packed(seed, n, k, bits, p, group, hadamard):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    table = torch.randn(2 ** (bits * p), p, generator=g)
    return w, pack(w, table, bits=bits, p=p, group_size=group, hadamard_size=hadamard, signs_seed=seed)


@given(code_bits=st.sampled_from(sorted(PLANES)), rows=st.integers(1, 5), chunks=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_pack_codes_round_trip(code_bits, rows, chunks, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**code_bits, (rows, 32 * chunks), generator=g)
    words = pack_codes(codes, code_bits)
    assert words.dtype == torch.int32 and words.shape == (rows, 32 * chunks * code_bits // 32)
    torch.testing.assert_close(unpack_codes(words, code_bits, 32 * chunks), codes)


@given(bits=st.sampled_from([2, 3, 4]), p=st.sampled_from([1, 2]), group=st.sampled_from([64, 128, 256]),
       hadamard=st.sampled_from([0, 64, 256]), seed=st.integers(0, 2**16))
def test_pack_dequantize_round_trip(bits, p, group, hadamard, seed):
    """Dequantized weight = the nearest table points times the scales, undone rotation included."""
    w, pk = _packed(seed, 8, 100, bits, p, group, hadamard)
    assert pk.padded_in_features == padded_size(100, group, hadamard, p)
    assert pk.codes.shape == (8, pk.padded_in_features * bits // 32)
    rotated = dequantize(pk, "rotated")
    scale = pk.scales.float()[..., None]
    # every p-vector of (rotated / scale) is a table point ...
    vecs = (rotated.view(8, -1, group) / scale).reshape(-1, p)
    assert torch.cdist(vecs, pk.table).min(1).values.max() < 1e-2
    # ... and it is the nearest table point to the true (rotated, normalized) weight vector
    true = (rotate_input(w, pk.signs, hadamard, pk.padded_in_features).view(8, -1, group) / scale).reshape(-1, p)
    assigned = (true - vecs).norm(dim=1)
    best = torch.cdist(true, pk.table).min(1).values
    assert (assigned - best).max() < 1e-2
    original = dequantize(pk, "original")
    assert original.shape == w.shape
    if hadamard == 0:  # with padding + rotation the padded columns carry error energy that "original" cuts off
        torch.testing.assert_close(original, rotated[:, :100])
    else:  # the inverse rotation is exact on the padded weight
        back = ifwht_reference(rotated, pk.signs, hadamard)
        torch.testing.assert_close(back[:, :100], original, rtol=1e-4, atol=1e-4)


@given(bits=st.sampled_from([2, 3, 4]), p=st.sampled_from([1, 2]), group=st.sampled_from([64, 128, 256]),
       hadamard=st.sampled_from([0, 128]), m=st.sampled_from([1, 3, 8, 33, 80]), n=st.integers(1, 40),
       k=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.float16]), bias=st.booleans(),
       which=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_triton_matches_reference(bits, p, group, hadamard, m, n, k, dtype, bias, which, seed):
    _, pk = _packed(seed, n, k, bits, p, group, hadamard)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    args = list(pk.op_args())
    args[4] = b
    expected = lut_linear_reference(x, *args)
    candidates = configs_for(m, pk.padded_in_features, p, group, bits, dtype)
    config = candidates[which % len(candidates)]
    actual = lut_linear_triton(x, *args, config=config)
    assert actual.dtype == dtype and actual.shape == (m, n)
    err = ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 3e-3), (config.describe(), err)


def test_split_k_and_batched_leading_dims():
    _, pk = _packed(3, 24, 512, 4, 1, 64, 0)
    x = torch.randn(2, 3, 512)
    args = list(pk.op_args())
    args[4] = torch.randn(24)
    expected = lut_linear_reference(x, *args)
    for config in configs_for(1, 512, 1):
        if config.meta["SPLIT_K"] > 1:
            torch.testing.assert_close(lut_linear_triton(x[:1, :1], *args, config=config), expected[:1, :1],
                                       rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lut_linear_triton(x, *args), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,p", [(2, 1), (3, 1), (4, 1), (2, 2), (3, 2), (4, 2)])
def test_dequantize_kernel(bits, p):
    _, pk = _packed(bits + 10 * p, 20, 256, bits, p, 64, 0)
    w = dequantize_triton(pk.codes, pk.scales, pk.table, bits, p, 64, dtype=torch.float32)
    torch.testing.assert_close(w, dequantize(pk, "rotated"))


def test_op_is_linear_in_original_basis_and_differentiable():
    w, pk = _packed(7, 16, 96, 4, 1, 64, 64)
    x = torch.randn(5, 96, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    args = list(pk.op_args())
    args[4] = b
    y = torch.ops.transfigure.lut_linear(x, *args)
    dense = dequantize(pk, "original")
    torch.testing.assert_close(y, x @ dense.T + b, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    (x2 @ dense.T + b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-4)


def test_op_under_torch_compile():
    _, pk = _packed(1, 16, 64, 3, 2, 64, 0)
    x = torch.randn(4, 64)
    fn = torch.compile(lambda t: torch.ops.transfigure.lut_linear(t, *pk.op_args()) * 2, backend="inductor")
    torch.testing.assert_close(fn(x), lut_linear_reference(x, *pk.op_args()) * 2)


@given(bits=st.sampled_from([1, 2, 3, 4]), p=st.sampled_from([1, 2]), half=st.sampled_from([torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_pair_table_packs_the_two_weights_of_every_pair_code(bits, p, half, seed):
    from transfigure.kernels.lut_gemm import pair_table

    g = torch.Generator().manual_seed(seed)
    table = torch.randn(2 ** (p * bits), p, generator=g)
    pairs = pair_table(table, bits, p, half)
    assert pairs.dtype == torch.int32 and pairs.shape == (2 ** (2 * bits),)
    unpack = lambda bits16: bits16.to(torch.int16).view(half).to(torch.float32)  # noqa: E731
    first, second = unpack(pairs & 0xFFFF), unpack((pairs >> 16) & 0xFFFF)
    planes = PLANES[p * bits]
    units = torch.arange(2 ** (2 * bits))
    if p == 1:  # two scalar codes; a pair code is its plane-0 bits (2 * w0), then its plane-1 bits (2 * w1)
        w0, w1 = planes[0], planes[1] if len(planes) > 1 else 0
        lo, hi = units % 2 ** (2 * w0), units // 2 ** (2 * w0)
        code = [(lo // 2 ** (t * w0)) % 2**w0 + ((hi // 2 ** (t * w1)) % 2**w1) * 2**w0 for t in (0, 1)]
        want_first, want_second = table[code[0], 0], table[code[1], 0]
    else:  # one 2-dim code whose bits are the pair's bits
        want_first, want_second = table[units, 0], table[units, 1]
    torch.testing.assert_close(first, want_first.to(half).float(), rtol=0, atol=0)
    torch.testing.assert_close(second, want_second.to(half).float(), rtol=0, atol=0)
    assert pair_table(table, bits, p, half) is pairs  # cached per table tensor
    table.add_(1.0)  # an in-place change bumps the version: rebuilt
    assert pair_table(table, bits, p, half) is not pairs


@pytest.mark.parametrize("bits,p,group,k", [(4, 1, 64, 1024), (4, 2, 128, 1024), (4, 1, 128, 700)])
def test_every_gemv_config_of_one_byte_pairs_matches_reference(bits, p, group, k):
    """The M = 1 refinements (several groups per step, one split activation load) on every config that keeps
    them, with a bias, fp16 (the interpreter's half type)."""
    _, pk = _packed(11 + bits + p, 37, k, bits, p, group, 0)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5)).half()
    args = list(pk.op_args())
    args[4] = torch.randn(37, generator=torch.Generator().manual_seed(6)).half()
    expected = lut_linear_reference(x, *args).float()
    refined = [c for c in configs_for(1, pk.padded_in_features, p, group, bits, torch.float16) if "BLOCK_G" in c.meta]
    assert refined and not [c for c in configs_for(2, pk.padded_in_features, p, group, bits, torch.float16)
                            if "BLOCK_G" in c.meta and c.meta["MODE"] == "pair"]
    for config in refined:
        actual = lut_linear_triton(x, *args, config=config).float()
        err = ((actual - expected).norm() / expected.norm()).item()
        assert err < 3e-3, (config.describe(), err)
    # split-K at M = 1: the last program of each tile reduced the partials and reset its arrival counter
    from transfigure.kernels.lut_gemm import _COUNTERS

    assert any(c.meta["SPLIT_K"] > 1 for c in refined)
    assert any(c.meta.get("NIBBLE") for c in refined) == ((bits, p) == (4, 1))
    assert any(c.meta.get("REGISTER") for c in refined) == ((bits, p) == (4, 1))
    assert int(_COUNTERS[x.device].abs().sum()) == 0


def _every_config_of_mode_matches_reference(mode, seed, m, n, k, bits, p, group, bias_seed):
    """Every candidate config of kernel ``mode`` (fp16 activations and bias, the interpreter's half type) equals
    the reference; at least one of them splits K. Returns the packed weight."""
    _, pk = _packed(seed, n, k, bits, p, group, 0)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
    args = list(pk.op_args())
    args[4] = torch.randn(n, generator=torch.Generator().manual_seed(bias_seed)).half()
    expected = lut_linear_reference(x, *args).float()
    configs = [c for c in configs_for(m, pk.padded_in_features, p, group, bits, torch.float16)
               if c.meta.get("MODE") == mode]
    assert configs and any(c.meta["SPLIT_K"] > 1 for c in configs)
    for config in configs:
        actual = lut_linear_triton(x, *args, config=config).float()
        err = ((actual - expected).norm() / expected.norm()).item()
        assert err < 3e-3, (config.describe(), err)
    return pk


@pytest.mark.parametrize("m,group,k", [(2, 64, 1024), (5, 128, 700), (16, 128, 512), (40, 64, 256)])
def test_every_register_mm_config_matches_reference(m, group, k):
    """The small-M register-table kernel (4-bit scalar codes, tensor-core dot), every config that keeps it,
    with a bias and split-K, fp16 (the interpreter's half type)."""
    pk = _every_config_of_mode_matches_reference("register_mm", 7 + m, m, 45, k, 4, 1, group, bias_seed=9)
    assert not [c for c in configs_for(m, pk.padded_in_features, 1, group, 3, torch.float16)
                if c.meta.get("MODE") == "register_mm"]  # 4-bit scalar codes only


def test_no_register_configs_where_inline_ptx_cannot_run(monkeypatch):
    """On ROCm the register-table kernels (NVIDIA PTX) are never candidates, and bf16 keeps the other kernels."""
    monkeypatch.setattr(torch.version, "hip", "6.0")
    for m in (1, 4, 16):
        candidates = configs_for(m, 1024, 1, 128, 4, torch.bfloat16)
        assert candidates and not [c for c in candidates
                                   if c.meta.get("REGISTER") or c.meta.get("MODE") in ("register_mm", "mma")]
    monkeypatch.setattr(torch.version, "hip", None)
    assert all(c.meta.get("REGISTER") or c.meta.get("MODE") == "mma" for c in configs_for(1, 1024, 1, 128, 4, torch.bfloat16))


@pytest.mark.parametrize("m,group,k,n,bits,p", [(1, 64, 1024, 45, 4, 1), (3, 128, 1000, 40, 4, 1),
                                                 (9, 256, 512, 33, 4, 1), (16, 128, 512, 70, 4, 1),
                                                 (1, 128, 1024, 50, 2, 1), (5, 64, 512, 20, 2, 2), (2, 128, 512, 36, 4, 2),
                                                 (1, 64, 1024, 45, 3, 1), (4, 128, 700, 40, 3, 1), (13, 256, 512, 33, 3, 1)])
def test_every_mma_config_matches_reference(m, group, k, n, bits, p):
    """The tensor-core decode kernel (``_lut_mma_gemv_kernel``, its EMULATE path here), every config the tuner
    would try, with a bias, split-K, persistent programs (one SM on the CPU), row counts that leave warps
    partly empty and M past one block of 8 x rows; 4-bit, 3-bit (two bit-planes) and 2-bit codes, scalar and
    2-dim."""
    _every_config_of_mode_matches_reference("mma", 11 + m, m, n, k, bits, p, group, bias_seed=5)
    from transfigure.kernels.lut_gemm import _COUNTERS

    assert int(_COUNTERS[torch.device("cpu")].abs().sum()) == 0  # every split-K tile counter is left at zero


@given(group=st.sampled_from([64, 128, 256]), m=st.integers(1, 16), n=st.integers(1, 70), k=st.integers(1, 600),
       bias=st.booleans(), which=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_three_bit_mma_matches_reference(group, m, n, k, bias, which, seed):
    """3-bit scalar codes (a 2-bit and a 1-bit plane) on the tensor-core kernel (EMULATE path), any shape, M up to
    16 and any of its configs: split-K, persistent programs, L2 hints, partly empty warps, two blocks of x rows."""
    _, pk = _packed(seed, n, k, 3, 1, group, 0)
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(m, k, generator=g) + 0.5).half() * torch.where(torch.rand(m, k, generator=g) < 0.5, -1, 1).half()
    args = list(pk.op_args())
    args[4] = torch.randn(n, generator=g).half() if bias else None
    expected = lut_linear_reference(x, *args).float()
    configs = [c for c in configs_for(m, pk.padded_in_features, 1, group, 3, torch.float16)
               if c.meta.get("MODE") == "mma"]
    assert configs and all(c.meta.get("LOOKUP") == "shared" for c in configs)
    config = configs[which % len(configs)]
    actual = lut_linear_triton(x, *args, config=config).float()
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err < 3e-3, (config.describe(), err)


def test_mma_configs_only_where_the_kernel_applies():
    mma = lambda configs: [c for c in configs if c.meta.get("MODE") == "mma"]  # noqa: E731
    assert mma(configs_for(1, 1024, 1, 128, 4, torch.bfloat16)) and mma(configs_for(16, 1024, 1, 128, 4, torch.float16))
    assert not mma(configs_for(17, 1024, 1, 128, 4, torch.bfloat16))       # more than two blocks of x rows
    assert not mma(configs_for(1, 1024, 1, 128, 4, torch.float32))         # 16-bit activations only
    assert not mma(configs_for(1, 1024, 2, 128, 3, torch.bfloat16))        # 3-bit 2-dim codes: 4 + 2 bit-planes
    for bits, p in ((4, 2), (2, 1), (2, 2), (3, 1)):  # only the shared byte-table lookup decodes these
        configs = mma(configs_for(1, 1024, p, 128, bits, torch.bfloat16))
        assert configs and all(c.meta.get("LOOKUP") == "shared" for c in configs)
    assert not [c for c in mma(configs_for(1, 1024, 1, 256, 4, torch.bfloat16)) if c.meta["UNROLL"] > 1]


@pytest.mark.parametrize("bits,p", [(4, 1), (3, 1), (2, 2)])
def test_packing_in_row_blocks_equals_one_piece(monkeypatch, bits, p):
    """Large weights are packed a block of rows at a time (bounded temporaries): same codes and scales."""
    from transfigure.kernels import lut_format

    w = torch.randn(37, 300, generator=torch.Generator().manual_seed(bits)) * 0.02
    table = torch.randn(2 ** (bits * p), p, generator=torch.Generator().manual_seed(7))
    whole = lut_format.pack(w, table, bits=bits, p=p, group_size=64, hadamard_size=128, scale_search=5)
    monkeypatch.setattr(lut_format, "PACK_BLOCK_ELEMENTS", 5 * 384)  # 5 rows (K padded to 384) per block
    blocks = lut_format.pack(w, table, bits=bits, p=p, group_size=64, hadamard_size=128, scale_search=5)
    assert torch.equal(whole.codes, blocks.codes) and torch.equal(whole.scales, blocks.scales)
