"""Where a LoRA training step's GPU time goes: PEFT + Inductor against transfigure's lora pass, per kernel.

The LoRA benchmark (``bench_lora.py``) times whole steps; this script also profiles a few of them with
``torch.profiler`` and lists kernels by GPU time, the sum of kernel time per step (GPU busy) beside the wall
time (the rest is the GPU waiting for the host), so a gap between two variants can be located. Model:
Llama-3.2-1B shapes (``--layers`` of its 16 decoder layers, full 128256 vocabulary), random weights, bf16,
batch 8 x 512, LoRA r=16 alpha=32 on all linears (fp32 adapters in both), AdamW.

    python benchmarks/profile_training.py --out $OUT --layers 16
    python benchmarks/profile_training.py --smoke   # tiny model on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import transfigure  # noqa: E402
import transfigure.passes.lora as lora  # noqa: E402
from transfigure.bench import environment, pyplot  # noqa: E402

VARIANTS = ("peft+inductor", "lora-fused", "lora-unfused")
# also: "peft-bf16+inductor" -- PEFT with autocast_adapter_dtype=False (bf16 adapters, bf16 adapter matmuls)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_base(layers: int, smoke: bool, device: str, dtype: torch.dtype):
    from transfigure.models import llama_1b_config, model_class, tiny_config

    config = tiny_config("llama") if smoke else llama_1b_config(num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class("llama")(config).to(dtype)
    return model.eval().requires_grad_(False)


def setup(variant: str, base, r: int, extra: dict, mode: str | None):
    """(compiled model, optimizer) of one variant, adapters equal to a PEFT model's with B ~ N(0, 0.01)."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
    ref = peft.get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=variant != "peft-bf16+inductor")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator(p.device).manual_seed(1))
    if variant in ("peft+inductor", "peft-bf16+inductor"):
        return torch.compile(ref, mode=mode), torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4)
    state = peft.get_peft_model_state_dict(ref)
    del ref
    ours = copy.deepcopy(base)
    lora.load_lora(ours, state, {"lora_alpha": 2 * r})
    options = {"lora": {"r": r, "alpha": float(2 * r), "target_modules": "all-linear",
                        "fused": variant != "lora-unfused"}, **extra}
    compiled = torch.compile(ours, backend=transfigure.backend(**options), mode=mode)
    return compiled, torch.optim.AdamW(lora.lora_parameters(ours), lr=1e-4)


def kernel_table(step, steps: int) -> tuple[list[dict], float]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if torch.cuda.is_available() and event.device_type != DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us()
        entry = totals.setdefault(event.name[:140], [0.0, 0])
        entry[0] += us
        entry[1] += 1
    rows = [{"kernel": k, "us_per_step": v[0] / steps, "per_step": v[1] / steps} for k, v in totals.items()]
    rows.sort(key=lambda row: -row["us_per_step"])
    return rows, sum(row["us_per_step"] for row in rows) / 1e3


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas")):
        return "GEMM (cuBLAS)"
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if n.startswith("triton") or "triton" in n:
        return "Triton (Inductor or ours)"
    if "memcpy" in n or "memset" in n:
        return "copies"
    return "other (ATen)"


def run_variant(variant: str, args, device, dtype, ids, extra: dict) -> dict:
    torch._dynamo.reset()
    base = build_base(args.layers, args.smoke, device, dtype)
    model, opt = setup(variant, base, args.r, extra, args.mode)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    first = float(step())
    step()
    sync()
    compile_s = time.time() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    kernels, busy_ms = kernel_table(step, args.profile_steps)
    by_category: dict[str, float] = {}
    for row in kernels:
        by_category[category(row["kernel"])] = by_category.get(category(row["kernel"]), 0.0) + row["us_per_step"] / 1e3
    result = {"name": variant, "step_ms_median": statistics.median(times), "step_ms_all": times, "peak_gib": peak,
              "first_loss": first, "compile_and_2_steps_s": compile_s, "gpu_busy_ms": busy_ms,
              "by_category_ms": by_category, "kernels": kernels[:40]}
    del model, opt, base
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(results: dict) -> str:
    rows = [v for v in results["variants"] if "step_ms_median" in v]
    base = rows[0]["step_ms_median"] if rows else None
    lines = [f"# LoRA training step, Llama-3.2-1B shape ({results['layers']} layers), bf16, batch {results['batch']} x "
             f"{results['seq_len']}, r={results['r']} all linears, torch.compile mode={results.get('mode') or 'default'} — {results['device']}, torch {results['torch']}, "
             f"{results['date']}", "",
             "Median of the timed steps (forward, backward, AdamW step). GPU busy: sum of kernel times per step "
             "(torch.profiler); wall - busy is time the GPU waited for the host.", "",
             "| variant | step ms | vs first row | GPU busy ms | peak GiB | first loss | " + " | ".join(
                 sorted({c for v in rows for c in v["by_category_ms"]})) + " |",
             "|---|---|---|---|---|---|" + "---|" * len({c for v in rows for c in v["by_category_ms"]})]
    cats = sorted({c for v in rows for c in v["by_category_ms"]})
    for v in rows:
        peak = f"{v['peak_gib']:.2f}" if v["peak_gib"] is not None else "-"
        lines.append(f"| {v['name']} | {v['step_ms_median']:.2f} | {base / v['step_ms_median']:.3f}x | {v['gpu_busy_ms']:.2f} | "
                     f"{peak} | {v['first_loss']:.4f} | " + " | ".join(f"{v['by_category_ms'].get(c, 0):.2f}" for c in cats) + " |")
    for v in results["variants"]:
        if "error" in v:
            lines.append(f"| {v['name']} | failed: {v['error'][:160]} |")
    for v in rows:
        lines += ["", f"## {v['name']}: top kernels (us per step, launches per step)", "", "| us | launches | kernel |",
                  "|---|---|---|"]
        lines += [f"| {k['us_per_step']:.0f} | {k['per_step']:.0f} | `{k['kernel'][:100]}` |" for k in v["kernels"][:20]]
    return "\n".join(lines) + "\n"


