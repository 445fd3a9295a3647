"""End-to-end decode benchmark through transformers' ``generate()``: transfigure vs the baselines users pick.

Variants, all in the same process and run: ``eager`` (dynamic cache), ``inductor`` (static cache +
``torch.compile(mode="reduce-overhead")``, CUDA graphs — the usual baseline), ``transfigure`` with no passes,
and transfigure with pass combinations (``lut-4bit``, ``lut-3bit``, ``sparsity-50``, ``lut-4bit+sparsity-50``,
``linearize``, ``ladder``) whose passes are installed. Reports tokens/s, time to first token, peak GPU memory
and compile time (cold, and warm = recompiling after ``torch._dynamo.reset()`` with Inductor's caches hot),
as JSON + Markdown + PNG. Random weights: speed does not depend on their values (quality is the quality
harness's job), except activation sparsity, whose thresholds are calibrated on the same random model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import transfigure
from transfigure.compiler import builtin_passes


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    batch: int
    new_tokens: int
    tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    ttft_ms: float | None = None
    peak_gib: float | None = None
    compile_cold_s: float | None = None
    compile_warm_s: float | None = None
    error: str | None = None
    loop: str = "generate"
    # the cold compile's share spent in transfigure (sums over the graphs compiled by the cold call): running
    # the passes, and lowering the rewritten graphs (Inductor); the rest is Dynamo, kernel JIT, CUDA graphs
    compile_graphs: int | None = None
    compile_passes_s: float | None = None
    compile_lowering_s: float | None = None
    decoding: str = "greedy"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


DECODINGS = ("greedy", "sample", "padded")
"""greedy; sample: top-k 50, top-p 0.95, temperature 0.8; padded: greedy over a left-padded batch whose row i
has 8*i fewer prompt tokens (an ``attention_mask`` with leading zeros, as a tokenizer pads for generation)."""


def _decoding_kwargs(decoding: str, prompt: torch.Tensor) -> dict[str, Any]:
    if decoding == "greedy":
        return {"do_sample": False}
    if decoding == "sample":
        return {"do_sample": True, "top_k": 50, "top_p": 0.95, "temperature": 0.8}
    if decoding == "padded":
        batch, length = prompt.shape
        if batch < 2:
            raise ValueError("bench decoding 'padded' needs a batch of at least 2 (rows of different lengths)")
        pads = torch.arange(batch, device=prompt.device)[:, None] * 8
        mask = (torch.arange(length, device=prompt.device)[None, :] >= pads).long()
        return {"do_sample": False, "attention_mask": mask, "pad_token_id": 0}
    raise ValueError(f"bench decoding {decoding!r}: one of {', '.join(DECODINGS)}")


def _generate(model, prompt, new_tokens: int, decoding: str = "greedy", **kwargs: Any) -> torch.Tensor:
    """``generate()`` with the model's EOS rule on (what users run). A random model rarely picks its EOS id, and
    when it does the timing would cover fewer tokens: that is an error, not a number."""
    out = model.generate(prompt, max_new_tokens=new_tokens, **_decoding_kwargs(decoding, prompt), **kwargs)
    made = out.shape[1] - prompt.shape[1]
    if made != new_tokens:
        raise RuntimeError(f"generate() stopped at EOS after {made} of {new_tokens} tokens; the timing would be wrong")
    return out


def build_model(name: str, device: str, dtype: torch.dtype):
    import transformers

    from transfigure import models

    if name == "llama-1b":
        config = models.llama_1b_config()
    elif name == "llama-8b":
        config = models.llama_8b_config()
    elif name in models.ARCHITECTURES:
        config = models.tiny_config(name)
    else:
        raise ValueError(f"unknown bench model {name!r}: llama-1b, llama-8b or a tiny architecture")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config) if name.startswith("llama-") else models.model_class(name)(config)
    return model.to(dtype).eval()


def _variant_options(variant: str, model, device: str) -> dict[str, Any] | None:
    """Compile options of a transfigure variant (``None``: one of its passes is not installed)."""
    from transfigure.quality import combination

    if variant == "transfigure":
        return {}
    name = variant.removeprefix("transfigure+")
    needs, build = combination(name)
    if not set(needs) <= set(builtin_passes()):
        return None
    # Speed only (random weights): uniform allocation, so no greedy search over blocks is needed.
    ctx = {"model": model, "greedy": False,
           "calibration_windows": torch.randint(0, model.config.vocab_size, (4, 128), device=device)}
    return build(ctx)


def run_variant(model_name: str, variant: str, batch: int, new_tokens: int, prompt_len: int, device: str,
                dtype: torch.dtype, warm_compile: bool = True, lowering: str = "inductor", loop: str = "generate",
                decoding: str = "greedy") -> Row:
    """``loop="generate"``: transformers' ``generate()`` with a compiled static-cache step (the issue's harness);
    ``loop="custom"``: transformers' ``generate()`` with ``custom_generate=transfigure.decoding_loop(backend)``
    (transformers prepares the call, our loop decodes: compiled one-token step, no host sync per token);
    ``loop="step"``: :func:`transfigure.generate` (the same loop as a plain function). Under "custom" and
    "step" every compiled variant, Inductor included, runs the loop, so both sides skip generate()'s per-token
    host work; the eager variant always runs transformers' loop."""
    if loop not in LOOPS:
        raise ValueError(f"bench loop {loop!r}: one of {', '.join(LOOPS)}")
    if decoding not in DECODINGS:
        raise ValueError(f"bench decoding {decoding!r}: one of {', '.join(DECODINGS)}")
    if loop == "step" and decoding != "greedy":
        raise ValueError("bench loop 'step' (transfigure.generate) decodes greedily without padding; use --loop custom")
    row = Row(model_name, variant, batch, new_tokens, loop=loop if variant != "eager" else "generate", decoding=decoding)
    torch._dynamo.reset()
    model = build_model(model_name, device, dtype)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    backend: Any = None
    if variant == "inductor":
        backend = "inductor"
    elif variant != "eager":
        options = _variant_options(variant, model, device)
        if options is None:
            row.error = "pass not installed"
            return row
        backend = transfigure.backend(lowering=lowering, **options)

    compile_fn = None
    if backend is not None and loop == "step":
        decode = lambda n: transfigure.generate(model, prompt, n, backend=backend)  # noqa: E731
        compile_fn = lambda: None  # noqa: E731 - Dynamo's reset alone makes the kept step compile again
    elif backend is not None and loop == "custom":
        decoding_loop = transfigure.decoding_loop(backend)
        decode = lambda n: _generate(model, prompt, n, decoding, custom_generate=decoding_loop)  # noqa: E731
        compile_fn = lambda: None  # noqa: E731
    else:
        decode = lambda n: _generate(model, prompt, n, decoding)  # noqa: E731
        if backend is not None:
            from transformers import CompileConfig

            # transformers' own path: static cache, decode steps compiled (Inductor + CUDA graphs by default)
            extra = {} if backend == "inductor" else {"backend": backend}
            compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead", **extra)
            compile_config._compile_all_devices = device != "cuda"  # lets the CPU smoke test compile too
            model.generation_config.cache_implementation = "static"
            model.generation_config.compile_config = compile_config
            compile_fn = lambda: model.__dict__.pop("_compiled_call", None)  # noqa: E731

    def timed(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        decode(n)
        _sync(device)
        return time.perf_counter() - start

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cold = timed(new_tokens)
        _record_compile_breakdown(row, backend)
        total = min(timed(new_tokens) for _ in range(2))
        # a one-token call has its own cache length: under CUDA graphs its first call warms up, the second
        # records, the third replays (what a user sees once warm)
        first = min(timed(1) for _ in range(3))
    handed_over = [str(w.message) for w in caught if "decoding_loop: running transformers' own" in str(w.message)]
    if handed_over and loop == "custom":  # the row would time transformers' loop under the hook's name
        row.error = handed_over[0]
    row.tokens_per_s = batch * new_tokens / total
    row.decode_tokens_per_s = batch * (new_tokens - 1) / max(total - first, 1e-9)
    row.ttft_ms = first * 1e3
    row.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if backend is not None:
        row.compile_cold_s = max(cold - total, 0.0)
    idle = _passes_that_rewrote_nothing(backend)
    if idle:
        # e.g. linearize under transformers' loop: every decode step attends over the KV cache, which the pass
        # leaves softmax -- the row would time the original model under the variant's name
        row.error = "; ".join(f"{name} rewrote no site ({reason})" for name, reason in idle.items())
    if compile_fn is not None and warm_compile:
        torch._dynamo.reset()
        compile_fn()
        row.compile_warm_s = max(timed(new_tokens) - total, 0.0)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _record_compile_breakdown(row: Row, backend: Any) -> None:
    report = getattr(backend, "report", None)
    if report is None or not len(report):
        return
    row.compile_graphs = len(report.graphs)
    row.compile_passes_s = sum(p.seconds for graph in report.graphs for p in graph.passes)
    row.compile_lowering_s = sum(graph.lowering_seconds for graph in report.graphs)


def _passes_that_rewrote_nothing(backend: Any) -> dict[str, str]:
    """Pass name -> its first skip reason, for each pass the backend was asked for that rewrote no site in any
    graph it compiled."""
    report = getattr(backend, "report", None)
    if report is None or not len(report):
        return {}
    idle = {}
    for name in getattr(backend, "raw_options", {}):
        results = [p.result for graph in report.graphs for p in graph.passes if p.name == name]
        if results and not any(r.rewritten for r in results):
            skipped = [s for r in results for s in r.sites if s.status == "skipped"]
            idle[name] = f"{skipped[0].fqn}: {skipped[0].detail}" if skipped else "no matching site"
    return idle


LOOPS = ("generate", "custom", "step")
LOOP_NAMES = {"generate": "transformers generate()",
              "custom": "generate(custom_generate=transfigure.decoding_loop)",
              "step": "transfigure.generate"}

DEFAULT_VARIANTS = ("eager", "inductor", "transfigure", "transfigure+lut-4bit", "transfigure+sparsity-50",
                    "transfigure+lut-4bit+sparsity-50")


def run(models: Sequence[str] = ("llama-1b",), batches: Sequence[int] = (1,), new_tokens: Sequence[int] = (256,),
        variants: Sequence[str] = DEFAULT_VARIANTS, prompt_len: int = 128, device: str | None = None,
        out_dir: str | Path | None = None, progress: bool = True, warm_compile: bool = True,
        lowering: str = "inductor", loop: str = "generate", decoding: str = "greedy") -> dict[str, Any]:
    from tqdm.auto import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    jobs = [(m, v, b, n) for m in models for b in batches for n in new_tokens for v in variants]
    rows = []
    for model_name, variant, batch, n in tqdm(jobs, desc="bench", disable=not progress):
        try:
            rows.append(run_variant(model_name, variant, batch, n, prompt_len, device, dtype, warm_compile, lowering, loop,
                                    decoding))
        except Exception as error:  # keep the other variants' numbers
            rows.append(Row(model_name, variant, batch, n, error=_error_text(error), decoding=decoding))
        print(rows[-1], flush=True)
    result = {**environment(device), "prompt_len": prompt_len, "loop": loop, "decoding": decoding,
              "rows": [dataclasses.asdict(r) for r in rows]}
    if out_dir:
        save(result, out_dir, stem=stem_for([loop]))
    return result


def _error_text(error: BaseException) -> str:
    """One line for a failed row: the innermost cause (Dynamo wraps backend errors), type and first line."""
    while True:
        inner = error.__cause__ or getattr(error, "inner_exception", None)
        if inner is None or inner is error:
            break
        error = inner
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def environment(device: str | None = None) -> dict[str, str]:
    """Where a benchmark ran: device name, torch and triton versions, UTC time (every results file carries it)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton_version,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, batch, new tokens, variant): the median of repeated runs, with their spread.

    Single ``generate()`` runs of one variant vary by up to 25% on a GPU host (the loop is host-bound), so the
    benchmark script can interleave repeats (A B A B ...); ratios are then taken between medians."""
    import statistics

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["model"], row["batch"], row["new_tokens"], row["variant"], row.get("loop", "generate"),
               row.get("decoding", "greedy"))
        groups.setdefault(key, []).append(row)
    out = []
    for key, runs in groups.items():
        ok = [r for r in runs if not r["error"]]
        if not ok:
            out.append({**runs[0], "runs": len(runs), "failed": len(runs)})
            continue
        merged = dict(ok[0])
        for field in ("tokens_per_s", "decode_tokens_per_s", "ttft_ms", "peak_gib", "compile_cold_s", "compile_warm_s"):
            values = [r[field] for r in ok if r[field] is not None]
            merged[field] = statistics.median(values) if values else None
        speeds = [r["tokens_per_s"] for r in ok]
        merged.update(runs=len(runs), failed=len(runs) - len(ok), tokens_per_s_min=min(speeds), tokens_per_s_max=max(speeds))
        out.append(merged)
    return out


