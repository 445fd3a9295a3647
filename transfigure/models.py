"""Built-in tiny model configs (random weights, no downloads) and a small real-text corpus.

Tests, the demo and the benchmarks build models from here. ``tiny_model`` covers the five architectures
every pass is tested on; ``llama_1b_config``/``llama_8b_config`` give benchmark-sized Llama shapes;
``trained_tiny_llama`` trains a byte-level Llama in-process on ``pydoc_data.topics`` (cached on disk).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("llama", "qwen3", "mistral", "gpt2", "bert")
VOCAB = 256  # byte-level tokens: no tokenizer download needed


def tiny_config(arch: str, **overrides: Any):
    """A transformers config with the smallest shapes that still exercise every code path (GQA, 2 layers)."""
    import transformers

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256)
    if arch == "llama":
        cfg = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        config = transformers.LlamaConfig(**{**common, **cfg, **overrides})
    elif arch == "qwen3":
        cfg = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        config = transformers.Qwen3Config(**{**common, **cfg, **overrides})
    elif arch == "mistral":
        cfg = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
        config = transformers.MistralConfig(**{**common, **cfg, **overrides})
    elif arch == "gpt2":
        cfg = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config = transformers.GPT2Config(**{**cfg, **overrides})
    elif arch == "bert":
        cfg = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                   max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config = transformers.BertConfig(**{**cfg, **overrides})
    else:
        raise ValueError(f"unknown architecture {arch!r}; built-in: {', '.join(ARCHITECTURES)}")
    config._attn_implementation = "sdpa"
    return config


def model_class(arch: str):
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
        "bert": transformers.BertModel,
    }[arch]


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A tiny random-weight HF model of ``arch`` in eval mode."""
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(arch)(config)
    return model.to(dtype).eval()


def example_inputs(arch: str, batch: int = 2, seq_len: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq_len), generator=generator)}


def llama_1b_config(**overrides: Any):
    """Llama-3.2-1B shapes: hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256, tied."""
    import transformers

    cfg = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096,
               rope_theta=500000.0)
    return transformers.LlamaConfig(**{**cfg, **overrides})


def llama_8b_config(**overrides: Any):
    """Llama-3.1-8B shapes: hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256."""
    import transformers

    cfg = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192,
               rope_theta=500000.0)
    return transformers.LlamaConfig(**{**cfg, **overrides})


# -- real text -------------------------------------------------------------------------------------

def text_corpus() -> bytes:
    """English technical prose shipped with Python (the pydoc topic help), as UTF-8 bytes."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def byte_batches(batch: int, seq_len: int, split: str = "train", seed: int = 0, count: int | None = None) -> Iterator[torch.Tensor]:
    """Random windows of the corpus as byte tokens; the last 10% of the text is the ``eval`` split."""
    data = torch.frombuffer(bytearray(text_corpus()), dtype=torch.uint8).long()
    cut = int(len(data) * 0.9)
    data = data[:cut] if split == "train" else data[cut:]
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while count is None or produced < count:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + seq_len] for s in starts.tolist()])
        produced += 1


def _cache_dir() -> Path:
    root = os.environ.get("TRANSFIGURE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "transfigure")
    return Path(root) / "models"


def trained_tiny_llama(steps: int = 300, seq_len: int = 128, batch: int = 16, lr: float = 3e-3, seed: int = 0,
                       device: str | torch.device = "cpu", **overrides: Any):
    """A tiny byte-level Llama trained in-process on the pydoc corpus (cached on disk by its settings).

    ``device`` is where it trains and is returned; the cache holds one copy per recipe, whatever the device.
    """
    settings = dict(steps=steps, seq_len=seq_len, batch=batch, lr=lr, seed=seed, **overrides)
    digest = hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()[:16]
    path = _cache_dir() / f"tiny_llama_{digest}.pt"
    model = tiny_model("llama", seed=seed, **overrides).to(device)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.eval()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for tokens in byte_batches(batch, seq_len, "train", seed=seed, count=steps):
        tokens = tokens.to(device)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return model.eval()


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: int = 8, batch: int = 8, seq_len: int = 128, seed: int = 1) -> float:
    """Mean next-byte cross-entropy on the held-out split (on the model's device)."""
    device = next(model.parameters()).device
    losses = [model(input_ids=t.to(device), labels=t.to(device)).loss.item()
              for t in byte_batches(batch, seq_len, "eval", seed=seed, count=batches)]
    return sum(losses) / len(losses)
