"""Linear attention: GPU correctness + timings vs fla 0.6.0 and SDPA, and (``--quality``) the CPU quality study.

GPU:  python benchmarks/bench_linear_attention.py --out $OUT --budget 330   (bf16; fla optional, timed if importable)
      every kernel config is first validated alone in bf16 (a crashing/wrong one is excluded and reported), then
      op-level checks, timings and the decode step run task by task in worker subprocesses (crash-isolated).
      Timings are kernels under a CUDA graph by default; BENCH_TIMER=eager times Python launches (what the
      first runs did: at B1 H16, T <= 8K that mostly measured fla's host overhead).
CPU:  python benchmarks/bench_linear_attention.py --quality --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transfigure.bench import environment, pyplot  # noqa: E402


def rel(a, b) -> float:
    return float(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item())


# --------------------------------------------------------------------------------------------------
# GPU: a parent process runs every check/timing as a task in worker subprocesses. A task that kills its
# worker (illegal memory access poisons the CUDA context for the rest of the process) is recorded as crashed,
# and a fresh worker resumes with the next task, so one bad variant never loses the others' numbers.
# --------------------------------------------------------------------------------------------------

SMOKE = os.environ.get("BENCH_SMOKE") == "1"  # CPU plumbing check under TRITON_INTERPRET=1: tiny shapes, fp16
DEV = "cpu" if SMOKE else "cuda"
LOW = torch.float16 if SMOKE else torch.bfloat16  # the interpreter computes bf16 wrongly
SHAPES = [(1, 2, 32)] if SMOKE else [(1, 16, 128), (8, 32, 128)]
TS = (100,) if SMOKE else (2048, 8192, 32768)
CONTEXTS = (64, 128) if SMOKE else (1024, 2048, 4096, 8192, 16384, 32768)
TASK_CAP = float(os.environ.get("BENCH_TASK_CAP", "120"))
# eager: do_bench, each call launched from Python (at B1 H16 and T <= 8K that is mostly host time, fla's and
# ours, and it swung 0.15-0.39 ms for the same fla call across machines); cudagraph: do_bench_cudagraph, the
# kernels alone, as a compiled model under CUDA graphs runs them
TIMER = os.environ.get("BENCH_TIMER", "cudagraph")
CHECK = (1, 4, 2, 70, 32) if SMOKE else (2, 8, 2, 1000, 128)  # B, H, Hk, T, D of the correctness checks


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()
VARIANTS = ["ours_fwd", "fla_fwd", "sdpa_fwd", "ours_fwdbwd", "fla_fwdbwd", "ours_gla_fwd", "fla_gla_fwd",
            "ours_gla_fwdbwd", "fla_gla_fwdbwd", "ours_liger_fwd", "ours_hybrid_fwd", "rel_vs_fla"]
# focused runs: BENCH_VARIANTS=ours_liger_fwd,ours_hybrid_fwd BENCH_STAGES=check,time0
if os.environ.get("BENCH_VARIANTS"):
    VARIANTS = [v for v in VARIANTS if v in os.environ["BENCH_VARIANTS"].split(",")]
STAGES = os.environ.get("BENCH_STAGES", "configs,check,decode,time0,time1").split(",")


def stage_tasks(stage: str) -> list[str]:
    from transfigure.kernels import linear_attention as la

    if stage == "configs":
        # BENCH_CONFIGS=FUSED|SEG checks only the configs whose description matches (new ones, in a short run)
        wanted = re.compile(os.environ.get("BENCH_CONFIGS", ""))
        return [f"{kind}:{i}:{gated}" for kind, configs in (("fwd", la._all_fwd_configs), ("bwd", la._all_bwd_configs))
                for i, c in enumerate(configs) if wanted.search(c.describe()) for gated in (0, 1)]
    if stage == "check":
        return [f"{dt}:{gated}" for dt in ("float32", "bfloat16") for gated in (0, 1)] + ["normalized:bfloat16", "decode:bfloat16", "decode:float32",
                                                                                  "window:lolcats", "window:liger"]
    if stage == "decode":
        return [f"{name}:{ctx}" for ctx in CONTEXTS for name in ("ours_decode", "ours_gla_decode", "sdpa_decode")]
    if stage.startswith("time"):
        if int(stage[4:]) >= len(SHAPES):
            return []
        B, H, D = SHAPES[int(stage[4:])]
        # ours first over every T (cheap: our autotune), then SDPA, then fla (its first call per shape runs fla's
        # own autotuning, 20-100 s each on the H100 in our first run)
        order = sorted(VARIANTS, key=lambda v: (v.startswith("fla") or v == "rel_vs_fla", v.startswith("sdpa")))
        return [f"{B}:{H}:{D}:{T}:{v}" for v in order for T in TS if not (B > 1 and v in ("ours_liger_fwd", "ours_hybrid_fwd"))]
    raise ValueError(stage)


class Worker:
    def __init__(self):
        import torch.nn.functional as F

        self.F = F
        self.cache_key, self.data = None, None
        try:
            from fla.ops.gla import chunk_gla
            from fla.ops.linear_attn import chunk_linear_attn

            self.fla = (chunk_linear_attn, chunk_gla)
        except Exception as error:  # noqa: BLE001
            self.fla, self.fla_error = None, repr(error)

    def bench(self, fn) -> float:
        import triton.testing

        fn()
        sync()
        if SMOKE:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        if TIMER == "cudagraph":
            try:
                return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))
            except Exception as error:  # noqa: BLE001  (not capturable: say so rather than mix timers)
                raise RuntimeError(f"not capturable in a CUDA graph: {error!r}"[:200]) from error
        return float(triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median"))

    @staticmethod
    def qkvg(B, H, Hk, T, D, dtype, seed=0, grad=False):
        import torch.nn.functional as F

        gen = torch.Generator(device=DEV).manual_seed(seed)
        q = torch.randn(B, H, T, D, device=DEV, generator=gen) * D**-0.5
        k = torch.randn(B, Hk, T, D, device=DEV, generator=gen) * D**-0.5
        v = torch.randn(B, Hk, T, D, device=DEV, generator=gen)
        g = F.logsigmoid(torch.randn(B, Hk, T, D, device=DEV, generator=gen) + 3)
        do = torch.randn(B, H, T, D, device=DEV, generator=gen)
        out = [x.to(dtype) for x in (q, k, v, g, do)]
        if grad:
            out = [x.requires_grad_(True) for x in out[:4]] + [out[4]]
        return out

    # -- per-config validation (bf16, direct launch, no autotuner) --
    def configs(self, task):
        from transfigure.kernels import linear_attention as la

        kind, i, gated = task.split(":")
        gated = gated == "1"
        config = (la._all_fwd_configs if kind == "fwd" else la._all_bwd_configs)[int(i)]
        if self.cache_key != ("cfg", gated):
            q, k, v, g, do = self.qkvg(*CHECK, torch.float64, seed=1)
            g = g if gated else None
            ref_o = la.linear_attention_reference(q, k, v, g, 1.0, 64)
            ref_g = la._linear_attn_bwd_reference(q, k, v, g, do, 1.0, 64)
            self.cache_key, self.data = ("cfg", gated), (q, k, v, g, do, ref_o, ref_g)
        q, k, v, g, do, ref_o, ref_g = self.data
        c = lambda x: None if x is None else x.to(LOW).contiguous()  # noqa: E731
        row = {"config": config.as_json()}
        if kind == "fwd":
            o = la._fwd_launch(config, c(q), c(k), c(v), c(g), 1.0, 64)
            sync()
            row["o"] = rel(o, ref_o)
        else:
            grads = la._bwd_launch(config, c(q), c(k), c(v), c(g), c(do), 1.0, 64)
            sync()
            for name, a, e in zip(["dq", "dk", "dv", "dg"] if gated else ["dq", "dk", "dv"], grads, ref_g):
                row[name] = rel(a, e)
        row["ok"] = all(val < 3e-2 for key, val in row.items() if key not in ("config",))
        return row

    # -- op-level correctness through the autotuned ops --
    def check(self, task):
        from transfigure.kernels import linear_attention as la

        what, dt = task.split(":")
        if what == "normalized":
            q, k, v, g, do = self.qkvg(*CHECK, torch.float64, seed=2)
            q, k = self.F.elu(q) + 1, self.F.elu(k) + 1
            ref = la.linear_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), g.float().cpu(), chunk_size=64, normalize=True)
            out = la.linear_attention(q.to(LOW), k.to(LOW), v.to(LOW), g.to(LOW), chunk_size=64, normalize=True)
            return {"o": rel(out.cpu(), ref), "ok": rel(out.cpu(), ref) < 3e-2}
        if what == "window":  # the hybrid's softmax window: Triton kernel vs its blockwise reference, bf16
            from transfigure.kernels import window_attention as wa

            q, k, v, g, do = self.qkvg(*CHECK, torch.float32, seed=6)
            B_, H_, Hk_, T_, D_ = CHECK
            valid = torch.ones(B_, T_, dtype=torch.bool, device=DEV)
            factor = torch.rand(H_, device=DEV) if dt == "lolcats" else None
            ref = wa.window_attention_reference(q, k, v, valid, factor, 64, D_**-0.5, dt)
            out = torch.ops.transfigure.window_attention(q.to(LOW), k.to(LOW), v.to(LOW), valid, factor, 64, D_**-0.5, dt)
            errs = [rel(a.float(), b) for a, b in zip(out, ref)]
            return {"num": errs[0], "den": errs[1], "ok": max(errs) < 3e-2}
        if what == "decode":
            dtype = LOW if dt == "bfloat16" else torch.float32
            B_, H_, Hk_, T_, D_ = CHECK
            T_ = min(T_, 300)
            q, k, v, g, do = self.qkvg(B_, H_, Hk_, T_, D_, torch.float32, seed=3)
            ref = la.linear_attention_reference(q.double(), k.double(), v.double(), g.double(), 0.5, 64)
            S = torch.zeros(B_, Hk_, D_, D_, device=DEV)
            outs = []
            for t in range(T_):
                o, S = la.linear_attention_decode_step(q[:, :, t].to(dtype), k[:, :, t].to(dtype), v[:, :, t].to(dtype), g[:, :, t].to(dtype), S, 0.5, inplace=True)
                outs.append(o)
            err = rel(torch.stack(outs, 2), ref)
            return {"o": err, "ok": err < (3e-2 if dtype != torch.float32 else 1e-4)}
        dt, gated = what, dt == "1"
        dtype = LOW if dt == "bfloat16" else getattr(torch, dt)
        q, k, v, g, do = self.qkvg(*CHECK, torch.float64, seed=4)
        g = g if gated else None
        ref_o = la.linear_attention_reference(q, k, v, g, 1.0, 64)
        ref_g = la._linear_attn_bwd_reference(q, k, v, g, do, 1.0, 64)
        c = lambda x: None if x is None else x.to(dtype)  # noqa: E731
        leaves = [c(x).requires_grad_(True) if x is not None else None for x in (q, k, v, g)]
        out = torch.ops.transfigure.linear_attn(*leaves, 1.0, 64)
        grads = torch.autograd.grad(out, [x for x in leaves if x is not None], c(do))
        row = {"dtype": dt, "gated": gated, "o": rel(out, ref_o)}
        for name, a, e in zip(["dq", "dk", "dv", "dg"], grads, ref_g):
            row[name] = rel(a, e)
        row["ok"] = all(val < (3e-2 if dtype != torch.float32 else 1e-2) for key, val in row.items() if key not in ("dtype", "gated"))
        return row

    # -- decode step vs context length --
    def decode(self, task):
        from transfigure.kernels import linear_attention as la

        name, ctx = task.split(":")
        ctx = int(ctx)
        B, H, D = SHAPES[0]
        q = torch.randn(B, H, D, device=DEV, dtype=LOW)
        k = torch.randn(B, H, D, device=DEV, dtype=LOW)
        v = torch.randn(B, H, D, device=DEV, dtype=LOW)
        if name == "sdpa_decode":
            kc = torch.randn(B, H, ctx, D, device=DEV, dtype=LOW)
            vc = torch.randn(B, H, ctx, D, device=DEV, dtype=LOW)
            return {"ms": self.bench(lambda: self.F.scaled_dot_product_attention(q[:, :, None], kc, vc))}
        # the state after a prefill of ctx tokens (its size does not depend on ctx; we build it for real anyway)
        qq, kk, vv, gg, _ = self.qkvg(B, H, H, ctx, D, LOW, seed=5)
        g1 = gg[:, :, -1] if name == "ours_gla_decode" else None
        S = torch.einsum("bhtk,bhtv->bhkv", kk.float(), vv.float())
        return {"ms": self.bench(lambda: la.linear_attention_decode_step(q, k, v, g1, S, 1.0, inplace=True))}

    # -- sequence timings --
    def time(self, task):
        from transfigure.kernels import linear_attention as la
        from transfigure.passes.linearize import linearized_attention

        B, H, D, T, variant = task.split(":")
        B, H, D, T = int(B), int(H), int(D), int(T)
        key = (B, H, D, T)
        if self.cache_key != key:
            self.cache_key, self.data = None, None
            if DEV == "cuda":
                torch.cuda.empty_cache()
            q, k, v, g, do = self.qkvg(B, H, H, T, D, LOW, seed=6, grad=True)
            fla_in = [x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v, g)] + [do.transpose(1, 2).contiguous()]
            self.cache_key, self.data = key, (q, k, v, g, do, fla_in)
        q, k, v, g, do, (qt, kt, vt, gt, dot) = self.data
        op = torch.ops.transfigure.linear_attn
        F = self.F
        if variant.startswith("fla") or variant == "rel_vs_fla":
            if self.fla is None:
                return {"error": self.fla_error}
            chunk_linear_attn, chunk_gla = self.fla
        grad = torch.autograd.grad
        fns = {
            "ours_fwd": lambda: la.linear_attn_triton(q.detach(), k.detach(), v.detach(), None, 1.0, 64),
            "ours_gla_fwd": lambda: la.linear_attn_triton(q.detach(), k.detach(), v.detach(), g.detach(), 1.0, 64),
            "sdpa_fwd": lambda: F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True),
            "ours_fwdbwd": lambda: grad(op(q, k, v, None, 1.0, 64), (q, k, v), do),
            "ours_gla_fwdbwd": lambda: grad(op(q, k, v, g, 1.0, 64), (q, k, v, g), do),
            "fla_fwd": lambda: chunk_linear_attn(qt.detach(), kt.detach(), vt.detach(), scale=1.0, normalize=False),
            "fla_gla_fwd": lambda: chunk_gla(qt.detach(), kt.detach(), vt.detach(), gt.detach(), scale=1.0),
            "fla_fwdbwd": lambda: grad(chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=False)[0], (qt, kt, vt), dot),
            "fla_gla_fwdbwd": lambda: grad(chunk_gla(qt, kt, vt, gt, scale=1.0)[0], (qt, kt, vt, gt), dot),
            # the pass's whole site: liger feature map + gates, without / with the liger window (0.5 SWA-64 + 0.5 GLA)
            "ours_liger_fwd": lambda: linearized_attention(q.detach(), k.detach(), v.detach(), None, None, None, None, causal=True,
                                                           feature_map="liger", window="none", window_size=64, chunk_size=64, scale=D**-0.5),
            "ours_hybrid_fwd": lambda: linearized_attention(q.detach(), k.detach(), v.detach(), None, None, None, None, causal=True,
                                                            feature_map="liger", window="liger", window_size=64, chunk_size=64, scale=D**-0.5),
        }
        if variant == "rel_vs_fla":
            with torch.no_grad():
                ours = la.linear_attn_triton(q.detach(), k.detach(), v.detach(), g.detach(), 1.0, 64).transpose(1, 2)
                theirs = chunk_gla(qt.detach(), kt.detach(), vt.detach(), gt.detach(), scale=1.0)[0]
            return {"gla_rel": rel(ours, theirs)}
        tuner = la._bwd_tuner if "fwdbwd" in variant else la._fwd_tuner
        tuner.last_timings = {}
        if variant.endswith("fwd"):
            with torch.no_grad():
                row = {"ms": self.bench(fns[variant])}
        else:
            row = {"ms": self.bench(fns[variant])}
        if variant.startswith("ours") and tuner.last_timings:  # what the autotuner measured per config, ms
            row["tuned_ms"] = {name: round(ms, 4) for name, ms in sorted(tuner.last_timings.items(), key=lambda kv: kv[1])}
        return row


def worker_main(stage: str, first: int, events: str, deadline: float) -> None:
    w = Worker()
    tasks = stage_tasks(stage)
    with open(events, "a") as f:
        for i in range(first, len(tasks)):
            if time.time() > deadline:
                f.write(json.dumps({"stage": stage, "task": tasks[i], "status": "skipped (time budget)"}) + "\n")
                continue
            f.write(json.dumps({"stage": stage, "index": i, "task": tasks[i], "status": "start", "_t": time.time()}) + "\n")
            f.flush()
            t0 = time.time()
            try:
                row = getattr(w, stage.rstrip("0123456789"))(tasks[i])
                status = "ok"
            except Exception as error:  # noqa: BLE001  (record, keep going)
                row, status = {"error": repr(error)[:300]}, "error"
                if "CUDA" in repr(error) or "illegal" in repr(error):
                    f.write(json.dumps({"stage": stage, "index": i, "task": tasks[i], "status": "crash", **row}) + "\n")
                    f.flush()
                    os._exit(3)  # the CUDA context is gone; the parent resumes after this task
            row.update({"stage": stage, "index": i, "task": tasks[i], "status": status, "seconds": round(time.time() - t0, 2)})
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
            f.flush()


def run_stage(stage: str, events: str, deadline: float, extra_env: dict) -> None:
    import subprocess

    first = 0
    n = len(stage_tasks(stage))
    while first < n:
        env_ = {**os.environ, **extra_env}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", stage, "--first", str(first), "--events", events,
               "--deadline", str(deadline)]
        # a task that runs longer than TASK_CAP seconds is killed (recorded as crashed) and the next one starts
        proc = subprocess.Popen(cmd, env=env_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        import threading

        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
        reader.start()
        rc = None
        while rc is None:
            time.sleep(0.5)
            rc = proc.poll()
            if rc is not None:
                break
            rows = [json.loads(line) for line in open(events) if line.strip()]
            last = rows[-1] if rows else {}
            started_at = last.get("_t", 0.0) if last.get("status") == "start" else 0.0
            if time.time() > deadline + 20 or (started_at and time.time() - started_at > TASK_CAP):
                proc.kill()
                rc = proc.wait()
        reader.join(timeout=5)
        tail = "".join(chunks)[-3000:]
        if rc != 0:
            tail += f" (exit {rc}; killed after {TASK_CAP}s on one task or at the deadline)" if rc == -9 else ""
        print(tail[-3000:], flush=True)
        if rc == 0:
            return
        rows = [json.loads(line) for line in open(events) if line.strip()]
        mine = [r for r in rows if r.get("stage") == stage and "index" in r]
        started = [r["index"] for r in mine if r["status"] == "start" and r["index"] >= first]
        done = {r["index"] for r in mine if r["status"] != "start"}
        last = max(started) if started else first
        if last not in done:
            with open(events, "a") as f:
                f.write(json.dumps({"stage": stage, "index": last, "task": stage_tasks(stage)[last], "status": "crash",
                                    "error": f"worker exited {rc}: {tail[-400:]}"}) + "\n")
        first = last + 1
        if time.time() > deadline:
            return


def gpu(out_dir: str, budget_s: float) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    deadline = time.time() + budget_s
    events = os.path.join(out_dir, "linear_attention_events.jsonl")
    open(events, "w").close()
    results = {"env": {**environment(), "timer": TIMER}}
    try:
        import fla

        results["env"]["fla"] = getattr(fla, "__version__", "?")
    except Exception as error:  # noqa: BLE001
        results["env"]["fla"] = repr(error)
    try:
        if "configs" in STAGES:
            run_stage("configs", events, deadline, {"CUDA_LAUNCH_BLOCKING": "1"})
        rows = [json.loads(line) for line in open(events) if line.strip()]
        bad = {"fwd": set(), "bwd": set()}
        for r in rows:
            if r.get("stage") == "configs" and r["status"] != "start" and (r["status"] != "ok" or not r.get("ok")):
                kind, i, _ = r["task"].split(":")
                bad[kind].add(int(i))
        exclude = ",".join(f"{kind}:{i}" for kind in bad for i in sorted(bad[kind]))
        results["excluded_configs"] = exclude
        print("excluded configs:", exclude or "none", flush=True)
        extra = {"TRANSFIGURE_LINEAR_ATTN_EXCLUDE": exclude}
        for stage in [s for s in ("check", "decode", "time0", "time1") if s in STAGES]:
            try:
                run_stage(stage, events, deadline, extra)
            except Exception as error:  # noqa: BLE001  (keep the other stages)
                results.setdefault("stage_errors", {})[stage] = repr(error)[:300]
    finally:
        return collect(out_dir, results)


def collect(out_dir: str, results: dict) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "linear_attention_events.jsonl")) if line.strip()]
    final = [r for r in rows if r["status"] != "start"]
    results["configs"] = [r for r in final if r["stage"] == "configs"]
    results["correctness"] = [r for r in final if r["stage"] == "check"]
    results["decode"] = [r for r in final if r["stage"] == "decode"]
    table: dict = {}
    for r in final:
        if r["stage"].startswith("time"):
            B, H, D, T, variant = r["task"].split(":")
            entry = table.setdefault((int(B), int(H), int(D), int(T)), {"B": int(B), "H": int(H), "D": int(D), "T": int(T)})
            entry[variant] = r.get("ms", r.get("gla_rel", r.get("error", r["status"])))
    results["timings"] = list(table.values())
    with open(os.path.join(out_dir, "linear_attention.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(out_dir, results)
    try:
        plot(out_dir, results)
    except Exception as error:  # noqa: BLE001  (matplotlib may be missing on the GPU machine)
        print("plot failed:", repr(error))
    return results


def _ratio(a, b):
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "n/a"


def _ms(x):
    if x is None:
        return "not run"
    return f"{x:.3f}" if isinstance(x, float) else f"`{str(x)[:40]}`"


def write_markdown(out_dir: str, results: dict) -> None:
    e = results["env"]
    lines = [f"# Linear attention on {e['device']}", "",
             f"torch {e['torch']}, triton {e['triton']}, fla {e.get('fla')}, {e['date']}. bf16 inputs, fp32 state, chunk 64, "
             + ("median of `triton.testing.do_bench_cudagraph` (kernels under a CUDA graph, no host time)"
              if e.get("timer") == "cudagraph" else "median of `triton.testing.do_bench` (eager launches)")
             + ", ms. Speedup = other / ours (>1: ours faster).", "",
             f"Excluded kernel configs (failed the per-config bf16 check): {results.get('excluded_configs') or 'none'}", "",
             "| B | H | D | T | ours fwd | fla fwd | speedup | SDPA fwd | vs SDPA | ours fwd+bwd | fla fwd+bwd | speedup | "
             "ours GLA fwd | fla GLA fwd | ours GLA fwd+bwd | fla GLA fwd+bwd | speedup | liger site | liger+window | hybrid/plain |",
             "|" + "---|" * 20]
    for r in results["timings"]:
        g = r.get
        lines.append("| " + " | ".join([str(r["B"]), str(r["H"]), str(r["D"]), str(r["T"]),
                                         _ms(g("ours_fwd")), _ms(g("fla_fwd")), _ratio(g("fla_fwd"), g("ours_fwd")),
                                         _ms(g("sdpa_fwd")), _ratio(g("sdpa_fwd"), g("ours_fwd")),
                                         _ms(g("ours_fwdbwd")), _ms(g("fla_fwdbwd")), _ratio(g("fla_fwdbwd"), g("ours_fwdbwd")),
                                         _ms(g("ours_gla_fwd")), _ms(g("fla_gla_fwd")),
                                         _ms(g("ours_gla_fwdbwd")), _ms(g("fla_gla_fwdbwd")), _ratio(g("fla_gla_fwdbwd"), g("ours_gla_fwdbwd")),
                                         _ms(g("ours_liger_fwd")), _ms(g("ours_hybrid_fwd")), _ratio(g("ours_hybrid_fwd"), g("ours_liger_fwd"))]) + " |")
    lines += ["", "## Decode step (B=1, H=16, D=128, one token), ms", "", "| context | ours | ours gated | SDPA on a KV cache |", "|---|---|---|---|"]
    dec: dict = {}
    for r in results["decode"]:
        name, ctx = r["task"].split(":")
        dec.setdefault(int(ctx), {})[name] = r.get("ms", r.get("error", r["status"]))
    for ctx in sorted(dec):
        d = dec[ctx]
        lines.append(f"| {ctx} | {_ms(d.get('ours_decode'))} | {_ms(d.get('ours_gla_decode'))} | {_ms(d.get('sdpa_decode'))} |")
    lines += ["", "## Correctness on the GPU (relative L2 error vs fp64 reference)", "", "| check | result |", "|---|---|"]
    for r in results["correctness"]:
        vals = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in r.items() if k not in ("stage", "index", "task", "seconds")}
        lines.append(f"| {r['task']} | {vals} |")
    lines += ["", "## Per-config bf16 check (direct launch, B2 H8 Hk2 T1000 D128)", "", "| config | result |", "|---|---|"]
    for r in results["configs"]:
        vals = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in r.items() if k not in ("stage", "index", "task", "seconds", "config")}
        lines.append(f"| {r['task']} {r.get('config', '')} | {vals} |")
    with open(os.path.join(out_dir, "linear_attention.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(out_dir: str, results: dict) -> None:
    plt = pyplot()
    if plt is None:
        return

    shapes = sorted({(r["B"], r["H"], r["D"]) for r in results["timings"]})
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(6 * (len(shapes) + 1), 4.5))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, shape in zip(axes, shapes):
        rows = sorted((r for r in results["timings"] if (r["B"], r["H"], r["D"]) == shape), key=lambda r: r["T"])
        for name in ("ours_fwd", "fla_fwd", "sdpa_fwd", "ours_fwdbwd", "fla_fwdbwd", "ours_gla_fwdbwd", "fla_gla_fwdbwd", "ours_hybrid_fwd"):
            pts = [(r["T"], r[name]) for r in rows if isinstance(r.get(name), float)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if name.startswith(("fla", "sdpa")) else "-")
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title=f"B={shape[0]} H={shape[1]} D={shape[2]} bf16")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for name in ("ours_decode", "ours_gla_decode", "sdpa_decode"):
        pts = sorted((int(r["task"].split(":")[1]), r["ms"]) for r in results["decode"] if r["task"].startswith(name + ":") and "ms" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="context", ylabel="ms / token / layer", title="decode step B=1 H=16 D=128")
    ax.legend(fontsize=7)
    e = results["env"]
    fig.suptitle(f"{e['device']} | torch {e['torch']} triton {e['triton']} fla {e.get('fla')} | {e['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "linear_attention.png"), dpi=110)


# --------------------------------------------------------------------------------------------------
# CPU quality study
# --------------------------------------------------------------------------------------------------


def _stage2(model, kw: dict, state, steps: int, lr: float, seed: int = 11) -> float:
    """LoLCATs stage 2: LoRA (r=8 on q/k/v/o) trained with the LM loss on the linearized model, feature maps frozen.
    Returns the eval loss after ``steps`` AdamW steps. Runs through the compiler (linearize + lora passes)."""
    import transfigure
    from transfigure.models import byte_batches, eval_loss
    from transfigure.passes import lora

    torch._dynamo.reset()
    model.requires_grad_(False)
    backend = transfigure.backend(lowering="eager", linearize={**kw, "state": state} if state else kw,
                                  lora={"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    compiled = torch.compile(model, backend=backend)
    batches = byte_batches(8, 128, "train", seed=seed)
    tokens = next(batches)
    loss = compiled(input_ids=tokens, labels=tokens).loss
    optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=lr)
    for _ in range(steps):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = next(batches)
        loss = compiled(input_ids=tokens, labels=tokens).loss
    result = eval_loss(compiled)
    lora.remove_lora(model)
    torch._dynamo.reset()
    return result


def quality(out_dir: str, steps: int, lr: float, stage2_steps: int = 200, stage2_lr: float = 2e-3) -> dict:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from transfigure.models import byte_batches, eval_loss, trained_tiny_llama
    from transfigure.passes.attention_transfer import attention_transfer_loss, distill_attention
    from transfigure.reference.linear_attention import linearize_reference, restore_reference

    model = trained_tiny_llama()
    results = {"env": environment(), "model": "trained_tiny_llama() (byte-level, hidden 64, 2 layers, 300 steps on pydoc_data.topics)",
               "eval": "transfigure.models.eval_loss (8 batches x 8 x 128 bytes, eval split)", "steps": steps, "lr": lr,
               "stage2": f"LoRA r=8 alpha 16 on q/k/v/o, {stage2_steps} AdamW steps at lr {stage2_lr}, 8 x 128 bytes, feature maps frozen",
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
        gap = before - results["original"]
        if state:
            linearize_reference(model, fm, win, window_size=ws, state=state)
            run["after_transfer"] = eval_loss(model)
            restore_reference(model)
            run["transfer_mse_after"] = attention_transfer_loss(model, probe, state, **kw)
            run["gap_closed"] = (before - run["after_transfer"]) / gap if gap > 0 else None
        if stage2_steps:
            run["after_stage2"] = _stage2(model, kw, state, stage2_steps, stage2_lr)
            run["stage2_without_transfer"] = _stage2(model, kw, None, stage2_steps, stage2_lr)
            run["gap_closed_stage2"] = (before - run["after_stage2"]) / gap if gap > 0 else None
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
    parser.add_argument("--stage2-steps", type=int, default=200, help="LoRA steps of LoLCATs stage 2 (0: skip)")
    parser.add_argument("--budget", type=float, default=330.0)
    parser.add_argument("--worker")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--events")
    parser.add_argument("--deadline", type=float, default=0.0)
    parser.add_argument("--replot", help="rebuild Markdown + PNG from a directory holding linear_attention_events.jsonl + .json")
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.first, args.events, args.deadline)
    elif args.replot:
        saved = json.load(open(os.path.join(args.replot, "linear_attention.json")))
        collect(args.replot, {"env": saved["env"], "excluded_configs": saved.get("excluded_configs")})
    elif args.quality:
        quality(args.out, args.steps, args.lr, args.stage2_steps)
    else:
        gpu(args.out, args.budget)
