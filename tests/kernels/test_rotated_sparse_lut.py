import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels import lut_format
from transfigure.kernels import rotated_sparse_lut as rotated_module
from transfigure.kernels.autotune import Config
from transfigure.kernels.fwht import fwht_triton
from transfigure.kernels.rotated_sparse_lut import (
    MAX_FUSED_ROTATION,
    _rotated_sparse_lut_linear_cuda,
    compact_rotated,
    decode_layout,
    fuses_rotation,
    rotate_compact_triton,
    rotated_keep,
    rotated_sparse_gemv_triton,
    rotated_sparse_lut_linear,
    rotated_sparse_lut_linear_reference,
    rotated_sparsity,
    supports,
)

GAUSSIAN_HALF = 0.6745  # |N(0, 1)| median: tau for about 50% in the rotated basis


def _problem(n, k, group, h, dtype, seed, bias=True):
    generator = torch.Generator().manual_seed(seed)
    table = torch.sort(torch.randn(16, generator=generator))[0].reshape(16, 1)
    weight = torch.randn(n, k, generator=generator)
    packed = lut_format.pack(weight, table, bits=4, group_size=group, hadamard_size=h, signs_seed=seed)
    codes_t, scales_t = decode_layout(packed.codes, packed.scales)
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    x = torch.randn(1, k, generator=generator).to(dtype)
    return packed, codes_t, scales_t, b, x


def _rotated_weight(packed):
    return lut_format.dequantize(packed, "rotated").double()