def summarize(paths: list[str], out: str) -> str:
    """One table (and a bar chart) over several runs of this script: wall and GPU-busy time per variant and mode."""
    runs = [json.load(open(path)) for path in paths]
    rows = [(run.get("mode") or "default", v) for run in runs for v in run["variants"] if "step_ms_median" in v]
    reference = {mode: v["step_ms_median"] for mode, v in rows if v["name"] == "peft+inductor"}
    first = runs[0]
    lines = [f"# LoRA training step against PEFT + torch.compile, Llama-3.2-1B shape ({first['layers']} layers), bf16, "
             f"batch {first['batch']} x {first['seq_len']}, r={first['r']} on all linears, AdamW — {first['device']}, "
             f"torch {first['torch']}", "",
             "Same process per mode; the PEFT rows use PEFT's defaults (fp32 adapters, `autocast_adapter_dtype=True`: x "
             "is cast to fp32 and the adapter matmuls run in fp32) unless marked bf16 (`autocast_adapter_dtype=False`: "
             "bf16 adapters, bf16 optimizer state). transfigure keeps fp32 adapters (and fp32 AdamW state) and runs "
             "the adapter matmuls in the activation dtype. GPU busy = sum of kernel times per step; wall - busy = GPU "
             "waiting for the host. Peak memory is only meaningful without CUDA graphs (their pool is allocated "
             "before the timed steps).", "",
             "| torch.compile mode | variant | step ms | vs PEFT (same mode) | GPU busy ms | peak GiB | first loss |",
             "|---|---|---|---|---|---|---|"]
    for mode, v in rows:
        ratio = f"{reference[mode] / v['step_ms_median']:.2f}x" if mode in reference else "-"
        peak = f"{v['peak_gib']:.2f}" if v.get("peak_gib") is not None and mode == "default" else "-"
        lines.append(f"| {mode} | {v['name']} | {v['step_ms_median']:.2f} | {ratio} | {v['gpu_busy_ms']:.2f} | {peak} | "
                     f"{v['first_loss']:.4f} |")
    lines += ["", "Kernel tables: " + ", ".join(f"`{os.path.basename(p).replace('.json', '.md')}`" for p in paths), ""]
    text = "\n".join(lines)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lora_training.md"), "w") as f:
        f.write(text)
    plt = pyplot()
    if plt is None:
        return text
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{v['name']}\n({mode})" for mode, v in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [v["step_ms_median"] for _, v in rows], 0.4, label="step (wall) ms")
    ax.bar([x + 0.2 for x in xs], [v["gpu_busy_ms"] for _, v in rows], 0.4, label="GPU busy ms")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("ms per training step (lower is better)")
    ax.set_title(f"LoRA r={first['r']} training step, 1B shape, {first['batch']}x{first['seq_len']} tokens, {first['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lora_training.png"), dpi=120)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--extra", default="{}", help="JSON of more transfigure options for the lora variants")
    parser.add_argument("--mode", default=None, help="torch.compile mode of every variant (e.g. reduce-overhead)")
    parser.add_argument("--name", default="profile_training")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--summarize", nargs="+", help="only merge existing JSON files of this script into lora_training.{md,png}")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize, args.out))
        return
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.batch, args.seq_len, args.r, args.steps, args.profile_steps = 2, 16, 4, 2, 1
    vocab = 128256 if not args.smoke else 256
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), device=device, generator=torch.Generator(device).manual_seed(0))
    extra = json.loads(args.extra)
    results = {**environment(device), "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len, "r": args.r,
               "extra": extra, "mode": args.mode, "variants": []}
    os.makedirs(args.out, exist_ok=True)
    for variant in args.variants.split(","):
        try:
            results["variants"].append(run_variant(variant, args, device, dtype, ids, extra))
        except Exception as error:  # keep the other variants' rows
            results["variants"].append({"name": variant, "error": f"{type(error).__name__}: {str(error)[:400]}"})
        print({k: v for k, v in results["variants"][-1].items() if k != "kernels"}, flush=True)
        with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
            f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
