"""Where a decode step's GPU time goes, per variant: step time in a sync-free loop, CUDA-graph skips, kernel table.

``generate()`` is host-bound on a 1B model (about 340 tok/s where the same compiled step runs at 600 tok/s in a
loop without per-token syncs), so its tokens/s hide what a pass does to the GPU's work. This script times the
compiled one-token step the way ``bench_ladder.py`` does (StaticCache, mode="reduce-overhead", 64 real decode
steps enqueued back to back, CUDA events), records whether Inductor skipped CUDA graphs (and why), and profiles
a few steps with ``torch.profiler`` to list kernels by GPU time and count per step.

    python benchmarks/profile_decode.py --out $OUT --variants standard,lut-4bit,lut-4bit+sparsity-50
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_ladder import run_variant  # noqa: E402

from transfigure.bench import environment  # noqa: E402


class _SkipRecorder(logging.Handler):
    """Collects Inductor's "skipping cudagraphs due to ..." messages (logged as perf hints)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if "cudagraph" in text.lower() and "skip" in text.lower():
            self.messages.append(text[:400])


def _options(variant: str, model) -> dict:
    from transfigure.bench import _variant_options

    if variant == "inductor":
        return None  # backend="inductor", no transfigure at all
    return {} if variant == "standard" else _variant_options("transfigure+" + variant, model, "cuda")


def kernel_table(step, inputs, steps: int) -> tuple[list[dict], int]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for token, position in inputs[:steps]:
            step(token, position)
        torch.cuda.synchronize()
    rows, launches = [], 0
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us <= 0 or event.count == 0:
            continue
        rows.append({"kernel": event.key[:120], "per_step": event.count / steps, "us_per_step": device_us / steps})
        launches += event.count
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows, launches // steps


def markdown(results: dict) -> str:
    """Step time per variant vs the first (standard) one, and each variant's kernels by GPU time."""
    rows = [v for v in results["variants"] if "step_ms_median" in v]
    base = rows[0]["step_ms_median"] if rows else None
    lines = [f"# Decode step, {results.get('model', 'llama-1b')} shape ({results['layers']} layers), bf16, batch 1 — "
             f"{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['date']}", "",
             "Compiled one-token step (StaticCache, mode=\"reduce-overhead\"), 64 real decode steps enqueued without host "
             "syncs, CUDA events, median of 5 runs. No generate() loop: this is the GPU's work per token. Host enqueue "
             "tok/s: steps per second of the Python loop that only enqueues (the host-side cost per step).", "",
             "| variant | step ms | tok/s | vs first row | host enqueue tok/s | kernels / step | CUDA-graph skips |",
             "|---|---|---|---|---|---|---|"]
    for v in rows:
        lines.append(f"| {v['name']} | {v['step_ms_median']:.3f} | {v['tokens_per_s']:.0f} | {base / v['step_ms_median']:.2f}x | "
                     f"{v.get('loop_tokens_per_s', 0):.0f} | {v.get('launches_per_step', '')} | "
                     f"{len(v.get('cudagraph_skips', [])) or 'none'} |")
    for v in results["variants"]:
        if "error" in v:
            lines.append(f"| {v['name']} | failed: {v['error'][:120]} | | | | | |")
    for v in rows:
        lines += ["", f"## {v['name']}: top kernels (us per step, launches per step)", "", "| us | launches | kernel |", "|---|---|---|"]
        lines += [f"| {k['us_per_step']:.1f} | {k['per_step']:.0f} | `{k['kernel'][:90]}` |" for k in v.get("kernels", [])[:12]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--variants", default="inductor,standard,lut-4bit,lut-4bit+sparsity-50",
                        help="inductor = backend='inductor'; standard = transfigure without passes; else a quality combination")
    parser.add_argument("--model", choices=("1b", "8b"), default="1b")
    parser.add_argument("--layers", type=int, default=None, help="default: all of the model's layers")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=400.0)
    parser.add_argument("--markdown", help="only write the Markdown of an existing profile_decode JSON")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.markdown:
        with open(args.markdown) as handle:
            text = markdown(json.load(handle))
        with open(os.path.splitext(args.markdown)[0] + ".md", "w") as handle:
            handle.write(text)
        return
    import transformers

    from transfigure.models import llama_1b_config, llama_8b_config

    recorder = _SkipRecorder()
    torch._logging.set_logs(perf_hints=True)
    for name in ("torch._inductor", "torch._dynamo", "torch"):
        logging.getLogger(name).addHandler(recorder)

    t0 = time.time()
    torch.manual_seed(0)
    make_config = llama_1b_config if args.model == "1b" else llama_8b_config
    config = make_config(**({"num_hidden_layers": args.layers} if args.layers else {}))
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.requires_grad_(False)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {**environment("cuda"), "model": f"llama-{args.model}", "layers": config.num_hidden_layers, "variants": []}
    for variant in args.variants.split(","):
        if time.time() - t0 > args.budget_s:
            print(f"skipping {variant}: time budget spent", flush=True)
            continue
        recorder.messages.clear()
        from torch._dynamo.utils import counters

        counters.clear()
        try:
            res = run_variant(model, variant, _options(variant, model), prompt, args.new, args.prompt + args.new + 8)
        except Exception as error:  # keep the other variants
            import traceback

            traceback.print_exc()
            results["variants"].append({"name": variant, "error": f"{type(error).__name__}: {error}"[:600]})
            continue
        step = res.pop("step")
        res.pop("reset_length")()
        res.pop("logits"), res.pop("tokens")
        res["cudagraph_skips"] = sorted(set(recorder.messages))
        try:  # the LUT GEMV config the autotuner chose per shape (M, N, K_pad, bits, ...)
            from transfigure.kernels import lut_gemm

            res["lut_configs"] = {str(key[0]): config.describe() for key, config in lut_gemm._CHOSEN.items()}
        except Exception:  # noqa: BLE001
            pass
        res["cudagraph_skip_count"] = int(sum(counters["inductor"].get(k, 0) for k in counters["inductor"] if "cudagraph_skip" in k))
        try:
            res["kernels"], res["launches_per_step"] = kernel_table(step, res.pop("inputs"), steps=args.profile_steps)
        except Exception as error:
            res["kernels"], res["profile_error"] = [], f"{type(error).__name__}: {error}"[:400]
        results["variants"].append(res)
        print(f"{variant}: step {res['step_ms_median']:.3f} ms ({res['tokens_per_s']:.0f} tok/s), launches/step "
              f"{res.get('launches_per_step')}, cudagraph skips {res['cudagraph_skips'] or 'none'}", flush=True)
        for shape, config in res.get("lut_configs", {}).items():
            print(f"   LUT {shape}: {config}", flush=True)
        for row in res["kernels"][:18]:
            print(f"   {row['us_per_step']:8.1f} us  x{row['per_step']:5.1f}  {row['kernel']}", flush=True)
        with open(os.path.join(args.out, f"profile_decode_{args.model}.json"), "w") as handle:
            json.dump(results, handle, indent=1, default=str)
        with open(os.path.join(args.out, f"profile_decode_{args.model}.md"), "w") as handle:
            handle.write(markdown(results))
        del step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
