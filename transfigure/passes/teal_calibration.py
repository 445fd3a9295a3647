"""TEAL calibration: per-input activation histograms, thresholds for a target sparsity, greedy allocation.

TEAL (Liu et al., "Training-Free Activation Sparsity in Large Language Models", ICLR 2025) sparsifies the
*input* of every projection in a transformer block, ``s(x) = x * 1[|x| > t]``, with one scalar threshold per
input distribution. Projections that read the same tensor share it: in a Llama block the 7 projections see
4 distributions (q/k/v input, o input, gate/up input, down input); GPT-2 has c_attn, attn.c_proj, c_fc,
mlp.c_proj; BERT has query/key/value, attention.output.dense, intermediate.dense, output.dense.

:func:`calibrate` runs the original model on calibration batches and records, for each such *site*, a
histogram of ``log2 |x|`` (so the threshold for sparsity ``p`` is the ``p``-quantile of ``|x|``, read off
the cumulative histogram). Sites are found at run time: block linears (a layer index in their FQN) called
one after the other on the *same tensor object* share a site, which is exactly the graph-level rule the
``sparsity`` pass uses (linears sharing one input node).

Allocation of a model-level target ``p`` across a block's sites:

* ``uniform``: every site gets ``p``.
* ``greedy`` (TEAL's block-wise greedy): per block, start every site at 0; at each step try raising each
  site ``i`` by ``delta`` and keep the one that adds the least relative L2 error to the block output per
  unit of parameter-weighted block sparsity ``S = sum_i P_i s_i / P`` gained (``P_i`` its parameter count,
  ``P`` the block's; the error is measured by re-running the block on stored calibration inputs). The path
  is recorded up to ``S = greedy_max``; a target is looked up between the two path points around it
  (they differ in one site, raised part of the way), so the block sparsity equals the target exactly.

The :class:`Calibration` object is plain data (histograms, site names, shapes, greedy paths): ``save`` /
``load`` round-trip it through ``torch.save`` with ``weights_only`` loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..compiler.graph import layer_index
from ..compiler.options import load_file

HIST_LOW = -32.0  # log2 |x| range of the histogram; |x| below 2**-32 counts as zero
HIST_HIGH = 24.0
HIST_BINS = 16384  # bin width 0.0034 in log2: thresholds resolved to 0.24 %
ROTATED_HIST_MAX = 8.0  # |z| / rms of its Hadamard block; larger ratios land in the last bin
ROTATED_HIST_BINS = 8192
FORMAT_VERSION = 1


class CalibrationMismatchError(ValueError):
    """The calibration was made for another model (different linears or shapes)."""


@dataclasses.dataclass
class Site:
    """One activation distribution: the input shared by ``members`` (module FQNs) in block ``layer``."""

    name: str
    members: tuple[str, ...]
    layer: int
    block: str
    in_features: int
    params: int
    hist: torch.Tensor  # float64 [HIST_BINS] counts of log2|x| (bin 0 also holds |x| below 2**HIST_LOW)
    count: int = 0
    # Hadamard size h -> float64 [ROTATED_HIST_BINS] counts of |z| / rms(z's h-block), z = R x (rotated basis)
    rotated: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def quantile(self, p: float) -> float:
        """Threshold ``t`` with a fraction ``p`` of the calibration values at or below it (``|x| <= t``)."""
        if p <= 0 or self.count == 0:
            return 0.0
        cum = torch.cumsum(self.hist, 0)
        goal = p * float(cum[-1])
        i = int(torch.searchsorted(cum, torch.tensor([goal], dtype=cum.dtype)).item())
        i = min(i, HIST_BINS - 1)
        below = float(cum[i - 1]) if i > 0 else 0.0
        inside = float(self.hist[i])
        frac = (goal - below) / inside if inside > 0 else 1.0
        width = (HIST_HIGH - HIST_LOW) / HIST_BINS
        return float(2.0 ** (HIST_LOW + (i + min(max(frac, 0.0), 1.0)) * width))

    def rotated_quantile(self, hadamard_size: int, p: float) -> float | None:
        """``tau`` with a fraction ``p`` of the rotated ratios ``|z| / rms`` at or below it, or None when this
        site was not calibrated for ``hadamard_size``."""
        hist = self.rotated.get(hadamard_size)
        if hist is None:
            return None
        if p <= 0:
            return 0.0
        cum = torch.cumsum(hist, 0)
        goal = p * float(cum[-1])
        i = min(int(torch.searchsorted(cum, torch.tensor([goal], dtype=cum.dtype)).item()), ROTATED_HIST_BINS - 1)
        below = float(cum[i - 1]) if i > 0 else 0.0
        inside = float(hist[i])
        frac = (goal - below) / inside if inside > 0 else 1.0
        return float((i + min(max(frac, 0.0), 1.0)) * ROTATED_HIST_MAX / ROTATED_HIST_BINS)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members), "layer": self.layer, "block": self.block,
                "in_features": self.in_features, "params": self.params, "hist": self.hist, "count": self.count,
                "rotated": {str(h): hist for h, hist in self.rotated.items()}}


class Calibration:
    """Histograms of every TEAL site of one model, plus the greedy allocation paths.

    ``thresholds(target, allocation)`` maps each linear's module FQN to its threshold; ``check(linears)``
    raises :class:`CalibrationMismatchError` naming the first difference from a model's block linears.
    """

    def __init__(self, sites: list[Site], greedy: dict[str, list[tuple[float, dict[str, float]]]] | None = None,
                 info: Mapping[str, Any] | None = None):
        self.sites = list(sites)
        self.greedy = greedy or {}
        self.info = dict(info or {})

    # -- lookup ------------------------------------------------------------------------------------
    def site_of(self) -> dict[str, Site]:
        """Module FQN -> its site."""
        return {m: s for s in self.sites for m in s.members}

    def sparsities(self, target: float, allocation: str = "uniform") -> dict[str, float]:
        """Site name -> sparsity level for a model-level ``target`` under ``allocation``."""
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target!r}")
        if allocation == "uniform":
            return {s.name: target for s in self.sites}
        if allocation != "greedy":
            raise ValueError(f"allocation must be 'uniform' or 'greedy', got {allocation!r}")
        if not self.greedy:
            raise ValueError("this calibration has no greedy paths: calibrate(..., greedy=True) to record them")
        out: dict[str, float] = {}
        for block, path in self.greedy.items():
            chosen = None
            for (lo, lo_levels), (hi, hi_levels) in zip(path, path[1:]):
                if hi >= target - 1e-12:
                    # consecutive points differ in one site: raise it part of the way to hit the target exactly
                    w = 0.0 if hi <= lo else min(max((target - lo) / (hi - lo), 0.0), 1.0)
                    chosen = {k: lo_levels[k] + w * (hi_levels[k] - lo_levels[k]) for k in lo_levels}
                    break
            if target <= 0.0 and path:
                chosen = dict(path[0][1])
            if chosen is None:
                raise ValueError(f"greedy path of block {block!r} reaches only {path[-1][0]:.3f} < target {target}; "
                                 f"calibrate with a larger greedy_max")
            out.update(chosen)
        for s in self.sites:
            out.setdefault(s.name, target)
        return out

    def thresholds(self, target: float, allocation: str = "uniform") -> dict[str, float]:
        """Module FQN -> threshold (0.0 means: leave this linear dense)."""
        levels = self.sparsities(target, allocation)
        out = {}
        for s in self.sites:
            t = s.quantile(levels[s.name])
            for m in s.members:
                out[m] = t
        return out

    def rotated_thresholds(self, target: float, allocation: str, hadamard_size: int) -> dict[str, float | None]:
        """Module FQN -> ``tau`` of the rotated-basis threshold (:mod:`transfigure.kernels.rotated_sparse_lut`)
        at the site's allocated sparsity; None where the calibration has no statistics for ``hadamard_size``
        (``calibrate(..., rotations=(hadamard_size,))`` records them)."""
        levels = self.sparsities(target, allocation)
        return {m: s.rotated_quantile(hadamard_size, levels[s.name]) for s in self.sites for m in s.members}

    def block_sparsity(self, levels: Mapping[str, float]) -> dict[str, float]:
        """Parameter-weighted sparsity of each block under per-site ``levels``."""
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for s in self.sites:
            num[s.block] = num.get(s.block, 0.0) + s.params * levels[s.name]
            den[s.block] = den.get(s.block, 0.0) + s.params
        return {b: num[b] / den[b] for b in num}

    # -- validation --------------------------------------------------------------------------------
    def check(self, linears: Mapping[str, int | None]) -> None:
        """``linears``: module FQN -> in_features of the model's block linears. Raise on the first mismatch."""
        known = self.site_of()
        for fqn, in_features in linears.items():
            if fqn not in known:
                raise CalibrationMismatchError(
                    f"calibration does not match this model: linear {fqn!r} has no calibration entry "
                    f"(calibrated for {self.info.get('model', 'another model')} with {len(known)} block linears, "
                    f"e.g. {next(iter(known), '-')!r})")
            site = known[fqn]
            if in_features is not None and in_features != site.in_features:
                raise CalibrationMismatchError(
                    f"calibration does not match this model: linear {fqn!r} has in_features={in_features}, "
                    f"calibrated with {site.in_features}")
        # a graph break can split the model: only the layers this graph holds must be complete
        layers = {known[fqn].layer for fqn in linears if fqn in known}
        for fqn, site in known.items():
            if site.layer in layers and fqn not in linears:
                raise CalibrationMismatchError(
                    f"calibration does not match this model: calibrated linear {fqn!r} (layer {site.layer}) is not "
                    "in the model")

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "hist": [HIST_LOW, HIST_HIGH, HIST_BINS], "info": self.info,
                "sites": [s.as_dict() for s in self.sites],
                "greedy": {b: [[lvl, dict(levels)] for lvl, levels in path] for b, path in self.greedy.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Calibration:
        if state.get("format") != FORMAT_VERSION or list(state.get("hist", [])) != [HIST_LOW, HIST_HIGH, HIST_BINS]:
            raise ValueError(f"unsupported calibration format {state.get('format')!r} / histogram {state.get('hist')!r}")
        sites = [Site(d["name"], tuple(d["members"]), int(d["layer"]), d["block"], int(d["in_features"]),
                      int(d["params"]), d["hist"].to(torch.float64), int(d["count"]),
                      {int(h): v.to(torch.float64) for h, v in d.get("rotated", {}).items()}) for d in state["sites"]]
        greedy = {b: [(float(lvl), {k: float(v) for k, v in levels.items()}) for lvl, levels in path]
                  for b, path in state.get("greedy", {}).items()}
        return cls(sites, greedy, state.get("info", {}))

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        return cls.from_state_dict(load_file(path, weights_only=True))

    def __repr__(self) -> str:
        return (f"Calibration({self.info.get('model', '?')}, {len(self.sites)} sites, "
                f"{self.info.get('tokens', '?')} tokens, greedy={'yes' if self.greedy else 'no'})")


# ---------------------------------------------------------------------------------------------------------
# finding the sites of a model
# ---------------------------------------------------------------------------------------------------------
def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2's transposed linear


def _linear_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def block_of(fqn: str) -> str | None:
    """``model.layers.3.mlp.down_proj`` -> ``model.layers.3`` (the transformer block), or None."""
    index = layer_index(fqn)
    if index is None:
        return None
    parts = fqn.split(".")
    for i in range(1, len(parts)):
        if parts[i] == str(index) and parts[i - 1] in ("layers", "h", "layer", "blocks", "block"):
            return ".".join(parts[: i + 1])
    return None


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module FQN -> module for every linear inside a transformer block (lm_head, pooler etc. excluded)."""
    return {name: m for name, m in model.named_modules() if _is_linear(m) and block_of(name) is not None}


def _call_model(model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if accepts_cache else {}
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device), **extra)
    if isinstance(batch, Mapping):
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return model(**{**extra, **kwargs})
    if isinstance(batch, (tuple, list)):
        return model(*[b.to(device) if isinstance(b, torch.Tensor) else b for b in batch], **extra)
    raise TypeError(f"calibration batches must be tensors, dicts or tuples, got {type(batch).__name__}")


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return _first_tensor(value[0])
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"cannot find the output tensor of a block in {type(value).__name__}")


def _histogram(x: torch.Tensor) -> torch.Tensor:
    logs = torch.log2(x.detach().abs().float().clamp_min(2.0**HIST_LOW)).flatten()
    return torch.histc(logs, bins=HIST_BINS, min=HIST_LOW, max=HIST_HIGH).double().cpu()


def _effective_rotation(in_features: int, hadamard_size: int) -> int:
    from .quantize import effective_sizes

    return effective_sizes(in_features, 128, hadamard_size, 1)[1]


@functools.lru_cache(maxsize=32)
def _signs(padded: int, seed: int) -> torch.Tensor:
    from ..kernels.lut_format import random_signs

    return random_signs(padded, seed)


def _rotated_histogram(x: torch.Tensor, hadamard_size: int, seed: int) -> torch.Tensor:
    """Histogram of ``|z| / rms(z's block)`` for ``z = H_h (d * x) / sqrt(h)`` with lut_quant's random signs
    ``d`` (same seed and padding rule, so the same rotation whenever the seeds agree)."""
    from ..kernels.fwht import fwht_reference

    h = hadamard_size
    x = x.detach().float().reshape(-1, x.shape[-1])
    kp = -(-x.shape[-1] // h) * h
    x = torch.nn.functional.pad(x, (0, kp - x.shape[-1]))
    signs = _signs(kp, seed).to(x.device)
    z = fwht_reference(x, signs, h, 1.0 / math.sqrt(h)).reshape(-1, h)
    rms = z.pow(2).mean(-1, keepdim=True).sqrt()
    ratio = (z.abs() / rms.clamp_min(1e-30)).clamp_max(ROTATED_HIST_MAX * (1 - 1e-7))
    ratio = ratio[(rms > 0).expand_as(ratio)]
    return torch.histc(ratio, bins=ROTATED_HIST_BINS, min=0.0, max=ROTATED_HIST_MAX).double().cpu()


@contextlib.contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def thresholded(model: torch.nn.Module, thresholds: Mapping[str, float]):
    """Inside the block, each linear named in ``thresholds`` sees ``x * 1[|x| > t]`` (eager, for evaluation)."""
    modules = dict(model.named_modules())
    handles = []
    for fqn, t in thresholds.items():
        if t <= 0:
            continue

        def pre(module, args, t=t):
            x = args[0]
            return (torch.where(x.abs() > t, x, torch.zeros((), dtype=x.dtype, device=x.device)), *args[1:])

        handles.append(modules[fqn].register_forward_pre_hook(pre))
    with _hooks(handles):
        yield


# ---------------------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    greedy: bool = True,
    greedy_step: float = 0.05,
    greedy_max: float = 0.9,
    greedy_batches: int = 2,
    max_batches: int | None = None,
    progress: bool = True,
    rotations: Iterable[int] = (512,),
    rotation_seed: int = 0,
) -> Calibration:
    """Run ``model`` (HF causal LM or encoder) on ``batches`` and return a :class:`Calibration`.

    ``batches``: token-id tensors, or dicts/tuples of model arguments. The first ``greedy_batches`` batches'
    block inputs are kept (on the model's device) for the greedy search, which then runs per block with
    step ``greedy_step`` (of parameter-weighted block sparsity) up to ``greedy_max``.

    ``rotations``: ``lut_quant.hadamard_size`` values for which the statistics of thresholding in the *rotated*
    basis are also recorded (``|z| / rms`` per block of ``z = R x``, at the size lut_quant actually uses for each
    input width; used when ``sparsity`` meets a ``lut_quant`` linear rotated by that size, see
    :mod:`transfigure.kernels.rotated_sparse_lut`), with the random signs of ``lut_quant.seed = rotation_seed``.
    ``()`` records none.
    """
    rotations = tuple(int(h) for h in rotations)
    for h in rotations:
        if h < 1 or h & (h - 1):
            raise ValueError(f"calibrate: rotations must be powers of two, got {h}")
    from tqdm.auto import tqdm

    linears = block_linears(model)
    if not linears:
        raise ValueError("calibrate: found no linear layers inside transformer blocks (expected FQNs like "
                         "'model.layers.0.self_attn.q_proj' or 'transformer.h.0.attn.c_attn')")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    groups: list[list[str]] = []  # members sharing one input, in call order (first batch)
    hists: dict[str, torch.Tensor] = {}
    rotated_hists: dict[tuple[str, int], torch.Tensor] = {}
    counts: dict[str, int] = {}
    state = {"last": None, "first": True}
    site_of: dict[str, str] = {}

    def make_pre(fqn):
        def pre(module, args):
            x = args[0]
            if state["first"]:
                if state["last"] is not None and state["last"][0] is x:
                    groups[-1].append(fqn)
                else:
                    groups.append([fqn])
                state["last"] = (x, fqn)
                site_of[fqn] = groups[-1][0]
                if site_of[fqn] != fqn:
                    return None  # shares the input of an earlier member: counted once, under the site
            elif site_of.get(fqn, fqn) != fqn:
                return None
            h = _histogram(x)
            hists[fqn] = hists[fqn] + h if fqn in hists else h
            counts[fqn] = counts.get(fqn, 0) + x.numel()
            for size in {_effective_rotation(x.shape[-1], r) for r in rotations}:
                rh = _rotated_histogram(x, size, rotation_seed)
                key = (fqn, size)
                rotated_hists[key] = rotated_hists[key] + rh if key in rotated_hists else rh
            return None
        return pre

    blocks = sorted({block_of(f) for f in linears}, key=lambda b: (layer_index(b), b))
    modules = dict(model.named_modules())
    stored: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {b: [] for b in blocks}
    keep_inputs = {"on": True}

    def make_block_hook(block):
        def hook(module, args, kwargs, output):
            if keep_inputs["on"]:
                stored[block].append((args, dict(kwargs), _first_tensor(output).detach()))
        return hook

    handles = [m.register_forward_pre_hook(make_pre(f)) for f, m in linears.items()]
    if greedy:
        handles += [modules[b].register_forward_hook(make_block_hook(b), with_kwargs=True) for b in blocks]
    tokens = 0
    n_batches = 0
    with _hooks(handles):
        iterator = tqdm(batches, desc="TEAL calibration", disable=not progress, total=max_batches)
        for batch in iterator:
            if max_batches is not None and n_batches >= max_batches:
                break
            keep_inputs["on"] = greedy and n_batches < greedy_batches
            _call_model(model, batch, device)
            state["first"] = False
            state["last"] = None
            n_batches += 1
            tokens += batch.numel() if isinstance(batch, torch.Tensor) else 0
    if n_batches == 0:
        raise ValueError("calibrate: no batches")

    sites = []
    for members in groups:
        first = members[0]
        in_features = _linear_shape(linears[first])[0]
        params = sum(linears[m].weight.numel() for m in members)
        sites.append(Site(first, tuple(members), layer_index(first), block_of(first), in_features, params,
                          hists[first], counts[first],
                          {h: rotated_hists[(first, h)] for (f, h) in rotated_hists if f == first}))
    info = {"model": type(model).__name__, "batches": n_batches, "tokens": tokens, "rotation_seed": rotation_seed}
    calibration = Calibration(sites, None, info)
    if greedy:
        calibration.greedy = _greedy_paths(model, calibration, stored, greedy_step, greedy_max, progress)
    if was_training:
        model.train()
    return calibration


def _block_error(block: torch.nn.Module, inputs, thresholds: Mapping[str, float], prefix: str) -> float:
    """Relative squared L2 error of the block output over the stored inputs with ``thresholds`` applied."""
    modules = dict(block.named_modules())
    handles = []
    for fqn, t in thresholds.items():
        if t <= 0:
            continue
        local = fqn[len(prefix) + 1:]

        def pre(module, args, t=t):
            x = args[0]
            return (torch.where(x.abs() > t, x, torch.zeros((), dtype=x.dtype, device=x.device)), *args[1:])

        handles.append(modules[local].register_forward_pre_hook(pre))
    err = ref = 0.0
    with _hooks(handles):
        for args, kwargs, dense in inputs:
            out = _first_tensor(block(*args, **kwargs)).float()
            err += float((out - dense.float()).pow(2).sum())
            ref += float(dense.float().pow(2).sum())
    return err / max(ref, 1e-30)


def _greedy_paths(model, calibration: Calibration, stored, step: float, maximum: float, progress: bool):
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    by_block: dict[str, list[Site]] = {}
    for s in calibration.sites:
        by_block.setdefault(s.block, []).append(s)
    paths: dict[str, list[tuple[float, dict[str, float]]]] = {}
    cap = 0.995
    for block, sites in tqdm(by_block.items(), desc="TEAL greedy allocation", disable=not progress):
        total = sum(s.params for s in sites)
        levels = {s.name: 0.0 for s in sites}
        current_err = 0.0
        path = [(0.0, dict(levels))]
        while path[-1][0] < maximum - 1e-9:
            best = None
            for cand in sites:
                if levels[cand.name] >= cap:
                    continue
                trial = dict(levels)
                trial[cand.name] = min(cap, levels[cand.name] + step)
                gain = (trial[cand.name] - levels[cand.name]) * cand.params / total
                thresholds = {m: s.quantile(trial[s.name]) for s in sites for m in s.members}
                err = _block_error(modules[block], stored[block], thresholds, block)
                cost = (err - current_err) / gain
                if best is None or cost < best[0]:
                    best = (cost, err, trial)
            if best is None:
                break
            _, current_err, levels = best
            path.append((sum(s.params * levels[s.name] for s in sites) / total, dict(levels)))
        paths[block] = path
    return paths


# ---------------------------------------------------------------------------------------------------------
# evaluation helpers (used by tests and benchmarks)
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def measure_sparsity(model: torch.nn.Module, calibration: Calibration, thresholds: Mapping[str, float],
                     batches: Iterable[Any]) -> dict[str, float]:
    """Fraction of inputs at or below the threshold at each site (site name -> sparsity) on ``batches``."""
    modules = dict(model.named_modules())
    zeros: dict[str, float] = {}
    totals: dict[str, float] = {}
    handles = []
    for s in calibration.sites:
        t = thresholds[s.members[0]]

        def pre(module, args, name=s.name, t=t):
            x = args[0]
            zeros[name] = zeros.get(name, 0.0) + float((x.abs() <= t).sum())
            totals[name] = totals.get(name, 0.0) + x.numel()

        handles.append(modules[s.members[0]].register_forward_pre_hook(pre))
    device = next(model.parameters()).device
    with _hooks(handles):
        for batch in batches:
            _call_model(model, batch, device)
    return {name: zeros[name] / totals[name] for name in zeros}


@torch.no_grad()
def block_errors(model: torch.nn.Module, calibration: Calibration, thresholds: Mapping[str, float],
                 batches: Iterable[Any]) -> dict[str, float]:
    """Relative L2 error of each block's output with ``thresholds`` vs dense, blocks fed dense inputs."""
    modules = dict(model.named_modules())
    blocks = sorted({s.block for s in calibration.sites}, key=lambda b: (layer_index(b), b))
    stored: dict[str, list] = {b: [] for b in blocks}

    def make_hook(block):
        def hook(module, args, kwargs, output):
            stored[block].append((args, dict(kwargs), _first_tensor(output).detach()))
        return hook

    device = next(model.parameters()).device
    with _hooks([modules[b].register_forward_hook(make_hook(b), with_kwargs=True) for b in blocks]):
        for batch in batches:
            _call_model(model, batch, device)
    out = {}
    for b in blocks:
        local = {m: t for m, t in thresholds.items() if block_of(m) == b}
        out[b] = _block_error(modules[b], stored[b], local, b)
    return out
