"""GPU check of every decode config (M = 1, 4, 16 by default) of the LUT GEMV against its reference, repeated to
catch races.

The split-K epilogue synchronizes programs through per-tile arrival counters, which the CPU interpreter (one
program at a time) cannot stress. Each config runs ``--repeats`` times on the same input; the outputs must
match the float32 reference and each other exactly (a lost or doubled partial sum would show).

    python benchmarks/check_lut_configs.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16], help="rows of x (M) to check")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], help="activation dtypes to check")
    ap.add_argument("--register-only", action="store_true",
                    help="only the register-table configs (the inline-PTX lookup: REGISTER pair configs, register_mm, mma)")
    ap.add_argument("--group", type=int, default=128, help="group size of the packed weights")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--modes", nargs="+", default=None, help="only configs of these MODEs (pair, register_mm, mma, tile)")
    args = ap.parse_args()
    from transfigure.kernels.grids import get_grid
    from transfigure.kernels.lut_format import pack
    from transfigure.kernels.lut_gemm import _COUNTERS, configs_for, lut_linear_reference, lut_linear_triton

    rows, failures = [], 0
    for (n, k), (bits, p), bias in [(((8192, 2048)), (4, 1), False), ((2048, 8192), (4, 1), True),
                                    ((6144, 4096), (4, 1), False), ((3072, 2048), (3, 1), False),
                                    ((2048, 2048), (2, 1), True), ((4096, 4096), (4, 2), False)]:
        torch.manual_seed(n + k + bits)
        w = torch.randn(n, k, device="cuda") * 0.02
        pk = pack(w, get_grid("higgs", bits, p).table, bits=bits, p=p, group_size=args.group, hadamard_size=0)
        cases = [(getattr(torch, d), m, c) for d in args.dtypes for m in args.ms
                 for c in configs_for(m, pk.padded_in_features, p, args.group, bits, getattr(torch, d))
                 if (not args.register_only or c.meta.get("REGISTER") or c.meta.get("MODE") in ("register_mm", "mma"))
                 and (args.modes is None or c.meta.get("MODE", "tile") in args.modes)]
        for dtype, m, config in cases:
            args_ = list(pk.op_args())
            args_[4] = torch.randn(n, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(n)) if bias else None
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(m))
            ref = lut_linear_reference(x.float(), *args_).float()
            outs = [lut_linear_triton(x, *args_, config=config) for _ in range(args.repeats)]
            torch.cuda.synchronize()
            err = float((outs[0].float() - ref).norm() / ref.norm())
            same = all(torch.equal(outs[0], o) for o in outs[1:])
            # split-K through fp32 atomics (the tile kernel; the pair kernel at M > 1) sums in arrival order, so
            # only the counter-reduced kernels (pair at M = 1, register_mm) must repeat bit for bit
            mode = config.meta.get("MODE", "tile")
            atomics = config.meta.get("SPLIT_K", 1) > 1 and (mode == "tile" or (mode == "pair" and m > 1))
            ok = err < 1e-2 and (same or atomics)
            failures += not ok
            rows.append({"N": n, "K": k, "M": m, "dtype": str(dtype), "bits": bits, "p": p, "bias": bias, "config": config.describe(),
                         "rel_err": err, "repeat_identical": same, "ok": ok})
            if not ok:
                print("FAIL", rows[-1], flush=True)
    counters_zero = all(int(c.abs().sum()) == 0 for c in _COUNTERS.values())
    summary = {"device": torch.cuda.get_device_name(), "configs_checked": len(rows), "failures": failures,
               "counters_zero_after": counters_zero, "max_rel_err": max(r["rel_err"] for r in rows)}
    print(json.dumps(summary), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check_lut_configs" + (f"_{args.tag}" if args.tag else "") + ".json"), "w") as handle:
        json.dump({**summary, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
