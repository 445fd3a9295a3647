"""Ladder + tensor parallelism: 2 processes, gloo on CPU.

Each rank shards a tiny Llama with ``parallelize_module`` (column-parallel q/k/v/gate/up, row-parallel
o/down), compiles it with the ladder pass and captures the ATen graph AOTAutograd produces. Checks: the
TP + ladder output equals the single-process reference ladder model, and every all-reduce's ``wait_tensor``
(except the last sub-block's) comes after the next sub-block's all-reduce was issued, i.e. after its compute.
(Without the ladder pass, traced DTensor collectives wait right after their own all-reduce.)
"""

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
LAYERS = 2
DEADLINE_S = 150


def _tiny_llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _collective_order(graph):
    """Positions of each all_reduce and of the wait_tensor that consumes it, in all-reduce issue order."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    reduces = [n for n in graph.nodes if "all_reduce" in str(n.target)]
    waits = {}
    for node in graph.nodes:
        if "wait_tensor" in str(node.target):
            waits[node.args[0]] = position[node]
    return [(position[r], waits[r]) for r in reduces]


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        from torch._dynamo.backends.common import aot_autograd
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        from transfigure.compiler.graph import GraphView
        from transfigure.passes.ladder import LadderPass
        from transfigure.reference.ladder import LadderReference

        model = _tiny_llama()
        x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want_ladder = LadderReference(model, "all")(x)
            want_stock = model(x, use_cache=False).logits

        plan = {}
        for i in range(LAYERS):
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
        parallelize_module(model, init_device_mesh("cpu", (WORLD,)), plan)

        def make_backend(store):
            def forward_compiler(gm, example_inputs):
                store["aten"] = gm
                return gm.forward

            def backend(gm, example_inputs):
                view = GraphView(gm, example_inputs)
                store["result"] = LadderPass().run(view)
                return aot_autograd(fw_compiler=forward_compiler)(view.gm, example_inputs)

            return backend

        ladder = {}
        with torch.no_grad():
            torch._dynamo.reset()
            got_ladder = torch.compile(model, backend=make_backend(ladder), fullgraph=True)(x, use_cache=False).logits
        torch.save(
            {
                "ladder_error": (got_ladder - want_ladder).abs().max().item(),
                "ladder_vs_stock": (want_ladder - want_stock).abs().max().item(),
                "ladder_order": _collective_order(ladder["aten"].graph),
                "notes": list(ladder["result"].notes),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_tensor_parallel_ladder_two_ranks(tmp_path):
    context = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"2-process gloo run did not finish in {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rank, res in enumerate(results):
        assert res["ladder_vs_stock"] > 1e-3  # the ladder changes the function, so equality below means something
        assert res["ladder_error"] < 1e-5, (rank, res["ladder_error"])
        ladder = res["ladder_order"]
        assert len(ladder) == 2 * LAYERS  # one all-reduce per sub-block
        # (Stock TP cannot pass the next line: sub-block j+1 reads h_j, which needs sub-block j's wait first.)
        # Ladder: every wait but the last sub-block's comes after the next sub-block's all-reduce was issued.
        assert all(wait > nxt for (_, wait), (nxt, _) in zip(ladder, ladder[1:])), ladder
        assert any("explicit all_reduce" in note and "ladder_add" in note for note in res["notes"])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_tensor_parallel_decode_benchmark_runs_on_two_cpu_ranks(tmp_path):
    """benchmarks/bench_ladder_tp.py (the GPU timing harness of issue 8) on CPU: a per-rank static KV cache,
    greedy decode through the compiled TP model; the variant without passes gives the unsharded model's tokens,
    every rank decodes the same tokens, and the ladder variants rewrite their all-reduces."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(root / "benchmarks" / "bench_ladder_tp.py"), "--new-tokens", "4", "--prompt", "8",
                          "--out", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "ladder_tp.json").read_text())["rows"]}
    assert set(rows) == {"none", "ladder-upper-half", "ladder-all"}
    assert rows["none"]["matches_unsharded"] and all(r["ranks_agree"] for r in rows.values())
    assert rows["ladder-all"]["ladder_sites"] > rows["ladder-upper-half"]["ladder_sites"] > 0
