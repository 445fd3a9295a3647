"""Quality harness: what each rewrite costs in model quality, next to what it buys in speed.

For a causal LM: perplexity on a local text file, and the token-level KL divergence KL(p_original ||
p_rewritten) and top-1 agreement between the original and the rewritten model, per pass combination. For
an encoder: the cosine similarity of the last hidden states. Works on any local Hugging Face checkpoint
directory, or on built-ins: ``tiny-llama`` (a byte-level Llama trained in-process on ``pydoc_data.topics``)
and the random tiny architectures of :mod:`transfigure.models`.

Passes that need data (sparsity calibration, attention transfer) get it from the first half of the text;
metrics are computed on the second half.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import transfigure
from transfigure.compiler import builtin_passes

# -- models and text -------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    encode: Callable[[str], list[int]]
    causal: bool
    name: str


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``spec``: a local HF checkpoint directory, ``tiny-llama`` (trained in-process), or a tiny arch name."""
    from transfigure import models

    byte_encode = lambda text: list(text.encode("utf-8"))  # noqa: E731
    if spec == "tiny-llama":
        model = models.trained_tiny_llama()
        return LoadedModel(model.to(device, dtype), byte_encode, True, spec)
    if spec in models.ARCHITECTURES:
        return LoadedModel(models.tiny_model(spec).to(device, dtype), byte_encode, spec != "bert", spec)
    path = Path(spec)
    if not (path / "config.json").exists():
        raise ValueError(f"--model {spec!r}: not a built-in (tiny-llama, {', '.join(models.ARCHITECTURES)}) "
                         "and not a directory with a config.json")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    architectures = " ".join(config.architectures or [])
    causal = "CausalLM" in architectures or "LMHead" in architectures
    loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = loader.from_pretrained(path, torch_dtype=dtype, attn_implementation="sdpa").to(device).eval()
    # transformers may build a tokenizer from the config alone for a directory without tokenizer files, one that
    # encodes text to nothing: look for the files, and check that a probe sentence gives tokens
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    encode = None
    if any((path / name).exists() for name in tokenizer_files):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        if not encode("The quick brown fox."):
            raise ValueError(f"{spec}: its tokenizer encodes text to no tokens")
    if encode is None:
        if config.vocab_size < 256:
            raise ValueError(f"{spec}: no tokenizer files and a vocabulary too small for bytes")
        encode = byte_encode  # no tokenizer files: UTF-8 bytes as token ids (the built-in byte-level models)
    return LoadedModel(model, encode, causal, path.name)


