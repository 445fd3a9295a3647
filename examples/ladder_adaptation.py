"""Ladder residual adaptation demo: convert a trained tiny Llama, then fine-tune it back.

Ladder changes the function (sub-block j reads the residual stream one sub-block late), so a trained model
needs a short re-training after conversion (the paper converts the upper half of Llama-3.1-8B and re-trains
on 3B tokens). This demo does the same at toy scale, on CPU, in-process:

1. train a byte-level 4-layer Llama on ``pydoc_data.topics`` (``transfigure.models.trained_tiny_llama``);
2. compile it with ``options={"ladder": {"layers": ...}}`` for ``all`` and ``upper_half``; held-out loss
   right after conversion;
3. fine-tune through the compiled (ladder) model for N steps: full fine-tuning, and LoRA (``"lora"`` pass,
   base frozen) when that pass is available; held-out loss after;
4. control: the unconverted model fine-tuned for the same N steps (to separate recovery from extra training).

Run: ``python examples/ladder_adaptation.py --steps 200``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import transfigure
import transfigure.passes.ladder  # noqa: F401  (registers the "ladder" pass)

try:  # the LoRA pass, where present
    import transfigure.passes.lora  # noqa: F401
except Exception:  # pragma: no cover
    pass
from transfigure import models


_PRETRAINED: dict = {}
DEVICE = "cpu"


def _fresh(pretrain_steps: int, layers: int) -> torch.nn.Module:
    """The trained tiny Llama on DEVICE (models.trained_tiny_llama: trained once, cached on disk)."""
    key = (pretrain_steps, layers)
    if key not in _PRETRAINED:
        model = models.trained_tiny_llama(steps=pretrain_steps, num_hidden_layers=layers, device=DEVICE)
        _PRETRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = models.tiny_model("llama", seed=0, num_hidden_layers=layers).to(DEVICE)
    model.load_state_dict(_PRETRAINED[key])
    return model.eval()


def _eval_loss(model, batches: int = 16) -> float:
    return models.eval_loss(model, batches=batches, batch=8, seq_len=128, seed=1)


def _finetune(model, compiled, params, steps: int, lr: float, seed: int) -> None:
    model.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for tokens in models.byte_batches(16, 128, "train", seed=1000 + seed, count=steps):
        tokens = tokens.to(DEVICE)
        loss = compiled(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    model.eval()


def adaptation(steps: int = 200, pretrain_steps: int = 600, layers: int = 4, lr: float = 1e-3, lora_lr: float = 3e-3,
               choices=("all", "upper_half"), use_lora: bool = True, seed: int = 0) -> dict:
    """Held-out losses (nats/byte) for each conversion; see the module docstring."""
    torch.manual_seed(seed)
    start = time.time()
    base = _fresh(pretrain_steps, layers)
    rows = {"trained (standard residual)": {"converted": _eval_loss(base)}}

    control = _fresh(pretrain_steps, layers)
    _finetune(control, control, list(control.parameters()), steps, lr, seed)
    rows["trained (standard residual)"][f"full FT {steps} steps"] = _eval_loss(control)

    have_lora = use_lora and "lora" in transfigure.compiler.builtin_passes()
    for choice in choices:
        row = {}
        model = _fresh(pretrain_steps, layers)
        compiled = torch.compile(model, backend=transfigure.backend(lowering="eager", ladder={"layers": choice}))
        row["converted"] = _eval_loss(compiled)
        _finetune(model, compiled, list(model.parameters()), steps, lr, seed)
        row[f"full FT {steps} steps"] = _eval_loss(compiled)
        if have_lora:
            try:
                torch._dynamo.reset()
                model = _fresh(pretrain_steps, layers).requires_grad_(False)
                backend = transfigure.backend(lowering="eager", ladder={"layers": choice}, lora={"r": 16})
                compiled = torch.compile(model, backend=backend)
                model.train()
                compiled(input_ids=torch.zeros(1, 8, dtype=torch.long, device=DEVICE))  # creates the adapters
                params = transfigure.trainable_parameters(model)
                _finetune(model, compiled, params, steps, lora_lr, seed)
                row[f"LoRA r16 {steps} steps"] = _eval_loss(compiled)
            except Exception as error:  # report, keep the full fine-tuning numbers
                row["lora_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows[f"ladder {choice}"] = row
        torch._dynamo.reset()
    return {"steps": steps, "pretrain_steps": pretrain_steps, "layers": layers, "lr": lr, "lora": have_lora,
            "seconds": round(time.time() - start, 1), "torch": torch.__version__, "device": DEVICE, "rows": rows}


def markdown(result: dict) -> str:
    columns = sorted({k for row in result["rows"].values() for k in row if k != "lora_error"}, key=lambda k: (k != "converted", k))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in columns) + " |")
    lines += [f"({name}: LoRA failed: {row['lora_error']})" for name, row in result["rows"].items() if "lora_error" in row]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--json", default="")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    DEVICE = args.device
    result = adaptation(args.steps, args.pretrain_steps, use_lora=not args.no_lora)
    print(markdown(result))
    print(f"({result['seconds']} s, torch {result['torch']})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
