"""A late fusion on vs off: norms and SwiGLU products inside the input rotation (``--toggle norms``:
``lut_quant.fuse_norms`` / ``fuse_activations``) or RoPE + KV-cache write inside the decode attention launch
(``--toggle cache_update``: ``decode_attention.fuse_cache_update``).

For each variant of the 1B model, the same compiled greedy step as ``transfigure.generate`` (mode
"reduce-overhead"), with the fusion off and on: GPU time per step (CUDA events over a sync-free loop of 255
real decode steps), ``transfigure.generate`` tokens/s, kernels per step, and whether both decode the same tokens.
``--toggle cache_update`` also checks the fused op's Triton kernel against its reference on the GPU (bf16).

    python benchmarks/explore_norm_fusion.py --out $OUT --variants lut-4bit+lm_head+decode-attn [--toggle cache_update]
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
def measure(model, variant: str, fuse: bool, prompt_ids: torch.Tensor, new_tokens: int, toggle: str = "norms") -> dict:
    torch._dynamo.reset()
    options = copy.copy(_variant_options("transfigure+" + variant, model, "cuda"))
    if toggle == "norms":
        options["lut_quant"] = {**options["lut_quant"], "fuse_norms": fuse, "fuse_activations": fuse}
    else:
        options["decode_attention"] = {**options["decode_attention"], "fuse_cache_update": fuse}
    backend = transfigure.backend(**options)
    start = time.perf_counter()
    tokens = transfigure.generate(model, prompt_ids, new_tokens, backend=backend)
    torch.cuda.synchronize()
    row = {"variant": variant, "fuse_" + toggle: fuse, "first_call_s": time.perf_counter() - start}
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
    if toggle == "cache_update":
        found = backend.report.pass_report("cache_update_fuse") if fuse else None
        row["cache_updates_fused"] = len(found.result.rewritten) if found else 0
        row["cache_update_skips"] = [s.detail for s in found.result.skipped][:3] if found else []
    step = decode_module._compiled_step(model, backend, "reduce-overhead", "greedy")
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
                                key=lambda r: -r[1])[:30]
    row["tokens"] = tokens[0, prompt:].tolist()
    return row


def check_update_kernel() -> list[dict]:
    """``decode_attention_update`` on the GPU (bf16, 1B attention shapes, a 384-key cache) against its reference:
    output, caches and counter, with the fill counter and with explicit positions."""
    from transfigure.kernels.decode_attention import (decode_attention_update_reference,
                                                      decode_attention_update_triton)

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch, Lq, filled, counter in ((1, 1, 200, True), (1, 1, 383, False), (8, 1, 130, True), (1, 3, 64, True)):
        q = torch.randn(batch, 32, Lq, 64, device="cuda", generator=gen).bfloat16()
        k_new, v_new = (torch.randn(batch, 8, Lq, 64, device="cuda", generator=gen).bfloat16() for _ in range(2))
        cache_k, cache_v = (torch.randn(batch, 8, 384, 64, device="cuda", generator=gen).bfloat16() for _ in range(2))
        angles = torch.rand(1, 1, Lq, 32, device="cuda", generator=gen) * 6.3
        cos, sin = (torch.cat((f(angles), f(angles)), -1).bfloat16() for f in (torch.cos, torch.sin))
        positions = filled + torch.arange(Lq, device="cuda")
        mask = (torch.arange(384, device="cuda")[None, None, None, :] <= positions[None, None, :, None])
        states = []
        for fn in (decode_attention_update_reference, decode_attention_update_triton):
            fill = torch.tensor(filled, device="cuda")
            k_c, v_c = cache_k.clone(), cache_v.clone()
            out = fn(q, k_new, v_new, cos, sin, k_c, v_c, None if counter else positions, fill if counter else None,
                     mask.expand(batch, 1, Lq, 384), 0.125, False)
            torch.cuda.synchronize()
            states.append((out.float(), k_c.float(), v_c.float(), int(fill)))
        (o1, k1, v1, f1), (o2, k2, v2, f2) = states
        rows.append({"batch": batch, "Lq": Lq, "filled": filled, "counter": counter,
                     "out_rel_err": ((o1 - o2).norm() / o1.norm()).item(),
                     "keys_max_abs": (k1 - k2).abs().max().item(), "values_max_abs": (v1 - v2).abs().max().item(),
                     "fill": [f1, f2]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="lut-4bit+lm_head+decode-attn")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--toggle", choices=("norms", "cache_update"), default="norms")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {**environment("cuda"), "rows": []}
    stem = "explore_norm_fusion" if args.toggle == "norms" else "explore_cache_update_fusion"
    if args.toggle == "cache_update":
        result["kernel_check"] = check_update_kernel()
        print(json.dumps(result["kernel_check"]), flush=True)
    model = build_model("llama-1b", "cuda", torch.bfloat16)
    torch.manual_seed(1)
    prompt_ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
    for variant in args.variants.split(","):
        rows = []
        for fuse in (False, True):
            try:
                rows.append(measure(model, variant, fuse, prompt_ids, args.new_tokens, args.toggle))
            except Exception:
                import traceback

                rows.append({"variant": variant, "fuse_" + args.toggle: fuse, "error": traceback.format_exc()[-3000:]})
        if len(rows) == 2 and "tokens" in rows[0] and "tokens" in rows[1]:
            same = [a == b for a, b in zip(rows[0]["tokens"], rows[1]["tokens"])]
            rows[1]["same_tokens_as_unfused"] = all(same)
            rows[1]["first_different_token"] = None if all(same) else same.index(False)
        for row in rows:
            row.pop("tokens", None)
            print(json.dumps(row), flush=True)
        result["rows"] += rows
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
