"""Exploration: the tensor-core decode GEMV (``_lut_mma_gemv_kernel``, MODE=mma) against the register-table
pair kernel (MODE=pair, REGISTER=1, the M = 1 winner before it), cuBLAS bf16 and torch's int4 GEMM, per config.

For each shape and M: every candidate config of both families is checked against the float32 reference
(relative error, and bit-identical repeats for the split-K counters) and timed under CUDA-graph replay; the
JSON keeps every config's time, the Markdown table the best per family.

    python benchmarks/explore_lut_mma.py --out DIR [--shapes 8b 1b] [--ms 1 4 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_quant import SHAPES, SHAPES_1B, bench, int4_tinygemm  # noqa: E402


def family(config) -> str:
    mode = config.meta.get("MODE", "tile")
    if mode == "mma" and config.meta.get("LOOKUP") == "shared":
        return "mma-shared"
    if mode == "pair":
        return "pair-register" if config.meta.get("REGISTER") else "pair"
    return mode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shapes", nargs="+", default=["8b", "1b"])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--p", type=int, default=1)
    ap.add_argument("--families", nargs="+", default=["mma-shared", "mma", "pair-register", "register_mm"])
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    from transfigure.kernels.grids import get_grid
    from transfigure.kernels.lut_format import pack
    from transfigure.kernels.lut_gemm import configs_for, lut_linear_reference, lut_linear_triton

    shapes = (SHAPES if "8b" in args.shapes else []) + (SHAPES_1B if "1b" in args.shapes else [])
    rows = []
    for n, k in shapes:
        torch.manual_seed(n + k)
        w = torch.randn(n, k, device="cuda") * 0.02
        pk = pack(w, get_grid("higgs", args.bits, args.p).table, bits=args.bits, p=args.p, group_size=args.group,
                  hadamard_size=0)
        op = list(pk.op_args())
        dense = w.to(torch.bfloat16)
        try:
            int4 = int4_tinygemm(w, args.group)
        except Exception:  # noqa: BLE001
            int4 = None
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = lut_linear_reference(x.float(), *op).float()
            row = {"N": n, "K": k, "M": m, "cublas_us": bench(lambda: torch.nn.functional.linear(x, dense)),
                   "int4_us": bench(lambda: int4(x)) if int4 is not None and m <= 16 else None, "configs": {}}
            for config in configs_for(m, pk.padded_in_features, args.p, args.group, args.bits, torch.bfloat16):
                fam = family(config)
                if fam not in args.families:
                    continue
                try:
                    outs = [lut_linear_triton(x, *op, config=config) for _ in range(5)]
                    torch.cuda.synchronize()
                    err = float((outs[0].float() - ref).norm() / ref.norm())
                    same = all(torch.equal(outs[0], o) for o in outs[1:])
                    us = bench(lambda: lut_linear_triton(x, *op, config=config))
                    row["configs"][config.describe()] = {"family": fam, "us": us, "rel_err": err, "repeat_identical": same,
                                                         "ok": err < 1e-2 and same}
                except Exception as exc:  # noqa: BLE001
                    row["configs"][config.describe()] = {"family": fam, "error": repr(exc)[:300], "ok": False}
            best = {}
            for desc, r in row["configs"].items():
                if r.get("ok") and r["us"] < best.get(r["family"], (float("inf"), ""))[0]:
                    best[r["family"]] = (r["us"], desc)
            row["best"] = best
            bad = [d for d, r in row["configs"].items() if not r.get("ok")]
            row["failed"] = bad
            rows.append(row)
            summary = ", ".join(f"{f} {u:.1f} ({row['cublas_us'] / u:.2f}x)" for f, (u, _) in sorted(best.items()))
            print(f"{n}x{k} M={m}: cuBLAS {row['cublas_us']:.1f} int4 {row['int4_us']} | {summary} | failed {len(bad)}",
                  flush=True)
            for d in bad[:3]:
                print("   FAIL", d, row["configs"][d], flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "group": args.group,
            "bits": args.bits, "p": args.p}
    os.makedirs(args.out, exist_ok=True)
    name = "explore_lut_mma" + (f"_{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, name + ".json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    fams = args.families
    lines = [f"# Tensor-core LUT GEMV exploration ({meta['device']}, {meta['torch']}, {meta['date']})", "",
             f"us, CUDA-graph replay median; x = cuBLAS bf16 / ours. {args.bits}-bit p={args.p} HIGGS g{args.group}, bf16.",
             "",
             "| N x K | M | cuBLAS | torch int4 | " + " | ".join(f"{f} | x" for f in fams) + " |",
             "|---|---|---|---|" + "---|---|" * len(fams)]
    for r in rows:
        cells = []
        for f in fams:
            if f in r["best"]:
                us = r["best"][f][0]
                cells += [f"{us:.1f}", f"{r['cublas_us'] / us:.2f}"]
            else:
                cells += ["", ""]
        int4 = f"{r['int4_us']:.1f}" if r["int4_us"] else ""
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['cublas_us']:.1f} | {int4} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, name + ".md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
