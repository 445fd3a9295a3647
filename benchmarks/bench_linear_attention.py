"""Linear attention: GPU correctness + timings vs fla 0.6.0 and SDPA, and (``--quality``) the CPU quality study.

GPU:  python benchmarks/bench_linear_attention.py --out $OUT        (bf16; fla optional, timed if importable)
CPU:  python benchmarks/bench_linear_attention.py --quality --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def env() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def rel(a, b) -> float:
    return float(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item())


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


def gpu(out_dir: str, budget_s: float) -> dict:
    import torch.nn.functional as F
    import triton.testing

    from transfigure.kernels.linear_attention import (
        _linear_attn_bwd_reference,
        linear_attention_reference,
        linear_attn_bwd_triton,
        linear_attn_triton,
    )

    start = time.time()
    results = {"env": env(), "correctness": [], "timings": []}
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn

        have_fla = True
    except Exception as error:  # pragma: no cover
        results["fla_error"] = repr(error)
        have_fla = False
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)

    # correctness on GPU, bf16 and fp32, plain and gated, GQA, ragged T
    for dtype in (torch.float32, torch.bfloat16):
        for gated in (False, True):
            B, H, Hk, T, D = 2, 8, 2, 1000, 128
            q = torch.randn(B, H, T, D, device=dev, generator=gen) * D**-0.5
            k = torch.randn(B, Hk, T, D, device=dev, generator=gen) * D**-0.5
            v = torch.randn(B, Hk, T, D, device=dev, generator=gen)
            g = F.logsigmoid(torch.randn(B, Hk, T, D, device=dev, generator=gen) + 3) if gated else None
            do = torch.randn(B, H, T, D, device=dev, generator=gen)
            ref = linear_attention_reference(q.double(), k.double(), v.double(), None if g is None else g.double(), 1.0, 64)
            gref = _linear_attn_bwd_reference(q.double(), k.double(), v.double(), None if g is None else g.double(), do.double(), 1.0, 64)
            c = lambda x: None if x is None else x.to(dtype)  # noqa: E731
            out = linear_attn_triton(c(q), c(k), c(v), c(g), 1.0, 64)
            grads = linear_attn_bwd_triton(c(q), c(k), c(v), c(g), c(do), 1.0, 64)
            row = {"dtype": str(dtype), "gated": gated, "o": rel(out, ref)}
            for name, a, e in zip(["dq", "dk", "dv", "dg"], grads, gref):
                if e.numel():
                    row[name] = rel(a, e)
            results["correctness"].append(row)
            print("check", row, flush=True)

    def bench(fn):
        try:
            return float(triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median"))
        except Exception as error:  # record, keep going
            return repr(error)[:200]

    shapes = [(1, 16, 128), (8, 32, 128)]
    for B, H, D in shapes:
        for T in (2048, 4096, 8192, 16384, 32768):
            if time.time() - start > budget_s:
                results["truncated"] = True
                break
            if B * H * T > 8 * 32 * 8192:  # keep memory and time in bounds
                continue
            dt = torch.bfloat16
            q = (torch.randn(B, H, T, D, device=dev, dtype=dt) * D**-0.5).requires_grad_(True)
            k = (torch.randn(B, H, T, D, device=dev, dtype=dt) * D**-0.5).requires_grad_(True)
            v = torch.randn(B, H, T, D, device=dev, dtype=dt).requires_grad_(True)
            g = F.logsigmoid(torch.randn(B, H, T, D, device=dev, dtype=torch.float32) + 3).to(dt).requires_grad_(True)
            do = torch.randn(B, H, T, D, device=dev, dtype=dt)
            row = {"B": B, "H": H, "D": D, "T": T}
            with torch.no_grad():
                row["ours_fwd"] = bench(lambda: linear_attn_triton(q, k, v, None, 1.0, 64))
                row["ours_gla_fwd"] = bench(lambda: linear_attn_triton(q, k, v, g, 1.0, 64))
                row["sdpa_fwd"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            row["ours_fwdbwd"] = bench(lambda: torch.autograd.grad(torch.ops.transfigure.linear_attn(q, k, v, None, 1.0, 64), (q, k, v), do))
            row["ours_gla_fwdbwd"] = bench(lambda: torch.autograd.grad(torch.ops.transfigure.linear_attn(q, k, v, g, 1.0, 64), (q, k, v, g), do))
            row["sdpa_fwdbwd"] = bench(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do))
            if have_fla:
                # fla takes [B, T, H, D] by default (head_first=False in 0.6)
                qt, kt, vt, gt, dot = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v, g, do))
                with torch.no_grad():
                    row["fla_fwd"] = bench(lambda: chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=False))
                    row["fla_gla_fwd"] = bench(lambda: chunk_gla(qt, kt, vt, gt, scale=1.0))
                    row["fla_fwd_normalized"] = bench(lambda: chunk_linear_attn(qt, kt, vt, scale=1.0))
                row["fla_fwdbwd"] = bench(lambda: torch.autograd.grad(chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=False)[0], (qt, kt, vt), dot))
                row["fla_gla_fwdbwd"] = bench(lambda: torch.autograd.grad(chunk_gla(qt, kt, vt, gt, scale=1.0)[0], (qt, kt, vt, gt), dot))
                with torch.no_grad():
                    ours = linear_attn_triton(q, k, v, None, 1.0, 64).transpose(1, 2).float()
                    theirs = chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=False)[0].float()
                    row["rel_vs_fla"] = rel(ours, theirs)
            results["timings"].append(row)
            print("time", row, flush=True)
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "linear_attention_gpu.json"), "w") as f:
                json.dump(results, f, indent=1)
            del q, k, v, g, do
            torch.cuda.empty_cache()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear_attention_gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


# --------------------------------------------------------------------------------------------------
# CPU quality study
# --------------------------------------------------------------------------------------------------


def quality(out_dir: str, steps: int, lr: float) -> dict:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from transfigure.models import byte_batches, eval_loss, trained_tiny_llama
    from transfigure.passes.attention_transfer import attention_transfer_loss, distill_attention
    from transfigure.reference.linear_attention import linearize_reference, restore_reference

    model = trained_tiny_llama()
    results = {"env": env(), "model": "trained_tiny_llama() (byte-level, hidden 64, 2 layers, 300 steps on pydoc_data.topics)",
               "eval": "transfigure.models.eval_loss (8 batches x 8 x 128 bytes, eval split)", "steps": steps, "lr": lr,
               "original": eval_loss(model), "runs": []}
    print("original", results["original"], flush=True)
    train = list(byte_batches(8, 128, "train", seed=5, count=steps))
    probe = list(byte_batches(8, 128, "train", seed=7, count=4))
    for fm, win, ws in [("hedgehog", "none", 64), ("hedgehog", "lolcats", 16), ("elu", "lolcats", 16), ("liger", "liger", 16), ("elu", "none", 64)]:
        linearize_reference(model, fm, win, window_size=ws)
        before = eval_loss(model)
        restore_reference(model)
        kw = dict(feature_map=fm, window=win, window_size=ws)
        run = {"feature_map": fm, "window": win, "window_size": ws, "linearized": before,
               "transfer_mse_before": attention_transfer_loss(model, probe, None, **kw)}
        t = time.time()
        state = distill_attention(model, train, steps=steps, lr=lr, progress=False, **kw)
        run["distill_seconds"] = time.time() - t
        if state:
            linearize_reference(model, fm, win, window_size=ws, state=state)
            run["after_transfer"] = eval_loss(model)
            restore_reference(model)
            run["transfer_mse_after"] = attention_transfer_loss(model, probe, state, **kw)
            gap = before - results["original"]
            run["gap_closed"] = (before - run["after_transfer"]) / gap if gap > 0 else None
        results["runs"].append(run)
        print(run, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear_attention_quality.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--budget", type=float, default=240.0)
    args = parser.parse_args()
    if args.quality:
        quality(args.out, args.steps, args.lr)
    else:
        gpu(args.out, args.budget)
