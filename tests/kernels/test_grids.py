import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transfigure.kernels.grids import LLOYD_MAX_MSE, build_gaussian_grid, custom_grid, get_grid, grid_mse
from transfigure.kernels.lut_format import dequantize, pack


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scalar_grids_match_lloyd_max(bits):
    grid = get_grid("higgs", bits, 1)
    assert grid.table.shape == (2**bits, 1)
    mse = grid_mse(grid.table, n_samples=1 << 18, seed=7)
    assert abs(mse / LLOYD_MAX_MSE[bits] - 1) < 0.02
    assert abs(grid.mse / LLOYD_MAX_MSE[bits] - 1) < 0.02


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_vector_grids_beat_scalar(bits):
    g1, g2 = get_grid("higgs", bits, 1), get_grid("higgs", bits, 2)
    assert g2.table.shape == (2 ** (2 * bits), 2)
    m1 = grid_mse(g1.table, n_samples=1 << 17, seed=3)
    m2 = grid_mse(g2.table, n_samples=1 << 17, seed=3)
    assert m2 < m1
    assert abs(m2 / g2.mse - 1) < 0.03  # the shipped number is what one measures


def test_lloyd_builder_converges():
    points, mse = build_gaussian_grid(2, 1, n_samples=1 << 16, iters=40, seed=1)
    assert abs(mse / LLOYD_MAX_MSE[2] - 1) < 0.03
    assert torch.allclose(points[:, 0].sort().values.abs(), torch.tensor([1.510, 0.4528, 0.4528, 1.510]), atol=0.03)


def _rel_mse(w, packed):
    return float((dequantize(packed) - w).pow(2).sum() / w.pow(2).sum())


def test_hadamard_lowers_error_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((128, 512))
    w[:, torch.randperm(512, generator=g)[:8]] *= 10  # outlier input channels
    table = get_grid("higgs", 4, 1).table
    plain = _rel_mse(w, pack(w, table, bits=4, group_size=128, hadamard_size=0))
    rotated = _rel_mse(w, pack(w, table, bits=4, group_size=128, hadamard_size=512))
    assert rotated < 0.5 * plain
    assert rotated < 1.5 * LLOYD_MAX_MSE[4]  # after rotation the grid's Gaussian MSE is what one gets


def test_higgs_beats_nf4_at_fewer_bits():
    """HIGGS at 4.125 bits/weight (g128) beats NF4 with abs-max groups of 64 (4.25 bits/weight): p=2 always;
    scalar HIGGS only with the MSE-optimal group scale search (with plain RMS scales it measures 0.0093 vs
    NF4's 0.0084: abs-max adapts to each group, an RMS estimate from 128 weights is noisy; the search fixes it)."""
    w = torch.randn(128, 1024, generator=torch.Generator().manual_seed(1))
    nf4 = get_grid("nf4", 4, 1)
    nf = pack(w, nf4.table, bits=4, group_size=64, hadamard_size=0, scale_mode="absmax")  # 4.25 bits
    higgs2 = pack(w, get_grid("higgs", 4, 2).table, bits=4, p=2, group_size=128, hadamard_size=1024)  # 4.125
    assert higgs2.bits_per_weight < nf.bits_per_weight
    assert _rel_mse(w, higgs2) < _rel_mse(w, nf)
    table1 = get_grid("higgs", 4, 1).table
    higgs1 = pack(w, table1, bits=4, group_size=128, hadamard_size=1024)
    assert _rel_mse(w, higgs2) < _rel_mse(w, higgs1) < 1.05 * LLOYD_MAX_MSE[4]
    assert _rel_mse(w, higgs1) > _rel_mse(w, nf)  # plain RMS scales: NF4 g64 wins
    searched = pack(w, table1, bits=4, group_size=128, hadamard_size=1024, scale_search=17)
    assert searched.bits_per_weight < nf.bits_per_weight
    assert _rel_mse(w, searched) < 0.95 * _rel_mse(w, nf)


@given(grid=st.sampled_from([("higgs", 2, 1), ("higgs", 3, 1), ("higgs", 4, 1), ("higgs", 3, 2), ("nf4", 4, 1),
                             ("uniform", 3, 1)]),
       group=st.sampled_from([64, 128]), heavy=st.booleans(), seed=st.integers(0, 2**16))
def test_scale_search_never_loses_to_the_plain_scale(grid, group, heavy, seed):
    name, bits, p = grid
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 256, generator=gen)
    if heavy:  # Student-t with 3 degrees of freedom: normal / sqrt(chi2_3 / 3)
        w = w / (torch.randn(3, 16, 256, generator=gen).pow(2).sum(0) / 3).sqrt()
    g = get_grid(name, bits, p)
    plain = pack(w, g.table, bits=bits, p=p, group_size=group, hadamard_size=0, scale_mode=g.scale_mode)
    searched = pack(w, g.table, bits=bits, p=p, group_size=group, hadamard_size=0, scale_mode=g.scale_mode,
                    scale_search=9)
    # 1x is a candidate, so per group the search can only match or beat it (up to fp16 rounding of the scale)
    assert _rel_mse(w, searched) <= _rel_mse(w, plain) * (1 + 1e-3)


def test_uniform_and_custom_grids():
    u = get_grid("uniform", 3)
    assert u.table.shape == (8, 1) and u.scale_mode == "absmax" and float(u.table.abs().max()) == 1.0
    c = custom_grid([-4, -2, 2, 4], bits=2)
    assert torch.equal(c.table[:, 0], torch.tensor([-1.0, -0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="2\\*\\*\\(p\\*bits\\)"):
        custom_grid([1, 2, 3], bits=2)
    with pytest.raises(ValueError, match="nf4"):
        get_grid("nf4", 3)
    with pytest.raises(ValueError, match="unknown grid"):
        get_grid("int4", 4)
