"""Where the decoding loop's prompt time goes: the prompt (prefill) through the original model eagerly vs through
the rewritten model (Inductor or eager lowering), per variant: compile seconds, prompt ms, top GPU kernels.

    python benchmarks/profile_prompt.py --out $OUT --variants lut-4bit+lm_head+decode-attn --prompt 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import transfigure  # noqa: E402
from transfigure.backends import decode  # noqa: E402
from transfigure.bench import _variant_options, build_model, environment  # noqa: E402


def _prompt_call(model, runner, prompt, cache_len):
    import transformers

    cache = transformers.StaticCache(config=model.config, max_cache_len=cache_len)
    decode._allocate_cache(model, cache, prompt.shape[0], prompt.device)

    def call():
        cache.reset()
        return runner(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1,
                      cache_position=torch.arange(prompt.shape[1], device=prompt.device)).logits
    return call


def _time(call, repeats=10) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _kernels(call, top=25):
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        call()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if event.device_type == torch.autograd.DeviceType.CUDA:
            rows.append([event.key[:90], round(cuda_us, 1), event.count])
    rows.sort(key=lambda r: -r[1])
    host = sorted(([e.key[:90], round(e.self_cpu_time_total, 1), e.count] for e in prof.key_averages()
                   if e.device_type == torch.autograd.DeviceType.CPU), key=lambda r: -r[1])
    return rows[:top], sum(r[2] for r in rows), host[:top]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="lut-4bit+lm_head+decode-attn")
    parser.add_argument("--lowerings", default="inductor,eager")
    parser.add_argument("--prompt", type=int, default=128)
    args = parser.parse_args()
    model = build_model("llama-1b", "cuda", torch.bfloat16)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda")
    result = {**environment("cuda"), "prompt": args.prompt, "rows": []}
    original = _prompt_call(model, model, prompt, 512)
    original()
    kernels, launches, host = _kernels(original)
    result["rows"].append({"variant": "original eager", "prompt_ms": _time(original), "launches": launches,
                           "top_kernels": kernels, "top_host": host})
    print(json.dumps({k: v for k, v in result["rows"][-1].items() if k != "top_kernels"})[:1500], flush=True)
    references: dict[str, list[torch.Tensor]] = {}
    for variant in args.variants.split(","):
        options = _variant_options("transfigure+" + variant, model, "cuda")
        for lowering in args.lowerings.split(","):
            torch._dynamo.reset()
            graphed = lowering.endswith("-cg")
            backend = transfigure.backend(lowering=lowering.removesuffix("-cg"), **options)
            runner = torch.compile(model, backend=backend, fullgraph=True, mode="reduce-overhead" if graphed else None)
            call = _prompt_call(model, runner, prompt, 512)
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            call()
            call()
            kernels, launches, host = _kernels(call)
            graph = backend.report.graphs[-1]
            # other prompt lengths (a dynamic recompile, then a recording per length under CUDA graphs)
            outputs = [call().clone()]
            for length in (100, 77, 100):
                other = _prompt_call(model, runner, prompt[:, :length], 512)
                other()
                outputs.append(other().clone())
            reference = references.setdefault(variant, outputs)
            differences = [float((a.float() - b.float()).abs().max()) for a, b in zip(outputs, reference)]
            row = {"variant": variant, "lowering": lowering, "first_call_s": first,
                   "passes_s": graph.compile_seconds - graph.lowering_seconds, "lowering_s": graph.lowering_seconds,
                   "prompt_ms": _time(call), "launches": launches, "top_kernels": kernels[:8],
                   "top_host": host[:6], "max_abs_logit_vs_original": float((call() - original()).abs().max()),
                   "max_abs_vs_first_lowering_per_length": differences, "graphs": len(backend.report.graphs)}
            result["rows"].append(row)
            print(json.dumps(row)[:3000], flush=True)
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "profile_prompt.json"), "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
