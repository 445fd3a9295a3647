"""GPU benchmark of LUT-quantized linears (issue 3): correctness in bf16, then timings vs cuBLAS bf16,
dequantize + cuBLAS, and torch's int4 weight-only GEMM (tinygemm), plus FWHT bandwidth and the memory of a
Llama-3.2-1B-shaped set of linear weights after packing + releasing the dense copies.

    python benchmarks/bench_quant.py --out DIR [--quick]

Writes DIR/quant.json and DIR/quant.md (and quant.png when matplotlib is present), incrementally.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transfigure.kernels import fwht as fwht_mod
from transfigure.kernels.autotune import copies_beyond_l2, time_per_call
from transfigure.kernels.grids import get_grid
from transfigure.kernels.lut_format import pack
from transfigure.kernels.lut_gemm import _lut_tuner, dequantize_triton, lut_linear_reference, lut_linear_triton

SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)]  # (out N, in K), Llama-3-8B
SHAPES_1B = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]  # Llama-3.2-1B: q/o, k/v, gate/up, down
MS = [1, 4, 16, 64, 256]


def bench(fn):
    """Median microseconds of ``fn`` replayed from a CUDA graph: the compiled model runs every decode step
    under CUDA graphs (mode="reduce-overhead"), so this is the time that matters; it also keeps the Python
    launch overhead of 10-50 us kernels out of the comparison. Falls back to plain do_bench."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")) * 1e3
    except Exception:  # noqa: BLE001
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")) * 1e3


def bench_rotating(calls) -> float:
    """Median microseconds per call of ``calls`` (one per weight copy), captured back to back in one graph."""
    return 1e3 * time_per_call(calls, rep=30)


def bench_eager(fn):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")) * 1e3


def family_best(timings: dict[str, float]) -> dict[str, float]:
    """Fastest time (us) of each kernel family among the autotuner's candidates."""
    best: dict[str, float] = {}
    for desc, ms in timings.items():
        family = "pair" if "MODE=pair" in desc else "dequant" if "MODE=dequant" in desc else "tile"
        best[family] = min(best.get(family, float("inf")), ms * 1e3)
    return best


def _rtn4_groups(w: torch.Tensor, group: int):
    """Asymmetric 4-bit round-to-nearest groups of ``group`` columns: (fp32 groups, group minimum, step)."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    return wg, lo, ((hi - lo) / 15).clamp(min=1e-6)


def gemlite_4bit(w: torch.Tensor, group: int = 128):
    """gemlite's A16W4 Triton kernels (asymmetric RTN, g128), or raises when gemlite is missing."""
    from gemlite.helper import A16Wn

    n, k = w.shape
    wg, lo, scale = _rtn4_groups(w, group)
    zero = -lo / scale
    q = ((wg / scale) + zero).round().clamp(0, 15).to(torch.uint8).view(n, k)
    layer = A16Wn(device=str(w.device), dtype=torch.bfloat16).from_weights(
        q, scale.view(n, -1).to(torch.bfloat16), zero.view(n, -1).to(torch.bfloat16), W_nbits=4, group_size=group)
    return layer


