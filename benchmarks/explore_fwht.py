"""FWHT config exploration on the GPU: every candidate config of the tensor-core FWHT kernels for the given
Hadamard sizes, timed on 64 MB of bf16 against a copy of the same bytes, with its error against the fp32
reference. ROUND16 configs round the intermediate product to the input dtype between Kronecker factors instead
of carrying it at fp32 accuracy (hi + lo split); the error column shows what that costs.

    python benchmarks/explore_fwht.py --sizes 4096 8192 16384 --out benchmarks/results --tag large
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import bench  # noqa: E402

from transfigure.bench import environment  # noqa: E402
from transfigure.kernels.autotune import Config  # noqa: E402
from transfigure.kernels.fwht import _launch_dot, fwht_reference  # noqa: E402


def candidates(h: int, wide: bool = False) -> list[Config]:
    if wide:  # two factors only, more warps and stages (the 16384 search)
        return [Config({"ROWS": rows, **flag}, num_warps=warps, num_stages=stages)
                for flag in ({}, {"ROUND16": 1}) for rows in (1, 4, 16) for warps in (8, 16) for stages in (1, 2, 3)
                if rows > 1 or stages == 1]
    out = []
    for round16 in (0, 1):
        flag = {"ROUND16": 1} if round16 else {}
        for rows in (1, 4, 16):
            for warps in (4, 8):
                for stages in ((1,) if rows == 1 else (1, 2)):
                    out.append(Config({"ROWS": rows, **flag}, num_warps=warps, num_stages=stages))
        if h >= 4096:
            for rows in (1, 4, 8):
                for warps in (4, 8, 16):
                    out.append(Config({"KRON3": 1, "ROWS": rows, **flag}, num_warps=warps, num_stages=1))
        for batch in (2, 4, 8):
            for warps in (4, 8, 16):
                if batch * h <= 2048 * warps:
                    out.append(Config({"BATCH": batch, **flag}, num_warps=warps, num_stages=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="large")
    ap.add_argument("--wide", action="store_true", help="two-factor configs with 8/16 warps and 1-3 stages only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**environment("cuda"), "rows": []}
    stem = out / f"explore_fwht_{args.tag}"
    for h in args.sizes:
        x = torch.randn(64 * 1024 * 1024 // 2 // h, h, device="cuda", dtype=torch.bfloat16)
        signs = (torch.randint(0, 2, (h,), device="cuda") * 2 - 1).float()
        scale = 1 / math.sqrt(h)
        ref = fwht_reference(x[:64].float(), signs, h, scale)
        copy_us = bench(lambda: x.clone())
        for config in candidates(h, args.wide):
            row = {"h": h, "config": config.describe(), "copy_us": copy_us}
            try:
                y = _launch_dot(config, x, signs, h, scale)
                row["relerr"] = float((y[:64].float() - ref).norm() / ref.norm())
                row["us"] = bench(lambda: _launch_dot(config, x, signs, h, scale))
                row["fraction_of_copy"] = copy_us / row["us"]
            except Exception as error:  # noqa: BLE001 - a config that does not compile is a row, not a crash
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# FWHT configs, 64 MB bf16 ({result['device']}, torch {result['torch']}, triton {result['triton']}, "
             f"{result['date']})", "", "Best 8 per size; relerr = relative L2 error against the fp32 reference.", "",
             "| h | config | us | copy us | fraction of copy | relerr |", "| --- | --- | --- | --- | --- | --- |"]
    for h in args.sizes:
        ok = sorted((r for r in result["rows"] if r["h"] == h and "us" in r), key=lambda r: r["us"])
        for r in ok[:8]:
            lines.append(f"| {h} | {r['config']} | {r['us']:.1f} | {r['copy_us']:.1f} | {r['fraction_of_copy']:.2f} | "
                         f"{r['relerr']:.2e} |")
        failed = [r for r in result["rows"] if r["h"] == h and "error" in r]
        if failed:
            lines.append(f"| {h} | {len(failed)} configs failed: {failed[0]['error'][:80]} | | | | |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
