"""Ladder residual under tensor parallelism, started with torchrun (2..8 ranks).

    torchrun --nproc-per-node 2 examples/ladder_tp.py              # CPU, gloo
    torchrun --nproc-per-node 8 examples/ladder_tp.py --cuda       # one GPU per rank, NCCL

Each rank builds the same random Llama (heads and KV heads divisible by the world size), shards it with
``parallelize_module`` (column-parallel q/k/v/gate/up, row-parallel o/down), compiles it with
``options={"ladder": {...}}`` and checks the output against the single-process reference ladder model.
Under TP the pass turns each row-parallel all-reduce into explicit ``_c10d_functional.all_reduce`` +
``wait_tensor`` nodes and puts each wait after the next sub-block, so NCCL overlaps it with that compute.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def tp_plan(num_layers: int) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(num_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--layers", default="all", help="'all', 'upper_half' or comma-separated indices")
    parser.add_argument("--lowering", default="eager", choices=("eager", "inductor"))
    args = parser.parse_args()
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    import transfigure
    import transfigure.passes.ladder  # noqa: F401  (registers the pass)
    from transfigure.reference.ladder import LadderReference

    device = "cuda" if args.cuda else "cpu"
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    layers = args.layers if args.layers in ("all", "upper_half") else [int(i) for i in args.layers.split(",")]
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device).eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        want = LadderReference(model, layers)(x)
    parallelize_module(model, init_device_mesh(device, (world,)), tp_plan(config.num_hidden_layers))
    backend = transfigure.backend(lowering=args.lowering, ladder={"layers": layers})
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(x, use_cache=False).logits
    error = (got - want).abs().max().item()
    print(f"rank {rank}/{world}: max |TP+ladder - reference ladder| = {error:.2e}")
    if rank == 0:
        print(backend.report.graphs[-1].passes[0].result.notes[:3] if backend.report.graphs else "")
    dist.destroy_process_group()
    if error > 1e-4:
        sys.exit(1)


if __name__ == "__main__":
    main()