def _row_loop(row: dict[str, Any]) -> str:
    return row.get("loop", "generate")


def markdown(result: dict[str, Any]) -> str:
    """The table. Ratios are against the ``inductor`` row of the same model, batch and length, taken through
    transformers' own loop when the result has that row (the baseline users run), else through the same loop."""
    rows = summarize(result["rows"])
    repeated = any(r["runs"] > 1 for r in rows)
    loops = sorted({_row_loop(r) for r in rows if r["variant"] != "eager"} or {"generate"})
    how = LOOP_NAMES[loops[0]] if len(loops) == 1 else "the loop named per row"
    mixed = len(loops) > 1
    lines = [f"Decode through {how}, prompt {result['prompt_len']} tokens — {result['device']}, torch {result['torch']}, "
             f"triton {result['triton']}, {result['date']}" + ("; medians of interleaved repeats, range in brackets" if repeated else ""),
             "", "| model | batch | new | variant | tok/s | vs inductor | decode tok/s | TTFT ms | peak GiB | compile cold s | warm s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {}  # Inductor per (model, batch, new tokens); with several loops, the one through generate() wins
    for r in sorted(rows, key=lambda r: _row_loop(r) != "generate", reverse=True):
        if r["variant"] == "inductor" and not (r["error"] and r.get("failed", 0) == r["runs"]):
            base[(r["model"], r["batch"], r["new_tokens"], r.get("decoding", "greedy"))] = r["tokens_per_s"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        label = r["variant"] + (f" [{LOOP_NAMES[_row_loop(r)]}]" if mixed else "")
        if r.get("decoding", "greedy") != "greedy":
            label += f" ({r['decoding']})"
        if r["error"] and r.get("failed", 0) == r["runs"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {label} | error: {r['error']} | | | | | | |")
            continue
        ref = base.get((r["model"], r["batch"], r["new_tokens"], r.get("decoding", "greedy")))
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        speed = f"{r['tokens_per_s']:.1f}"
        if r["runs"] > 1:
            speed += f" [{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}, {r['runs']} runs" + (f", {r['failed']} failed" if r["failed"] else "") + "]"
        lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {label} | {speed} | {ratio} | "
                     f"{fmt(r['decode_tokens_per_s'], '.1f')} | {fmt(r['ttft_ms'], '.1f')} | {fmt(r['peak_gib'], '.2f')} | "
                     f"{fmt(r['compile_cold_s'], '.1f')} | {fmt(r['compile_warm_s'], '.1f')} |")
    if mixed:
        lines += ["", "Ratios: against `inductor` through transformers' generate() with its static cache and "
                  "torch.compile (CUDA graphs), the baseline users run."]
    broken_down = [r for r in rows if r.get("compile_graphs") and r.get("compile_cold_s") is not None]
    if broken_down:
        lines += ["", "Cold compile of the transfigure rows: graphs compiled; seconds in the passes; in lowering the "
                  "rewritten graphs (Inductor); the rest (Dynamo tracing, kernel JIT, CUDA-graph capture, autotuning "
                  "at first call)."]
        for r in broken_down:
            rest = r["compile_cold_s"] - r["compile_passes_s"] - r["compile_lowering_s"]
            lines.append(f"* {r['model']} {r['variant']}: {r['compile_graphs']} graphs, passes {r['compile_passes_s']:.1f} s, "
                         f"lowering {r['compile_lowering_s']:.1f} s, rest {rest:.1f} s of {r['compile_cold_s']:.1f} s")
    return "\n".join(lines)


def stem_for(loops: Sequence[str]) -> str:
    """Results file name for a run over these loops."""
    loops = sorted(set(loops))
    if loops == ["generate"]:
        return "e2e_decode"
    if loops == ["step"]:
        return "e2e_decode_step_loop"
    return "e2e_decode_" + "_".join(loops) + "_loop"


def merge(parts: Sequence[str | Path]) -> dict[str, Any]:
    """Join result files of separate runs (one process per variant, so one crash loses one variant)."""
    results = [json.loads(Path(p).read_text()) for p in parts]
    merged = dict(results[0])
    merged["rows"] = [{"loop": r.get("loop", "generate"), **row} for r in results for row in r["rows"]]
    loops = {row["loop"] for row in merged["rows"] if row["variant"] != "eager"}
    merged["loop"] = loops.pop() if len(loops) == 1 else "mixed"
    return merged


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend, or None when matplotlib is not installed (the GPU machine
    may lack it): the JSON and Markdown are written either way, the plot only where it can be."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        print("no plot:", error)
        return None
    return plt


def save(result: dict[str, Any], out_dir: str | Path, stem: str = "e2e_decode") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown(result) + "\n")
    plt = pyplot()
    if plt is None:
        return out
    ok = [r for r in summarize(result["rows"]) if r["failed"] < r["runs"]]
    groups = sorted({(r["model"], r["batch"], r["new_tokens"]) for r in ok})
    figure, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4), squeeze=False)
    for axis, group in zip(axes[0], groups):
        rows = [r for r in ok if (r["model"], r["batch"], r["new_tokens"]) == group]
        spread = [[r["tokens_per_s"] - r["tokens_per_s_min"] for r in rows], [r["tokens_per_s_max"] - r["tokens_per_s"] for r in rows]]
        axis.barh([r["variant"] + ("" if _row_loop(r) == "generate" else f" ({_row_loop(r)})") for r in rows], [r["tokens_per_s"] for r in rows], xerr=spread, color="#4c72b0", capsize=3)
        axis.set_xlabel("tokens/s (higher is better)")
        axis.set_title(f"{group[0]}, batch {group[1]}, {group[2]} new tokens")
    figure.suptitle(f"{result['device']} — torch {result['torch']}")
    figure.tight_layout()
    figure.savefig(out / f"{stem}.png", dpi=100)
    plt.close(figure)
    return out


