"""Norms and SwiGLU products inside the input rotation (``lut_quant.fuse_norms`` / ``fuse_activations``): on, off.

For each variant of the 1B model, the same compiled greedy step as ``transfigure.generate`` (mode
"reduce-overhead"), with both fusions off and on: GPU time per step (CUDA events over a sync-free loop of 255
real decode steps), ``transfigure.generate`` tokens/s, kernels per step, and whether both decode the same tokens.

    python benchmarks/explore_norm_fusion.py --out $OUT --variants lut-4bit+lm_head+decode-attn
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import transfigure  # noqa: E402
from transfigure.backends import decode as decode_module  # noqa: E402
from transfigure.bench import _variant_options, build_model, environment  # noqa: E402


@torch.no_grad()
def measure(model, variant: str, fuse: bool, prompt_ids: torch.Tensor, new_tokens: int) -> dict:
    torch._dynamo.reset()
    options = copy.copy(_variant_options("transfigure+" + variant, model, "cuda"))
    options["lut_quant"] = {**options["lut_quant"], "fuse_norms": fuse, "fuse_activations": fuse}
    backend = transfigure.backend(**options)
    start = time.perf_counter()
    tokens = transfigure.generate(model, prompt_ids, new_tokens, backend=backend)
    torch.cuda.synchronize()
    row = {"variant": variant, "fuse_norms": fuse, "first_call_s": time.perf_counter() - start}
    walls = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        transfigure.generate(model, prompt_ids, new_tokens, backend=backend)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    row["generate_tok_s"] = new_tokens / min(walls)
    report = backend.report.pass_report("norm_fuse").result if fuse else None
    row["norms_fused"] = len(report.rewritten) if report else 0
    row["products_fused"] = len(backend.report.pass_report("act_fuse").result.rewritten) if fuse else 0
    step = decode_module._compiled_step(model, backend, "reduce-overhead", greedy=True)
    _, (cache, buffer, unfinished, steps_running) = decode_module._BUFFERS[model]
    prompt = prompt_ids.shape[1]
    positions = torch.arange(prompt, prompt + new_tokens, device="cuda")
    steps = new_tokens - 1
    per_step = []
    for _ in range(4):
        cache.reset()
        model(input_ids=prompt_ids, **decode_module._cache_kwarg(model, cache), use_cache=True,
              cache_position=torch.arange(prompt, device="cuda"), logits_to_keep=1)
        buffer[:, :prompt + 1] = tokens[:, :prompt + 1]
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(1, steps + 1):
            step(model, cache, buffer, positions[i : i + 1], unfinished, steps_running, None, None, None, None)
        end.record()
        torch.cuda.synchronize()
        per_step.append(begin.elapsed_time(end) / steps)
    row["step_ms"] = sorted(per_step[1:])[1]
    row["step_ms_runs"] = per_step
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(1, 17):
            step(model, cache, buffer, positions[i : i + 1], unfinished, steps_running, None, None, None, None)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (getattr(e, "device_time_total", 0) or 0) > 0]
    row["kernels_per_step"] = sum(e.count for e in events) / 16
    row["top_kernels"] = sorted(([e.key[:90], round(e.device_time_total / 16, 1), e.count / 16] for e in events),
                                key=lambda r: -r[1])[:8]
    row["tokens"] = tokens[0, prompt:].tolist()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="lut-4bit+lm_head+decode-attn")
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {**environment("cuda"), "rows": []}
    model = build_model("llama-1b", "cuda", torch.bfloat16)
    torch.manual_seed(1)
    prompt_ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
    for variant in args.variants.split(","):
        rows = []
        for fuse in (False, True):
            try:
                rows.append(measure(model, variant, fuse, prompt_ids, args.new_tokens))
            except Exception:
                import traceback

                rows.append({"variant": variant, "fuse_norms": fuse, "error": traceback.format_exc()[-3000:]})
        if len(rows) == 2 and "tokens" in rows[0] and "tokens" in rows[1]:
            same = [a == b for a, b in zip(rows[0]["tokens"], rows[1]["tokens"])]
            rows[1]["same_tokens_as_unfused"] = all(same)
            rows[1]["first_different_token"] = None if all(same) else same.index(False)
        for row in rows:
            row.pop("tokens", None)
            print(json.dumps(row), flush=True)
        result["rows"] += rows
        with open(os.path.join(args.out, "explore_norm_fusion.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
