"""Where a cold compile's time goes: one bench variant's first (cold) decode call under cProfile.

The bench (``python -m transfigure bench``) reports compile time as one number (cold call minus a warm one).
This runs the same row (:func:`transfigure.bench.run_variant`) with the profiler on around it and writes the
functions that took the most cumulative time, so the share of hashing weights, packing, cache writes, kernel
JIT compiles, autotuning, Dynamo and Inductor can be read off. cProfile sees only this process's main thread:
Inductor's compile workers show up as waits; work moved to other threads shows up as the wait for it.

    python benchmarks/profile_cold_compile.py --model llama-8b --variant transfigure+lut-4bit --out /tmp/prof
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from pathlib import Path

import torch

from transfigure import bench

# cumulative-time rows worth reading whatever their rank (substrings of "file:line(function)")
WATCHED = ("content_key", "(pack)", "_write_npz", "_pack_weight", "quantize.py", "autotune.py", "compiler.py:",
           "compile_fx", "convert_frame", "cudagraph", "pipeline.py", "_dynamo/output_graph", "codecache",
           "async_compile", "sha256", "hashlib", "numpy", "savez")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--variant", default="transfigure+lut-4bit")
    parser.add_argument("--loop", default="custom", choices=bench.LOOPS)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # an empty transfigure cache: the packed-weight and tuning caches of earlier runs would make it warm
    os.environ["TRANSFIGURE_CACHE_DIR"] = tempfile.mkdtemp(prefix="transfigure_cold_")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    row = bench.run_variant(args.model, args.variant, 1, args.new_tokens, 128, args.device, dtype,
                            warm_compile=False, loop=args.loop)
    profiler.disable()
    wall = time.perf_counter() - start

    stem = f"profile_cold_compile_{args.model}_{args.variant.replace('+', '_')}"
    profiler.dump_stats(str(out / f"{stem}.prof"))  # for pstats' callers/callees views
    stats = pstats.Stats(profiler)
    text = io.StringIO()
    stats.stream = text
    stats.sort_stats("cumulative").print_stats(args.top)
    watched = io.StringIO()
    stats.stream = watched
    for pattern in WATCHED:
        stats.print_stats(pattern.replace("(", r"\(").replace(")", r"\)"), 8)
    summary = {"model": args.model, "variant": args.variant, "loop": args.loop, "wall_s": wall,
               "compile_cold_s": row.compile_cold_s, "tokens_per_s": row.tokens_per_s, "error": row.error,
               "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
               "torch": torch.__version__}
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    (out / f"{stem}.txt").write_text(json.dumps(summary, indent=1) + "\n\n" + text.getvalue() + "\n\nWATCHED\n"
                                     + watched.getvalue())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