# ---------------------------------------------------------------------------------------------------------
# Training: one optimizer step of full fine-tuning, LoRA and GaLore
# ---------------------------------------------------------------------------------------------------------
TRAINING_VARIANTS = ("inductor-full", "transfigure-full", "transfigure-lora", "transfigure-galore")


@dataclasses.dataclass
class TrainingRow:
    model: str
    variant: str
    batch: int
    seq_len: int
    tokens_per_s: float | None = None
    step_ms: float | None = None
    peak_gib: float | None = None
    optimizer_state_gib: float | None = None
    trainable_params: int | None = None
    first_step_s: float | None = None
    loss: float | None = None
    error: str | None = None


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (moments, projectors; not the step counters)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


def _training_setup(variant: str, model, lowering: str, lora_rank: int, galore_rank: int, mode: str | None = None):
    """(compiled model, optimizer factory called after the first backward, extra state bytes factory)."""
    from transfigure.passes import galore as galore_pass

    if variant == "inductor-full":
        model.requires_grad_(True)
        compiled = torch.compile(model, backend="inductor" if lowering == "inductor" else "eager", mode=mode)
        return compiled, lambda: torch.optim.AdamW(model.parameters(), lr=1e-5), lambda: 0
    if variant == "transfigure-full":
        model.requires_grad_(True)
        compiled = torch.compile(model, backend=transfigure.backend(lowering=lowering), mode=mode)
        return compiled, lambda: torch.optim.AdamW(model.parameters(), lr=1e-5), lambda: 0
    model.requires_grad_(False)
    if variant == "transfigure-lora":
        options = {"lora": {"r": lora_rank, "alpha": float(2 * lora_rank), "target_modules": "all-linear"}}
        compiled = torch.compile(model, backend=transfigure.backend(lowering=lowering, **options), mode=mode)
        return compiled, lambda: torch.optim.AdamW(transfigure.trainable_parameters(model), lr=1e-4), lambda: 0
    if variant == "transfigure-galore":
        options = {"galore": {"rank": galore_rank, "update_proj_gap": 200, "scale": 0.25}}
        compiled = torch.compile(model, backend=transfigure.backend(lowering=lowering, **options), mode=mode)

        def projector_bytes() -> int:
            return sum(s.P.numel() * s.P.element_size() for s in galore_pass.galore_states(model).values())

        return (compiled, lambda: galore_pass.GaLoreOptimizer(torch.optim.AdamW(galore_pass.galore_parameters(model), lr=1e-5)),
                projector_bytes)
    raise ValueError(f"unknown training variant {variant!r}; choose from {', '.join(TRAINING_VARIANTS)}")


