"""Decoding with a compiled one-token step and no host sync per token (gpt-fast's loop, for HF models).

``model.generate()`` spends about 3 ms of host time per token on a 1B Llama (H100, transformers 5) against
1.5-1.7 ms of GPU work, and it looks at the tokens on the host after every step, so the two add up and a faster
compiled model barely shows through it. The loop here keeps the GPU fed: the prompt runs through the same passes
(lowered eagerly, replayed from CUDA graphs on CUDA) into a transformers ``StaticCache``, then a compiled one-token
step (Inductor, CUDA graphs on CUDA) decodes with token selection and stopping rules kept on the device, and the host only
looks at the tokens every ``check_every`` steps. Both halves are the rewritten model: the first token and the
prompt's keys and values come from the same quantized / sparsified / fused graph as every later token.

Two ways in:

* :func:`decoding_loop` plugs it into transformers' own ``generate()`` through its ``custom_generate`` hook:
  ``model.generate(ids, max_new_tokens=..., custom_generate=transfigure.decoding_loop(backend))``. Greedy and
  sampling with any logits processors and stopping criteria give the same tokens as transformers' loop;
  what the loop does not cover (beam search, right padding, per-step scores, ...) runs transformers' own
  method, with a warning that says why.
* :func:`generate`: the same loop as a plain function (greedy).

Measured speed: ``benchmarks/results/e2e_decode_*``.
"""

from __future__ import annotations

import dataclasses

import inspect
import warnings
import weakref
from typing import Any, Callable

import torch

__all__ = ["CacheNotAllocatable", "decoding_loop", "generate"]

_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_BUFFERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_DEFAULT_BACKENDS: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def _compiled_step(model: torch.nn.Module, backend: Any, mode: str | None, kind: str = "logits"):
    """One compiled callable per (model, backend object, mode, kind), reused across calls (no recompiles):

    * ``"logits"``: the model itself, a one-token step returning logits;
    * ``"greedy"``: :func:`_greedy_step`, the token choice inside the graph;
    * ``"prompt"``: the model's forward for the prompt. A transfigure backend's prompt graph is lowered eagerly
      (the rewritten FX graph as Python), under CUDA graphs when the mode asks for them: it runs once per call,
      so Inductor's compile (~10 s for a 1B graph on an H100) would not pay back, while CUDA graphs remove what
      bounds it, the host (1B, 128 tokens: ~45 ms of Python and launches for ~5 ms of GPU work). Dynamo's
      automatic dynamic shapes: the first prompt length compiles specialised, a second recompiles once with a
      symbolic length; each length records its own CUDA graph.
    """
    from .backend import Backend

    per_model = _STEPS.setdefault(model, {})
    key = (id(backend), mode, kind)
    if key not in per_model:
        fn, lowered_by = (_greedy_step if kind == "greedy" else model), backend
        if kind == "prompt" and isinstance(backend, Backend):
            lowered_by = backend.with_lowering("eager")
        per_model[key] = (backend, torch.compile(fn, backend=lowered_by, fullgraph=True, mode=mode))
    return per_model[key][1]


def _compiled_graphs(backend: Any) -> list:
    """The reports of the graphs ``backend`` compiled so far (none for a backend without a report)."""
    return getattr(getattr(backend, "report", None), "graphs", [])


def _label_graphs_since(backend: Any, first: int, label: str) -> int:
    """Label the graphs ``backend`` compiled from index ``first`` on (its report then tells the prompt from the
    step); returns the count to start from next time."""
    graphs = _compiled_graphs(backend)
    for graph in graphs[first:]:
        graph.label = label
    return len(graphs)


