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
import json
import platform
import time
from collections.abc import Callable, Sequence
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _generate(model, prompt, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def _time_generate(model, prompt, new_tokens: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    _generate(model, prompt, new_tokens)
    _sync(device)
    return time.perf_counter() - start


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
    from transfigure.quality import COMBINATIONS

    if variant == "transfigure":
        return {}
    name = variant.removeprefix("transfigure+")
    needs, build = COMBINATIONS[name]
    if not set(needs) <= set(builtin_passes()):
        return None
    # Speed only (random weights): uniform allocation, so no greedy search over blocks is needed.
    ctx = {"model": model, "greedy": False,
           "calibration_windows": torch.randint(0, model.config.vocab_size, (4, 128), device=device)}
    return build(ctx)


def run_variant(model_name: str, variant: str, batch: int, new_tokens: int, prompt_len: int, device: str,
                dtype: torch.dtype, warm_compile: bool = True) -> Row:
    row = Row(model_name, variant, batch, new_tokens)
    torch._dynamo.reset()
    model = build_model(model_name, device, dtype)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    from transformers import CompileConfig

    compile_config: CompileConfig | None = None
    if variant == "eager":
        pass
    elif variant == "inductor":
        # transformers' own path: static cache, decode steps compiled with Inductor + CUDA graphs.
        compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    else:
        options = _variant_options(variant, model, device)
        if options is None:
            row.error = "pass not installed"
            return row
        backend = transfigure.backend(**options)
        compile_config = CompileConfig(fullgraph=True, backend=backend, mode="reduce-overhead")
    if compile_config is not None:
        compile_config._compile_all_devices = device != "cuda"  # lets the CPU smoke test compile too
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = compile_config
    compile_fn = (lambda: model.__dict__.pop("_compiled_call", None)) if compile_config is not None else None  # noqa: E731
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cold = _time_generate(model, prompt, new_tokens, device)
    total = min(_time_generate(model, prompt, new_tokens, device) for _ in range(2))
    first = min(_time_generate(model, prompt, 1, device) for _ in range(2))
    row.tokens_per_s = batch * new_tokens / total
    row.decode_tokens_per_s = batch * (new_tokens - 1) / max(total - first, 1e-9)
    row.ttft_ms = first * 1e3
    row.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if compile_fn is not None:
        row.compile_cold_s = max(cold - total, 0.0)
        if warm_compile:
            torch._dynamo.reset()
            compile_fn()
            row.compile_warm_s = max(_time_generate(model, prompt, new_tokens, device) - total, 0.0)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


DEFAULT_VARIANTS = ("eager", "inductor", "transfigure", "transfigure+lut-4bit", "transfigure+sparsity-50",
                    "transfigure+lut-4bit+sparsity-50")


def run(models: Sequence[str] = ("llama-1b",), batches: Sequence[int] = (1,), new_tokens: Sequence[int] = (256,),
        variants: Sequence[str] = DEFAULT_VARIANTS, prompt_len: int = 128, device: str | None = None,
        out_dir: str | Path | None = None, progress: bool = True, warm_compile: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    jobs = [(m, v, b, n) for m in models for b in batches for n in new_tokens for v in variants]
    rows = []
    for model_name, variant, batch, n in tqdm(jobs, desc="bench", disable=not progress):
        try:
            rows.append(run_variant(model_name, variant, batch, n, prompt_len, device, dtype, warm_compile))
        except Exception as error:  # keep the other variants' numbers
            rows.append(Row(model_name, variant, batch, n, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"))
        print(rows[-1], flush=True)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": _triton_version(), "date": time.strftime("%Y-%m-%d"),
              "prompt_len": prompt_len, "rows": [dataclasses.asdict(r) for r in rows]}
    if out_dir:
        save(result, out_dir)
    return result


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "-"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Decode through generate(), prompt {result['prompt_len']} tokens — {result['device']}, torch {result['torch']}, "
             f"triton {result['triton']}, {result['date']}", "",
             "| model | batch | new | variant | tok/s | vs inductor | decode tok/s | TTFT ms | peak GiB | compile cold s | warm s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {(r["model"], r["batch"], r["new_tokens"]): r["tokens_per_s"] for r in result["rows"] if r["variant"] == "inductor"}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['variant']} | error: {r['error']} | | | | | | |")
            continue
        ref = base.get((r["model"], r["batch"], r["new_tokens"]))
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['variant']} | {r['tokens_per_s']:.1f} | {ratio} | "
                     f"{fmt(r['decode_tokens_per_s'], '.1f')} | {fmt(r['ttft_ms'], '.1f')} | {fmt(r['peak_gib'], '.2f')} | "
                     f"{fmt(r['compile_cold_s'], '.1f')} | {fmt(r['compile_warm_s'], '.1f')} |")
    return "\n".join(lines)


def merge(parts: Sequence[str | Path]) -> dict[str, Any]:
    """Join result files of separate runs (one process per variant, so one crash loses one variant)."""
    results = [json.loads(Path(p).read_text()) for p in parts]
    merged = dict(results[0])
    merged["rows"] = [row for r in results for row in r["rows"]]
    return merged


def save(result: dict[str, Any], out_dir: str | Path, stem: str = "e2e_decode") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown(result) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    ok = [r for r in result["rows"] if not r["error"]]
    groups = sorted({(r["model"], r["batch"], r["new_tokens"]) for r in ok})
    figure, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4), squeeze=False)
    for axis, group in zip(axes[0], groups):
        rows = [r for r in ok if (r["model"], r["batch"], r["new_tokens"]) == group]
        axis.barh([r["variant"] for r in rows], [r["tokens_per_s"] for r in rows], color="#4c72b0")
        axis.set_xlabel("tokens/s (higher is better)")
        axis.set_title(f"{group[0]}, batch {group[1]}, {group[2]} new tokens")
    figure.suptitle(f"{result['device']} — torch {result['torch']}")
    figure.tight_layout()
    figure.savefig(out / f"{stem}.png", dpi=100)
    plt.close(figure)
    return out