def run_training_variant(model_name: str, variant: str, batch: int, seq_len: int, steps: int, device: str,
                         dtype: torch.dtype, lowering: str = "inductor", lora_rank: int = 16,
                         galore_rank: int = 128, mode: str | None = None) -> TrainingRow:
    """Time ``steps`` optimizer steps (forward, backward, ``optimizer.step()``) after a compiling one and two warm-up
    steps (under CUDA graphs the second call records)."""
    row = TrainingRow(model_name, variant, batch, seq_len)
    torch._dynamo.reset()
    model = build_model(model_name, device, dtype)
    generator = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device, generator=generator)
    compiled, make_optimizer, extra_state = _training_setup(variant, model, lowering, lora_rank, galore_rank, mode)
    optimizer = None

    def step() -> float:
        nonlocal optimizer
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is None:  # adapters exist only once the first graph compiled
            optimizer = make_optimizer()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    loss = step()
    _sync(device)
    row.first_step_s = time.perf_counter() - start
    for _ in range(2):  # under CUDA graphs the second call records and the third is the first replay
        loss = step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = (time.perf_counter() - start) / max(steps, 1)
    row.step_ms = seconds * 1e3
    row.tokens_per_s = batch * seq_len / seconds
    row.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    row.optimizer_state_gib = (optimizer_state_bytes(optimizer) + extra_state()) / 2**30
    inner = getattr(optimizer, "optimizer", optimizer)
    row.trainable_params = sum(p.numel() for group in inner.param_groups for p in group["params"])
    row.loss = float(loss)
    del model, compiled, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def run_training(models: Sequence[str] = ("llama-1b",), variants: Sequence[str] = TRAINING_VARIANTS, batch: int = 8,
                 seq_len: int = 512, steps: int = 5, device: str | None = None, out_dir: str | Path | None = None,
                 lowering: str = "inductor", progress: bool = True, lora_rank: int = 16,
                 galore_rank: int = 128, mode: str | None = None) -> dict[str, Any]:
    """Training-step benchmark: tokens/s, peak memory and optimizer state of each variant, one row each."""
    from tqdm.auto import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for model_name, variant in tqdm([(m, v) for m in models for v in variants], desc="train bench", disable=not progress):
        try:
            rows.append(run_training_variant(model_name, variant, batch, seq_len, steps, device, dtype, lowering,
                                             lora_rank, galore_rank, mode))
        except Exception as error:  # keep the other variants' numbers (an OOM loses one row)
            rows.append(TrainingRow(model_name, variant, batch, seq_len, error=_error_text(error)))
        print(rows[-1], flush=True)
    result = {**environment(device), "lowering": lowering, "steps": steps, "lora_rank": lora_rank,
              "galore_rank": galore_rank, "mode": mode, "warmup_steps": 2, "rows": [dataclasses.asdict(r) for r in rows]}
    if out_dir:
        save_training(result, out_dir, stem="training" if mode in (None, "default") else f"training_{mode.replace('-', '_')}")
    return result


