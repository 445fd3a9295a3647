"""Quantization grids (codebooks) for LUT quantization.

* ``higgs``: MSE-optimal grids for a standard Gaussian with ``2**(p*bits)`` points in ``p`` dimensions
  (HIGGS, Malinovskii et al. 2024). ``p = 1`` is the Lloyd-Max scalar quantizer; ``p = 2`` quantizes pairs
  of weights jointly (lower MSE per weight at the same bits). Built by Lloyd's algorithm (k-means on
  Gaussian samples, fixed seed) in :func:`build_gaussian_grid`, shipped in ``transfigure/data/grids_higgs.json``
  with their MSE measured on held-out samples (``benchmarks/make_grids.py`` rebuilds the file). Used with
  RMS group scales (after a Hadamard rotation the group entries are close to N(0, rms^2)).
* ``nf4``: the 16-value NormalFloat-4 codebook of QLoRA / bitsandbytes, with abs-max group scales.
* ``uniform``: ``2**bits`` evenly spaced values on [-1, 1] with abs-max group scales (plain RTN).
* any user codebook: a sequence of ``2**(p*bits)`` numbers (or ``[n, p]`` points), abs-max scaled by default.

A lookup table makes every grid equally cheap at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources

import torch

LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}  # per unit variance, scalar Gaussian

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)

GRID_NAMES = ("higgs", "nf4", "uniform")


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    name: str
    table: torch.Tensor  # float32 [2**(p*bits), p]
    bits: int
    p: int
    scale_mode: str  # "rms" or "absmax"
    mse: float | None = None  # per-weight MSE on N(0,1) data with scale 1 (rms grids), if known


def _nearest_sq_dist(samples: torch.Tensor, centers: torch.Tensor, chunk: int = 1 << 16):
    if centers.shape[1] == 1:  # 1-D: sort + bucketize instead of all pairwise distances
        order = torch.argsort(centers[:, 0])
        sc = centers[order, 0]
        idx = order[torch.bucketize(samples[:, 0].contiguous(), (sc[1:] + sc[:-1]) / 2)]
        return idx, (samples[:, 0] - centers[idx, 0]).pow(2)
    c2 = (centers * centers).sum(1)
    idx = torch.empty(samples.shape[0], dtype=torch.int64)
    dist = torch.empty(samples.shape[0])
    for i in range(0, samples.shape[0], chunk):
        s = samples[i:i + chunk]
        d = c2[None, :] - 2 * s @ centers.T
        m, j = d.min(1)
        idx[i:i + chunk] = j
        dist[i:i + chunk] = m + (s * s).sum(1)
    return idx, dist.clamp(min=0)


def build_gaussian_grid(bits: int, p: int, *, n_samples: int = 1 << 20, iters: int = 100, seed: int = 0):
    """Lloyd's algorithm on ``n_samples`` standard-Gaussian ``p``-vectors: ``2**(p*bits)`` centers.

    Initialized with k-means++ style seeding from the samples (a product of scalar grids is a Lloyd fixed
    point, so it is NOT used as the start for p = 2). Returns ``(points [n, p] float32, sample MSE per weight)``.
    """
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(n_samples, p, generator=g, dtype=torch.float64).float()
    k = 2 ** (p * bits)
    if p == 1:
        # start from evenly spaced quantiles: Lloyd converges to the unique optimum in 1-D
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        centers = (torch.special.ndtri(q)).float()[:, None]
    else:
        first = torch.randint(0, n_samples, (1,), generator=g)
        centers = samples[first]
        pool = samples[torch.randint(0, n_samples, (min(n_samples, 1 << 14),), generator=g)]
        while centers.shape[0] < k:
            _, d = _nearest_sq_dist(pool, centers)
            pick = torch.multinomial(d / d.sum(), 1, generator=g)
            centers = torch.cat([centers, pool[pick]])
    for _ in range(iters):
        idx, _ = _nearest_sq_dist(samples, centers)
        sums = torch.zeros(k, p).index_add_(0, idx, samples)
        counts = torch.bincount(idx, minlength=k).clamp(min=1).float()
        centers = sums / counts[:, None]
    _, d = _nearest_sq_dist(samples, centers)
    return centers.contiguous(), float(d.mean() / p)


def grid_mse(table: torch.Tensor, *, n_samples: int = 1 << 18, seed: int = 12345) -> float:
    """Per-weight MSE of quantizing standard-Gaussian p-vectors to ``table`` (scale 1)."""
    p = table.shape[1]
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(n_samples, p, generator=g)
    _, d = _nearest_sq_dist(samples, table.to(torch.float32))
    return float(d.mean() / p)


@functools.lru_cache(maxsize=None)
def _shipped() -> dict:
    text = resources.files("transfigure").joinpath("data", "grids_higgs.json").read_text()
    return json.loads(text)


def higgs_grid(bits: int, p: int = 1) -> Grid:
    key = f"b{bits}_p{p}"
    data = _shipped()["grids"]
    if key not in data:
        raise ValueError(f"no shipped HIGGS grid for bits={bits}, p={p} (have {sorted(data)})")
    entry = data[key]
    table = torch.tensor(entry["points"], dtype=torch.float32).reshape(-1, p)
    return Grid("higgs", table, bits, p, "rms", entry["mse"])


def nf4_grid() -> Grid:
    return Grid("nf4", torch.tensor(NF4_VALUES, dtype=torch.float32)[:, None], 4, 1, "absmax")


def uniform_grid(bits: int) -> Grid:
    return Grid("uniform", torch.linspace(-1.0, 1.0, 2**bits, dtype=torch.float32)[:, None], bits, 1, "absmax")


def custom_grid(values, bits: int, p: int = 1, scale_mode: str = "absmax") -> Grid:
    table = torch.as_tensor(values, dtype=torch.float32).reshape(-1, p)
    if table.shape[0] != 2 ** (p * bits):
        raise ValueError(f"codebook has {table.shape[0]} points, expected 2**(p*bits) = {2 ** (p * bits)}")
    if not torch.isfinite(table).all():
        raise ValueError("codebook values must be finite")
    if scale_mode == "absmax":
        table = table / table.abs().max().clamp(min=1e-12)
    return Grid("custom", table.contiguous(), bits, p, scale_mode)


def get_grid(grid, bits: int, p: int = 1) -> Grid:
    """Resolve a grid name (``higgs``, ``nf4``, ``uniform``) or a user codebook to a :class:`Grid`."""
    if isinstance(grid, str):
        if grid == "higgs":
            return higgs_grid(bits, p)
        if grid == "nf4":
            if bits != 4 or p != 1:
                raise ValueError("the nf4 grid has 16 scalar values: it needs bits=4, p=1")
            return nf4_grid()
        if grid == "uniform":
            if p != 1:
                raise ValueError("the uniform grid is scalar: it needs p=1")
            return uniform_grid(bits)
        raise ValueError(f"unknown grid {grid!r}; choose one of {GRID_NAMES} or pass a codebook")
    return custom_grid(grid, bits, p)
