"""LoRA / GaLore benchmark: fused kernel micro-benchmarks, a LoRA training step against PEFT + torch.compile,
and GaLore optimizer-state memory and step time against galore-torch and full AdamW.

Model: Llama-3.2-1B layer shapes (hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocab 128256), random
weights, bf16, ``--layers`` of the 16 decoder layers (compile time on the lent GPU is the limit), batch 8 x 512.
LoRA: r=16, alpha=32, all linears (PEFT's "all-linear"), AdamW on the fp32 adapters. GaLore: rank 128,
scale 0.25, gap 200, AdamW. Writes ``lora.json`` and ``lora.md`` (and ``lora.png`` when matplotlib is
present) into ``--out`` (default ``$OUT`` or benchmarks/results). Sections are written as they finish.

    python benchmarks/bench_lora.py            # GPU
    python benchmarks/bench_lora.py --smoke    # tiny shapes on CPU, to check the script runs
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import transfigure  # noqa: E402
import transfigure.passes.galore as galore  # noqa: E402
import transfigure.passes.lora as lora  # noqa: E402
from transfigure.kernels.lora import lora_linear_fused, lora_linear_reference  # noqa: E402

START = time.time()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn, device):
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def time_steps(step, n, device):
    """Median ms of ``n`` calls of ``step`` (each a full training step) and the peak memory over them."""
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(n):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times), peak


# -- 1. kernel -----------------------------------------------------------------------------------------------


def kernel_section(args, device, dtype):
    rows = []
    M = args.tokens
    shapes = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)] if not args.smoke else [(48, 32)]
    s = 2.0
    for N, K in shapes:
        for r in (16, 64):
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
            w = (torch.randn(N, K, device=device, generator=g) * K**-0.5).to(dtype)
            a = (torch.randn(r, K, device=device, generator=g) * K**-0.5).to(dtype)
            b = (torch.randn(N, r, device=device, generator=g) * r**-0.5).to(dtype)
            ref = lora_linear_reference(x.float(), w.float(), None, a.float(), b.float(), s, s)
            fused = lora_linear_fused(x, w, None, a, b, s)
            err = ((fused.float() - ref).norm() / ref.norm()).item()
            unfused = lambda: x @ w.t() + (x @ a.t()) @ b.t() * s  # noqa: E731
            compiled_unfused = torch.compile(unfused)
            row = {
                "M": M, "N": N, "K": K, "r": r, "rel_err_vs_fp32": err,
                "fused_ms": bench(lambda: lora_linear_fused(x, w, None, a, b, s), device),
                "torch_unfused_ms": bench(unfused, device),
                "inductor_unfused_ms": bench(compiled_unfused, device),
                "base_gemm_only_ms": bench(lambda: x @ w.t(), device),
            }
            from transfigure.kernels import lora as lora_kernels

            tuner = lora_kernels._tuner
            t = x @ a.t()
            cfg = tuner.best_config(x, w.t(), t, b.t(), s, None)
            row["chosen_config"] = cfg.describe()
            triton_cfgs = [c for c in lora_kernels._CONFIGS if not c.meta.get("CUBLAS")]
            timings = []
            for c in triton_cfgs[1:]:
                try:
                    timings.append(bench(lambda c=c: lora_kernels._launch(c, x, w.t(), t, b.t(), s, None), device))
                except Exception as error:  # a config may exceed shared memory
                    print("config skipped:", c.describe(), type(error).__name__)
            row["best_triton_ms"] = min(timings) if timings else float("nan")
            row["speedup_vs_inductor"] = row["inductor_unfused_ms"] / row["fused_ms"]
            rows.append(row)
            print("kernel", row, flush=True)
    return rows


# -- 2. LoRA training step -----------------------------------------------------------------------------------


def build_base(args, device, dtype):
    from transfigure.models import llama_1b_config, tiny_config, model_class

    if args.smoke:
        config = tiny_config("llama")
    else:
        config = llama_1b_config(num_hidden_layers=args.layers)
        config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class("llama")(config).to(dtype)
    return model.eval().requires_grad_(False)  # eval: no dropout; training via grads on adapters only


def lora_section(args, device, dtype, base, ids):
    import peft

    out = {}
    config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", lora_dropout=0.0)
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    state = peft.get_peft_model_state_dict(ref)
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-4)
    ref_compiled = torch.compile(ref)

    def make_step(model, opt):
        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    variants = {"peft+inductor": (ref_compiled, ref_opt, ref)}
    for fused in (True, False):
        ours = copy.deepcopy(base)
        lora.load_lora(ours, state, {"lora_alpha": 2 * args.r})
        compiled = torch.compile(ours, backend=transfigure.backend(
            lora={"r": args.r, "alpha": float(2 * args.r), "target_modules": "all-linear", "fused": fused}))
        variants[f"transfigure lora ({'fused' if fused else 'unfused'})"] = (compiled, torch.optim.AdamW(lora.lora_parameters(ours), lr=1e-4), ours)
    # correctness: first-step loss of each variant against peft's (same adapters, bf16)
    with torch.no_grad():
        ref_loss = ref_compiled(input_ids=ids, labels=ids).loss.item()
    for name, (model, opt, raw) in variants.items():
        if time.time() - START > args.budget:
            out[name] = {"skipped": "time budget"}
            continue
        step = make_step(model, opt)
        t0 = time.time()
        first = step().item()
        step()
        sync()
        compile_s = time.time() - t0
        ms, peak = time_steps(step, args.steps, device)
        out[name] = {"step_ms": ms, "peak_gib": peak, "first_loss": first, "peft_first_loss": ref_loss,
                     "compile_and_2_steps_s": compile_s}
        print("lora", name, out[name], flush=True)
        torch._dynamo.reset()
    peft_ms = out["peft+inductor"].get("step_ms")
    for name, row in out.items():
        if "step_ms" in row and peft_ms:
            row["speedup_vs_peft"] = peft_ms / row["step_ms"]
    return out


# -- 3. GaLore ---------------------------------------------------------------------------------------------


def state_bytes(opt):
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and torch.is_tensor(v.ortho_matrix):
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total


def galore_section(args, device, dtype, base, ids):
    out = {}
    rank = args.galore_rank

    def linear_weights(model):
        return [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]

    def run(name, model, opt, extra_state=0):
        if time.time() - START > args.budget:
            out[name] = {"skipped": "time budget"}
            return

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.time()
        step()  # includes compile (and GaLore's first SVD refresh)
        sync()
        first_s = time.time() - t0
        ms, peak = time_steps(step, args.steps, device)
        out[name] = {"step_ms": ms, "peak_gib": peak, "optimizer_state_gib": (state_bytes(opt) + extra_state) / 2**30,
                     "first_step_s": first_s}
        print("galore", name, out[name], flush=True)
        torch._dynamo.reset()

    # full AdamW over the same linear weights (fp32 states of bf16 weights: AdamW keeps them in the param dtype)
    full = copy.deepcopy(base)
    weights = linear_weights(full)
    for w in weights:
        w.requires_grad_(True)
    run("full AdamW (inductor)", torch.compile(full), torch.optim.AdamW(weights, lr=1e-5))
    del full, weights
    # galore-torch
    galore_torch = galore.import_galore_torch()

    gt_model = copy.deepcopy(base)
    weights = linear_weights(gt_model)
    for w in weights:
        w.requires_grad_(True)
    gt_opt = galore_torch.GaLoreAdamW([{"params": weights, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}],
                                      lr=1e-5, no_deprecation_warning=True)
    run("galore-torch AdamW (inductor model)", torch.compile(gt_model), gt_opt)
    del gt_model, weights, gt_opt
    # ours
    ours = copy.deepcopy(base)
    compiled = torch.compile(ours, backend=transfigure.backend(galore={"rank": rank, "update_proj_gap": 200, "scale": 0.25}))
    compiled(input_ids=ids[:1, :8])  # creates the adapters
    opt = galore.GaLoreOptimizer(torch.optim.AdamW(galore.galore_parameters(ours), lr=1e-5))
    projectors = sum(s.P.numel() * s.P.element_size() for s in galore.galore_states(ours).values())
    run("transfigure galore + AdamW", compiled, opt, extra_state=projectors)
    full_state = out.get("full AdamW (inductor)", {}).get("optimizer_state_gib")
    for row in out.values():
        if full_state and "optimizer_state_gib" in row:
            row["state_vs_full_adamw"] = row["optimizer_state_gib"] / full_state
    return out


# -- report ------------------------------------------------------------------------------------------------


def write(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lora.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"# LoRA / GaLore benchmark", "", f"{results['device']}, torch {results['torch']}, triton {results['triton']}, "
             f"{results['date']}. {results['setup']}", ""]
    if results.get("kernel"):
        lines += ["## Fused base + low-rank GEMM (bf16, forward)", "",
                  "| M | N | K | r | rel err vs fp32 | fused (autotuned) ms | best Triton-epilogue ms | inductor unfused ms | torch unfused ms | base GEMM ms | speedup vs inductor | chosen |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["kernel"]:
            lines.append(f"| {r['M']} | {r['N']} | {r['K']} | {r['r']} | {r['rel_err_vs_fp32']:.1e} | {r['fused_ms']:.3f} | "
                         f"{r['best_triton_ms']:.3f} | {r['inductor_unfused_ms']:.3f} | {r['torch_unfused_ms']:.3f} | {r['base_gemm_only_ms']:.3f} | "
                         f"{r['speedup_vs_inductor']:.2f}x | {'cuBLAS+addmm_' if 'CUBLAS' in r['chosen_config'] else 'Triton'} |")
        lines.append("")
    if results.get("lora"):
        lines += ["## LoRA training step (fwd + bwd + AdamW on adapters)", "",
                  "| variant | step ms | peak GiB | speedup vs PEFT+inductor | first loss (PEFT's) |", "|---|---|---|---|---|"]
        for name, r in results["lora"].items():
            if "step_ms" in r:
                lines.append(f"| {name} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {r.get('speedup_vs_peft', 1):.2f}x | "
                             f"{r['first_loss']:.4f} ({r['peft_first_loss']:.4f}) |")
            else:
                lines.append(f"| {name} | {r} | | | |")
        lines.append("")
    if results.get("galore"):
        lines += ["## GaLore (rank 128) vs full AdamW", "",
                  "| variant | step ms | peak GiB | optimizer state GiB | state / full AdamW |", "|---|---|---|---|---|"]
        for name, r in results["galore"].items():
            if "step_ms" in r:
                lines.append(f"| {name} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {r['optimizer_state_gib']:.3f} | "
                             f"{r.get('state_vs_full_adamw', float('nan')):.2f} |")
            else:
                lines.append(f"| {name} | {r} | | | |")
    with open(os.path.join(out_dir, "lora.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        if results.get("kernel"):
            labels = [f"{r['N']}x{r['K']} r{r['r']}" for r in results["kernel"]]
            xs = range(len(labels))
            for key, off in (("fused_ms", -0.3), ("inductor_unfused_ms", -0.1), ("torch_unfused_ms", 0.1), ("base_gemm_only_ms", 0.3)):
                axes[0].bar([x + off for x in xs], [r[key] for r in results["kernel"]], width=0.2, label=key)
            axes[0].set_xticks(list(xs), labels, rotation=45, fontsize=7)
            axes[0].set_ylabel("ms")
            axes[0].legend(fontsize=7)
            axes[0].set_title("fused LoRA GEMM, M=4096 bf16")
        for ax, key, title in ((axes[1], "lora", "LoRA step ms"), (axes[2], "galore", "GaLore optimizer state GiB")):
            rows = {k: v for k, v in (results.get(key) or {}).items() if "step_ms" in v}
            metric = "step_ms" if key == "lora" else "optimizer_state_gib"
            ax.bar(range(len(rows)), [v[metric] for v in rows.values()])
            ax.set_xticks(range(len(rows)), list(rows), rotation=20, fontsize=7)
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "lora.png"), dpi=120)
    except Exception as error:  # plotting is optional
        print("plot skipped:", error)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--galore-rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=230.0, help="seconds after which remaining variants are skipped")
    parser.add_argument("--sections", default="kernel,lora,galore")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.batch, args.seq, args.r, args.galore_rank, args.steps = 2, 16, 4, 8, 2
    args.tokens = args.batch * args.seq
    torch._dynamo.config.cache_size_limit = 64
    import triton

    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": (f"Llama-3.2-1B layer shapes, {args.layers} decoder layers, vocab 128256, {dtype}, batch {args.batch} x {args.seq}, "
                  f"LoRA r={args.r} alpha={2 * args.r} all linears, GaLore rank {args.galore_rank}") if not args.smoke else "smoke (tiny, CPU)",
    }
    sections = args.sections.split(",")
    if "kernel" in sections and device == "cuda":
        results["kernel"] = kernel_section(args, device, dtype)
        write(results, args.out)
    base = build_base(args, device, dtype)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device, generator=torch.Generator(device=device).manual_seed(0))
    if "lora" in sections:
        results["lora"] = lora_section(args, device, dtype, base, ids)
        write(results, args.out)
    if "galore" in sections:
        results["galore"] = galore_section(args, device, dtype, base, ids)
        write(results, args.out)
    results["total_s"] = time.time() - START
    write(results, args.out)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