def training_markdown(result: dict[str, Any]) -> str:
    lines = [f"Training step (forward + backward + optimizer.step), {result['steps']} timed steps after a compiling one"
             f"{' and %d warm-up ones' % result['warmup_steps'] if result.get('warmup_steps') else ''}, "
             f"torch.compile mode={result.get('mode') or 'default'} — "
             f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']}", "",
             "| model | batch x seq | variant | tokens/s | vs inductor-full | step ms | peak GiB | optimizer state GiB | trainable params | first step s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {(r["model"], r["batch"], r["seq_len"]): r["tokens_per_s"] for r in result["rows"] if r["variant"] == "inductor-full"}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in result["rows"]:
        shape = f"{r['batch']} x {r['seq_len']}"
        if r["error"]:
            lines.append(f"| {r['model']} | {shape} | {r['variant']} | error: {r['error']} | | | | | | |")
            continue
        ref = base.get((r["model"], r["batch"], r["seq_len"]))
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {r['model']} | {shape} | {r['variant']} | {r['tokens_per_s']:.0f} | {ratio} | {r['step_ms']:.1f} | "
                     f"{fmt(r['peak_gib'], '.2f')} | {r['optimizer_state_gib']:.3f} | {r['trainable_params']:,} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


def save_training(result: dict[str, Any], out_dir: str | Path, stem: str = "training") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(training_markdown(result) + "\n")
    plt = pyplot()
    if plt is None:
        return out
    ok = [r for r in result["rows"] if not r["error"]]
    if not ok:
        return out
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 3.5))
    labels = [f"{r['model']} {r['variant']}" for r in ok]
    speed.barh(labels, [r["tokens_per_s"] for r in ok], color="#4c72b0")
    speed.set_xlabel("training tokens/s (higher is better)")
    memory.barh(labels, [r["peak_gib"] or 0.0 for r in ok], color="#c44e52", label="peak")
    memory.barh(labels, [r["optimizer_state_gib"] for r in ok], color="#55a868", label="optimizer state")
    memory.set_xlabel("GiB")
    memory.legend()
    figure.suptitle(f"{result['device']} — torch {result['torch']}")
    figure.tight_layout()
    figure.savefig(out / f"{stem}.png", dpi=100)
    plt.close(figure)
    return out
