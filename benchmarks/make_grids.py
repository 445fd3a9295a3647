"""Rebuild transfigure/data/grids_higgs.json: Lloyd-optimal Gaussian grids for bits 1-4, p = 1 and 2.

    python benchmarks/make_grids.py

Deterministic (fixed seeds). The MSE stored with each grid is measured on 2**20 held-out samples.
"""

import json
import time
from pathlib import Path

import torch

from transfigure.kernels.grids import LLOYD_MAX_MSE, build_gaussian_grid, grid_mse

OUT = Path(__file__).resolve().parents[1] / "transfigure" / "data" / "grids_higgs.json"


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    grids = {}
    for p in (1, 2):
        for bits in (1, 2, 3, 4):
            start = time.time()
            n = 1 << 21 if p == 1 else 1 << 18
            iters = 150 if p == 1 else 40
            points, train_mse = build_gaussian_grid(bits, p, n_samples=n, iters=iters, seed=bits * 10 + p)
            mse = grid_mse(points, n_samples=1 << 19, seed=999)
            grids[f"b{bits}_p{p}"] = {"bits": bits, "p": p, "mse": round(mse, 6), "train_mse": round(train_mse, 6),
                                      "points": [[round(v, 6) for v in row] for row in points.tolist()]}
            ref = LLOYD_MAX_MSE[bits]
            print(f"bits={bits} p={p}: mse {mse:.6f} (Lloyd-Max scalar {ref}, ratio {mse / ref:.3f}) "
                  f"{time.time() - start:.1f}s", flush=True)
    doc = {"description": "MSE-optimal grids for N(0, I_p), Lloyd's algorithm on Gaussian samples "
                          "(benchmarks/make_grids.py); mse = per-weight MSE on held-out samples, unit variance.",
           "grids": grids}
    OUT.write_text(json.dumps(doc, indent=1))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