def _allocate_cache(model: torch.nn.Module, cache: Any, batch: int, device: torch.device) -> None:
    """Allocate the StaticCache's tensors before the compiled prompt runs.

    transformers allocates them on the first ``update`` and marks them static for CUDA graphs only outside a
    compiled region; inside the compiled prompt they would be graph-created tensors the step could not reuse."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    cache.early_initialization(batch, kv_heads, head_dim, dtype, device)
    missing = [i for i, layer in enumerate(cache.layers) if not getattr(layer, "is_initialized", True)]
    if missing:
        raise CacheNotAllocatable(
            f"cache layers {missing} of {type(cache).__name__} cannot be allocated ahead of the compiled prompt "
            "(transformers' early_initialization skips them); transformers' own generate() decodes this model")


class CacheNotAllocatable(NotImplementedError):
    """The model's StaticCache layers cannot be allocated before the compiled prompt runs (the loop needs them
    allocated outside the graph); :class:`decoding_loop` then runs transformers' own method instead."""


def _resolve(model: torch.nn.Module, backend: Any, mode: str | None, device: torch.device) -> tuple[Any, str | None]:
    """(backend, torch.compile mode) for this model and device."""
    if mode == "default":
        mode = "reduce-overhead" if device.type == "cuda" else None
    if backend is None:
        from .backend import Backend

        backend = _DEFAULT_BACKENDS.setdefault(model, Backend())
    if any(getattr(p, "name", None) == "linearize" for p in getattr(backend, "passes", ())):
        # The loop decodes over a KV cache: the linearize pass leaves attention over a cache softmax (key length !=
        # query length), so the tokens would be the original model's attention, not the linearized one's.
        raise ValueError(
            "transfigure decoding loop: this backend linearizes attention, which cannot run over transformers' KV "
            "cache (README, section linearize). Decode with "
            "transfigure.passes.linearize.LinearAttentionDecoder(model, feature_map=..., window=..., state=...)"
            ".generate(input_ids, max_new_tokens) (per-token cost flat in the context), or leave linearize out of "
            "the decoding backend.")
    return backend, mode


def _check_loop_arguments(who: str, check_every: int, cache_bucket: int) -> None:
    if cache_bucket < 1:
        raise ValueError(f"{who}: cache_bucket must be >= 1, got {cache_bucket}")
    if check_every < 1:
        raise ValueError(f"{who}: check_every must be >= 1, got {check_every}")


