"""Re-tune every key of the shipped LUT GEMV table on this GPU, from HBM, and time the winner against cuBLAS.

    PYTHONPATH=. TRANSFIGURE_CACHE_DIR=$OUT/tfcache TRANSFIGURE_SHIPPED_TUNING=0 python benchmarks/tune_shipped_table.py --out $OUT

The keys come from ``transfigure/data/autotune/lut_linear.json`` (decode shapes of the built-in 1B and 8B
models); the fresh choices land in ``$TRANSFIGURE_CACHE_DIR/autotune/lut_linear.json`` (copy it over the shipped
file), and ``tune_shipped_table.{json,md}`` list each shape's config and its time against cuBLAS bf16, both
rotating through weight copies (weights from HBM).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from transfigure.bench import pyplot


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([f"{r['N']}x{r['K']}" for r in rows], [r["speedup"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="k", lw=0.8)
    bits = sorted({r["bits"] for r in rows})
    ms = sorted({r["M"] for r in rows})
    targets = {2: 5.0, 3: 3.8, 4: 3.0}  # issue 3's M=1 targets
    for b in bits:
        if ms == [1]:
            ax.axhline(targets[b], color="r", lw=0.8, ls="--", label=f"target {targets[b]}x ({b}-bit, M=1)")
    ax.set_ylabel(f"cuBLAS bf16 / LUT {'/'.join(map(str, bits))}-bit, M={'/'.join(map(str, ms))}")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    ax.set_title(f"Shipped LUT GEMV configs, {result['device']}, triton {result['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from OUT/<stem>.json")
    ap.add_argument("--bits", type=int, choices=(2, 3, 4),
                    help="tune the table's shapes at this code width (new entries, merged into the shipped file by "
                         "hand) instead of the table's own keys")
    ap.add_argument("--m", type=int, help="tune the table's shapes at this many tokens (e.g. 8: batch-8 decode)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "tune_shipped_table" + (f"_{args.bits}bit" if args.bits else "") + (f"_m{args.m}" if args.m else "")
    if args.replot:
        plot(json.loads((out / f"{stem}.json").read_text()), out / f"{stem}.png")
        return
    import triton

    from transfigure.kernels.autotune import SHIPPED_TUNING_DIR, copies_beyond_l2, rotating_copies, time_per_call
    from transfigure.kernels.grids import get_grid
    from transfigure.kernels.lut_format import pack
    from transfigure.kernels.lut_gemm import _lut_tuner

    keys = [ast.literal_eval(k.split("|")[-1]) for k in json.loads((SHIPPED_TUNING_DIR / "lut_linear.json").read_text())]
    if args.bits or args.m:
        keys = [(args.m or m, n, k, args.bits or bits, p, group, dtype, has_bias)
                for m, n, k, bits, p, group, dtype, has_bias in keys if args.bits or bits == 4]
    dev = torch.device("cuda")
    rows = []
    for m, n, k, bits, p, group, dtype, has_bias in sorted(set(keys), key=lambda t: t[1] * t[2]):
        dtype = getattr(torch, dtype.replace("torch.", ""))
        w = torch.randn(n, k, device=dev) * 0.02
        pk = pack(w, get_grid("higgs", bits, p).table, bits=bits, p=p, group_size=group, hadamard_size=0,
                  scale_mode="rms", grid="higgs")
        x = torch.randn(m, k, device=dev, dtype=dtype)
        bias = torch.zeros(n, device=dev, dtype=dtype) if has_bias else None
        a = (x, pk.codes, pk.scales, pk.table.float(), bias, bits, p, group)
        config = _lut_tuner.best_config(*a)
        ours = 1e3 * time_per_call([lambda s=s: _lut_tuner.launch(config, *s) for s in rotating_copies(a)])
        ws = [w.to(dtype) for _ in range(copies_beyond_l2(2 * n * k))]
        cublas = 1e3 * time_per_call([lambda wd=wd: F.linear(x, wd) for wd in ws])
        rows.append({"M": m, "N": n, "K": k, "bits": bits, "config": config.describe(), "lut_us": ours,
                     "cublas_us": cublas, "speedup": cublas / ours})
        print(json.dumps(rows[-1]), flush=True)
        del w, pk, ws
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"# Shipped LUT GEMV keys re-tuned from HBM ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['date']})", "", "| M | N x K | bits | config | LUT us | cuBLAS bf16 us | x |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['M']} | {r['N']}x{r['K']} | {r['bits']} | {r['config']} | {r['lut_us']:.2f} | {r['cublas_us']:.2f} | "
              f"{r['speedup']:.2f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        plot({**meta, "rows": rows}, out / f"{stem}.png")
    except ImportError as error:  # matplotlib may be absent on the GPU machine
        print("no plot:", error)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
