"""Attention transfer (LoLCATs stage 1, Zhang et al. 2025): train only the linear-attention parameters
(Hedgehog feature maps, window factors) so that every layer's linear attention reproduces its softmax output.

For each batch the *original* model runs unchanged (every layer returns its softmax output, so each layer
sees exactly the inputs it sees in the stock model); at every attention layer the linearized attention of
the same ``q, k, v`` (detached) is computed with :func:`transfigure.passes.linearize.linearized_attention`
(the same function, and kernels, the ``linearize`` pass puts in the graph) and

    loss = sum over layers of mean((linear_attention(q, k, v) - softmax_attention(q, k, v))^2)

Layers do not interact (inputs are detached), so one joint step equals layer-by-layer training. The model's
own weights stay frozen. The result is a flat dict ``{"<attention fqn>.q_map": tensor, ...}`` that the pass
takes as ``options={"linearize": {"state": result, ...}}`` (or a path to ``torch.save(result)``).
Stage 2 (LoRA on the linearized model) uses the LoRA pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from transfigure.passes.linearize import WINDOW_FACTOR_INIT, linearized_attention
from transfigure.reference.linear_attention import _head_counts, _set_impl, attention_layers

_IMPL = "transfigure_attention_transfer"


class _Transfer:
    def __init__(self, feature_map: str, window: str, window_size: int, chunk_size: int, params: dict[str, torch.Tensor]):
        self.feature_map, self.window, self.window_size, self.chunk_size = feature_map, window, window_size, chunk_size
        self.params = params
        self.losses: list[torch.Tensor] = []


def _transfer_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    teacher, weights = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    cfg: _Transfer | None = getattr(module, "_transfigure_attention_transfer", None)
    if cfg is None:
        return teacher, weights
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    d = query.shape[-1]
    p = cfg.params
    with torch.enable_grad():
        student = linearized_attention(
            query.detach(), key.detach(), value.detach(), attention_mask, p.get("q_map"), p.get("k_map"), p.get("window_factor"),
            causal=causal, feature_map=cfg.feature_map, window=cfg.window if causal else "none",
            window_size=cfg.window_size, chunk_size=cfg.chunk_size, scale=float(scaling) if scaling is not None else d**-0.5,
        )
        target = teacher.detach().transpose(1, 2).float()  # sdpa_attention_forward returns [B, T, H, d]
        valid = _query_validity(attention_mask, query)
        diff = (student.float() - target) * valid
        cfg.losses.append(diff.square().sum() / (valid.sum() * diff.shape[1] * diff.shape[-1]).clamp_min(1))
    return teacher, weights


def _query_validity(mask, query):
    B, H, T, _ = query.shape
    if mask is None:
        return torch.ones(B, 1, T, 1, device=query.device)
    ok = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return ok.expand(B, -1, -1, -1).any(-1)[:, :1, :, None].float()


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(_IMPL, _transfer_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_IMPL, sdpa_mask)


def init_state(model: torch.nn.Module, feature_map: str = "hedgehog", window: str = "none", layers: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Fresh trainable parameters for every selected attention layer (what the pass would create)."""
    state: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    for fqn, module in attention_layers(model, layers).items():
        H, Hk, d = _head_counts(module)
        if feature_map == "hedgehog":
            state[f"{fqn}.q_map"] = torch.eye(d, device=device).repeat(H, 1, 1)
            state[f"{fqn}.k_map"] = torch.eye(d, device=device).repeat(Hk, 1, 1)
        if window == "lolcats" and getattr(module, "is_causal", True):
            state[f"{fqn}.window_factor"] = torch.full((H,), WINDOW_FACTOR_INIT, device=device)
    return state


def distill_attention(
    model: torch.nn.Module,
    batches: Iterable[Any],
    steps: int,
    lr: float = 1e-2,
    *,
    feature_map: str = "hedgehog",
    window: str = "none",
    window_size: int = 64,
    chunk_size: int = 64,
    layers: tuple[int, ...] = (),
    state: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    weight_decay: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Attention transfer: returns the trained state for ``options={"linearize": {"state": ...}}``.

    ``batches`` yields ``input_ids`` tensors or dicts of model inputs (``attention_mask`` is honoured); it is
    cycled if shorter than ``steps``. Only ``feature_map``/``window`` parameters train (``elu``/``liger`` with
    ``window="none"`` have none: then nothing is trained and the fresh state is returned).
    """
    from tqdm.auto import tqdm

    _register()
    params = {k: v.detach().clone().float().requires_grad_(True) for k, v in (state or init_state(model, feature_map, window, layers)).items()}
    if not params:
        return {}
    configs: dict[str, _Transfer] = {}
    for fqn, module in attention_layers(model, layers).items():
        mine = {name.rsplit(".", 1)[1]: t for name, t in params.items() if name.rsplit(".", 1)[0] == fqn}
        configs[fqn] = _Transfer(feature_map, window, window_size, chunk_size, mine)
        module._transfigure_attention_transfer = configs[fqn]
    previous_impl = getattr(model.config, "_attn_implementation", "sdpa")
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    _set_impl(model, _IMPL)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    bar = tqdm(total=steps, desc="attention transfer", disable=not progress)
    try:
        step = 0
        while step < steps:
            produced = False
            for batch in batches:
                produced = True
                inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
                for cfg in configs.values():
                    cfg.losses.clear()
                with torch.no_grad():
                    model(**inputs)
                loss = torch.stack([l for cfg in configs.values() for l in cfg.losses]).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update(1)
                bar.set_postfix(mse=f"{loss.item():.4g}")
                if step >= steps:
                    break
            if not produced:
                raise ValueError("distill_attention: batches produced nothing")
    finally:
        bar.close()
        for module in model.modules():
            if hasattr(module, "_transfigure_attention_transfer"):
                del module._transfigure_attention_transfer
        _set_impl(model, previous_impl)
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    return {k: v.detach().clone() for k, v in params.items()}


@torch.no_grad()
def attention_transfer_loss(model: torch.nn.Module, batches: Iterable[Any], state: dict[str, torch.Tensor] | None = None, *,
                            feature_map: str = "hedgehog", window: str = "none", window_size: int = 64, chunk_size: int = 64,
                            layers: tuple[int, ...] = ()) -> float:
    """Mean (over batches) of the summed per-layer MSE between linear and softmax attention outputs."""
    return _eval_transfer(model, batches, state, feature_map, window, window_size, chunk_size, layers)


def _eval_transfer(model, batches, state, feature_map, window, window_size, chunk_size, layers) -> float:
    _register()
    state = state if state is not None else init_state(model, feature_map, window, layers)
    configs = {}
    for fqn, module in attention_layers(model, layers).items():
        mine = {name.rsplit(".", 1)[1]: t for name, t in state.items() if name.rsplit(".", 1)[0] == fqn}
        configs[fqn] = module._transfigure_attention_transfer = _Transfer(feature_map, window, window_size, chunk_size, mine)
    previous_impl = getattr(model.config, "_attn_implementation", "sdpa")
    _set_impl(model, _IMPL)
    total, count = 0.0, 0
    try:
        for batch in batches:
            inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
            for cfg in configs.values():
                cfg.losses.clear()
            model(**inputs)
            total += float(sum(l.item() for cfg in configs.values() for l in cfg.losses))
            count += 1
    finally:
        for module in model.modules():
            if hasattr(module, "_transfigure_attention_transfer"):
                del module._transfigure_attention_transfer
        _set_impl(model, previous_impl)
    return total / max(count, 1)


__all__ = ["attention_transfer_loss", "distill_attention", "init_state"]
