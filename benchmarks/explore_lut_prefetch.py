"""Can L2 prefetching hide the HBM latency the tensor-core LUT GEMV waits on? (H100, weights from HBM)

Timed from HBM (rotating weight copies, as the autotuner now does), the 4-bit GEMV reads 14336x4096 codes at
~1.7 TB/s where cuBLAS reads bf16 at ~2.8 TB/s: each warp step waits for its own 16-byte code loads. Variants of
the group-step PTX, each over the best configs of ``explore_cold_tuning_lut.json``:

* ``c256`` / ``c128``: code loads with the ``.L2::256B`` / ``.L2::128B`` prefetch-size qualifier (a miss fetches
  the aligned 256 / 128 bytes around it: a row's next groups are then in L2);
* ``cs256``: the same on the group-scale loads too;
* ``pf4`` / ``pf8``: ``prefetch.global.L2`` of the lane's codes 4 / 8 groups ahead.

    PYTHONPATH=. python benchmarks/explore_lut_prefetch.py --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 4096), (3072, 2048), (16384, 2048),
          (2048, 2048), (2048, 8192)]


def variant(ptx: str, name: str, group_bytes: int) -> str:
    if name == "base":
        return ptx
    if name in ("c256", "c128", "cs256"):
        size = "256B" if name != "c128" else "128B"
        out = ptx.replace("@pg ld.global.nc.v", f"@pg ld.global.nc.L2::{size}.v").replace(
            "@ph ld.global.nc.v", f"@ph ld.global.nc.L2::{size}.v")
        if name == "cs256":
            out = out.replace("@pg ld.global.nc.b16", "@pg ld.global.nc.L2::256B.b16").replace(
                "@ph ld.global.nc.b16", "@ph ld.global.nc.L2::256B.b16")
        return out
    ahead = {"pf4": 4, "pf8": 8}[name] * group_bytes
    return ptx.replace("@pg ld.global.nc.v", f"@pg prefetch.global.L2 [ag+{ahead}];\n@pg ld.global.nc.v", 1).replace(
        "@ph ld.global.nc.v", f"@ph prefetch.global.L2 [ah+{ahead}];\n@ph ld.global.nc.v", 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--variants", nargs="*", default=["base", "c256", "c128", "cs256", "pf4", "pf8"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    from transfigure.kernels import lut_gemm
    from transfigure.kernels.autotune import rotating_copies, time_per_call
    from transfigure.kernels.grids import get_grid
    from transfigure.kernels.lut_format import pack

    explored = json.loads(Path("benchmarks/results/explore_cold_tuning_lut.json").read_text())
    best = {}
    for case in explored["cases"]:
        if case["case"].startswith("lut4") and case["case"].endswith("M=1"):
            ok = sorted((r for r in case["configs"] if "cold_us" in r), key=lambda r: r["cold_us"])
            best[case["case"].split()[1]] = [r["config"] for r in ok[: args.top]]
    originals = (dict(lut_gemm.MMA_GROUP_PTX), dict(lut_gemm.MMA_SHARED_GROUP_PTX))
    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    t0 = time.time()

    for n, k in SHAPES:
        names = best.get(f"{n}x{k}")
        if not names:
            continue
        w = torch.randn(n, k, device=dev) * 0.02
        pk = pack(w, get_grid("higgs", 4, 1).table, bits=4, p=1, group_size=128, hadamard_size=0, scale_mode="rms",
                  grid="higgs")
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        a = (x, pk.codes, pk.scales, pk.table.float(), None, 4, 1, 128)
        sets = rotating_copies(a)
        ref = lut_gemm.lut_linear_reference(x.float(), *pk.op_args())
        configs = [c for c in lut_gemm._lut_tuner.configs if c.describe() in names]
        for v in args.variants:
            lut_gemm.MMA_GROUP_PTX.clear()
            lut_gemm.MMA_GROUP_PTX.update({key: variant(p, v, 64) for key, p in originals[0].items()})
            lut_gemm.MMA_SHARED_GROUP_PTX.clear()
            lut_gemm.MMA_SHARED_GROUP_PTX.update({key: variant(p, v, 64) for key, p in originals[1].items()})
            for c in configs:
                row = {"shape": f"{n}x{k}", "variant": v, "config": c.describe()}
                try:
                    y = lut_gemm._lut_tuner.launch(c, *a)
                    row["rel_err"] = float((y.float() - ref).norm() / ref.norm())
                    row["cold_us"] = 1e3 * time_per_call([lambda c=c, s=s: lut_gemm._lut_tuner.launch(c, *s) for s in sets])
                except Exception as error:  # noqa: BLE001
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                result["rows"].append(row)
            done = [r for r in result["rows"] if r["shape"] == f"{n}x{k}" and r["variant"] == v and "cold_us" in r]
            print(f"{n}x{k} {v}: best {min((r['cold_us'] for r in done), default=float('nan')):.2f} us "
                  f"(max rel err {max((r['rel_err'] for r in done), default=float('nan')):.1e}) {time.time() - t0:.0f}s", flush=True)
            (out / "explore_lut_prefetch.json").write_text(json.dumps(result, indent=1))
    lut_gemm.MMA_GROUP_PTX.clear(); lut_gemm.MMA_GROUP_PTX.update(originals[0])  # noqa: E702
    lut_gemm.MMA_SHARED_GROUP_PTX.clear(); lut_gemm.MMA_SHARED_GROUP_PTX.update(originals[1])  # noqa: E702
    lines = ["| shape | " + " | ".join(args.variants) + " |", "|---" * (len(args.variants) + 1) + "|"]
    for n, k in SHAPES:
        cells = []
        for v in args.variants:
            done = [r["cold_us"] for r in result["rows"] if r["shape"] == f"{n}x{k}" and r["variant"] == v and "cold_us" in r]
            cells.append(f"{min(done):.2f}" if done else "-")
        lines.append(f"| {n}x{k} | " + " | ".join(cells) + " |")
    (out / "explore_lut_prefetch.md").write_text(
        f"# LUT GEMV M=1 4-bit, best of the top-{args.top} HBM configs per PTX variant, us from HBM "
        f"({result['device']}, triton {result['triton']}, {result['date']})\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
