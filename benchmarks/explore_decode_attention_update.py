"""Decode attention with and without the fused cache update, alone on the GPU (1B attention shapes, one token).

Times, per launch (CUDA graph of 16 launches, median): the plain ``decode_attention`` kernel over a cache that
already holds the token; ``decode_attention_update`` with the fill counter advanced in the launch; with explicit
positions (no counter); and without RoPE. Writes ``<out>/explore_decode_attention_update.json``.

    python benchmarks/explore_decode_attention_update.py --out $OUT [--tag name]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transfigure.bench import environment  # noqa: E402
from transfigure.kernels import decode_attention as da  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for batch, capacity, filled in ((1, 384, 200), (1, 1152, 900), (8, 384, 200)):
        q = torch.randn(batch, 32, 1, 64, device="cuda", dtype=torch.bfloat16)
        k_new, v_new = (torch.randn(batch, 8, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        keys, values = (torch.randn(batch, 8, capacity, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cos, sin = (torch.randn(1, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        fill, positions = torch.tensor(filled, device="cuda"), torch.tensor([filled], device="cuda")
        mask = torch.arange(capacity, device="cuda")[None, None, None, :] <= filled

        calls = {
            "plain": lambda: da.decode_attention_triton(q, keys, values, mask, 0.125, False),
            # the counter runs past the capacity while timing (the writes then fall outside every split): same work
            "update+counter": lambda: da.decode_attention_update_triton(
                q, k_new, v_new, cos, sin, keys, values, None, fill, mask, 0.125, False),
            "update+positions": lambda: da.decode_attention_update_triton(
                q, k_new, v_new, cos, sin, keys, values, positions, None, mask, 0.125, False),
            "update+positions, no rope": lambda: da.decode_attention_update_triton(
                q, k_new, v_new, None, None, keys, values, positions, None, mask, 0.125, False),
        }
        for name, call in calls.items():
            call()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench_cudagraph(lambda: [call() for _ in range(16)], rep=50, return_mode="median")
            rows.append({"batch": batch, "capacity": capacity, "filled": filled, "call": name,
                         "us_per_call": ms * 1000 / 16, "tag": args.tag})
            print(json.dumps(rows[-1]), flush=True)
    name = "explore_decode_attention_update" + (f"_{args.tag}" if args.tag else "") + ".json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump({**environment("cuda"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
