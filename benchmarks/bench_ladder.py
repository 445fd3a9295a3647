"""Ladder rewiring cost on ONE GPU: Llama-3.2-1B-shaped decode (bf16, random weights, batch 1).

Without tensor parallelism there is no all-reduce to hide, so the ladder pass can only cost time (different
fusion around the moved residual adds). Target: <= 2% decode throughput lost. Every variant is compiled with
the same backend (``transfigure`` -> Inductor, CUDA graphs on) and a transformers ``StaticCache``; only the
``ladder`` option differs. The prompt is fed through the same compiled one-token step (so the KV cache also
holds ladder activations), then tokens are decoded greedily.

Correctness: the decoded sequence is re-run without a cache through the plain-PyTorch reference ladder model
(``transfigure.reference.ladder``) and the per-position logits are compared (bf16).

    python benchmarks/bench_ladder.py --out $OUT      (GPU; writes bench_ladder.json/.md/.png)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transfigure.bench import environment  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_variant(model, name, options, prompt, new_tokens, max_len, lowering="inductor", cudagraphs=True):
    import transformers

    import transfigure
    import transfigure.passes.ladder  # noqa: F401

    torch._dynamo.reset()
    # options None: Inductor itself (backend="inductor"), the baseline transfigure must not lose to
    backend = "inductor" if options is None else transfigure.backend(lowering=lowering, **options)
    # mode="reduce-overhead" exactly as transformers' CompileConfig passes it (the path the e2e benchmark runs);
    # forcing triton.cudagraphs through inductor_config instead crashed in Inductor's launcher on torch 2.11
    mode = "reduce-overhead" if (cudagraphs and lowering == "inductor") else None
    step = torch.compile(model, backend=backend, fullgraph=True, mode=mode)
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
    # Allocate the cache's tensors EAGERLY (transformers 5 allocates them lazily on the first update; inside
    # the compiled graph that made them graph-created mutated inputs: Inductor skipped CUDA graphs and the
    # process segfaulted on torch 2.11). generate() does the same before it compiles. Position 0 is
    # overwritten by the compiled loop below.
    with torch.no_grad():
        model(input_ids=prompt[:, :1], past_key_values=cache, cache_position=torch.tensor([0], device=prompt.device),
              use_cache=True)
        for layer in getattr(cache, "layers", []):  # back to an empty cache, same storage
            for attr in ("keys", "values", "cumulative_length"):
                tensor = getattr(layer, attr, None)
                if isinstance(tensor, torch.Tensor):
                    tensor.zero_()
    # transformers marks keys/values static; newer versions also mutate a per-layer length counter, which
    # must be static too or Inductor skips CUDA graphs ("mutated inputs").
    for layer in getattr(cache, "layers", []):
        for attr in ("keys", "values", "cumulative_length"):
            tensor = getattr(layer, attr, None)
            if isinstance(tensor, torch.Tensor):
                try:
                    torch._dynamo.mark_static_address(tensor)
                except Exception:
                    pass
    device = prompt.device
    tokens = prompt[0].tolist()
    logits_seen = []
    start = time.perf_counter()
    with torch.no_grad():
        for position in range(len(tokens) + new_tokens - 1):
            token = torch.tensor([[tokens[position]]], device=device)
            out = step(input_ids=token, past_key_values=cache, cache_position=torch.tensor([position], device=device), use_cache=True)
            logits = out.logits[0, -1].float().clone()
            if position >= len(prompt[0]) - 1:
                logits_seen.append(logits)
                tokens.append(int(logits.argmax()))
    _sync()
    first_pass_s = time.perf_counter() - start

    # Steady-state decode: the same step at a fixed position (median of many, CUDA-graph replays).
    # transformers 5's StaticLayer writes at its own cumulative_length (incremented in place by every step,
    # cache_position is ignored), so timing re-decodes the same positions after resetting it: each timed run
    # is new_tokens real decode steps from the end of the prompt, enqueued without host syncs.
    start_pos = len(prompt[0])
    inputs = [(torch.tensor([[tokens[start_pos + i]]], device=device), torch.tensor([start_pos + i], device=device))
              for i in range(new_tokens)]

    def reset_length(value):
        for layer in getattr(cache, "layers", []):
            layer.cumulative_length.fill_(value)

    per_step_ms = []
    loop_s = float("inf")
    with torch.no_grad():
        for _ in range(6):
            reset_length(start_pos)
            _sync()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            wall = time.perf_counter()
            begin.record()
            for token, position in inputs:
                step(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
            end.record()
            _sync()
            loop_s = min(loop_s, time.perf_counter() - wall)
            per_step_ms.append(begin.elapsed_time(end) / new_tokens)
    per_step_ms = per_step_ms[1:]  # the first run may still record CUDA graphs
    ms = sorted(per_step_ms)[len(per_step_ms) // 2]
    return {
        "name": name,
        "options": options,
        "step_ms_median": ms,
        "step_ms_runs": per_step_ms,
        "tokens_per_s": 1000.0 / ms,
        "loop_tokens_per_s": new_tokens / loop_s,
        "compile_and_first_pass_s": first_pass_s,
        "tokens": tokens,
        "logits": torch.stack(logits_seen),
        # for profiling the same compiled step afterwards (profile_decode.py); not JSON
        "step": lambda token, position: step(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True),
        "inputs": inputs,
        "reset_length": lambda: reset_length(start_pos),
    }


def check(model, result, layers, prompt_len, device="cuda"):
    """Per-position logits of the decoded sequence vs the cache-free reference (bf16)."""
    from transfigure.reference.ladder import LadderReference

    tokens = torch.tensor([result["tokens"]], device=device)
    with torch.no_grad():
        if layers is None:
            ref = model(input_ids=tokens, use_cache=False).logits[0].float()
        else:
            ref = LadderReference(model, layers)(tokens)[0].float()
    ref = ref[prompt_len - 1 : prompt_len - 1 + len(result["logits"])]
    got = result["logits"]
    rel = float((got - ref).norm() / ref.norm())
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"rel_error": rel, "argmax_agreement": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=220.0, help="skip remaining variants after this")
    parser.add_argument("--no-cudagraphs", action="store_true", help="Inductor without CUDA graphs")
    parser.add_argument("--no-static-launcher", action="store_true",
                        help="torch._inductor.config.use_static_cuda_launcher = False (both device runs segfaulted in it)")
    args = parser.parse_args()
    if args.no_static_launcher:
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config, "use_static_cuda_launcher"):
            inductor_config.use_static_cuda_launcher = False
    os.makedirs(args.out, exist_ok=True)
    import transformers

    from transfigure.models import llama_1b_config

    t0 = time.time()
    torch.manual_seed(0)
    config = llama_1b_config(num_hidden_layers=args.layers)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    for p in model.parameters():  # HF init gives std 0.02; keep the residual stream well scaled
        p.requires_grad_(False)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    variants = [("standard", {}, None), ("ladder all", {"ladder": {"layers": "all"}}, "all"),
                ("ladder upper_half", {"ladder": {"layers": "upper_half"}}, "upper_half"),
                ("standard (repeat)", {}, None)]  # the repeat bounds run-to-run noise
    results = []
    for name, options, layers in variants:
        if time.time() - t0 > args.budget_s:
            print(f"skipping {name}: time budget spent", flush=True)
            continue
        try:
            res = run_variant(model, name, options, prompt, args.new, args.prompt + args.new + 8,
                              cudagraphs=not args.no_cudagraphs)
            res.update(check(model, res, layers, args.prompt))
        except Exception as error:
            import traceback

            traceback.print_exc()
            print(f"{name} failed: {error}", flush=True)
            continue
        print(f"{name}: {res['tokens_per_s']:.1f} tok/s (step {res['step_ms_median']:.3f} ms), loop {res['loop_tokens_per_s']:.1f} tok/s, "
              f"rel err {res['rel_error']:.2e}, argmax agree {res['argmax_agreement']:.3f}, first pass {res['compile_and_first_pass_s']:.0f} s", flush=True)
        for key in ("logits", "tokens", "step", "inputs", "reset_length"):
            res.pop(key)
        results.append(res)
        with open(os.path.join(args.out, "bench_ladder_partial.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    base = results[0]["tokens_per_s"]
    for res in results:
        res["ratio_vs_standard"] = res["tokens_per_s"] / base
    info = {**environment(), "model": f"Llama-3.2-1B-shaped ({args.layers} layers), bf16, random weights, batch 1",
            "prompt": args.prompt, "new_tokens": args.new, "results": results}
    with open(os.path.join(args.out, "bench_ladder.json"), "w") as handle:
        json.dump(info, handle, indent=1)
    lines = [f"# Ladder rewiring cost, single GPU decode ({info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']})", "",
             f"{info['model']}; prompt {args.prompt} tokens fed through the decode step, {args.new} new tokens; "
             "backend transfigure (Inductor, CUDA graphs), StaticCache; tok/s = 1000 / median step time (CUDA events around 64 consecutive decode steps enqueued without syncs; median of 5 runs after one warm-up run).", "",
             "| variant | step ms (median) | tok/s | ratio vs standard | loop tok/s | rel. error vs reference | argmax agreement |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        lines.append(f"| {res['name']} | {res['step_ms_median']:.3f} | {res['tokens_per_s']:.1f} | {res['ratio_vs_standard']:.3f} | "
                     f"{res['loop_tokens_per_s']:.1f} | {res['rel_error']:.2e} | {res['argmax_agreement']:.3f} |")
    with open(os.path.join(args.out, "bench_ladder.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([r["name"] for r in results], [r["tokens_per_s"] for r in results], color=["gray", "tab:blue", "tab:green"][: len(results)])
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_title(f"Ladder rewiring, 1 GPU ({info['device'].replace('NVIDIA ', '')})", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_ladder.png"), dpi=120)
    except Exception as error:  # plot is optional on the device
        print("no plot:", error)


if __name__ == "__main__":
    main()
