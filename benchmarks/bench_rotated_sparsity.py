"""GPU benchmark: activation sparsity in the rotated basis of 4-bit LUT linears (issues 4 and 9).

    PYTHONPATH=. python benchmarks/bench_rotated_sparsity.py --out DIR     # on the GPU
    python benchmarks/bench_rotated_sparsity.py --plot DIR/rotated_sparsity.json

For Llama-3-8B and Llama-3.2-1B linear shapes (q/k/v and gate/up as the fused stacks the passes build), one
token, bf16, 4-bit HIGGS codes, group 128, Hadamard 512, per-call times of calls run back to back in one CUDA graph
over weight copies that exceed the L2 cache (``autotune.time_per_call``: weights come from HBM, as in a decode step):
cuBLAS bf16 ``F.linear``; the dense rotated LUT linear (``transfigure::lut_linear``: FWHT + tensor-core GEMV);
``transfigure::rotated_sparse_lut_linear`` at 0 / 40 / 50 / 60 % (tau = the Gaussian quantile; the input is
Gaussian, so the rotated blocks are too) and its parts at 50 % (FWHT, + compaction, the fused rotation + compaction one token takes, the GEMV alone).
Correctness: relative L2 error against the op's fp32 reference. Writes rotated_sparsity.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparsity import rel_err  # noqa: E402

from transfigure.bench import pyplot  # noqa: E402

SHAPES = {"8B qkv 6144x4096": (6144, 4096), "8B o 4096x4096": (4096, 4096),
          "8B gate/up 28672x4096": (28672, 4096), "8B down 4096x14336": (4096, 14336),
          "1B qkv 3072x2048": (3072, 2048), "1B o 2048x2048": (2048, 2048),
          "1B gate/up 16384x2048": (16384, 2048), "1B down 2048x8192": (2048, 8192)}
LEVELS = (0.0, 0.4, 0.5, 0.6)


def gaussian_tau(sparsity: float) -> float:
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(sparsity, dtype=torch.float64)).item()


def run(out_dir: Path, families: bool = False) -> dict:
    from transfigure.kernels import lut_gemm  # noqa: F401  (registers the ops)
    from transfigure.kernels.grids import higgs_grid
    from transfigure.kernels.lut_format import pack
    from transfigure.kernels.lut_gemm import prepare_input
    from transfigure.kernels.autotune import copies_beyond_l2, time_per_call
    from transfigure.kernels.rotated_sparse_lut import (compact_rotated, decode_layout, fuses_rotation,
                                                        rotate_compact_triton, rotated_sparse_gemv,
                                                        rotated_sparse_lut_linear_reference)

    torch.manual_seed(0)
    device = torch.device("cuda")
    table = higgs_grid(4).table.to(device)
    rows, checks = [], []
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device=device) / k**0.5
        packed = pack(weight, table, bits=4, group_size=128, hadamard_size=512, signs_seed=0)
        codes_t, scales_t = decode_layout(packed.codes, packed.scales)
        w16 = weight.to(torch.bfloat16)
        del weight
        # weight copies beyond the L2 cache, timed back to back in one graph: every call reads its weights from HBM
        copies = [{"packed": packed, "codes_t": codes_t, "scales_t": scales_t, "w16": w16}]
        for _ in range(copies_beyond_l2(packed.codes.numel() * packed.codes.element_size()) - 1):
            copies.append({"packed": replace(packed, codes=packed.codes.clone(), scales=packed.scales.clone()),
                           "codes_t": codes_t.clone(), "scales_t": scales_t.clone()})
        dense16 = [w16] + [w16.clone() for _ in range(copies_beyond_l2(w16.numel() * 2) - 1)]

        def hbm_us(call, over=copies):
            return 1e3 * time_per_call([lambda c=c: call(c) for c in over], rep=50)

        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)

        def dense_args(c):
            q = c["packed"]
            return (q.codes, q.scales, q.table, q.signs, None, 4, 1, 128, 512, k)

        def sparse_args(c, tau):
            q = c["packed"]
            return (q.codes, q.scales, q.table, q.signs, None, c["codes_t"], c["scales_t"], 4, 128, 512, k, tau, True)

        row = {"shape": name, "n": n, "k": k, "weight_copies": len(copies)}
        row["cublas_us"] = hbm_us(lambda w: F.linear(x, w), dense16)
        row["lut4_us"] = hbm_us(lambda c: torch.ops.transfigure.lut_linear(x, *dense_args(c)))
        for level in LEVELS:
            tau = gaussian_tau(level)
            args = sparse_args(copies[0], tau)
            y = torch.ops.transfigure.rotated_sparse_lut_linear(x, *args)
            reference = rotated_sparse_lut_linear_reference(x, *args)  # z rounded to bf16 as the FWHT kernel does
            kept = compact_rotated(prepare_input(x, packed.signs, 512, k), tau, 512, 128)[2].sum().item() / k
            checks.append({"shape": name, "sparsity": level, "rel_err": rel_err(y, reference), "measured": 1 - kept})
            row[f"rot_{int(level * 100)}_us"] = hbm_us(
                lambda c, tau=tau: torch.ops.transfigure.rotated_sparse_lut_linear(x, *sparse_args(c, tau)))
        tau = gaussian_tau(0.5)
        # the rotation and compaction read only the token: no weight copies
        one = copies[:1]
        row["fwht_us"] = hbm_us(lambda c: prepare_input(x, packed.signs, 512, k), one)
        row["fwht_compact_us"] = hbm_us(
            lambda c: compact_rotated(prepare_input(x, packed.signs, 512, k), tau, 512, 128), one)
        if fuses_rotation(512, 128):
            fused = rotate_compact_triton(x, packed.signs, tau, 512, 128, k, k)
            unfused = compact_rotated(prepare_input(x, packed.signs, 512, k), tau, 512, 128)
            checks.append({"shape": name, "sparsity": 0.5, "measured": 1 - fused[2].sum().item() / k,
                           "rel_err": float(not all(torch.equal(a, b) for a, b in zip(fused, unfused))),
                           "what": "fused rotation + compaction vs FWHT then compaction (1 = not bit-identical)"})
            row["rotate_compact_us"] = hbm_us(lambda c: rotate_compact_triton(x, packed.signs, tau, 512, 128, k, k), one)
        vals, idx, counts = compact_rotated(prepare_input(x, packed.signs, 512, k), tau, 512, 128)
        row["gemv50_us"] = hbm_us(lambda c: rotated_sparse_gemv(vals, idx, counts, c["codes_t"], c["scales_t"],
                                                                packed.table, None, 128, torch.bfloat16, n))
        from transfigure.kernels.autotune import Config
        from transfigure.kernels.rotated_sparse_lut import _configs, _tuner

        row["config"] = _tuner.best_config(vals, idx, counts, codes_t, scales_t, packed.table.float(), None, 128,
                                           torch.bfloat16, n).describe()
        # the best of each kernel family at 50% (GEMV alone), to see what the tensor cores buy: every config timed
        # (~80 s a shape), so only with --families
        for family, keep in (("mma", lambda c: c.meta.get("MODE") == "mma"),
                             ("cuda_core", lambda c: c.meta.get("MODE") != "mma")) if families else ():
            best = None
            for config in (c for c in _configs() if keep(c) and c.meta["SPLIT_K"] <= k // 128):
                try:
                    t = hbm_us(lambda c, config=config: rotated_sparse_gemv(
                        vals, idx, counts, c["codes_t"], c["scales_t"], packed.table, None, 128, torch.bfloat16, n,
                        config=config))
                except Exception as error:  # a config that fails to compile or launch is reported, not fatal
                    print(f"{name} {config.describe()}: {type(error).__name__}: {error}"[:300], flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, config.describe())
            row[f"gemv50_{family}_us"], row[f"gemv50_{family}_config"] = best if best else (float("nan"), "-")
        if "mma" in row["config"]:
            y_mma = rotated_sparse_gemv(vals, idx, counts, codes_t, scales_t, packed.table, None, 128, torch.bfloat16, n)
        else:
            y_mma = rotated_sparse_gemv(vals, idx, counts, codes_t, scales_t, packed.table, None, 128, torch.bfloat16, n,
                                        config=Config({"MODE": "mma", "SPLIT_K": 4}, 4, 1))
        y_core = rotated_sparse_gemv(vals, idx, counts, codes_t, scales_t, packed.table, None, 128, torch.bfloat16, n,
                                     config=Config({"BLOCK_NB": 128, "BLOCK_K": 16, "SPLIT_K": 4, "REGISTER": 0}, 4, 2))
        checks.append({"shape": name, "sparsity": 0.5, "rel_err": rel_err(y_mma, y_core), "measured": float("nan"),
                       "what": "mma vs CUDA-core GEMV"})
        rows.append(row)
        print(json.dumps(row), flush=True)
        _save(out_dir, rows, checks)
        del packed, codes_t, scales_t, w16, copies, dense16
        torch.cuda.empty_cache()
    return _save(out_dir, rows, checks)


def _save(out_dir: Path, rows: list, checks: list) -> dict:
    """Written after every shape: a run cut short keeps the shapes it finished."""
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rows": rows, "checks": checks}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rotated_sparsity.json").write_text(json.dumps(result, indent=1))
    (out_dir / "rotated_sparsity.md").write_text(markdown(result))
    plot(result, out_dir / "rotated_sparsity.png")
    return result


def markdown(result: dict) -> str:
    lines = ["# Activation sparsity in the rotated basis of 4-bit LUT linears", "",
             f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']}. One token, bf16, "
             "4-bit HIGGS codes g128, Hadamard 512; us per call, calls back to back in one CUDA graph over weight copies "
             "beyond L2 (weights from HBM); x = cuBLAS bf16 / ours.", "",
             "| shape | cuBLAS | dense 4-bit (x) | sparse 0% | 40% (x) | 50% (x) | 60% (x) | 50% vs dense 4-bit | "
             "FWHT | +compaction | fused rotation+compaction | GEMV alone 50% (best tensor-core / CUDA-core config with "
             "--families) | config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        c = r["cublas_us"]
        lines.append(
            f"| {r['shape']} | {c:.1f} | {r['lut4_us']:.1f} ({c / r['lut4_us']:.2f}x) | {r['rot_0_us']:.1f} | "
            f"{r['rot_40_us']:.1f} ({c / r['rot_40_us']:.2f}x) | {r['rot_50_us']:.1f} ({c / r['rot_50_us']:.2f}x) | "
            f"{r['rot_60_us']:.1f} ({c / r['rot_60_us']:.2f}x) | {r['lut4_us'] / r['rot_50_us']:.2f}x | "
            f"{r['fwht_us']:.1f} | {r['fwht_compact_us']:.1f} | {r.get('rotate_compact_us', float('nan')):.1f} | "
            f"{r['gemv50_us']:.1f} "
            + (f"({r['gemv50_mma_us']:.1f} / {r['gemv50_cuda_core_us']:.1f}) | " if "gemv50_mma_us" in r else "| ") +
            f"{r['config']} |")
    lines += ["", "## Correctness (relative L2 error vs the fp32 reference) and measured sparsity", "",
              "| shape | what | target | measured | rel err |", "|---|---|---|---|---|"]
    for ch in result["checks"]:
        lines.append(f"| {ch['shape']} | {ch.get('what', 'op vs fp32 reference')} | {ch['sparsity']:.2f} | "
                     f"{ch['measured']:.3f} | {ch['rel_err']:.2e} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = result["rows"]
    names = [r["shape"] for r in rows]
    series = {"dense 4-bit": "lut4_us", "4-bit + 40%": "rot_40_us", "4-bit + 50%": "rot_50_us",
              "4-bit + 60%": "rot_60_us"}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(rows))], [r["cublas_us"] / r[key] for r in rows], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speedup over cuBLAS bf16 (M = 1)")
    ax.set_title(f"rotated-basis activation sparsity over 4-bit LUT codes ({result['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--plot", type=Path, help="re-plot / re-table an existing JSON")
    parser.add_argument("--families", action="store_true",
                        help="also time every GEMV config at 50%% for the best tensor-core / CUDA-core one")
    args = parser.parse_args()
    if args.plot:
        data = json.loads(args.plot.read_text())
        plot(data, args.plot.with_suffix(".png"))
        args.plot.with_suffix(".md").write_text(markdown(data))
    else:
        run(args.out, args.families)
