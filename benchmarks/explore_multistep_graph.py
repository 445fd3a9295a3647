"""Is the decode loop bound by the GPU or by the host? And what does one CUDA graph of several steps buy?

For each variant: (A) transfigure's loop as shipped (the greedy step compiled with mode="reduce-overhead", i.e.
Inductor's CUDA-graph trees, one replay per token): GPU time per step from CUDA events over a sync-free loop,
and the host's own enqueue cost per step measured while the GPU is held busy by a spin kernel (so the host never
waits). (B) the same step compiled without CUDA-graph trees and captured by hand, ``--chunk`` steps per
``torch.cuda.CUDAGraph`` (positions advanced inside the graph), one replay per chunk. Both must decode the same
tokens.

    python benchmarks/explore_multistep_graph.py --out $OUT --variants lut-4bit+lm_head+decode-attn
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
from transfigure.backends import decode as decode_module  # noqa: E402
from transfigure.bench import _variant_options, build_model, environment  # noqa: E402


def _prefill(model, cache, prompt_ids):
    prompt = prompt_ids.shape[1]
    return model(input_ids=prompt_ids, **decode_module._cache_kwarg(model, cache), use_cache=True,
                 cache_position=torch.arange(prompt, device=prompt_ids.device), logits_to_keep=1).logits


@torch.no_grad()
def measure(variant: str, new_tokens: int, chunk: int, prompt_len: int) -> dict:
    torch._dynamo.reset()
    model = build_model("llama-1b", "cuda", torch.bfloat16)
    torch.manual_seed(1)
    prompt_ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda")
    if variant == "inductor":
        backend = "inductor"
    else:
        backend = transfigure.backend(**_variant_options("transfigure+" + variant, model, "cuda"))
    row: dict = {"variant": variant}

    # (A) the shipped loop
    start = time.perf_counter()
    reference = transfigure.generate(model, prompt_ids, new_tokens, backend=backend)
    torch.cuda.synchronize()
    row["a_first_call_s"] = time.perf_counter() - start
    walls = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        again = transfigure.generate(model, prompt_ids, new_tokens, backend=backend)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    row["a_generate_tok_s"] = new_tokens / min(walls)
    row["a_repeat_same_tokens"] = bool(torch.equal(again, reference))
    step = decode_module._compiled_step(model, backend, "reduce-overhead", "greedy")
    _, (cache, tokens, unfinished, steps_running) = decode_module._BUFFERS[model]
    positions = torch.arange(prompt_len, prompt_len + new_tokens, device="cuda")

    def run_a(count):
        for i in range(1, count + 1):
            step(model, cache, tokens, positions[i : i + 1], unfinished, steps_running, None, None, None, None)

    def reset():
        cache.reset()
        _prefill(model, cache, prompt_ids)
        tokens[:, :prompt_len] = prompt_ids
        tokens[:, prompt_len] = reference[:, prompt_len]

    steps = new_tokens - 1
    gpu_ms = []
    for _ in range(4):
        reset()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run_a(steps)
        end.record()
        torch.cuda.synchronize()
        gpu_ms.append(begin.elapsed_time(end) / steps)
    row["a_step_ms"] = sorted(gpu_ms[1:])[1]
    row["a_same_tokens"] = bool(torch.equal(tokens[:, : prompt_len + new_tokens], reference))
    # host cost alone: the GPU spins first, so no enqueue below waits for it
    reset()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1.5e9))
    start = time.perf_counter()
    run_a(64)
    row["a_host_enqueue_ms"] = (time.perf_counter() - start) * 1000 / 64
    torch.cuda.synchronize()

    # (B) hand-captured graph of `chunk` steps, compiled without CUDA-graph trees
    stepper = torch.compile(decode_module._greedy_step, backend=backend, fullgraph=True)
    position = torch.tensor([prompt_len + 1], device="cuda")  # one static tensor, advanced inside the graph

    def run_chunk():
        for _ in range(chunk):
            stepper(model, cache, tokens, position, unfinished, steps_running, None, None, None, None)
            position.add_(1)

    start = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        reset()
        position.fill_(prompt_len + 1)
        run_chunk()  # compiles, tunes, warms
        torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(side)
    row["b_compile_s"] = time.perf_counter() - start
    graph = torch.cuda.CUDAGraph()
    reset()
    position.fill_(prompt_len + 1)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        run_chunk()
    chunks = steps // chunk
    gpu_ms, walls = [], []
    for _ in range(4):
        reset()
        position.fill_(prompt_len + 1)
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        wall = time.perf_counter()
        begin.record()
        for _ in range(chunks):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        gpu_ms.append(begin.elapsed_time(end) / (chunks * chunk))
    row["b_chunk"] = chunk
    row["b_step_ms"] = sorted(gpu_ms[1:])[1]
    decoded = prompt_len + 1 + chunks * chunk
    row["b_same_tokens"] = bool(torch.equal(tokens[:, :decoded], reference[:, :decoded]))
    row["b_first_difference"] = int((tokens[0, :decoded] != reference[0, :decoded]).nonzero()[0]) \
        if not row["b_same_tokens"] else None
    torch.cuda._sleep(int(1.5e9))
    start = time.perf_counter()
    for _ in range(4):
        graph.replay()
    row["b_host_enqueue_ms_per_step"] = (time.perf_counter() - start) * 1000 / (4 * chunk)
    torch.cuda.synchronize()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="lut-4bit+lm_head+decode-attn")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {**environment("cuda"), "rows": []}
    for variant in args.variants.split(","):
        try:
            row = measure(variant, args.new_tokens, args.chunk, args.prompt)
        except Exception:  # one failing variant must not lose the others' numbers
            import traceback

            row = {"variant": variant, "error": traceback.format_exc()[-3000:]}
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        with open(os.path.join(args.out, "explore_multistep_graph.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
