"""Greedy decoding with a compiled one-token step and no host sync per token (gpt-fast's loop, for HF models).

``model.generate()`` spends about 3 ms of host time per token on a 1B Llama (H100, transformers 5) against
1.5-1.7 ms of GPU work, so a faster compiled model barely shows through it. :func:`generate` keeps the GPU fed:
the prompt runs eagerly into a transformers ``StaticCache``, then a compiled one-token step (CUDA graphs on
CUDA) decodes with the argmax kept on the device, and the host only looks at the tokens every ``check_every``
steps (for EOS). Same tokens as ``model.generate(do_sample=False)``; measured speed of the step loop:
``benchmarks/results/profile_decode_{1b,8b}.md``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["generate"]

_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_DEFAULT_BACKENDS: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def _compiled_step(model: torch.nn.Module, backend: Any, mode: str | None):
    """One compiled step per (model, backend object, mode), reused across calls (no recompiles)."""
    per_model = _STEPS.setdefault(model, {})
    key = (id(backend), mode)
    if key not in per_model:
        per_model[key] = (backend, torch.compile(model, backend=backend, fullgraph=True, mode=mode))
    return per_model[key][1]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    backend: Any = None,
    mode: str | None = "default",
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    check_every: int = 16,
    cache_bucket: int = 256,
) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` (``[batch, prompt]``, no padding) by ``max_new_tokens`` tokens.

    ``backend``: what compiles the decode step — a ``transfigure.backend(...)`` object (build it once and
    reuse it), ``"inductor"``, or None for ``transfigure.backend()`` without passes (one per model).
    ``mode``: torch.compile's mode; ``"default"`` means ``"reduce-overhead"`` (CUDA graphs) on CUDA and none on
    CPU. With ``eos_token_id`` a finished row continues with ``pad_token_id`` (default: the EOS id) and decoding
    stops once every row finished (checked every ``check_every`` tokens). The KV cache length is rounded up to a
    multiple of ``cache_bucket`` so calls with other prompt / output lengths reuse the compiled step (its shapes
    include the cache's). Returns ``[batch, prompt + new]``.
    """
    import transformers

    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"transfigure.generate: input_ids must be [batch, prompt>=1], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"transfigure.generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache_bucket < 1:
        raise ValueError(f"transfigure.generate: cache_bucket must be >= 1, got {cache_bucket}")
    if check_every < 1:
        raise ValueError(f"transfigure.generate: check_every must be >= 1, got {check_every}")
    device = input_ids.device
    if mode == "default":
        mode = "reduce-overhead" if device.type == "cuda" else None
    if backend is None:
        from .backend import Backend

        backend = _DEFAULT_BACKENDS.setdefault(model, Backend())
    step = _compiled_step(model, backend, mode)

    batch, prompt = input_ids.shape
    cache_len = -(-(prompt + max_new_tokens) // cache_bucket) * cache_bucket
    cache = transformers.StaticCache(config=model.config, max_cache_len=cache_len)
    # the prompt runs eagerly: it allocates the cache (transformers marks its tensors static for CUDA graphs)
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits
    tokens = torch.empty(batch, prompt + max_new_tokens, dtype=input_ids.dtype, device=device)
    tokens[:, :prompt] = input_ids
    next_token = logits[:, -1].argmax(-1)
    tokens[:, prompt] = next_token
    pad = eos_token_id if pad_token_id is None else pad_token_id
    vocab = getattr(model.config, "vocab_size", None)
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad)):
        if value is not None and (value < 0 or (vocab is not None and value >= vocab)):
            raise ValueError(f"transfigure.generate: {name}={value} is not a token id of this model (vocab {vocab}); "
                             "finished rows are fed their pad token, so it must be one")
    finished = next_token == eos_token_id if eos_token_id is not None else None
    positions = torch.arange(prompt, prompt + max_new_tokens, device=device)
    end = prompt + max_new_tokens
    for i in range(1, max_new_tokens):
        logits = step(input_ids=next_token[:, None], past_key_values=cache, cache_position=positions[i - 1 : i],
                      use_cache=True).logits
        next_token = logits[:, -1].argmax(-1)  # consumed before the next replay overwrites the logits
        if finished is not None:
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            finished = finished | (next_token == eos_token_id)
        tokens[:, prompt + i] = next_token
        if finished is not None and i % check_every == 0 and bool(finished.all()):
            end = prompt + i + 1
            break
    return tokens[:, :end]