def token_windows(tokens: Sequence[int], seq_len: int, max_windows: int) -> torch.Tensor:
    count = min(max_windows, len(tokens) // seq_len)
    if count < 2:
        raise ValueError(f"the text has {len(tokens)} tokens: need at least {2 * seq_len} for two windows of {seq_len}")
    return torch.tensor(tokens[: count * seq_len]).view(count, seq_len)


# -- pass combinations ------------------------------------------------------------------------------

Context = dict[str, Any]  # model, calibration windows, device, cache of expensive preparations


def _calibration(ctx: Context):
    if "calibration" not in ctx:
        from transfigure.passes.teal_calibration import calibrate

        ctx["calibration"] = calibrate(ctx["model"], [w[None] for w in ctx["calibration_windows"]], greedy=ctx.get("greedy", True), progress=False)
    return ctx["calibration"]


def _sparsity(ctx: Context, target: float) -> dict:
    allocation = "greedy" if ctx.get("greedy", True) else "uniform"
    return {"target": target, "calibration": _calibration(ctx), "allocation": allocation}


def _distilled(ctx: Context):
    if "attention_state" not in ctx:
        from transfigure.passes.attention_transfer import distill_attention

        batches = [ctx["calibration_windows"][i : i + 4] for i in range(0, len(ctx["calibration_windows"]), 4)]
        ctx["attention_state"] = distill_attention(ctx["model"], batches, steps=ctx.get("distill_steps", 200), lr=1e-2, progress=False)
    return ctx["attention_state"]


# name -> (passes it needs, function building the options from the context)
COMBINATIONS: dict[str, tuple[tuple[str, ...], Callable[[Context], dict]]] = {
    "none": ((), lambda ctx: {}),
    "lut-4bit": (("lut_quant",), lambda ctx: {"lut_quant": {"bits": 4}}),
    "lut-3bit": (("lut_quant",), lambda ctx: {"lut_quant": {"bits": 3}}),
    "lut-2bit": (("lut_quant",), lambda ctx: {"lut_quant": {"bits": 2}}),
    # the output layer too (excluded by default): on the 1B shape its 128256 x 2048 bf16 weight is 0.5 GB, as much
    # as every other linear together once they are 4-bit
    "lut-4bit+lm_head": (("lut_quant",), lambda ctx: {"lut_quant": {"bits": 4, "exclude": ("*embed*", "embed_out")}}),
    "sparsity-40": (("sparsity",), lambda ctx: {"sparsity": _sparsity(ctx, 0.4)}),
    "sparsity-50": (("sparsity",), lambda ctx: {"sparsity": _sparsity(ctx, 0.5)}),
    "lut-4bit+sparsity-50": (("lut_quant", "sparsity"), lambda ctx: {"lut_quant": {"bits": 4}, "sparsity": _sparsity(ctx, 0.5)}),
    # thresholds on the rotated input of the 4-bit linears, so the sparse LUT kernels apply (sparsity.rotated_basis)
    "lut-4bit+rotated-sparsity-50": (("lut_quant", "sparsity"), lambda ctx: {
        "lut_quant": {"bits": 4}, "sparsity": {**_sparsity(ctx, 0.5), "rotated_basis": True}}),
    "lut-4bit+lm_head+rotated-sparsity-50": (("lut_quant", "sparsity"), lambda ctx: {
        "lut_quant": {"bits": 4, "exclude": ("*embed*", "embed_out")},
        "sparsity": {**_sparsity(ctx, 0.5), "rotated_basis": True}}),
    "linearize-elu": (("linearize",), lambda ctx: {"linearize": {"feature_map": "elu"}}),
    "linearize-hedgehog": (("linearize",), lambda ctx: {"linearize": {"feature_map": "hedgehog"}}),
    "linearize-hedgehog+transfer": (
        ("linearize",),
        lambda ctx: {"linearize": {"feature_map": "hedgehog", "state": _distilled(ctx)}},
    ),
    "ladder-all": (("ladder",), lambda ctx: {"ladder": {"layers": "all"}}),
    "ladder-upper-half": (("ladder",), lambda ctx: {"ladder": {"layers": "upper_half"}}),
    # decode steps only: prefill (what the quality metrics run) keeps SDPA, so its numbers are the original's
    "decode-attn": (("decode_attention",), lambda ctx: {"decode_attention": {}}),
}
DECODE_ATTENTION_SUFFIX = "+decode-attn"


def combination(name: str) -> tuple[tuple[str, ...], Callable[[Context], dict]]:
    """``(passes needed, options builder)`` of a combination: a name of ``COMBINATIONS``, or one of them followed
    by ``+decode-attn`` (the same options plus the ``decode_attention`` pass, e.g. ``lut-4bit+decode-attn``)."""
    if name in COMBINATIONS:
        return COMBINATIONS[name]
    base = name.removesuffix(DECODE_ATTENTION_SUFFIX)
    if base != name and base in COMBINATIONS:
        needs, build = COMBINATIONS[base]
        return (*needs, "decode_attention"), lambda ctx: {**build(ctx), "decode_attention": {}}
    raise ValueError(f"unknown combination {name!r}; known: {', '.join(COMBINATIONS)} (each may end in "
                     f"{DECODE_ATTENTION_SUFFIX!r})")


def available_combinations() -> list[str]:
    installed = set(builtin_passes())
    return [name for name, (needs, _) in COMBINATIONS.items() if set(needs) <= installed]


# -- metrics ---------------------------------------------------------------------------------------


def _logits_or_hidden(model: Any, batch: torch.Tensor, causal: bool) -> torch.Tensor:
    out = model(input_ids=batch)
    return (out.logits if causal else out.last_hidden_state).float()


@torch.no_grad()
def measure(model: Any, reference: list[torch.Tensor], windows: torch.Tensor, causal: bool, batch_size: int) -> dict[str, float]:
    """Perplexity, KL to the reference and top-1 agreement (causal), or cosine similarity (encoder)."""
    nll_sum, kl_sum, agree, count, cosine = 0.0, 0.0, 0.0, 0, []
    for start, ref in zip(range(0, len(windows), batch_size), reference):
        batch = windows[start : start + batch_size]
        out = _logits_or_hidden(model, batch, causal)
        if causal:
            logp = torch.log_softmax(out[:, :-1], -1)
            ref_logp = torch.log_softmax(ref[:, :-1], -1)
            targets = batch[:, 1:]
            nll_sum += -logp.gather(-1, targets[..., None]).sum().item()
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
            count += targets.numel()
        else:
            cosine.append(torch.nn.functional.cosine_similarity(out, ref, dim=-1).flatten())
    if causal:
        return {"perplexity": math.exp(nll_sum / count), "kl": kl_sum / count, "top1_agreement": agree / count}
    return {"cosine": torch.cat(cosine).mean().item()}


def evaluate(
    model_spec: str = "tiny-llama",
    text: str | None = None,
    combinations: Sequence[str] | None = None,
    seq_len: int = 128,
    max_windows: int = 32,
    batch_size: int = 8,
    device: str = "cpu",
    lowering: str = "eager",
    progress: bool = True,
    distill_steps: int = 200,
) -> dict[str, Any]:
    """Run every combination and return ``{"model", "rows": [{combination, metrics...}]}``."""
    from tqdm.auto import tqdm

    from transfigure import models

    loaded = load_model(model_spec, device)
    if text is None:
        text = models.text_corpus().decode("utf-8")
    windows = token_windows(loaded.encode(text), seq_len, max_windows).to(device)
    half = len(windows) // 2
    calibration_windows, eval_windows = windows[:half], windows[half:]
    names = list(combinations) if combinations else available_combinations()
    for name in names:
        combination(name)  # an unknown name fails here, before the model runs
    model = loaded.model
    with torch.no_grad():
        reference = [_logits_or_hidden(model, eval_windows[i : i + batch_size], loaded.causal) for i in range(0, len(eval_windows), batch_size)]
    baseline = measure(model, reference, eval_windows, loaded.causal, batch_size)
    rows = [{"combination": "original", **baseline, "seconds": 0.0}]
    ctx: Context = {"model": model, "calibration_windows": calibration_windows, "distill_steps": distill_steps}
    installed = set(builtin_passes())
    for name in tqdm(names, desc="quality", disable=not progress):
        needs, build = combination(name)
        missing = set(needs) - installed
        if missing:
            rows.append({"combination": name, "skipped": f"pass not installed: {', '.join(sorted(missing))}"})
            continue
        start = time.perf_counter()
        try:
            options = build(ctx)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=transfigure.backend(lowering=lowering, **options))
            metrics = measure(compiled, reference, eval_windows, loaded.causal, batch_size)
        except Exception as error:  # report, keep going: one failing combination must not hide the others
            rows.append({"combination": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
            continue
        finally:
            torch._dynamo.reset()
        rows.append({"combination": name, **metrics, "seconds": round(time.perf_counter() - start, 2)})
    return {"model": loaded.name, "causal": loaded.causal, "seq_len": seq_len, "eval_windows": len(eval_windows), "rows": rows}


def markdown_table(result: dict[str, Any]) -> str:
    if result["causal"]:
        lines = ["| combination | perplexity | KL to original (nats/token) | top-1 agreement |", "| --- | --- | --- | --- |"]
        for row in result["rows"]:
            if "perplexity" in row:
                lines.append(f"| {row['combination']} | {row['perplexity']:.3f} | {row['kl']:.4f} | {row['top1_agreement']:.3f} |")
            else:
                lines.append(f"| {row['combination']} | {row.get('skipped') or row.get('error')} | | |")
    else:
        lines = ["| combination | cosine similarity of last hidden states |", "| --- | --- |"]
        for row in result["rows"]:
            value = f"{row['cosine']:.5f}" if "cosine" in row else row.get("skipped") or row.get("error")
            lines.append(f"| {row['combination']} | {value} |")
    return "\n".join(lines)


def save(result: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    (out / "quality.md").write_text(f"Quality of {result['model']} ({result['eval_windows']} held-out windows of {result['seq_len']} tokens)\n\n" + markdown_table(result) + "\n")
    return out
