"""Decode throughput of a tensor-parallel Llama with and without the ladder residual (issue 8), via torchrun.

    torchrun --nproc-per-node 2 benchmarks/bench_ladder_tp.py                       # CPU (gloo), tiny model: checks
    torchrun --nproc-per-node 2 benchmarks/bench_ladder_tp.py --cuda --model llama-1b --out DIR   # NCCL, timed

Every rank builds the same random model, shards it with ``parallelize_module`` (column-parallel q/k/v/gate/up,
row-parallel o/down: one all-reduce after attention and one after the MLP of each layer), prefills the prompt
eagerly into a static KV cache and decodes greedily through the model compiled with ``backend="transfigure"``:
no passes, then ``ladder`` on the upper half and on all layers (the pass makes each row-parallel all-reduce an
explicit async collective whose wait moves past the next sub-block, so the communication overlaps compute).

The KV cache is sized for this rank's heads: transformers' ``StaticCache`` allocates ``num_key_value_heads`` of the
config, while a column-parallel k/v projection gives each rank ``num_key_value_heads / world`` of them, so the
cache gets a config copy with the per-rank head counts.

Checks (every run): all ranks decode the same tokens; the variant without passes gives the tokens of the unsharded
model (fp32 runs: CPU; bf16 TP changes the reduction order, so on the GPU the check is reported, not enforced).
Rank 0 writes ``ladder_tp.{json,md}`` to ``--out``: tokens/s, ms per token, compile seconds per variant.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = {"none": None, "ladder-upper-half": "upper_half", "ladder-all": "all"}


def build_config(name: str):
    from transfigure import models

    if name == "llama-1b":
        return models.llama_1b_config()
    if name == "llama-8b":
        return models.llama_8b_config()
    if name == "tiny":
        import transformers

        return transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    raise ValueError(f"--model {name!r}: one of llama-1b, llama-8b, tiny")


def per_rank_config(config, world: int):
    """The config a rank's KV cache must be sized with: its share of the (key/value) heads."""
    for name in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, name) % world:
            raise ValueError(f"{name}={getattr(config, name)} is not divisible by the {world} tensor-parallel ranks")
    local = copy.deepcopy(config)
    local.num_attention_heads //= world
    local.num_key_value_heads //= world
    local.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return local


def greedy_decode(model, step, prompt: torch.Tensor, new_tokens: int, cache_config) -> tuple[torch.Tensor, float]:
    """Prefill eagerly into a fresh static cache, then ``new_tokens - 1`` compiled one-token steps.
    Returns (tokens, seconds of the decode steps)."""
    import transformers

    from transfigure.backends.decode import _cache_kwarg

    batch, length = prompt.shape
    cache = transformers.StaticCache(config=cache_config, max_cache_len=length + new_tokens)
    logits = model(input_ids=prompt, **_cache_kwarg(model, cache), use_cache=True,
                   cache_position=torch.arange(length, device=prompt.device)).logits
    token = logits[:, -1].argmax(-1)
    out = [token]
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(1, new_tokens):
        position = torch.tensor([length + i - 1], device=prompt.device)
        logits = step(input_ids=token[:, None], **_cache_kwarg(model, cache), use_cache=True,
                      cache_position=position).logits
        token = logits[:, -1].argmax(-1)
        out.append(token)
    sync()
    return torch.stack(out, 1), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--mode", default=None, choices=(None, "reduce-overhead"),
                        help="torch.compile mode through transfigure's 'mode' option (CUDA graphs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    import transfigure
    from examples.ladder_tp import tp_plan

    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if args.cuda else "cpu"
    if args.cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dtype = torch.bfloat16 if args.cuda else torch.float32
    config = build_config(args.model)
    config._attn_implementation = "sdpa"
    cache_config = per_rank_config(config, world)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(1)).to(device)

    def fresh_model():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()

    reference = None
    if rank == 0 and (not args.cuda or args.model == "tiny"):
        with torch.no_grad():
            unsharded = fresh_model()
            reference = greedy_decode(unsharded, unsharded, prompt, args.new_tokens, config)[0]
            del unsharded
    rows = []
    for name in args.variants:
        torch._dynamo.reset()
        model = fresh_model()
        parallelize_module(model, init_device_mesh(device, (world,)), tp_plan(config.num_hidden_layers))
        options = {} if VARIANTS[name] is None else {"ladder": {"layers": VARIANTS[name]}}
        if args.mode:
            options["mode"] = args.mode
        backend = transfigure.backend(lowering="inductor" if args.cuda else "eager", **options)
        step = torch.compile(model, backend=backend)
        with torch.no_grad():
            start = time.perf_counter()
            greedy_decode(model, step, prompt, args.new_tokens, cache_config)  # compiles
            first = time.perf_counter() - start
            tokens, seconds = greedy_decode(model, step, prompt, args.new_tokens, cache_config)
        gathered = [torch.empty_like(tokens) for _ in range(world)]
        dist.all_gather(gathered, tokens)
        row = {"variant": name, "tokens_per_s": args.batch * (args.new_tokens - 1) / seconds,
               "ms_per_token": 1e3 * seconds / (args.new_tokens - 1), "first_run_s": first,
               "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered)}
        result = backend.report.graphs[0].passes[0].result if backend.report.graphs and options.get("ladder") else None
        if result is not None:
            row["ladder_sites"] = len(result.rewritten)
        if reference is not None and name == "none":
            row["matches_unsharded"] = bool(torch.equal(tokens, reference))
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
        del model, step
    if rank == 0:
        meta = {"world": world, "model": args.model, "batch": args.batch, "prompt": args.prompt,
                "new_tokens": args.new_tokens, "device": torch.cuda.get_device_name() if args.cuda else "cpu",
                "torch": torch.__version__, "transformers": transformers.__version__, "mode": args.mode,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        base = next((r["tokens_per_s"] for r in rows if r["variant"] == "none"), None)
        lines = [f"# Ladder residual under tensor parallelism: decode, {meta['model']}, {world} ranks "
                 f"({meta['device']}, torch {meta['torch']}, {meta['date']})", "",
                 f"Batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, greedy, mode {args.mode}.", "",
                 "| variant | tok/s | vs no passes | ms/token | first run s | ranks agree |", "|---|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['tokens_per_s'] / base:.3f}x" if base else "-"
            lines.append(f"| {r['variant']} | {r['tokens_per_s']:.1f} | {ratio} | {r['ms_per_token']:.3f} | "
                         f"{r['first_run_s']:.1f} | {r['ranks_agree']} |")
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "ladder_tp.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
            (out / "ladder_tp.md").write_text(text)
    failed = [r["variant"] for r in rows if not r["ranks_agree"] or r.get("matches_unsharded") is False]
    dist.destroy_process_group()
    if failed and not args.cuda:
        print(f"rank {rank}: check failed for {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