def int4_tinygemm(w: torch.Tensor, group: int = 128):
    """torch's own int4 weight-only GEMM (asymmetric RTN, g128). Returns a callable or raises."""
    n, k = w.shape
    wg, lo, scale = _rtn4_groups(w, group)
    q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
    zero = lo + 8 * scale  # tinygemm dequant: (q - 8) * scale + zero
    scales_zeros = torch.stack([scale.view(n, -1), zero.view(n, -1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    q_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(q_u8.contiguous(), 8)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_zeros)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gemm-only", action="store_true", help="skip the memory and FWHT bandwidth parts")
    ap.add_argument("--shapes", choices=("8b", "1b", "all"), default="8b")
    ap.add_argument("--fwht-only", action="store_true", help="only the FWHT bandwidth part (writes quant_fwht.{json,md})")
    ap.add_argument("--fwht-sizes", type=int, nargs="+", default=[2**i for i in range(6, 16)], help="Hadamard sizes to time")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    dev = torch.device("cuda")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    results = {"meta": meta, "gemm": [], "fwht": [], "memory": {}, "errors": []}
    t_start = time.time()

    stem = "quant_fwht" if args.fwht_only else "quant"

    def save():
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
        if args.fwht_only:  # incrementally: the largest sizes may not finish inside a device call
            write_markdown(results, out, stem)

    if args.fwht_only:
        fwht_part(results, dev, save, args.fwht_sizes)
        return

    torch.manual_seed(0)
    variants = [(4, 1)] + [(3, 1), (2, 1), (4, 2)]
    shapes = {"8b": SHAPES, "1b": SHAPES_1B, "all": SHAPES + SHAPES_1B}[args.shapes]
    for n, k in shapes:
        copies = {"bf16": copies_beyond_l2(2 * n * k), "int4": copies_beyond_l2(n * k // 2)}
        ws = [(torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16) for _ in range(copies["bf16"])]
        w = ws[0]
        int4s: list = []
        try:
            int4s = [int4_tinygemm(ws[i % len(ws)]) for i in range(copies["int4"])]
        except Exception as e:  # noqa: BLE001
            results["errors"].append(f"int4 tinygemm {n}x{k}: {type(e).__name__}: {e}"[:300])
        gls: list = []
        try:
            gls = [gemlite_4bit(ws[i % len(ws)]) for i in range(copies["int4"])]
        except Exception as e:  # noqa: BLE001
            results["errors"].append(f"gemlite {n}x{k}: {type(e).__name__}: {e}"[:300])
        packs = {}
        for bits, p in variants:
            copies[f"lut{bits}"] = copies_beyond_l2(n * k * bits // 8)
            packs[(bits, p)] = [pack(ws[i % len(ws)].float(), get_grid("higgs", bits, p).table, bits=bits, p=p,
                                     group_size=128, hadamard_size=0, scale_mode="rms", grid="higgs")
                                for i in range(copies[f"lut{bits}"])]
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"N": n, "K": k, "M": m, "weight_copies": copies}
            row["cublas_bf16_us"] = bench_rotating(lambda w=w: F.linear(x, w) for w in ws)
            if int4s:
                try:
                    row["torch_int4_us"] = bench_rotating(lambda f=f: f(x) for f in int4s)
                except Exception as e:  # noqa: BLE001
                    results["errors"].append(f"int4 mm {n}x{k} M={m}: {e}"[:300])
            if gls:
                try:
                    yg = gls[0](x)
                    ref_g = F.linear(x.float(), w.float())
                    row["gemlite_4b_relerr"] = float((yg.float() - ref_g).norm() / ref_g.norm())
                    row["gemlite_4b_us"] = bench_rotating(lambda f=f: f(x) for f in gls)
                except Exception as e:  # noqa: BLE001
                    results["errors"].append(f"gemlite {n}x{k} M={m}: {type(e).__name__}: {e}"[:300])
            for (bits, p), pks in packs.items():
                if (bits, p) != (4, 1) and m != 1 and not args.quick:
                    continue
                if args.quick and m not in (1, 16):
                    continue
                pk = pks[0]
                a = pk.op_args()
                tag = f"lut{bits}b_p{p}"
                y = lut_linear_triton(x, *a)  # tunes on first call
                ref = lut_linear_reference(x.float(), *a)
                row[f"{tag}_relerr"] = float((y.float() - ref).norm() / ref.norm())
                row[f"{tag}_families_us"] = family_best(_lut_tuner.last_timings)
                row[f"{tag}_us"] = bench_rotating(lambda a=q.op_args(): lut_linear_triton(x, *a) for q in pks)
                if m == 1:
                    row[f"{tag}_eager_us"] = bench_eager(lambda: lut_linear_triton(x, *a))
                row[f"{tag}_config"] = _lut_tuner.best_config(x, pk.codes, pk.scales, pk.table.float(), None,
                                                              bits, p, 128).describe()
                row[f"{tag}_speedup_vs_cublas"] = row["cublas_bf16_us"] / row[f"{tag}_us"]
                if (bits, p) == (4, 1):
                    row["dequant_cublas_us"] = bench_rotating(
                        lambda q=q: F.linear(x, dequantize_triton(q.codes, q.scales, q.table, bits, p, 128, dtype=x.dtype))
                        for q in pks)
            results["gemm"].append(row)
            print(json.dumps(row), flush=True)
            save()
        # the full op with online rotation (H=512), 4-bit, M=1
        rotated = [pack(ws[i % len(ws)].float(), get_grid("higgs", 4, 1).table, bits=4, p=1, group_size=128,
                        hadamard_size=512) for i in range(copies["lut4"])]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        lut_linear_triton(x, *rotated[0].op_args())
        results["gemm"][-len(MS)]["lut4b_H512_M1_us"] = bench_rotating(
            lambda a=q.op_args(): lut_linear_triton(x, *a) for q in rotated)
        signs = rotated[0].signs.to(dev)
        results["gemm"][-len(MS)]["fwht512_M1_us"] = bench(
            lambda: torch.ops.transfigure.fwht(x, signs, 512, 1 / math.sqrt(512)))
        del w, ws, packs, rotated, int4s, gls
        torch.cuda.empty_cache()
        save()
        print("elapsed", time.time() - t_start, flush=True)

    if args.gemm_only:
        write_markdown(results, out)
        return
    # memory: Llama-3.2-1B-shaped linear weights (16 layers), 4-bit g128, dense released after packing
    torch.cuda.empty_cache()
    hidden, inter, kv = 2048, 8192, 512
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)] * 16
    base = torch.cuda.memory_allocated()
    weights = [torch.randn(s, device=dev, dtype=torch.bfloat16) * 0.02 for s in shapes]
    dense = torch.cuda.memory_allocated() - base
    packed = []
    table = get_grid("higgs", 4, 1).table
    for wt in weights:
        packed.append(pack(wt, table, bits=4, p=1, group_size=128, hadamard_size=512))
        wt.untyped_storage().resize_(0)  # what release_dense does
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated() - base
    results["memory"] = {"dense_bf16_bytes": dense, "after_release_bytes": after, "ratio": after / dense}
    print(json.dumps(results["memory"]), flush=True)
    save()
    fwht_part(results, dev, save, args.fwht_sizes)
    write_markdown(results, out)


def fwht_part(results, dev, save, sizes) -> None:
    """FWHT bandwidth against a copy of the same bytes (64 MB of bf16), for each Hadamard size in ``sizes``."""
    for h in sizes:
        x = torch.randn(64 * 1024 * 1024 // 2 // h, h, device=dev, dtype=torch.bfloat16)  # 64 MB
        signs = (torch.randint(0, 2, (h,), device=dev) * 2 - 1).float()
        y = torch.ops.transfigure.fwht(x, signs, h, 1 / math.sqrt(h))
        ref = fwht_mod.fwht_reference(x[:64].float(), signs, h, 1 / math.sqrt(h))
        err = float((y[:64].float() - ref).norm() / ref.norm())
        t = bench(lambda: torch.ops.transfigure.fwht(x, signs, h, 1 / math.sqrt(h)))
        tc = bench(lambda: x.clone())
        row = {"h": h, "bytes": 2 * x.numel() * 2, "fwht_us": t, "copy_us": tc, "fraction_of_copy": tc / t,
               "GBps": 2 * x.numel() * 2 / t / 1e3, "relerr_bf16": err}
        try:
            from transfigure.kernels.fwht import _fwht_dot_tuner, _fwht_tuner

            tuner = _fwht_dot_tuner if 16 <= h <= 32768 else _fwht_tuner
            row["config"] = tuner.best_config(x, signs, h, 1 / math.sqrt(h)).describe()
            row["timings"] = getattr(tuner, "last_timings", None)
        except Exception as e:  # noqa: BLE001
            row["config"] = f"? ({type(e).__name__})"
        results["fwht"].append(row)
        print(json.dumps(row), flush=True)
        save()


def write_markdown(results, out: Path, stem: str = "quant") -> None:
    meta = results["meta"]
    lines = [f"# LUT quantization benchmark ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['date']})", "", "Times in us per call (do_bench_cudagraph median; every kernel rotates through as many weight copies as make "
             "a round read ~3x the L2 cache, so weights come from HBM as in a decode step), bf16 activations, HIGGS grids g128, no rotation "
             "unless noted. Speedup = cuBLAS bf16 / ours. gemlite: 0.6.0, A16W4 asymmetric RTN g128 (its own kernels and "
             "autotuning); torch int4: `_weight_int4pack_mm` (tinygemm).", ""] + ([meta["note"], ""] if meta.get("note") else []) + [
             "| N x K | M | cuBLAS bf16 | torch int4 | gemlite 4b | dequant+cuBLAS | LUT 4b | x | LUT 3b | x | LUT 2b | x | LUT 4b p2 | x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    g = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for r in results["gemm"]:
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {f(r.get('cublas_bf16_us'))} | {f(r.get('torch_int4_us'))} | "
                     f"{f(r.get('gemlite_4b_us'))} | {f(r.get('dequant_cublas_us'))} | {f(r.get('lut4b_p1_us'))} | {g(r.get('lut4b_p1_speedup_vs_cublas'))} | "
                     f"{f(r.get('lut3b_p1_us'))} | {g(r.get('lut3b_p1_speedup_vs_cublas'))} | {f(r.get('lut2b_p1_us'))} | "
                     f"{g(r.get('lut2b_p1_speedup_vs_cublas'))} | {f(r.get('lut4b_p2_us'))} | {g(r.get('lut4b_p2_speedup_vs_cublas'))} |")
    if not results["gemm"]:
        lines = lines[:2] + ([meta["note"]] if meta.get("note") else [])
    else:
        lines += ["", "Full op with online FWHT (H=512), 4-bit, M=1: " + ", ".join(
            f"{r['N']}x{r['K']}: {r['lut4b_H512_M1_us']:.1f} us" for r in results["gemm"] if "lut4b_H512_M1_us" in r)]
    lines += ["", "| FWHT h | us | copy us | fraction of copy bandwidth | GB/s | config |", "|---|---|---|---|---|---|"]
    for r in results["fwht"]:
        lines.append(f"| {r['h']} | {r['fwht_us']:.1f} | {r['copy_us']:.1f} | {r['fraction_of_copy']:.2f} | {r['GBps']:.0f} | "
                     f"{r.get('config', '')} |")
    if results["memory"]:
        m = results["memory"]
        lines += ["", f"Memory, Llama-3.2-1B-shaped linear weights: dense bf16 {m['dense_bf16_bytes'] / 2**20:.0f} MiB, "
                  f"after pack + release {m['after_release_bytes'] / 2**20:.0f} MiB, ratio {m['ratio']:.3f}"]
    if results["errors"]:
        lines += ["", "Errors:"] + [f"- {e}" for e in results["errors"]]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        measured = list(dict.fromkeys((r["N"], r["K"]) for r in results["gemm"]))
        if not measured:  # the FWHT-only run: bandwidth against a copy, per Hadamard size
            rows = sorted(results["fwht"], key=lambda r: r["h"])
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot([r["h"] for r in rows], [r["fraction_of_copy"] for r in rows], marker="o", label="FWHT")
            ax.axhline(0.7, color="k", lw=0.5, ls="--", label="target 0.7")
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("Hadamard size h")
            ax.set_ylabel("fraction of copy bandwidth")
            ax.set_title(f"FWHT, 64 MB bf16, {meta['device']}", fontsize=9)
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / f"{stem}.png", dpi=100)
            return
        fig, axes = plt.subplots(1, len(measured), figsize=(4 * len(measured), 3.5), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, (n, k) in zip(axes, measured):
            rows = [r for r in results["gemm"] if r["N"] == n and r["K"] == k]
            for key, label in [("lut4b_p1_speedup_vs_cublas", "LUT 4b"), ("lut3b_p1_speedup_vs_cublas", "LUT 3b"),
                               ("lut2b_p1_speedup_vs_cublas", "LUT 2b")]:
                pts = [(r["M"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            pts = [(r["M"], r["cublas_bf16_us"] / r["torch_int4_us"]) for r in rows if "torch_int4_us" in r]
            if pts:
                ax.plot(*zip(*pts), marker="x", ls="--", label="torch int4")
            pts = [(r["M"], r["cublas_bf16_us"] / r["gemlite_4b_us"]) for r in rows if "gemlite_4b_us" in r]
            if pts:
                ax.plot(*zip(*pts), marker="+", ls=":", label="gemlite 4b")
            ax.axhline(1.0, color="k", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{n}x{k}")
            ax.set_xlabel("M")
        axes[0].set_ylabel("speedup vs cuBLAS bf16")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=100)
    except Exception as e:  # noqa: BLE001
        print("no plot:", e)


if __name__ == "__main__":
    main()
