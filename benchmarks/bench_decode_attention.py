"""Decode attention on the GPU: ``transfigure::decode_attention`` vs what a compiled transformers model runs.

Per shape (Llama-3.2-1B: 32 query heads, 8 KV heads, d 64; Llama-3.1-8B: 32/8, d 128), batch, static-cache
capacity and filled length, one query token, bf16, times (CUDA-graph replays of calls back to back over cache
copies that exceed L2, ``transfigure.kernels.autotune.time_per_call``):

* ``repeat_kv+sdpa``: transformers' path with a static cache -- keys/values expanded to every query head
  (``repeat_kv``) and SDPA with the bool cache mask (torch picks its kernel);
* ``repeat_kv+sdpa (inductor)``: the same function compiled by Inductor (how the baseline model runs it);
* ``sdpa enable_gqa``: SDPA told about the groups instead (when this torch accepts it with a mask);
* ``ours``: the tuned Triton kernel.

Each is checked against the fp32 reference first. JSON + Markdown + a plot of the speedups.

    python benchmarks/bench_decode_attention.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transfigure.bench import pyplot  # noqa: E402
from transfigure.kernels import decode_attention as da  # noqa: E402
from transfigure.kernels.autotune import rotating_copies, time_per_call  # noqa: E402

SHAPES = {"1b": (32, 8, 64), "8b": (32, 8, 128)}


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, L, d = x.shape
    return x[:, :, None].expand(b, h, groups, L, d).reshape(b, h * groups, L, d)


def transformers_path(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=scale)


def gqa_sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def ours(q, k, v, mask, scale):
    return torch.ops.transfigure.decode_attention(q, k, v, mask, scale, False)


def case(model: str, batch: int, capacity: int, filled: int, compiled_path) -> dict:
    H, Hk, D = SHAPES[model]
    gen = torch.Generator(device="cuda").manual_seed(capacity + filled)
    q = torch.randn(batch, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, Hk, capacity, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(batch, Hk, capacity, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    mask = (torch.arange(capacity, device="cuda") < filled)[None, None, None, :].expand(batch, 1, 1, capacity)
    scale = D ** -0.5
    want = da.decode_attention_reference(q.float(), k.float(), v.float(), mask, scale, False)
    row = {"model": model, "batch": batch, "capacity": capacity, "filled": filled, "us": {}, "max_abs_err": {}}
    paths = {"repeat_kv+sdpa": transformers_path, "repeat_kv+sdpa (inductor)": compiled_path,
             "sdpa enable_gqa": gqa_sdpa, "ours": ours}
    arg_sets = rotating_copies((q, k, v, mask, scale), min_bytes=1 << 16)
    for name, fn in paths.items():
        try:
            got = fn(q, k, v, mask, scale)
            torch.cuda.synchronize()
            row["max_abs_err"][name] = (got.float() - want).abs().max().item()
            row["us"][name] = 1e3 * time_per_call([lambda a=a: fn(*a) for a in arg_sets])
        except Exception as error:  # noqa: BLE001  (a path this torch does not support is a row note)
            row["us"][name] = None
            row["max_abs_err"][name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    base = row["us"]["repeat_kv+sdpa (inductor)"] or row["us"]["repeat_kv+sdpa"]
    row["speedup_vs_inductor"] = base / row["us"]["ours"] if base and row["us"]["ours"] else None
    return row


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Decode attention, one query token, bf16 -- {env['device']}, torch {env['torch']}, triton {env['triton']}",
             "", "Times in us per call (CUDA-graph replay of calls back to back over cache copies beyond L2). "
             "`capacity`: the static cache's length (what SDPA reads), `filled`: tokens in it (what the mask lets "
             "through). Speedup: Inductor-compiled `repeat_kv` + SDPA over ours.", "",
             "| model | batch | capacity | filled | repeat_kv+sdpa | + inductor | sdpa enable_gqa | ours | speedup | ours err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda t: "n/a" if t is None else f"{t:.1f}"  # noqa: E731
    for r in result["rows"]:
        us = r["us"]
        err = r["max_abs_err"]["ours"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['capacity']} | {r['filled']} | {fmt(us['repeat_kv+sdpa'])} | "
                     f"{fmt(us['repeat_kv+sdpa (inductor)'])} | {fmt(us['sdpa enable_gqa'])} | {fmt(us['ours'])} | "
                     f"{r['speedup_vs_inductor']:.2f}x | {err if isinstance(err, str) else f'{err:.1e}'} |")
    notes = {k: v for r in result["rows"] for k, v in r["max_abs_err"].items() if isinstance(v, str)}
    if notes:
        lines += ["", "Paths that did not run: " + "; ".join(f"{k}: {v}" for k, v in notes.items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict = {}
    for r in result["rows"]:
        label = f"{r['model']} B{r['batch']} filled={'full' if r['filled'] == r['capacity'] else '128+half'}"
        series.setdefault(label, []).append((r["capacity"], r["speedup_vs_inductor"]))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("static cache capacity (tokens)")
    ax.set_ylabel("speedup over Inductor repeat_kv + SDPA")
    ax.set_title("decode attention, one token, bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--stem", default="decode_attention")
    parser.add_argument("--capacities", default="384,1152,4096,16384")
    parser.add_argument("--budget-s", type=float, default=240.0)
    args = parser.parse_args()
    from transfigure.bench import environment

    start = time.time()
    compiled_path = torch.compile(transformers_path)
    rows = []
    for model in ("1b", "8b"):
        for batch in (1, 8):
            for capacity in [int(c) for c in args.capacities.split(",")]:
                for filled in (128 + (capacity - 128) // 2, capacity):
                    if time.time() - start > args.budget_s:
                        break
                    rows.append(case(model, batch, capacity, filled, compiled_path))
                    r = rows[-1]
                    print(model, batch, capacity, filled, {k: (round(v, 1) if v else v) for k, v in r["us"].items()},
                          f"{r['speedup_vs_inductor']:.2f}x", flush=True)
    result = {"environment": environment(), "rows": rows,
              "configs": {k: v for k, v in getattr(da, "_tuner").timings.items()} if hasattr(da, "_tuner") else {}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, f"{args.stem}.md"), "w") as f:
        f.write(markdown(result))
    plot(result, os.path.join(args.out, f"{args.stem}.png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
