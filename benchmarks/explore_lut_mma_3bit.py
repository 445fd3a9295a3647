"""Exploration: the tensor-core path for 3-bit LUT codes (``_lut_mma_gemv_kernel`` with THREE_BIT: 6-bit pair
indices assembled from the 2-bit and 1-bit planes, looked up in the shared pair table) on the GPU.

Two parts, in one call of a few minutes:

1. Check: every 3-bit tensor-core config the tuner would try for bf16 g128 (the timed ones) at M = 1 and 16,
   and two per case otherwise (``representative``), for bf16 / fp16 x groups 64 / 128 / 256 x M = 1, 4, 16 on
   a long-K shape, and for g128 on a small one with N not a multiple of 16, against the float32 reference
   (``lut_linear_reference``). A relative error
   above ``--tolerance`` or a repeat that differs is a failure: printed as it happens, listed at the end, and
   the script exits with status 1 (the timings still run, without the failing configs).
2. Time, weights from HBM (every kernel rotates through as many weight copies as make a round read ~3x the L2,
   in one CUDA-graph replay: ``autotune.time_per_call``, as ``bench_quant.py``), bf16, HIGGS grids g128, on
   the Llama-3-8B shapes at M = 1 and 16: cuBLAS bf16, the existing 3-bit path (the best of the non-tensor-core
   configs that won before, or all of them with ``--all-baselines``), every new 3-bit tensor-core config, and
   the 4-bit tensor-core op over the same configs (shared-table ones; ``--four-bit all`` adds its register
   lookup configs).

Writes ``OUT/explore_lut_mma_3bit.json`` (every time and error) and ``.md`` (best per family, and every 3-bit
config against the same config on 4-bit codes), incrementally.

    python benchmarks/explore_lut_mma_3bit.py --out "$OUT"                 # on the GPU
    TRITON_INTERPRET=1 python benchmarks/explore_lut_mma_3bit.py --smoke --out /tmp/smoke   # CPU, end to end
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transfigure.bench import pyplot  # noqa: E402
from transfigure.kernels.autotune import copies_beyond_l2, time_per_call  # noqa: E402
from transfigure.kernels.grids import get_grid  # noqa: E402
from transfigure.kernels.lut_format import pack  # noqa: E402
from transfigure.kernels.lut_gemm import configs_for, lut_linear_reference, lut_linear_triton  # noqa: E402

TIMED_SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)]  # (N, K), Llama-3-8B
# N = 4000 leaves the last program's warps partly empty and, a multiple of 16 like the timed N, shares Triton's
# integer specializations with them, so the bf16 g128 kernels checked here are the ones timed later (compile
# time is most of this script's budget); the small shape checks the bookkeeping once more with N % 16 != 0
CHECK_SHAPES = [(4000, 14336), (1000, 2048)]
# the non-tensor-core 3-bit configs that won before (benchmarks/results/quant.json: the tile config below at M = 1
# on all four shapes; the pair family came second) and, at M = 16, dequantize + cuBLAS and the tl.dot tiles
KNOWN_BASELINES = {
    1: [{"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_K": 512, "SPLIT_K": 1},
        {"BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 1},
        {"MODE": "pair", "BLOCK_N": 16, "SPLIT_K": 4}, {"MODE": "pair", "BLOCK_N": 64, "SPLIT_K": 4}],
    16: [{"MODE": "dequant"}, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1},
         {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2},
         {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2}],
}


def is_mma(config) -> bool:
    return config.meta.get("MODE") == "mma"


def mma_configs(m: int, kp: int, group: int, bits: int, dtype: torch.dtype, register_too: bool = False) -> list:
    return [c for c in configs_for(m, kp, 1, group, bits, dtype)
            if is_mma(c) and (register_too or c.meta.get("LOOKUP") == "shared")]


def representative(configs: list) -> list:
    """Two configs that together exercise split-K, the L2 hint, and persistent programs or two K steps per
    iteration where those apply: the step's PTX differs per (half type, group size, x blocks); the rest of the
    bookkeeping is checked on every config of the timed set."""
    picks = []
    for wanted in (lambda c: c.meta["SPLIT_K"] > 1 and c.meta.get("L2"),
                   lambda c: c.meta.get("PER_SM") or c.meta["UNROLL"] > 1, lambda c: c.meta["SPLIT_K"] > 1):
        if len(picks) == 2:
            break
        found = next((c for c in configs if wanted(c) and c not in picks), None)
        if found is not None:
            picks.append(found)
    return picks


def baseline_configs(m: int, kp: int, group: int, everything: bool) -> list:
    candidates = [c for c in configs_for(m, kp, 1, group, 3, torch.bfloat16) if not is_mma(c)]
    if everything:
        return candidates
    wanted = KNOWN_BASELINES[1 if m == 1 else 16]
    return [c for c in candidates if any(all(c.meta.get(k) == v for k, v in w.items()) for w in wanted)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).norm() / expected.norm())


def packed_weight(n: int, k: int, bits: int, group: int, device: str, seed: int):
    torch.manual_seed(seed)
    w = torch.randn(n, k, device=device) * 0.02
    return w, pack(w, get_grid("higgs", bits, 1).table, bits=bits, p=1, group_size=group, hadamard_size=0,
                   scale_mode="rms", grid="higgs")


def weight_copies(pk, count: int) -> list[tuple]:
    """``count`` op-argument tuples over distinct copies of the codes and scales (same values): a round over
    them reads the weights from HBM."""
    copies = [pk] + [dataclasses.replace(pk, codes=pk.codes.clone(), scales=pk.scales.clone()) for _ in range(count - 1)]
    return [q.op_args() for q in copies]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--smoke", action="store_true",
                    help="CPU + TRITON_INTERPRET=1: a tiny shape, fp16 (the interpreter's half type), a few configs")
    ap.add_argument("--tolerance", type=float, default=1e-2, help="largest relative error vs the fp32 reference")
    ap.add_argument("--all-baselines", action="store_true", help="time every non-tensor-core 3-bit candidate")
    ap.add_argument("--four-bit", choices=("shared", "all"), default="shared")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16], help="M values to time")
    ap.add_argument("--check-budget-s", type=float, default=150.0,
                    help="skip the remaining check cases (reported as not checked) after this many seconds")
    ap.add_argument("--budget-s", type=float, default=250.0, help="stop timing (and write what is done) after this")
    ap.add_argument("--replot", action="store_true", help="only redraw OUT/explore_lut_mma_3bit.png from its JSON")
    args = ap.parse_args()
    if args.replot:
        stem = os.path.join(args.out, "explore_lut_mma_3bit")
        with open(stem + ".json") as handle:
            plot(json.load(handle), stem + ".png")
        return
    started = time.time()
    smoke = args.smoke
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--smoke needs TRITON_INTERPRET=1 (the Triton interpreter on CPU tensors)")
    device = "cpu" if smoke else "cuda"
    import triton

    meta = {"device": "cpu (TRITON_INTERPRET=1, smoke)" if smoke else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "note": "weights from HBM: rotating copies ~3x L2 per round, one CUDA-graph replay (time_per_call); "
                    "HIGGS grids, no rotation"}
    results = {"meta": meta, "checks": [], "failures": [], "timings": [], "errors": []}
    failed_configs: set[str] = set()  # descriptions of configs that were wrong somewhere: not timed
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "explore_lut_mma_3bit" + ("_smoke" if smoke else ""))

    def save() -> None:
        with open(stem + ".json", "w") as handle:
            json.dump(results, handle, indent=1)
        write_markdown(results, stem + ".md")
        plot(results, stem + ".png")

    # ---------------------------------------------------------------- 1. check against the reference
    check_shapes = [(64, 512), (37, 256)] if smoke else CHECK_SHAPES
    halves = [torch.float16] if smoke else [torch.bfloat16, torch.float16]
    groups = [64, 128, 256]
    for n, k in check_shapes:
        for group in (groups if (n, k) == check_shapes[0] else [128]):
            _, pk = packed_weight(n, k, 3, group, device, seed=n + k + group)
            op = pk.op_args()
            for half in halves:
                for m in (1, 4, 16):
                    x = torch.randn(m, k, device=device, generator=None).to(half)
                    ref = lut_linear_reference(x.float(), *op).float()
                    configs = mma_configs(m, pk.padded_in_features, group, 3, half)
                    if not configs:
                        results["failures"].append(f"{n}x{k} g{group} {half} M={m}: no 3-bit tensor-core config")
                        continue
                    if time.time() - started > args.check_budget_s:
                        results["errors"].append(f"NOT CHECKED (check budget spent): {n}x{k} g{group} {half} M={m}")
                        continue
                    timed_set = half == torch.bfloat16 and group == 128 and (n, k) == check_shapes[0] and m != 4
                    if smoke:
                        configs = configs[:2]
                    elif not timed_set:
                        configs = representative(configs)
                    worst = 0.0
                    for config in configs:
                        name = f"{n}x{k} g{group} {str(half)[6:]} M={m} {config.describe()}"
                        try:
                            outs = [lut_linear_triton(x, *op, config=config) for _ in range(1 if smoke else 3)]
                            if not smoke:
                                torch.cuda.synchronize()
                            err = relative_error(outs[0], ref)
                            same = all(torch.equal(outs[0], o) for o in outs[1:])
                        except Exception as exc:  # noqa: BLE001
                            err, same = float("nan"), False
                            results["errors"].append(f"{name}: {type(exc).__name__}: {exc}"[:400])
                        worst = max(worst, err) if err == err else float("inf")
                        results["checks"].append({"case": name, "rel_err": err, "repeat_identical": same})
                        if not (err <= args.tolerance and same):
                            failed_configs.add(config.describe())
                            results["failures"].append(f"{name}: rel_err {err:.3g}, repeat identical {same}")
                            print(f"!!! WRONG: {name}: rel_err {err:.3g}, repeat identical {same}", flush=True)
                    print(f"check {n}x{k} g{group} {str(half)[6:]} M={m}: {len(configs)} configs, max rel err "
                          f"{worst:.3g}", flush=True)
            save()

    # ---------------------------------------------------------------- 2. timings, weights from HBM
    timed_shapes = [(64, 512)] if smoke else TIMED_SHAPES
    dtype = torch.float16 if smoke else torch.bfloat16

    def timer(calls: list) -> float:
        """Microseconds per call: CUDA-graph replay over the copies on the GPU, a plain median on the CPU."""
        if not smoke:
            return 1e3 * time_per_call(calls, rep=20)
        calls[0]()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            calls[0]()
            samples.append(time.perf_counter() - start)
        return 1e6 * sorted(samples)[1]

    out_of_time = False
    for n, k in timed_shapes:
        if out_of_time:
            break
        w, pk3 = packed_weight(n, k, 3, 128, device, seed=n * 7 + k)
        _, pk4 = packed_weight(n, k, 4, 128, device, seed=n * 7 + k)
        dense = w.to(dtype)
        count = lambda nbytes: 1 if smoke else copies_beyond_l2(nbytes)  # noqa: E731
        dense_copies = [dense] + [dense.clone() for _ in range(count(2 * n * k) - 1)]
        sets3 = weight_copies(pk3, count(n * k * 3 // 8))
        sets4 = weight_copies(pk4, count(n * k // 2))
        for m in args.ms:
            if time.time() - started > args.budget_s:
                out_of_time = True
                results["errors"].append(f"time budget ({args.budget_s:.0f} s) spent before {n}x{k} M={m}")
                break
            x = torch.randn(m, k, device=device).to(dtype)
            ref3 = lut_linear_reference(x.float(), *sets3[0]).float()
            row = {"N": n, "K": k, "M": m, "copies": {"bf16": len(dense_copies), "lut3": len(sets3), "lut4": len(sets4)},
                   "cublas_us": timer([lambda d=d: F.linear(x, d) for d in dense_copies]), "configs": {}}

            def run(family, config, sets, bits):
                desc = config.describe()
                if desc in failed_configs and bits == 3:
                    return
                try:
                    us = timer([lambda a=a: lut_linear_triton(x, *a, config=config) for a in sets])
                    entry = {"family": family, "us": us}
                    if bits == 3:
                        entry["rel_err"] = relative_error(lut_linear_triton(x, *sets[0], config=config), ref3)
                    row["configs"][f"{family} | {desc}"] = entry
                except Exception as exc:  # noqa: BLE001
                    results["errors"].append(f"{n}x{k} M={m} {family} {desc}: {type(exc).__name__}: {exc}"[:400])

            kp = pk3.padded_in_features
            baselines = baseline_configs(m, kp, 128, args.all_baselines)
            for config in (baselines[:2] if smoke else baselines):
                run("3-bit existing", config, sets3, 3)
            new = mma_configs(m, kp, 128, 3, dtype)
            for config in (new[:3] if smoke else new):
                run("3-bit mma", config, sets3, 3)
            four = mma_configs(m, kp, 128, 4, dtype, register_too=args.four_bit == "all")
            for config in (four[:3] if smoke else four):
                run("4-bit mma", config, sets4, 4)
            best = {}
            for name, entry in row["configs"].items():
                fam = entry["family"]
                if entry["us"] < best.get(fam, (float("inf"), ""))[0]:
                    best[fam] = (entry["us"], name.split(" | ", 1)[1])
            row["best"] = best
            results["timings"].append(row)
            summary = ", ".join(f"{fam} {us:.1f} ({row['cublas_us'] / us:.2f}x)" for fam, (us, _) in sorted(best.items()))
            print(f"{n}x{k} M={m}: cuBLAS {row['cublas_us']:.1f} us | {summary} | {time.time() - started:.0f} s", flush=True)
            save()
        del dense_copies, sets3, sets4
        if not smoke:
            torch.cuda.empty_cache()
    save()
    print(f"wrote {stem}.md / .json in {time.time() - started:.0f} s", flush=True)
    for line in results["errors"]:  # configs that raised, cases skipped for time
        print("  error: " + line, flush=True)
    if results["failures"]:
        print("\n" + "!" * 100 + f"\n{len(results['failures'])} CHECK FAILURE(S) -- the 3-bit tensor-core path is WRONG:",
              flush=True)
        for line in results["failures"][:30]:
            print("  " + line, flush=True)
        sys.exit(1)
    print(f"all {len(results['checks'])} checks passed (max rel err "
          f"{max((c['rel_err'] for c in results['checks']), default=0):.3g})", flush=True)


def plot(results: dict, path: str) -> None:
    """Bars of cuBLAS bf16 / ours per shape and M: the old 3-bit path, the 3-bit and 4-bit tensor-core GEMVs."""
    plt = pyplot()
    if plt is None:
        return
    rows = [t for t in results["timings"] if t.get("best")]
    if not rows:
        return
    families = ("3-bit existing", "3-bit mma", "4-bit mma")
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(families)
    for i, family in enumerate(families):
        ratios = [t["cublas_us"] / t["best"][family][0] if family in t["best"] else 0.0 for t in rows]
        ax.bar([j + i * width for j in range(len(rows))], ratios, width, label=family)
    ax.set_xticks([j + width for j in range(len(rows))], [f"{t['N']}x{t['K']}\nM={t['M']}" for t in rows], fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(3.8, color="r", lw=0.8, ls="--", label="target 3.8x (3-bit, M=1)")
    ax.set_ylabel("cuBLAS bf16 / ours (from HBM)")
    meta = results["meta"]
    ax.set_title(f"3-bit LUT GEMV on the tensor cores, {meta['device']}, triton {meta['triton']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(results: dict, path: str) -> None:
    meta = results["meta"]
    lines = [f"# 3-bit LUT codes on the tensor cores ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['date']})", "", f"us per call, {meta['note']}. x = cuBLAS bf16 / ours. 3-bit existing = best of the "
             "non-tensor-core configs timed; 4-bit mma = best 4-bit tensor-core config (same grid family, g128).", "",
             "| N x K | M | cuBLAS | 3-bit existing | x | 3-bit mma | x | 4-bit mma | x | 3-bit mma / 4-bit mma |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fams = ("3-bit existing", "3-bit mma", "4-bit mma")
    for r in results["timings"]:
        cells = []
        for fam in fams:
            us = r["best"].get(fam, (None,))[0]
            cells += ["", ""] if us is None else [f"{us:.1f}", f"{r['cublas_us'] / us:.2f}"]
        mma3, mma4 = r["best"].get("3-bit mma", (None,))[0], r["best"].get("4-bit mma", (None,))[0]
        ratio = f"{mma3 / mma4:.2f}" if mma3 and mma4 else ""
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['cublas_us']:.1f} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "Best configs:", ""]
    for r in results["timings"]:
        for fam, (us, desc) in sorted(r["best"].items()):
            lines.append(f"- {r['N']}x{r['K']} M={r['M']} {fam}: {us:.1f} us, {desc}")
    # every 3-bit tensor-core config next to the same config on 4-bit codes
    lines += ["", "Per config (us, 3-bit / 4-bit):", ""]
    cases = [(r["N"], r["K"], r["M"]) for r in results["timings"]]
    lines += ["| config | " + " | ".join(f"{n}x{k} M={m}" for n, k, m in cases) + " |", "|---|" + "---|" * len(cases)]
    descs = list(dict.fromkeys(name.split(" | ", 1)[1] for r in results["timings"] for name in r["configs"]
                               if name.startswith("3-bit mma")))
    for desc in descs:
        cells = []
        for r in results["timings"]:
            three, four = r["configs"].get(f"3-bit mma | {desc}"), r["configs"].get(f"4-bit mma | {desc}")
            as_text = lambda entry: "" if entry is None else f"{entry['us']:.1f}"  # noqa: E731
            cells.append(f"{as_text(three)} / {as_text(four)}")
        lines.append(f"| {desc} | " + " | ".join(cells) + " |")
    checks = results["checks"]
    lines += ["", f"Checks: {len(checks)} config runs, max rel err "
              f"{max((c['rel_err'] for c in checks), default=0):.3g}, failures {len(results['failures'])}."]
    lines += [f"- FAILED {f}" for f in results["failures"]]
    if results["errors"]:
        lines += ["", "Errors:"] + [f"- {e}" for e in results["errors"]]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(2)
