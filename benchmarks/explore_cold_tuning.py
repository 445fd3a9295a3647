"""Does the autotuner pick different configs when weights come from HBM instead of the L2 cache?

The tuner times each config by replaying one call over one set of buffers; a 4-bit 14336x4096 weight is 29 MB and
sits in the H100's 50 MB L2 after the first replay, so the tuner ranks configs by L2 latency. A decode step reads
every weight once from HBM. This script times every candidate config of the LUT GEMV (M = 1, 16) and of the TEAL
sparse GEMV (M = 1, 50 %) both ways -- "hot" (one buffer) and "cold" (rotating through copies of the large tensor
arguments so one round reads ~3x L2) -- and reports, per shape, the hot choice's cold time against the best cold time.

    PYTHONPATH=. python benchmarks/explore_cold_tuning.py --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

SHAPES_8B = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 4096)]
SHAPES_1B = [(2048, 2048), (3072, 2048), (8192, 2048), (16384, 2048), (2048, 8192)]


def rotating_args(args: tuple) -> list[tuple]:
    from transfigure.kernels.autotune import rotating_copies

    return rotating_copies(args)


def time_calls(calls) -> float:
    """Microseconds per call, back to back in one CUDA-graph replay."""
    from transfigure.kernels.autotune import time_per_call

    return 1e3 * time_per_call(calls)


def explore(tuner, args, configs, label, result, save, cold_only=False):
    sets = rotating_args(args)
    rows = []
    for c in configs:
        try:
            hot = float("nan") if cold_only else time_calls([lambda c=c: tuner.launch(c, *args)])
            cold = time_calls([lambda c=c, a=a: tuner.launch(c, *a) for a in sets])
            rows.append({"config": c.describe(), "hot_us": hot, "cold_us": cold})
        except Exception as error:  # noqa: BLE001
            rows.append({"config": c.describe(), "error": f"{type(error).__name__}: {str(error)[:160]}"})
    ok = [r for r in rows if "cold_us" in r]
    hot_best = min(ok, key=lambda r: r["hot_us"] if r["hot_us"] == r["hot_us"] else r["cold_us"])
    cold_best = min(ok, key=lambda r: r["cold_us"])
    summary = {"case": label, "copies": len(sets), "hot_choice": hot_best["config"], "hot_choice_hot_us": hot_best["hot_us"],
               "hot_choice_cold_us": hot_best["cold_us"], "cold_choice": cold_best["config"],
               "cold_choice_cold_us": cold_best["cold_us"], "gain": hot_best["cold_us"] / cold_best["cold_us"],
               "configs": rows}
    result["cases"].append(summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "configs"}), flush=True)
    save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", choices=("lut", "sparse", "all"), default="all")
    ap.add_argument("--shapes", nargs="*", help="NxK shapes to run (default: all)")
    ap.add_argument("--cold-only", action="store_true", help="skip the one-buffer timing")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    from transfigure.kernels import sparse_gemv as sg
    from transfigure.kernels.autotune import Config
    from transfigure.kernels.grids import get_grid
    from transfigure.kernels.lut_format import pack
    from transfigure.kernels.lut_gemm import _lut_tuner

    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cases": []}
    t0 = time.time()

    def save():
        (out / "explore_cold_tuning.json").write_text(json.dumps(result, indent=1))

    if args.only in ("lut", "all"):
        for n, k in SHAPES_8B + SHAPES_1B:
            w = (torch.randn(n, k, device=dev) * 0.02)
            for bits in ((4, 2) if (n, k) in SHAPES_8B[:4] else (4,)):
                pk = pack(w, get_grid("higgs", bits, 1).table, bits=bits, p=1, group_size=128, hadamard_size=0,
                          scale_mode="rms", grid="higgs")
                for m in ((1, 16) if bits == 4 and (n, k) in ((4096, 4096), (14336, 4096)) else (1,)):
                    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                    a = (x, pk.codes, pk.scales, pk.table.float(), None, bits, 1, 128)
                    configs = [c for c in _lut_tuner.prune(_lut_tuner.configs, a) if c.meta.get("MODE") != "dequant"]
                    explore(_lut_tuner, a, configs, f"lut{bits} {n}x{k} M={m}", result, save)
                    print(f"{time.time() - t0:.0f}s", flush=True)
    if args.only in ("sparse", "all"):
        extra = [Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s}, w, 3)
                 for bn, bk, w in ((512, 16, 4), (512, 32, 8), (1024, 16, 8), (256, 16, 4), (128, 128, 4), (64, 256, 4), (32, 256, 2))
                 for s in (4, 8, 16, 32)]
        for n, k in SHAPES_8B:
            if args.shapes and f"{n}x{k}" not in args.shapes:
                continue
            w = (torch.randn(n, k, device=dev) / k**0.5).to(torch.bfloat16)
            wt = w.t().contiguous()
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            t = float(x.float().abs().flatten().quantile(0.5))
            a = (x, wt, None, t)
            base = sg._prune(sg._configs()[1:] + extra, a)
            # the deferred-K-reduction variant of every candidate, in the same run
            configs = base + [Config({**c.meta, "DEFER": 1}, c.num_warps, c.num_stages) for c in base if "DEFER" not in c.meta]
            explore(sg._tuner, a, configs, f"sparse50 {n}x{k} M=1", result, save, args.cold_only)
            print(f"{time.time() - t0:.0f}s", flush=True)
    lines = ["| case | copies | hot choice | its hot us | its cold us | cold choice | cold us | gain |", "|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        lines.append(f"| {c['case']} | {c['copies']} | {c['hot_choice']} | {c['hot_choice_hot_us']:.1f} | {c['hot_choice_cold_us']:.1f} | "
                     f"{c['cold_choice']} | {c['cold_choice_cold_us']:.1f} | {c['gain']:.2f} |")
    (out / "explore_cold_tuning.md").write_text(
        f"# Autotuning with hot vs cold L2 ({result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']})\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
