"""GPU benchmark of TEAL activation sparsity (issue 4): correctness in bf16/fp16, then timings vs cuBLAS.

    python benchmarks/bench_sparsity.py --out DIR          # on the GPU
    python benchmarks/bench_sparsity.py --plot DIR/sparsity.json   # plot from a JSON anywhere

Measures, for Llama-3-8B linear shapes (and Llama-3.2-1B ones), bf16:
* M = 1: the sparse GEMV at 0 / 40 / 50 % activation sparsity vs cuBLAS bf16 (``F.linear``);
* M = 1: the sparse LUT GEMV (4-bit, group 128, NF4-like table) at 0 / 50 % vs cuBLAS bf16;
* M = 4, 8: the sparse GEMV (tl.dot path) at 50 % vs cuBLAS;
* M = 64, 256: the ``sparse_linear`` op (plain path: threshold kernel + cuBLAS, and the dense-prefill
  setting: cuBLAS alone behind the op's shape check) vs ``F.linear`` with no sparsity.
Every timing is per call, from ``triton.testing.do_bench_cudagraph`` (median) over calls captured back to back
in one CUDA graph (what a compiled decode step runs), rotating through as many weight copies as make a round
read ~3x the L2 cache: a decode step reads each weight once from HBM, and repeating one buffer would time the
cache (the first version replayed a one-call graph over one buffer, which added the graph launch to both sides).
The fused q/k/v and gate/up shapes are what the ``sparsity`` pass runs for Llama-style models.
Writes DIR/sparsity.json, DIR/sparsity.md and DIR/sparsity.png (if matplotlib is there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transfigure.bench import pyplot
from transfigure.kernels.autotune import copies_beyond_l2, time_per_call

SHAPES_8B = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096),
             "gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336)}
SHAPES_1B = {"1B q/o 2048x2048": (2048, 2048), "1B k/v 512x2048": (512, 2048),
             "1B gate/up 8192x2048": (8192, 2048), "1B down 2048x8192": (2048, 8192)}
# what the sparsity pass runs: q/k/v and gate/up share their input and threshold, so it fuses them
FUSED_8B = {"qkv fused 6144x4096": (6144, 4096), "gate+up fused 28672x4096": (28672, 4096)}
FUSED_1B = {"1B qkv fused 3072x2048": (3072, 2048), "1B gate+up fused 16384x2048": (16384, 2048)}


def bench_graph(calls) -> float:
    """Median microseconds per call of ``calls`` (one per weight copy), all captured back to back in one CUDA
    graph -- what a compiled decode step does (no launch gap, no host time between kernels)."""
    return 1e3 * time_per_call(calls, rep=50)


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def nf4_like_table(bits=4):
    # normal quantiles, normalized to abs-max 1 (an NF4-like grid; the values do not matter for speed)
    q = torch.linspace(0.5 / 2**bits, 1 - 0.5 / 2**bits, 2**bits)
    t = torch.erfinv(2 * q - 1) * 2**0.5
    return t / t.abs().max()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--plot", default=None, help="only plot an existing sparsity.json")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRANSFIGURE_CACHE_DIR", str(out / "cache"))
    import triton

    from transfigure.kernels import sparse_gemv as sg
    from transfigure.kernels import sparse_lut_gemv as slg
    from transfigure.kernels.autotune import Config
    from transfigure.kernels.lut_format import dequantize, pack

    dev = torch.device("cuda")
    t_start = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "correctness": [], "m1": [], "lut": [], "small_m": [], "plain": [], "errors": []}

    def save():
        (out / "sparsity.json").write_text(json.dumps(result, indent=1))

    def sparse_x(m, k, p, dtype, seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(m, k, device=dev, generator=g).to(dtype)
        t = float(x.float().abs().flatten().quantile(p)) if p > 0 else 0.0
        return x, t

    # ---- correctness: bf16 + fp16, dense and LUT kernels, M = 1, 3, 8 --------------------------------
    for dtype in (torch.bfloat16, torch.float16):
        for m in (1, 3, 8):
            n, k = 1000, 4096
            x, t = sparse_x(m, k, 0.5, dtype, seed=m)
            w = (torch.randn(n, k, device=dev) / k**0.5).to(dtype)
            b = torch.randn(n, device=dev).to(dtype)
            wt = w.t().contiguous()
            ref = sg.sparse_linear_reference(x.float(), wt.float(), b.float(), t)
            cfg = Config({"BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 4}, 4, 3)
            out_k = sg._launch(cfg, x, wt, b, t)  # a fixed config: keeps autotuning to the timed keys
            result["correctness"].append({"kernel": "sparse_gemv", "dtype": str(dtype), "M": m, "rel_err": rel_err(out_k, ref)})
            packed = pack(w.float(), nf4_like_table(), bits=4, group_size=128, scale_mode="absmax")
            ct, st = slg.repack_column_major(packed.codes, packed.scales, 4)
            dense_q = dequantize(packed).to(dev)
            ref_q = torch.where(x.float().abs() > t, x.float(), 0.0) @ dense_q.T + b.float()
            out_q = slg._launch(cfg, x, ct, st, packed.table.reshape(-1).contiguous(), b, 4, 128, t)
            result["correctness"].append({"kernel": "sparse_lut_gemv", "dtype": str(dtype), "M": m, "rel_err": rel_err(out_q, ref_q)})
    # the op's plain path for many tokens
    x, t = sparse_x(100, 4096, 0.5, torch.bfloat16)
    w = (torch.randn(1024, 4096, device=dev) / 64).to(torch.bfloat16)
    wt = w.t().contiguous()
    result["correctness"].append({"kernel": "sparse_linear op M=100 (plain path)", "dtype": "torch.bfloat16", "M": 100,
                                  "rel_err": rel_err(sg.sparse_linear(x, wt, None, t), sg.sparse_linear_reference(x.float(), wt.float(), None, t))})
    save()
    print("correctness", result["correctness"], flush=True)

    # ---- M = 1 timings ------------------------------------------------------------------------------
    def weights(n, k, copies):
        ws = [(torch.randn(n, k, device=dev) / k**0.5).to(torch.bfloat16) for _ in range(copies)]
        return ws, [w.t().contiguous() for w in ws]

    for name, (n, k) in {**SHAPES_8B, **FUSED_8B, **SHAPES_1B, **FUSED_1B}.items():
        try:
            copies = copies_beyond_l2(2 * n * k)
            ws, wts = weights(n, k, copies)
            row = {"shape": name, "N": n, "K": k, "weight_copies": copies}
            x, _ = sparse_x(1, k, 0.0, torch.bfloat16)
            row["cublas_graph_us"] = bench_graph([lambda w=w: F.linear(x, w) for w in ws])
            for p in (0.5, 0.4, 0.0):  # the first call picks the config: tune at 50 %
                xp, t = sparse_x(1, k, p, torch.bfloat16, seed=1)
                g = bench_graph([lambda wt=wt: sg.sparse_gemv_triton(xp, wt, None, t) for wt in wts])
                row[f"sparse{int(p * 100)}_graph_us"] = g
                row[f"speedup{int(p * 100)}"] = row["cublas_graph_us"] / g
            for p in (0.5, 0.4):
                xp, t = sparse_x(1, k, p, torch.bfloat16, seed=1)
                try:
                    err = rel_err(sg.sparse_gemv_compact_triton(xp, wts[0], None, t),
                                  sg.sparse_linear_reference(xp.float(), wts[0].float(), None, t))
                    g = bench_graph([lambda wt=wt: sg.sparse_gemv_compact_triton(xp, wt, None, t) for wt in wts])
                    row[f"compact{int(p * 100)}_graph_us"], row[f"compact{int(p * 100)}_rel_err"] = g, err
                    row[f"compact_speedup{int(p * 100)}"] = row["cublas_graph_us"] / g
                except Exception as error:
                    result["errors"].append(f"compact {name}: {type(error).__name__}: {error}")
            row["config"] = sg._tuner.best_config(x, wts[0], None, 0.0).describe()
            result["m1"].append(row)
            print(row, f"{time.time() - t_start:.0f}s", flush=True)
            save()
            if name in SHAPES_8B:
                lut_copies = copies_beyond_l2(n * k // 2)
                packs = []
                for i in range(lut_copies):
                    packed = pack(ws[i % copies].float(), nf4_like_table(), bits=4, group_size=128, scale_mode="absmax")
                    packs.append(slg.repack_column_major(packed.codes.to(dev), packed.scales.to(dev), 4))
                table = packed.table.reshape(-1).contiguous().to(dev)
                lrow = {"shape": name, "N": n, "K": k, "cublas_graph_us": row["cublas_graph_us"], "lut_copies": lut_copies}
                for p in (0.5, 0.0):
                    xp, t = sparse_x(1, k, p, torch.bfloat16, seed=1)
                    g = bench_graph([lambda ct=ct, st=st: slg.sparse_lut_gemv_triton(xp, ct, st, table, None, 4, 128, k, t)
                                     for ct, st in packs])
                    lrow[f"lut4_sparse{int(p * 100)}_graph_us"] = g
                    lrow[f"speedup{int(p * 100)}"] = row["cublas_graph_us"] / g
                result["lut"].append(lrow)
                print(lrow, f"{time.time() - t_start:.0f}s", flush=True)
                del packs
                save()
            del ws, wts
        except Exception as error:  # keep going: a partial result is still worth bringing back
            result["errors"].append(f"{name}: {type(error).__name__}: {error}")
            save()

    # ---- small M (tl.dot path) ----------------------------------------------------------------------
    for m in (4, 8):
        for name in ("q/o 4096x4096", "gate/up 14336x4096"):
            n, k = SHAPES_8B[name]
            try:
                ws, wts = weights(n, k, copies_beyond_l2(2 * n * k))
                xp, t = sparse_x(m, k, 0.5, torch.bfloat16, seed=2)
                cub = bench_graph([lambda w=w: F.linear(xp, w) for w in ws])
                sp = bench_graph([lambda wt=wt: sg.sparse_gemv_triton(xp, wt, None, t) for wt in wts])
                kept_rows = float((xp.float().abs() > t).any(0).float().mean())
                result["small_m"].append({"shape": name, "M": m, "cublas_graph_us": cub, "sparse50_graph_us": sp,
                                          "speedup": cub / sp, "rows_read": kept_rows})
                save()
            except Exception as error:
                result["errors"].append(f"small M {m} {name}: {type(error).__name__}: {error}")
    print(result["small_m"], flush=True)

    # ---- M >= 64: plain path overhead ---------------------------------------------------------------
    for m in (64, 256):
        for name in ("q/o 4096x4096", "gate/up 14336x4096"):
            n, k = SHAPES_8B[name]
            try:
                ws, wts = weights(n, k, copies_beyond_l2(2 * n * k))
                xp, t = sparse_x(m, k, 0.5, torch.bfloat16, seed=3)
                op = torch.ops.transfigure.sparse_linear
                row = {"shape": name, "M": m}
                row["dense_graph_us"] = bench_graph([lambda w=w: F.linear(xp, w) for w in ws])
                row["dense_wt_view_graph_us"] = bench_graph([lambda wt=wt: F.linear(xp, wt.t()) for wt in wts])
                row["op_sparse_graph_us"] = bench_graph([lambda wt=wt: op(xp, wt, None, t, True) for wt in wts])
                row["op_dense_prefill_graph_us"] = bench_graph([lambda wt=wt: op(xp, wt, None, t, False) for wt in wts])
                row["overhead_sparse_pct"] = 100 * (row["op_sparse_graph_us"] / row["dense_graph_us"] - 1)
                row["overhead_dense_prefill_pct"] = 100 * (row["op_dense_prefill_graph_us"] / row["dense_graph_us"] - 1)
                result["plain"].append(row)
                save()
            except Exception as error:
                result["errors"].append(f"plain M {m} {name}: {type(error).__name__}: {error}")
    print(result["plain"], flush=True)
    result["tuning_graph_timings_ms"] = {**sg._tuner.timings, **slg._tuner.timings}
    result["tuning_graph_timings_compact_ms"] = dict(sg._compact_tuner.timings)
    result["seconds"] = time.time() - t_start
    save()
    (out / "sparsity.md").write_text(markdown(result))
    try:
        plot(result, out / "sparsity.png")
    except Exception as error:  # matplotlib may be absent on the GPU machine
        print("no plot:", error)
    print(markdown(result))


def markdown(r) -> str:
    lines = [f"# TEAL sparse GEMV benchmark\n", f"{r['device']}, torch {r['torch']}, triton {r['triton']}, {r['date']}.",
             "Times in microseconds per call: `triton.testing.do_bench_cudagraph` median over calls captured back to",
             "back in one CUDA graph, rotating through enough weight copies that a round reads ~3x the L2 cache (a",
             "decode step reads its weights from HBM); speedups are cuBLAS bf16 / ours, same run. Random N(0,1)",
             "activations, threshold at the |x| quantile for the sparsity level.\n", "## Correctness (relative L2 error vs fp32 reference)\n",
             "| kernel | dtype | M | rel err |", "|---|---|---|---|"]
    lines += [f"| {c['kernel']} | {c['dtype'].replace('torch.', '')} | {c['M']} | {c['rel_err']:.2e} |" for c in r["correctness"]]
    lines += ["\n## M = 1, bf16: sparse GEMV vs cuBLAS\n",
              "| shape (N x K) | cuBLAS | ours 0% | ours 40% | ours 50% | x 40% | x 50% | weight copies | config |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in r["m1"]:
        lines.append(f"| {row['shape']} | {row['cublas_graph_us']:.1f} | {row['sparse0_graph_us']:.1f} | {row['sparse40_graph_us']:.1f} | "
                     f"{row['sparse50_graph_us']:.1f} | {row['speedup40']:.2f} | {row['speedup50']:.2f} | {row.get('weight_copies', 1)} | {row.get('config', '')} |")
    lines += ["\n## M = 1, bf16: compaction variant (indices of surviving columns first, then a gather GEMV)\n",
              "| shape | cuBLAS | compact 40% | compact 50% | x 40% | x 50% | rel err 50% |", "|---|---|---|---|---|---|---|"]
    for row in r["m1"]:
        if "compact50_graph_us" in row:
            lines.append(f"| {row['shape']} | {row['cublas_graph_us']:.1f} | {row.get('compact40_graph_us', float('nan')):.1f} | "
                         f"{row['compact50_graph_us']:.1f} | {row.get('compact_speedup40', float('nan')):.2f} | {row['compact_speedup50']:.2f} | {row['compact50_rel_err']:.1e} |")
    lines += ["\n## M = 1, bf16 activations, 4-bit LUT weights (g128): sparse LUT GEMV vs cuBLAS bf16\n",
              "| shape | cuBLAS bf16 | LUT4 0% | LUT4 50% | x 0% | x 50% |", "|---|---|---|---|---|---|"]
    for row in r["lut"]:
        lines.append(f"| {row['shape']} | {row['cublas_graph_us']:.1f} | {row['lut4_sparse0_graph_us']:.1f} | "
                     f"{row['lut4_sparse50_graph_us']:.1f} | {row['speedup0']:.2f} | {row['speedup50']:.2f} |")
    lines += ["\n## Small M (tl.dot path), 50% per-token sparsity\n",
              "| shape | M | cuBLAS | ours | x | weight rows read |", "|---|---|---|---|---|---|"]
    for row in r["small_m"]:
        lines.append(f"| {row['shape']} | {row['M']} | {row['cublas_graph_us']:.1f} | {row['sparse50_graph_us']:.1f} | {row['speedup']:.2f} | {row['rows_read']:.2f} |")
    lines += ["\n## M >= 64: the op's plain path vs F.linear without sparsity (graph times)\n",
              "| shape | M | F.linear | F.linear on W^T view | op, sparse prefill | op, dense prefill | overhead sparse | overhead dense prefill |",
              "|---|---|---|---|---|---|---|---|"]
    for row in r["plain"]:
        lines.append(f"| {row['shape']} | {row['M']} | {row['dense_graph_us']:.1f} | {row['dense_wt_view_graph_us']:.1f} | {row['op_sparse_graph_us']:.1f} | "
                     f"{row['op_dense_prefill_graph_us']:.1f} | {row['overhead_sparse_pct']:+.1f}% | {row['overhead_dense_prefill_pct']:+.1f}% |")
    if r.get("notes"):
        lines += ["\n## Notes\n"] + [f"- {n}" for n in r["notes"]]
    if r.get("errors"):
        lines += ["\n## Errors\n"] + [f"- {e}" for e in r["errors"]]
    return "\n".join(lines) + "\n"


def plot(r, path) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    rows = r["m1"]
    names = [row["shape"] for row in rows]
    xs = range(len(rows))
    width = 0.2
    for i, (key, label) in enumerate([("speedup0", "sparse GEMV 0%"), ("speedup40", "40%"), ("speedup50", "50%")]):
        axes[0].bar([x + (i - 1) * width for x in xs], [row[key] for row in rows], width, label=label)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("speedup vs cuBLAS bf16 GEMV (M=1)")
    axes[0].legend()
    lut = r["lut"]
    xs2 = range(len(lut))
    axes[1].bar([x - 0.15 for x in xs2], [row["speedup0"] for row in lut], 0.3, label="4-bit LUT, 0%")
    axes[1].bar([x + 0.15 for x in xs2], [row["speedup50"] for row in lut], 0.3, label="4-bit LUT + 50% sparsity")
    axes[1].axhline(5.0, color="r", lw=0.8, ls="--", label="target 5x")
    axes[1].set_xticks(list(xs2), [row["shape"] for row in lut], rotation=30, ha="right", fontsize=8)
    axes[1].set_ylabel("speedup vs cuBLAS bf16 GEMV (M=1)")
    axes[1].legend()
    fig.suptitle(f"TEAL sparse GEMV, {r['device']}, torch {r['torch']}, triton {r['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
