import pytest
import torch

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
    """HIGGS p=2 (4.125 bits/weight) beats NF4 with abs-max groups of 64 (4.25 bits/weight).

    Scalar HIGGS (Lloyd-Max with RMS group scales) does NOT: abs-max scaling adapts to each group and NF4 g64
    measures 0.0084 vs 0.0093 here (see notes/issue-3.md); the test pins that fact too.
    """
    w = torch.randn(128, 1024, generator=torch.Generator().manual_seed(1))
    nf4 = get_grid("nf4", 4, 1)
    nf = pack(w, nf4.table, bits=4, group_size=64, hadamard_size=0, scale_mode="absmax")  # 4.25 bits
    higgs2 = pack(w, get_grid("higgs", 4, 2).table, bits=4, p=2, group_size=128, hadamard_size=1024)  # 4.125
    assert higgs2.bits_per_weight < nf.bits_per_weight
    assert _rel_mse(w, higgs2) < _rel_mse(w, nf)
    higgs1 = pack(w, get_grid("higgs", 4, 1).table, bits=4, group_size=128, hadamard_size=1024)
    assert _rel_mse(w, higgs2) < _rel_mse(w, higgs1) < 1.05 * LLOYD_MAX_MSE[4]


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
