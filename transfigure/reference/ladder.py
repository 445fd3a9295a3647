"""Plain-PyTorch reference for Ladder Residual: the oracle the ``ladder`` pass is tested against.

Number the sub-blocks of a pre-norm decoder j = 1..2L (attention and MLP alternating) and let ``h_j`` be the
residual stream after sub-block j, with ``h_0 = h_{-1}`` = the embeddings. A standard block computes

    h_j = h_{j-1} + f_j(h_{j-1})

and a ladder block (Ladder Residual, Zhang et al. 2025, arXiv:2501.06589) computes

    h_j = h_{j-1} + f_j(h_{j-2})

so f_j never waits for f_{j-1}'s output (under tensor parallelism: for its all-reduce). Layers are converted
whole: a converted layer's two sub-blocks both read the stream one sub-block late; the others read it as
usual. The final norm reads ``h_2L``, which holds every sub-block's output.

:class:`LadderReference` re-runs a Hugging Face model's own modules (embeddings, norms, attention, MLP, final
norm, head) in that order, with no graph capture involved, so it can check the graph rewrite independently.
Supported: Llama, Qwen3, Mistral (``model.model.layers``) and GPT-2 (``model.transformer.h``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["LadderReference", "select_layers"]


def select_layers(choice: str | Sequence[int], num_layers: int, n: int = 0) -> tuple[int, ...]:
    """Resolve a layer choice (``"all"``, ``"upper_half"``, ``"last_n"`` with ``n``, ``"none"``, or indices)."""
    if isinstance(choice, str):
        if choice == "all":
            return tuple(range(num_layers))
        if choice == "none":
            return ()
        if choice == "upper_half":
            return tuple(range(num_layers - num_layers // 2, num_layers))
        if choice == "last_n":
            if not 0 < n <= num_layers:
                raise ValueError(f"layers='last_n' needs 0 < n <= {num_layers} (the model's layer count), got n={n}")
            return tuple(range(num_layers - n, num_layers))
        raise ValueError(f"unknown layer choice {choice!r}: use 'all', 'upper_half', 'last_n' (with n) or a list of indices")
    chosen = sorted({int(i) for i in choice})
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    return tuple(chosen)


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


class LadderReference(nn.Module):
    """``model`` (a Hugging Face causal LM) run with ladder residuals in ``layers``; returns logits.

    Shares the model's modules (no copy). Full-sequence forward only (no KV cache), like a training step.
    """

    def __init__(self, model: nn.Module, layers: str | Iterable[int] = "all", n: int = 0):
        super().__init__()
        self.model = model
        if hasattr(model, "model") and hasattr(model.model, "layers"):
            self.family = "llama"
            blocks = model.model.layers
        elif hasattr(model, "transformer") and hasattr(model.transformer, "h"):
            self.family = "gpt2"
            blocks = model.transformer.h
        else:
            raise TypeError(f"LadderReference supports Llama/Qwen3/Mistral/GPT-2 causal LMs, not {type(model).__name__}")
        self.num_layers = len(blocks)
        self.layers = select_layers(layers if isinstance(layers, str) else tuple(layers), self.num_layers, n)

    def _subblocks(self, hidden: torch.Tensor):
        """Embeddings, then (layer, f) for each sub-block in order, then the head."""
        length = hidden.shape[1]
        if self.family == "llama":
            base = self.model.model
            embeds = base.embed_tokens(hidden)
            positions = torch.arange(length, device=hidden.device)[None].expand(hidden.shape[0], -1)
            cos_sin = base.rotary_emb(embeds, positions)
            mask = _causal_mask(length, embeds.dtype, embeds.device)
            blocks = []
            for i, layer in enumerate(base.layers):
                blocks.append((i, lambda x, l=layer: l.self_attn(hidden_states=l.input_layernorm(x), position_embeddings=cos_sin, attention_mask=mask)[0]))
                blocks.append((i, lambda x, l=layer: l.mlp(l.post_attention_layernorm(x))))
            return embeds, blocks, lambda x: self.model.lm_head(base.norm(x))
        base = self.model.transformer
        positions = torch.arange(length, device=hidden.device)[None]
        embeds = base.drop(base.wte(hidden) + base.wpe(positions))
        mask = _causal_mask(length, embeds.dtype, embeds.device)
        blocks = []
        for i, block in enumerate(base.h):
            blocks.append((i, lambda x, b=block: b.attn(b.ln_1(x), attention_mask=mask)[0]))
            blocks.append((i, lambda x, b=block: b.mlp(b.ln_2(x))))
        return embeds, blocks, lambda x: self.model.lm_head(base.ln_f(x))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds, blocks, head = self._subblocks(input_ids)
        chosen = set(self.layers)
        before, current = embeds, embeds  # h_{j-2}, h_{j-1}
        for layer, f in blocks:
            source = before if layer in chosen else current
            before, current = current, current + f(source)
        return head(current)
