"""Per-layer bit allocation for LUT quantization (HIGGS "dynamic" bitwidths), solved exactly by DP.

HIGGS' linearity theorem: for small quantization noise the increase of the model's loss is close to
``sum_l alpha_l * t_l^2`` where ``t_l^2 = |W_l - Q(W_l)|^2 / |W_l|^2`` is layer ``l``'s relative error. With
Hadamard rotation and RMS group scales, ``t_l^2`` is the grid's MSE for a unit Gaussian, ``mse(b)``. So the
allocation problem is

    min_b  sum_l alpha_l * mse(b_l)    s.t.  sum_l n_l * b_l <= avg_bits * sum_l n_l,   b_l in {2, 3, 4}

(``n_l`` = weights of layer ``l``; the fp16 scales cost the same at every ``b`` and drop out). This is a
multiple-choice knapsack; :func:`allocate_bits` solves it exactly by dynamic programming over the budget in
units of ``gcd(n_l)`` weights.

The sensitivities ``alpha_l`` are fit data-free (:func:`estimate_sensitivities`): add Gaussian noise of known
relative variance ``t^2`` to layer ``l``'s weight, measure the KL divergence between the model's output
distributions before and after on random tokens, ``alpha_l = KL / t^2``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from functools import reduce
from pathlib import Path

import torch

from transfigure.kernels.grids import higgs_grid

__all__ = ["allocate_bits", "brute_force_bits", "estimate_sensitivities", "save_sensitivities", "total_error"]

MAX_STATES = 4_000_000


def _mse_table(choices: Sequence[int], p: int) -> dict[int, float]:
    return {b: higgs_grid(b, p).mse for b in choices}


def total_error(layers, bits: Sequence[int], p: int = 1) -> float:
    mse = _mse_table(sorted(set(bits)), p)
    return sum(alpha * mse[b] for (_, _, alpha), b in zip(layers, bits))


def allocate_bits(layers: Sequence[tuple[str, int, float]], avg_bits: float, *, p: int = 1, group_size: int = 128,
                  choices: Sequence[int] = (2, 3, 4)) -> list[int]:
    """Exact DP. ``layers``: ``(name, n_weights, alpha)``; returns bits per layer (same order).

    Raises ``ValueError`` if even the smallest choice everywhere exceeds the budget.
    """
    choices = sorted(choices)
    mse = _mse_table(choices, p)
    sizes = [int(n) for _, n, _ in layers]
    if not layers:
        return []
    unit = reduce(math.gcd, sizes)
    units = [n // unit for n in sizes]
    budget = int(math.floor(avg_bits * sum(units) + 1e-9))
    if min(choices) * sum(units) > budget:
        raise ValueError(f"avg_bits={avg_bits} is below the smallest choice {min(choices)}")
    cap = max(choices) * sum(units)
    budget = min(budget, cap)
    if (budget + 1) * len(layers) > MAX_STATES:
        raise ValueError("bit allocation: too many DP states (layer sizes share too small a common divisor)")
    inf = float("inf")
    # dp[c] = least error of the layers so far using exactly c budget units; choice[l][c] = bits for layer l
    dp = torch.full((budget + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    picks = []
    for (_, _, alpha), u in zip(layers, units):
        new = torch.full_like(dp, inf)
        pick = torch.zeros(budget + 1, dtype=torch.int8)
        for b in choices:
            cost = b * u
            if cost > budget:
                continue
            cand = torch.full_like(dp, inf)
            cand[cost:] = dp[: budget + 1 - cost] + alpha * mse[b]
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.tensor(b, dtype=torch.int8), pick)
        dp = new
        picks.append(pick)
    c = int(torch.argmin(dp))
    out = []
    for (_, _, _), u, pick in zip(reversed(layers), reversed(units), reversed(picks)):
        b = int(pick[c])
        out.append(b)
        c -= b * u
    return out[::-1]


def brute_force_bits(layers, avg_bits: float, *, p: int = 1, choices: Sequence[int] = (2, 3, 4)) -> list[int]:
    """Exhaustive search (tests only)."""
    mse = _mse_table(choices, p)
    total = sum(n for _, n, _ in layers)
    best, best_bits = float("inf"), None
    for bits in itertools.product(choices, repeat=len(layers)):
        if sum(n * b for (_, n, _), b in zip(layers, bits)) > avg_bits * total + 1e-9:
            continue
        err = sum(a * mse[b] for (_, _, a), b in zip(layers, bits))
        if err < best - 1e-15:
            best, best_bits = err, list(bits)
    return best_bits


@torch.no_grad()
def estimate_sensitivities(model: torch.nn.Module, *, modules: Sequence[str] | None = None, noise: float = 0.05,
                           batch: int = 2, seq_len: int = 32, vocab: int | None = None, seed: int = 0,
                           repeats: int = 2) -> dict[str, float]:
    """Data-free ``alpha_l`` for every ``nn.Linear`` (or those named in ``modules``): ``KL / t^2``.

    ``noise`` is the relative std ``t`` (noise std = ``t * rms(W_l)``); tokens are uniform random ids.
    Models without logits (encoders) use the relative squared error of the last hidden state instead of KL.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or getattr(getattr(model, "config", None), "vocab_size", 256)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)

    def output():
        out = model(input_ids=ids)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    base = output().float()
    has_logits = getattr(model(input_ids=ids), "logits", None) is not None
    log_p = torch.log_softmax(base, -1)
    result = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (modules is not None and name not in modules):
            continue
        w = module.weight
        saved = w.detach().clone()
        rms = saved.float().pow(2).mean().sqrt()
        total = 0.0
        for r in range(repeats):
            gen = torch.Generator().manual_seed(seed + 1 + r)
            eps = torch.randn(saved.shape, generator=gen).to(device=w.device, dtype=torch.float32)
            w.copy_((saved.float() + noise * rms * eps).to(w.dtype))
            out = output().float()
            if has_logits:
                kl = (log_p.exp() * (log_p - torch.log_softmax(out, -1))).sum(-1).mean()
            else:
                kl = (out - base).pow(2).sum() / base.pow(2).sum()
            total += float(kl)
        w.copy_(saved)
        result[name] = total / repeats / noise**2
    return result


def save_sensitivities(path: str | Path, sensitivities: dict[str, float]) -> None:
    Path(path).write_text(json.dumps({"sensitivities": sensitivities}, indent=1))