def wide_argmax(scores: torch.Tensor, chunks: int = 128) -> torch.Tensor:
    """``scores.argmax(-1)`` in two reductions: the maximum (first index) of each of ``chunks`` slices of the last
    dim, then the first slice holding the overall maximum -- the same index as ``torch.argmax`` (first
    occurrence; NaN counts as the maximum). Why: Inductor runs a one-row argmax over a 128K vocabulary as one
    program (28 us of an H100's ~1 ms 1B decode step); split, each slice gets its own program."""
    vocab = scores.shape[-1]
    if vocab < 16 * chunks:
        return scores.argmax(-1)
    width = -(-vocab // chunks)
    if width * chunks != vocab:  # the padding can never win: a real element is at least -inf and comes first
        scores = torch.nn.functional.pad(scores, (0, width * chunks - vocab), value=float("-inf"))
    best, where = scores.reshape(*scores.shape[:-1], chunks, width).max(-1)
    chunk = best.argmax(-1, keepdim=True)
    return (chunk * width + where.gather(-1, chunk)).squeeze(-1)


def _greedy_step(model: torch.nn.Module, cache: Any, tokens: torch.Tensor, position: torch.Tensor,
                 unfinished: torch.Tensor, steps_running: torch.Tensor, eos: torch.Tensor | None,
                 pad: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                 position_offsets: torch.Tensor | None = None) -> None:
    """One greedy decode step with the token choice and the EOS bookkeeping inside the compiled graph.

    Reads the last token from ``tokens``, writes the new one at ``position`` and updates ``unfinished`` /
    ``steps_running`` in place (static buffers), so a step is ONE graph replay on the host: every eager op around
    it costs tens of microseconds of host time, and at ~1.2 ms of GPU work per 4-bit 1B step those add up to the
    bound (H100, 1B, 4-bit, through generate(): 517 tok/s with the choice outside the graph, 657 with it inside)."""
    last = tokens.index_select(1, position - 1)
    padding = {} if attention_mask is None else {"attention_mask": attention_mask,
                                                 "position_ids": (position - 1 + position_offsets)[:, None]}
    logits = model(input_ids=last, **_cache_kwarg(model, cache), cache_position=position - 1, use_cache=True,
                   **padding).logits
    token = wide_argmax(logits[:, -1])
    if eos is not None:
        token = torch.where(unfinished, token, pad)
        unfinished.logical_and_(~torch.isin(token, eos))
        steps_running.add_(unfinished)
    tokens.index_copy_(1, position, token[:, None])


def _decode(model: torch.nn.Module, compiled: tuple[Any, str | None], input_ids: torch.Tensor, max_new_tokens: int,
            *, choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, eos: torch.Tensor | None,
            pad: torch.Tensor | int | None, stop: Callable[[torch.Tensor], torch.Tensor] | None,
            check_every: int, cache_bucket: int, streamer: Any = None, keep_cache: bool = False,
            attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """The loop. ``choose(tokens so far, last logits) -> next tokens`` (None: greedy, decided inside the compiled
    step, see :func:`_greedy_step`); a row stops when its new token is in ``eos`` or ``stop(tokens so far)`` says
    so; finished rows continue with ``pad`` (when given); decoding ends at the step where every row has finished,
    found on the device and read back every ``check_every`` steps (the tokens returned end exactly there, as in
    transformers' loop). ``compiled`` = (backend, torch.compile mode). Returns the tokens ``[batch, prompt + new]``
    and the cache; the cache and buffers are reused by the next call of the same shapes unless ``keep_cache``
    (the caller keeps the cache). ``attention_mask``: the prompt's ``[batch, prompt]`` mask of a LEFT-padded batch
    (zeros = padding); the model then gets a cache-long mask and per-row positions that skip the padding, as
    transformers' own loop gives it.
    """
    import transformers

    device = input_ids.device
    batch, prompt = input_ids.shape
    cache_len = -(-(prompt + max_new_tokens) // cache_bucket) * cache_bucket
    key = (batch, cache_len, device, input_ids.dtype, getattr(model, "dtype", None))
    kept = None if keep_cache else _BUFFERS.get(model)
    if kept is not None and kept[0] == key:
        cache, tokens, unfinished, steps_running = kept[1]
        cache.reset()
        unfinished.fill_(True)
        steps_running.zero_()
    else:
        cache = transformers.StaticCache(config=model.config, max_cache_len=cache_len)
        _allocate_cache(model, cache, batch, device)
        # as long as the cache, so the compiled step sees the same shapes for every length in the bucket
        tokens = torch.empty(batch, cache_len, dtype=input_ids.dtype, device=device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        # steps each row was still running after: its finishing step, or max_new_tokens if it never finished
        steps_running = torch.zeros(batch, dtype=torch.long, device=device)
        for buffer in (tokens, unfinished, steps_running):  # mutated in place by the CUDA-graphed step
            torch._dynamo.mark_static_address(buffer)
        if not keep_cache:
            # the next call of the same shape reuses them: new addresses would make CUDA graphs record again
            _BUFFERS[model] = (key, (cache, tokens, unfinished, steps_running))
    padding: dict[str, torch.Tensor] = {}
    position_offsets = None
    if attention_mask is not None and not bool(attention_mask.all()):
        full_mask = torch.ones(batch, cache_len, dtype=attention_mask.dtype, device=device)
        full_mask[:, :prompt] = attention_mask
        prompt_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # a row's position id = its cache index + offset (negative by the row's padding)
        position_offsets = prompt_positions[:, -1] - (prompt - 1)
        padding = {"attention_mask": full_mask, "position_ids": prompt_positions}
    # the prompt goes through the rewritten model too: an eager prompt would take the first token and the prompt's
    # keys and values from the original weights, and decode a mix of the two models
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    compiled_before = len(_compiled_graphs(compiled[0]))
    logits = _compiled_step(model, *compiled, "prompt")(
        input_ids=input_ids, **_cache_kwarg(model, cache), use_cache=True,
        cache_position=torch.arange(prompt, device=device), **padding, **keep_last).logits
    compiled_before = _label_graphs_since(compiled[0], compiled_before, "prompt")
    fused = choose is None and stop is None
    if fused and eos is not None and pad is None:
        pad = eos[0]  # what transformers falls back to when only an EOS id is known
    if fused and pad is not None and not isinstance(pad, torch.Tensor):
        pad = torch.tensor(pad, dtype=input_ids.dtype, device=device)
    tokens[:, :prompt] = input_ids
    tracks_stops = eos is not None or stop is not None
    positions = torch.arange(prompt, prompt + max_new_tokens, device=device)
    step = _compiled_step(model, *compiled, "greedy" if fused else "logits")
    streamed = prompt
    done = max_new_tokens
    # a streamer reads the tokens at every checkpoint anyway (a sync), so only a loop without one lags its checks
    checks = _FinishedChecks(lagged=device.type == "cuda" and streamer is None)
    for i in range(max_new_tokens):
        if i and fused:
            step(model, cache, tokens, positions[i : i + 1], unfinished, steps_running, eos,
                 pad if tracks_stops else None, padding.get("attention_mask"), position_offsets)
        else:
            if i:
                # a fresh [batch, 1] tensor, not a slice of ``tokens``: its strides would change with the lengths
                step_padding = {} if not padding else {
                    "attention_mask": padding["attention_mask"],
                    "position_ids": (positions[i - 1 : i] + position_offsets)[:, None]}
                logits = step(input_ids=next_token[:, None], **_cache_kwarg(model, cache),
                              cache_position=positions[i - 1 : i], use_cache=True, **step_padding).logits
            # consumed before the next replay of the step overwrites its output
            next_token = logits[:, -1].argmax(-1) if choose is None else choose(tokens[:, : prompt + i], logits[:, -1])
            if pad is not None and tracks_stops:
                next_token = torch.where(unfinished, next_token, pad)
            tokens[:, prompt + i] = next_token
            if tracks_stops:
                stopping = torch.zeros_like(unfinished)
                if eos is not None:
                    stopping = torch.isin(next_token, eos)
                if stop is not None:
                    stopping = stopping | stop(tokens[:, : prompt + i + 1])
                unfinished.logical_and_(~stopping)
                steps_running += unfinished
        checkpoint = (i + 1) % check_every == 0 or i + 1 == max_new_tokens
        if checkpoint and streamer is not None:
            streamer.put(tokens[:, streamed : prompt + i + 1].cpu())
            streamed = prompt + i + 1
        if checkpoint and tracks_stops:
            checks.push(i + 1, unfinished.any())
            if checks.all_finished() is not None:
                done = i + 1
                break
    _label_graphs_since(compiled[0], compiled_before, "decode step")
    end = prompt + done
    if tracks_stops and not bool(unfinished.any()):
        end = prompt + int(steps_running.max()) + 1
    return tokens[:, :end].clone(), cache


class _FinishedChecks:
    """"Has every row finished?" at the loop's checkpoints, read without draining the GPU's queue.

    Reading the flag at once (``bool(unfinished.any())``) waits for every step enqueued so far; the GPU then
    idles while the host enqueues the next one (H100, 1B, 4-bit: one CUDA-graph replay costs the host 0.3-0.9 ms
    against ~1.1 ms of GPU work, so every check cost most of a step). Here a checkpoint's flag is copied to
    pinned host memory behind an event, and the host only waits for the checkpoint BEFORE the last one: the GPU
    keeps one check interval of steps queued, and decoding may run up to two intervals past the step where every
    row finished (their tokens are padding, cut off by the caller from ``steps_running``). Not lagged (CPU, or a
    streamer that syncs at every checkpoint anyway), the loop stops at the first checkpoint where every row has
    finished."""

    def __init__(self, lagged: bool):
        self.lagged = lagged
        self.pending: list[tuple[int, torch.Tensor, Any]] = []

    def push(self, step: int, any_unfinished: torch.Tensor) -> None:
        self.pending.append((step, *self._stage(any_unfinished)) if self.lagged else (step, any_unfinished, None))

    @staticmethod
    def _stage(any_unfinished: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(host copy of the flag, the event that says it has arrived)"""
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(any_unfinished, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return flag, event

    def all_finished(self) -> int | None:
        """The first checkpoint step known to have every row finished (None: none known yet). Waits at most for
        the checkpoint before the newest one."""
        while self.pending:
            step, flag, event = self.pending[0]
            if event is not None and not event.query():
                if len(self.pending) < 2:
                    return None
                event.synchronize()
            self.pending.pop(0)
            if not bool(flag):
                return step
        return None


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
    CPU. With ``eos_token_id`` a finished row continues with ``pad_token_id`` (default: the EOS id) and the
    result ends at the step where every row has finished (checked on the host every ``check_every`` tokens).
    The KV cache length is rounded up to a multiple of ``cache_bucket`` so calls with other prompt / output
    lengths reuse the compiled step (its shapes include the cache's); the cache stays allocated for the next call
    of the same shapes (see :class:`decoding_loop`). Returns ``[batch, prompt + new]``.
    For sampling, logits processors, stopping criteria or streamers, use
    ``model.generate(..., custom_generate=transfigure.decoding_loop(backend))``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"transfigure.generate: input_ids must be [batch, prompt>=1], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"transfigure.generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_loop_arguments("transfigure.generate", check_every, cache_bucket)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    vocab = getattr(model.config, "vocab_size", None)
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad)):
        if value is not None and (value < 0 or (vocab is not None and value >= vocab)):
            raise ValueError(f"transfigure.generate: {name}={value} is not a token id of this model (vocab {vocab}); "
                             "finished rows are fed their pad token, so it must be one")
    compiled = _resolve(model, backend, mode, input_ids.device)
    eos = None if eos_token_id is None else torch.tensor([eos_token_id], device=input_ids.device)
    tokens, _ = _decode(model, compiled, input_ids, max_new_tokens, choose=None, eos=eos,
                        pad=pad, stop=None, check_every=check_every, cache_bucket=cache_bucket)
    return tokens


# model inputs transformers' generate() prepares that the loop reproduces itself (cache positions, positions
# without padding, the one-position logits)
_LOOP_MODEL_KWARGS = {"attention_mask", "past_key_values", "cache", "use_cache", "position_ids", "cache_position",
                      "logits_to_keep"}


def _cache_kwarg(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache as the model's forward names it: ``cache`` since transformers 5.24, ``past_key_values``
    before (still accepted there, with a deprecation warning)."""
    return {_cache_name(type(model)): cache}


@torch.compiler.assume_constant_result  # a property of the class: a constant inside the compiled step
def _cache_name(model_class: type) -> str:
    name = _CACHE_NAMES.get(model_class)  # read once per class, not per token of the eager loops
    if name is None:
        names = inspect.signature(model_class.forward).parameters
        name = _CACHE_NAMES[model_class] = ("cache" if "cache" in names and "past_key_values" not in names
                                            else "past_key_values")
    return name


_CACHE_NAMES: dict[type, str] = {}


class decoding_loop:  # noqa: N801 - used like a function: custom_generate=transfigure.decoding_loop(backend)
    """transfigure's decode loop as transformers' ``generate(custom_generate=...)`` callable.

    ``model.generate(input_ids, max_new_tokens=256, custom_generate=transfigure.decoding_loop(backend))`` (or
    ``decoding_loop(lut_quant={"bits": 4})``: the loop builds its backend from these options) runs
    transformers' usual input and generation-config preparation, then this loop: the compiled one-token step
    (``backend`` as in :func:`generate`; build the object once and reuse it, the step is kept per model and
    backend), logits processors and stopping criteria applied on the device every step, greedy or sampled
    tokens, finished rows padded, the host looking at the tokens every ``check_every`` steps. Returns what
    transformers' loop returns (the sequences, or ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate``).

    Memory: the last call's KV cache (its length rounded up to ``cache_bucket``) stays allocated with the model
    for the next call of the same batch and bucket, so CUDA graphs replay without recording again; it is freed
    with the model or replaced by a call of other shapes.

    Streaming: transformers (5.17-5.23) does not hand ``streamer=`` to a ``custom_generate`` callable (only the
    prompt reaches it); pass it as ``token_streamer=`` instead, and it gets the new tokens in chunks of
    ``check_every``.

    Cases the loop does not cover run transformers' own decoding method for the generation mode instead, with a
    warning naming the reason: beam search and other non-sampling modes, a right-padded batch (left padding is
    handled), a cache passed in by the caller, per-step outputs (``output_scores``, ``output_logits``,
    attentions, hidden states), ``synced_gpus``, encoder-decoder models, extra model inputs.
    """

    def __init__(self, backend: Any = None, *, mode: str | None = "default", check_every: int = 16,
                 cache_bucket: int = 256, **options: Any):
        _check_loop_arguments("transfigure.decoding_loop", check_every, cache_bucket)
        if options:
            if backend is not None:
                raise ValueError("transfigure.decoding_loop: give either a backend or options for one "
                                 f"(got a backend and options {sorted(options)})")
            from .backend import Backend

            backend = Backend(**options)  # options are validated here, before any generate() call
        self.backend = backend
        self.mode = mode
        self.check_every = check_every
        self.cache_bucket = cache_bucket

    def __repr__(self) -> str:
        return (f"transfigure.decoding_loop(backend={self.backend!r}, mode={self.mode!r}, "
                f"check_every={self.check_every}, cache_bucket={self.cache_bucket})")

    @staticmethod
    def unsupported(model: torch.nn.Module, input_ids: torch.Tensor, stopping_criteria: Any, generation_config: Any,
                    synced_gpus: bool, model_kwargs: dict[str, Any], extra: dict[str, Any]) -> str | None:
        """Why this call needs transformers' own loop (``None``: the compiled loop covers it)."""
        from transformers.generation.configuration_utils import GenerationMode

        mode = generation_config.get_generation_mode()
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            return f"generation mode {mode.value!r} (the loop does greedy and sampling)"
        if getattr(model.config, "is_encoder_decoder", False):
            return "an encoder-decoder model"
        if synced_gpus:
            return "synced_gpus"
        wanted = [name for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
                  if generation_config.return_dict_in_generate and getattr(generation_config, name, False)]
        if wanted:
            return f"{', '.join(wanted)} (per-step outputs)"
        mask = model_kwargs.get("attention_mask")
        if mask is not None and mask.shape != input_ids.shape:
            return f"an attention_mask of shape {tuple(mask.shape)} for input_ids {tuple(input_ids.shape)}"
        if mask is not None and not bool((mask[:, 1:] >= mask[:, :-1]).all() and mask[:, -1].all()):
            return "a right-padded batch (the loop takes left padding, as decoder-only generation wants)"
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if cache is not None and (getattr(cache, "_is_user_defined", False) or cache.get_seq_length() > 0):
            return "a cache passed in by the caller"
        others = sorted(k for k, v in {**model_kwargs, **extra}.items()
                        if k not in _LOOP_MODEL_KWARGS and v is not None)
        if others:
            return f"inputs {others} (the loop feeds the model input_ids only)"
        if (stopping_criteria.max_length or generation_config.max_length or 0) <= input_ids.shape[1]:
            return "no new tokens to generate"
        return None

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                 generation_config: Any, synced_gpus: bool = False, streamer: Any = None, token_streamer: Any = None,
                 **model_kwargs: Any):
        from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

        if streamer is None and token_streamer is not None:
            streamer = token_streamer
            streamer.put(input_ids.cpu())  # what generate() does for its own ``streamer=``
        mode_kwargs = {k: model_kwargs.pop(k) for k in ("assistant_model", "inputs_tensor", "tokenizer",
                                                         "assistant_tokenizer") if k in model_kwargs}
        reason = self.unsupported(model, input_ids, stopping_criteria, generation_config, synced_gpus, model_kwargs,
                                  mode_kwargs)
        if reason is not None:
            return self._transformers_loop(reason, model, input_ids, logits_processor, stopping_criteria,
                                           generation_config, synced_gpus, streamer, model_kwargs, mode_kwargs)
        max_length = stopping_criteria.max_length or generation_config.max_length
        eos_criteria = [c for c in stopping_criteria if isinstance(c, EosTokenCriteria)]
        others = [c for c in stopping_criteria if not isinstance(c, (EosTokenCriteria, MaxLengthCriteria))]
        eos = torch.cat([c.eos_token_id.to(input_ids.device).reshape(-1) for c in eos_criteria]) if eos_criteria else None
        # transformers pads finished rows only when an EOS rule exists
        pad = generation_config._pad_token_tensor if eos is not None else None
        if pad is not None:
            pad = pad.to(input_ids.device)

        def stop(tokens: torch.Tensor) -> torch.Tensor:
            finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            for criterion in others:
                finished = finished | criterion(tokens, None)
            return finished

        do_sample = generation_config.do_sample
        processors = list(logits_processor or [])

        def choose(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            scores = logits_processor(tokens, logits.to(copy=True, dtype=torch.float32))
            if do_sample:
                return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            return scores.argmax(-1)

        compiled = _resolve(model, self.backend, self.mode, input_ids.device)
        plain_greedy = not processors and not do_sample
        try:
            sequences, cache = _decode(model, compiled, input_ids, max_length - input_ids.shape[1],
                                       choose=None if plain_greedy else choose, eos=eos, pad=pad,
                                       stop=stop if others else None, check_every=self.check_every,
                                       cache_bucket=self.cache_bucket, streamer=streamer,
                                       keep_cache=bool(generation_config.return_dict_in_generate),
                                       attention_mask=model_kwargs.get("attention_mask"))
        except CacheNotAllocatable as error:
            return self._transformers_loop(str(error), model, input_ids, logits_processor, stopping_criteria,
                                           generation_config, synced_gpus, streamer, model_kwargs, mode_kwargs)
        if streamer is not None:
            streamer.end()
        if generation_config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            fields = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
            return GenerateDecoderOnlyOutput(sequences=sequences, **{"cache" if "cache" in fields else "past_key_values": cache})
        return sequences

    @staticmethod
    def _transformers_loop(reason, model, input_ids, logits_processor, stopping_criteria, generation_config,
                           synced_gpus, streamer, model_kwargs, mode_kwargs):
        from transformers.generation.utils import GENERATION_MODES_MAPPING

        mode = generation_config.get_generation_mode(mode_kwargs.get("assistant_model"))
        method = GENERATION_MODES_MAPPING.get(mode)
        if method is None or "/" in method:
            raise NotImplementedError(
                f"transfigure.decoding_loop: generation mode {mode.value!r} is a transformers Hub recipe ({method}); "
                "call generate() without custom_generate for it")
        warnings.warn(f"transfigure.decoding_loop: running transformers' own {method} for this call: {reason}",
                      stacklevel=3)
        return getattr(type(model), method)(model, input_ids, logits_processor=logits_processor,
                                            stopping_criteria=stopping_criteria, generation_config=generation_config,
                                            synced_gpus=synced_gpus, streamer=streamer, **mode_kwargs, **model_kwargs)
