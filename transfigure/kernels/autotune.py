"""Autotuning for Triton launchers, on the GPU and in interpreter mode.

``triton.autotune`` cannot be used directly in CI: with two or more configs it needs an active GPU
driver, and Triton's own result cache differs across the versions we support (3.6 on the lent GPU, 3.9 on
CPU machines). :class:`Autotuner` benchmarks each :class:`Config` once per *key* (shapes, dtypes, device),
remembers the winner in memory and on disk (``$TRANSFIGURE_CACHE_DIR/autotune/<name>.json``, default
``~/.cache/transfigure``), and in interpreter mode uses the first config unless
``TRANSFIGURE_AUTOTUNE_CPU=1`` asks for a CPU timing of every config.

The package ships tuning tables measured on the GPUs we benchmark (``transfigure/data/autotune/<name>.json``,
same format): their keys name the GPU model and Triton version, so they apply only there, and only until the
user's own cache has an entry for the key. They spare a fresh machine the benchmarking of every candidate on
the first compile (8B-shaped Llama, H100: most of the extra cold compile time). ``TRANSFIGURE_SHIPPED_TUNING=0``
ignores them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

from .registry import interpreter_mode


@dataclasses.dataclass(frozen=True)
class Config:
    """One candidate launch: meta-parameters passed to the kernel plus warps/stages."""

    meta: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2

    def describe(self) -> str:
        items = ", ".join(f"{k}={v}" for k, v in sorted(self.meta.items()))
        return f"{items}, num_warps={self.num_warps}, num_stages={self.num_stages}"

    def as_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}


def cache_dir() -> Path:
    root = os.environ.get("TRANSFIGURE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "transfigure")
    return Path(root)


SHIPPED_TUNING_DIR = Path(__file__).resolve().parent.parent / "data" / "autotune"


def _device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def _bench_cpu(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def copies_beyond_l2(bytes_per_copy: int, l2_bytes: int | None = None, device: int = 0) -> int:
    """How many copies of ``bytes_per_copy`` bytes make one round read ~3x the L2 cache (``l2_bytes``, by default
    the GPU's; at most 32): a decode step reads each weight once from HBM, so timing one buffer over and over
    would time the cache."""
    if l2_bytes is None:
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) if torch.cuda.is_available() else 50 << 20
    return max(1, min(32, -(-3 * l2_bytes // max(int(bytes_per_copy), 1))))


def _bench_gpu(fn: Callable[[], Any], rep: int = 20) -> float:
    """Kernel time as a CUDA-graph replay sees it (decode loops run under CUDA graphs).

    Plain ``do_bench`` times launches as Python issues them, and for 10-50 us kernels that mostly measures
    host overhead, so every config looks alike; it is the fallback when a launch cannot be captured.
    """
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except Exception:
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def time_per_call(calls: Sequence[Callable[[], Any]], rep: int = 20) -> float:
    """Median milliseconds per call of ``calls`` (e.g. one per weight copy of :func:`rotating_copies`), run back
    to back in one CUDA-graph replay: how the autotuner and the GPU benchmarks time kernels."""
    calls = list(calls)
    return _bench_gpu(lambda: [call() for call in calls], rep) / len(calls)


def rotating_copies(args: tuple, min_bytes: int = 1 << 20, l2_bytes: int | None = None) -> list[tuple]:
    """``args`` followed by copies whose tensors of at least ``min_bytes`` are cloned, as many sets as make one
    round over them read ~3x the L2 cache (``l2_bytes``; by default the GPU's, and no copies off the GPU).

    Timing configs over these ranks them as a decode step runs them, with weights from HBM: replaying one set
    keeps a 4-bit 8B-layer weight (29 MB) in the H100's 50 MB L2, and the config that wins there lost up to
    1.34x against the best one from HBM (benchmarks/results/explore_cold_tuning_lut.md).
    ``TRANSFIGURE_AUTOTUNE_L2=hot`` times one set."""
    if os.environ.get("TRANSFIGURE_AUTOTUNE_L2", "cold") == "hot":
        return [args]

    def big(a: Any) -> bool:
        return isinstance(a, torch.Tensor) and a.numel() * a.element_size() >= min_bytes

    total = sum(a.numel() * a.element_size() for a in args if big(a))
    if not total:
        return [args]
    device = next(a.device for a in args if big(a))
    if l2_bytes is None and device.type != "cuda":
        return [args]
    n = copies_beyond_l2(total, l2_bytes, device.index or 0)
    return [args] + [tuple(a.clone() if big(a) else a for a in args) for _ in range(n - 1)]


class Autotuner:
    """Pick the fastest :class:`Config` for ``launch(config, *args)`` per ``key(*args)``.

    ``launch`` must be safe to call repeatedly on the same arguments (it allocates its own outputs, or
    zeroes accumulators itself), because benchmarking runs it several times. ``prune`` may drop configs
    that cannot apply to a given input (e.g. a block larger than the problem).
    """

    def __init__(
        self,
        name: str,
        configs: Sequence[Config],
        key: Callable[..., Hashable],
        launch: Callable[..., Any],
        prune: Callable[[Sequence[Config], tuple], Sequence[Config]] | None = None,
    ):
        if not configs:
            raise ValueError(f"autotuner {name!r} needs at least one config")
        self.name = name
        self.configs = list(configs)
        self.key = key
        self.launch = launch
        self.prune = prune
        self._best: dict[str, Config] = {}
        self._fast: dict[Hashable, Config] = {}  # (device index, key) -> config: the per-call path
        self._lock = threading.Lock()
        self._disk_loaded = False
        self.last_timings: dict[str, float] = {}
        self.timings: dict[str, dict[str, float]] = {}  # key -> config description -> ms, for reports

    # -- persistence -------------------------------------------------------------------------------
    @property
    def cache_file(self) -> Path:
        return cache_dir() / "autotune" / f"{self.name}.json"

    @property
    def shipped_file(self) -> Path:
        return SHIPPED_TUNING_DIR / f"{self.name}.json"

    def _load_disk(self) -> None:
        if self._disk_loaded:
            return
        self._disk_loaded = True
        by_json = {json.dumps(c.as_json(), sort_keys=True): c for c in self.configs}
        files = [self.cache_file]
        if os.environ.get("TRANSFIGURE_SHIPPED_TUNING", "1") != "0":
            files.insert(0, self.shipped_file)  # the user's own measurements win
        for path in files:
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for key, entry in stored.items():
                # a config no longer in the candidate list is ignored (the key is tuned again)
                config = by_json.get(json.dumps(entry.get("config"), sort_keys=True))
                if config is not None:
                    self._best[key] = config

    def _store_disk(self, key: str, config: Config, timings: dict[str, float]) -> None:
        path = self.cache_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                stored = {}
            stored[key] = {"config": config.as_json(), "timings_ms": timings}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(stored, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home must not break inference; the in-memory choice still holds

    # -- selection ---------------------------------------------------------------------------------
    def _full_key(self, args: tuple) -> str:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        import triton

        # "|hbm": timed over weights from HBM (rotating_copies); entries tuned on one buffer are tuned again
        hbm = "|hbm" if device.type == "cuda" and os.environ.get("TRANSFIGURE_AUTOTUNE_L2", "cold") != "hot" else ""
        return f"{_device_tag(device)}|triton{triton.__version__}{hbm}|{self.key(*args)!r}"

    def best_config(self, *args: Any) -> Config:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        fast_key = (first.device.index if first is not None else None, self.key(*args))
        found = self._fast.get(fast_key)
        if found is not None:
            return found
        config = self._select(args)
        capturing = first is not None and first.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing:
            self._fast[fast_key] = config
        return config

    def _select(self, args: tuple) -> Config:
        candidates = self.prune(self.configs, args) if self.prune else self.configs
        if not candidates:
            raise RuntimeError(f"autotuner {self.name!r}: every config was pruned for this input")
        tune_on_cpu = os.environ.get("TRANSFIGURE_AUTOTUNE_CPU", "0") == "1"
        if len(candidates) == 1 or (interpreter_mode() and not tune_on_cpu):
            return candidates[0]
        key = self._full_key(args)
        with self._lock:
            self._load_disk()
            if key in self._best and self._best[key] in candidates:
                return self._best[key]
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None and first.is_cuda and torch.cuda.is_current_stream_capturing():
                return candidates[0]  # no benchmarking inside someone else's CUDA-graph capture
            arg_sets = [args] if interpreter_mode() else rotating_copies(args)
            timings: dict[str, float] = {}
            failures: dict[str, str] = {}
            for config in candidates:
                calls = [lambda c=config, a=a: self.launch(c, *a) for a in arg_sets]
                try:
                    timings[config.describe()] = _bench_cpu(calls[0]) if interpreter_mode() else time_per_call(calls)
                except Exception as error:  # noqa: BLE001  (out of shared memory / registers, or a compile error)
                    failures[config.describe()] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[-1]}"
            if not timings:
                raise RuntimeError(f"autotuner {self.name!r}: no config could run for key {key}; failures: {failures}")
            resourceless = [d for d, e in failures.items() if "out of resource" not in e.lower() and "OutOfResources" not in e]
            if resourceless:  # a config that fails for another reason is a kernel bug: say so, but keep the model running
                warnings.warn(f"autotuner {self.name!r}: {len(resourceless)} config(s) failed for key {key} and were "
                              f"skipped, e.g. {resourceless[0]}: {failures[resourceless[0]]}", RuntimeWarning, stacklevel=2)
            best_name = min(timings, key=timings.__getitem__)
            # Config holds a dict (unhashable): match by description
            best = next(c for c in candidates if c.describe() == best_name)
            self._best[key] = best
            self.last_timings = timings
            self.timings[key] = timings
            self._store_disk(key, best, timings)
            return best

    def __call__(self, *args: Any) -> Any:
        return self.launch(self.best_config(*args), *args)