@given(
    n=st.integers(1, 100),
    k=st.integers(1, 300),
    group=st.sampled_from([32, 64, 128]),
    h=st.sampled_from([32, 64, 128, 256]),
    tau=st.sampled_from([0.0, 0.5, GAUSSIAN_HALF, 1.2]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    split=st.sampled_from([1, 2, 4]),
    mode=st.sampled_from(["gather", "register", "mma"]),
    scale_each=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemv_over_compacted_rows_matches_reference(n, k, group, h, tau, dtype, split, mode, scale_each, bias, seed):
    if mode == "mma":  # its interpreter emulation walks entries one by one: keep the problem small
        n, k = min(n, 64), min(k, 96)
    packed, codes_t, scales_t, b, x = _problem(n, k, group, h, dtype, seed, bias)
    kp = packed.scales.shape[1] * group
    z = lut_format.rotate_input(x, packed.signs, h, kp)
    vals, idx, counts = compact_rotated(z, tau, h, group)
    kept = torch.zeros(kp, dtype=torch.bool)
    for g, c in enumerate(counts.tolist()):
        kept[idx[g * group: g * group + c].long()] = True
        # after the survivors: the group's other inputs, value 0 (steps past the count read them unmasked)
        tail = idx[g * group + c: (g + 1) * group].long()
        assert torch.equal(torch.sort(torch.cat([idx[g * group: g * group + c].long(), tail]))[0],
                           torch.arange(g * group, (g + 1) * group))
        assert not vals[g * group + c: (g + 1) * group].any()
    assert torch.equal(kept, rotated_keep(z, tau, h).reshape(-1))
    if mode == "mma":  # the tensor-core kernel (emulated lane by lane in the interpreter), 16-bit activations
        dtype = torch.float16
        config = Config({"MODE": "mma", "SPLIT_K": split, "UNROLL": 1 + split % 3}, 2, 1)
        dtype_tol = 2e-3
    else:
        register = mode == "register" and dtype == torch.float16
        config = Config({"BLOCK_NB": 32 if split == 1 else 64, "BLOCK_K": 16, "SPLIT_K": split,
                         "REGISTER": int(register), "SCALE_EACH": int(scale_each)}, 4, 1)
        # the register table holds fp16-rounded grid values; gathers use the fp32 grid
        dtype_tol = 1e-5 if dtype == torch.float32 else (2e-3 if register else 1e-3)
    actual = rotated_sparse_gemv_triton(vals, idx, counts, codes_t, scales_t, packed.table, b, group, dtype, n,
                                        config=config)
    z_kept = torch.where(kept, z.reshape(-1).double(), 0.0)
    expected = z_kept @ _rotated_weight(packed).T + (b.double() if b is not None else 0.0)
    assert actual.shape == (1, n) and actual.dtype == dtype
    scale = expected.abs().max().item() + 1.0
    assert (actual.double().reshape(-1) - expected).abs().max().item() <= dtype_tol * scale


def test_dropped_rows_are_not_read():
    packed, codes_t, scales_t, b, x = _problem(64, 256, 64, 128, torch.float32, 3)
    z = lut_format.rotate_input(x, packed.signs, 128, 256)
    keep = rotated_keep(z, GAUSSIAN_HALF, 128).reshape(-1)
    assert 0.3 < 1 - keep.float().mean().item() < 0.7
    vals, idx, counts = compact_rotated(z, GAUSSIAN_HALF, 128, 64)
    config = Config({"BLOCK_NB": 32, "BLOCK_K": 16, "SPLIT_K": 2, "REGISTER": 0}, 4, 1)
    clean = rotated_sparse_gemv_triton(vals, idx, counts, codes_t, scales_t, packed.table, b, 64, torch.float32, 64,
                                       config=config)
    poisoned = codes_t.clone()
    poisoned[~keep] = torch.randint(0, 256, (int((~keep).sum()), codes_t.shape[1]), dtype=torch.uint8)
    dirty = rotated_sparse_gemv_triton(vals, idx, counts, poisoned, scales_t, packed.table, b, 64, torch.float32, 64,
                                       config=config)
    assert torch.equal(clean, dirty)
    poisoned[keep.nonzero()[0]] ^= 0x11  # a kept row IS read
    assert not torch.equal(clean, rotated_sparse_gemv_triton(vals, idx, counts, poisoned, scales_t, packed.table, b,
                                                             64, torch.float32, 64, config=config))


@pytest.mark.parametrize("m,sparse_prefill", [(1, True), (3, True), (12, True), (12, False)])
def test_op_paths_match_the_reference(m, sparse_prefill):
    """The launcher the op runs on CUDA (here through the interpreter): one token -> compaction + sparse GEMV,
    more -> rotated threshold + dense LUT GEMV (none above 8 tokens with ``sparse_prefill=False``)."""
    packed, codes_t, scales_t, b, _ = _problem(80, 200, 64, 64, torch.float32, 7)
    x = torch.randn(m, 200)
    args = (packed.codes, packed.scales, packed.table, packed.signs, b, codes_t, scales_t, 4, 64, 64, 200,
            GAUSSIAN_HALF, sparse_prefill)
    expected = rotated_sparse_lut_linear_reference(x, *args)
    actual = _rotated_sparse_lut_linear_cuda(x, *args)
    assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4)
    if m > 8 and not sparse_prefill:  # dense prefill: exactly the rotated LUT linear
        dense = x.double() @ lut_format.dequantize(packed, "original").double()[:, :200].T + b.double()
        assert torch.allclose(actual.double(), dense, atol=1e-3)


@given(
    h=st.sampled_from([256, 512, 1024]),
    group=st.sampled_from([64, 128, 256]),
    blocks=st.integers(1, 2),
    pad=st.integers(0, 255),
    signed=st.booleans(),
    tau=st.sampled_from([0.0, 0.5, GAUSSIAN_HALF, 1.2]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_fused_rotation_compacts_exactly_what_the_two_launches_do(h, group, blocks, pad, signed, tau, dtype, seed):
    """One launch (pad, signs, FWHT, compaction) against the FWHT kernel ``prepare_input`` launches on CUDA
    followed by ``_compact_kernel``: the same z, rounded alike, so the same survivors, values, order and counts.
    The token is a prefix of a longer nonzero buffer: inputs past ``in_features`` must read as padding."""
    kp = blocks * h
    k = kp - pad
    generator = torch.Generator().manual_seed(seed)
    heavy = torch.randn(1, kp, generator=generator) * torch.rand(1, kp, generator=generator).pow(3) * 4 + 0.01
    x = heavy.to(dtype)[:, :k]
    signs = lut_format.random_signs(kp, seed) if signed else None
    assert fuses_rotation(h, group)
    fused = rotate_compact_triton(x, signs, tau, h, group, kp, k)
    z = fwht_triton(torch.nn.functional.pad(x, (0, kp - k)), signs, h, 1.0 / math.sqrt(h))
    separate = compact_rotated(z, tau, h, group)
    for name, a, b in zip(("values", "indices", "counts"), fused, separate):
        assert torch.equal(a, b), name


def test_fused_rotation_covers_only_whole_kronecker_blocks():
    assert fuses_rotation(256, 256) and fuses_rotation(MAX_FUSED_ROTATION, 64)
    assert not fuses_rotation(128, 64)  # below the two-factor range: the FWHT's tile kernel
    assert not fuses_rotation(256, 512)  # a slice of several blocks
    assert not fuses_rotation(2 * MAX_FUSED_ROTATION, 128)
    with pytest.raises(ValueError):
        rotate_compact_triton(torch.randn(1, 128), None, GAUSSIAN_HALF, 128, 64, 128, 128)


@pytest.mark.parametrize("h,group,k,dtype", [(256, 64, 200, torch.float32), (512, 128, 1000, torch.float32),
                                             (256, 256, 256, torch.float16), (1024, 64, 700, torch.float16)])
@pytest.mark.parametrize("signed", [True, False])
def test_one_token_op_runs_the_fused_rotation_and_matches_the_reference(h, group, k, dtype, signed, monkeypatch):
    """The one-token CUDA launcher (interpreter here) takes the fused kernel where it applies, padding included,
    and its output is the reference's."""
    packed = lut_format.pack(torch.randn(72, k), torch.sort(torch.randn(16))[0].reshape(16, 1), bits=4,
                             group_size=group, hadamard_size=h, signs_seed=5 if signed else None)
    codes_t, scales_t = decode_layout(packed.codes, packed.scales)
    b = torch.randn(72).to(dtype)
    x = (torch.randn(1, k) * torch.rand(1, k).pow(3) * 4).to(dtype)
    calls = []
    fused = rotated_module.rotate_compact_triton
    monkeypatch.setattr(rotated_module, "rotate_compact_triton", lambda *a: calls.append(a) or fused(*a))
    args = (packed.codes, packed.scales, packed.table, packed.signs, b, codes_t, scales_t, 4, group, h, k,
            GAUSSIAN_HALF, True)
    actual = _rotated_sparse_lut_linear_cuda(x, *args)
    expected = rotated_sparse_lut_linear_reference(x, *args)
    assert len(calls) == 1 and actual.shape == (1, 72) and actual.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    scale = expected.abs().max().item() + 1.0
    assert (actual.double() - expected.double()).abs().max().item() <= tol * scale


def test_op_compiles_and_its_gradient_is_the_masked_one():
    packed, codes_t, scales_t, b, _ = _problem(48, 128, 64, 128, torch.float32, 11)
    args = (packed.codes, packed.scales, packed.table, packed.signs, b, codes_t, scales_t, 4, 64, 128, 128,
            GAUSSIAN_HALF, True)
    x = torch.randn(2, 3, 128, requires_grad=True)
    fn = torch.compile(lambda x: rotated_sparse_lut_linear(x, *args), backend="aot_eager", fullgraph=True)
    y = fn(x)
    assert y.shape == (2, 3, 48)
    grad = torch.randn_like(y)
    (actual,) = torch.autograd.grad(y, x, grad)
    # by hand: z = R x, y = (keep * z) W_r^T + b  =>  dx = R^T (keep * (grad W_r))
    xd = x.detach().double()
    z = lut_format.rotate_input(xd, packed.signs.double(), 128, 128)
    keep = rotated_keep(z, GAUSSIAN_HALF, 128)
    gz = torch.where(keep, grad.double() @ _rotated_weight(packed), 0.0)
    expected = lut_format.rotate_input(gz, None, 128, 128) * packed.signs.double()  # H symmetric: R^T = D H / sqrt(h)
    assert torch.allclose(actual.double(), expected, atol=1e-4)


def test_tau_sets_the_sparsity_whatever_the_token_norm():
    """The threshold is relative to the block's RMS, so scaling a token does not change what is dropped; and
    after a random-sign Hadamard transform a heavy-tailed block is close to Gaussian (tau = 0.6745: about half).
    Blocks whose energy sits in a few outlier channels are not (the rotated values take few distinct
    magnitudes): that is why tau is calibrated per input rather than fixed."""
    x = torch.distributions.StudentT(3.0).sample((64, 512))
    signs = lut_format.random_signs(512, 0)
    scaled = x * torch.logspace(-2, 2, 64)[:, None]
    z, z_scaled = (lut_format.rotate_input(t, signs, 512, 512) for t in (x, scaled))
    assert torch.equal(rotated_keep(z, GAUSSIAN_HALF, 512), rotated_keep(z_scaled, GAUSSIAN_HALF, 512))
    assert abs(rotated_sparsity(x, signs, 512, GAUSSIAN_HALF) - 0.5) < 0.03
    outliers = x.clone()
    outliers[:, :4] *= 30.0
    assert abs(rotated_sparsity(outliers, signs, 512, GAUSSIAN_HALF) - 0.5) > 0.03


def test_supports():
    assert supports(4, 1, 128, 512) and not supports(4, 1, 128, 0) and not supports(3, 1, 128, 512)
    assert not supports(4, 2, 128, 512) and not supports(4, 1, 128, 16384)


def test_tensor_core_configs_never_have_warps_without_a_tile():
    """Each warp of the tensor-core GEMV owns one unmasked 64-output tile: with 2 tiles (N = 128) a program of
    4 or 8 warps would read past the codes (an illegal address found on the H100), so those are pruned."""
    from transfigure.kernels import rotated_sparse_lut as rsl

    scales_tm = torch.ones(4, 128, dtype=torch.float16)  # 4 groups, 128 padded outputs = 2 tiles
    args = (None, None, None, None, scales_tm, None, None, 128, torch.bfloat16, 128)
    kept = rsl._prune(rsl._configs(), args)
    mma = [c for c in kept if c.meta.get("MODE") == "mma"]
    assert mma and {c.num_warps for c in mma} == {2}
    wide = rsl._prune(rsl._configs(), (None, None, None, None, torch.ones(4, 1024, dtype=torch.float16), None, None,
                                       128, torch.bfloat16, 1024))
    assert {c.num_warps for c in wide if c.meta.get("MODE") == "mma"} == {2, 4, 8}


def test_gpu_tuning_of_16_bit_tokens_considers_only_the_tensor_core_kernel(monkeypatch):
    """On the GPU the tensor-core GEMV won every tuned shape, so 16-bit tokens tune only its configs (the
    CUDA-core ones tripled the first decode step's tuning); fp32 tokens, which it cannot take, keep the rest."""
    from transfigure.kernels import rotated_sparse_lut as rsl

    monkeypatch.setattr(rsl, "interpreter_mode", lambda: False)
    scales_tm = torch.ones(16, 1024, dtype=torch.float16)
    for half, modes in ((torch.bfloat16, {"mma"}), (torch.float16, {"mma"}), (torch.float32, {None})):
        kept = rsl._prune(rsl._configs(), (None, None, None, None, scales_tm, None, None, 128, half, 1024))
        assert kept and {c.meta.get("MODE") for c in kept} == modes, half
