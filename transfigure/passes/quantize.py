"""Hadamard rotation + lookup-table (LUT) weight quantization of linears: pass ``lut_quant`` (order 40).

Math (HIGGS, Malinovskii et al. 2024, arXiv:2411.17525; lookup GEMM after FLUTE, Guo et al. 2024,
arXiv:2407.10960). For each matched ``y = x W^T + b`` (``W``: out x in):

* rotation (``hadamard_size = h > 0``): rows of ``W`` are cut into blocks of ``h`` and each block ``v`` becomes
  ``R v = H_h (d * v) / sqrt(h)`` (Walsh-Hadamard, random signs ``d``). ``R`` is orthogonal, so
  ``x W^T = (R x)(R W)^T``; the op rotates ``x`` online (``transfigure::fwht``). Rotated rows are close to
  Gaussian even when ``W`` has outliers, which is what an MSE-optimal Gaussian grid wants.
* quantization: groups of ``group_size`` entries get one fp16 scale (their RMS for HIGGS grids, abs-max for
  NF4 / uniform / user codebooks); ``p``-vectors of ``W / s`` are replaced by the index of the nearest of the
  ``2**(p*bits)`` grid points. For a unit-variance Gaussian the error per weight is the grid MSE (4-bit
  Lloyd-Max: 0.0095), so a layer's relative weight error ``|W - Q(W)|^2 / |W|^2`` is about that number.
* the linear becomes one ``transfigure::lut_linear(x, codes, scales, table, signs, bias, bits, p, g, h, K)``
  node (see :mod:`transfigure.kernels.lut_format` for the layout), which keeps the linear's identity
  (``graph.replace_linear``) so later passes (sparsity 45, LoRA 50) find and compose with it.
* per-layer bits (``avg_bits``): HIGGS' dynamic allocation, ``min sum_l alpha_l mse(b_l)`` subject to the
  bit budget, solved exactly by dynamic programming (:mod:`.bit_allocation`); ``alpha_l`` are data-free
  sensitivities (:func:`.bit_allocation.estimate_sensitivities`), equal when not given.

Packing happens at compile time from the real parameters. Packed tensors are reused across recompiles (kept
per parameter) and cached on disk keyed by the weight bytes and the options (``cache``). The codes are
declared ``derived_from`` the weight: changing the weight in place after compiling is detected on the next
call (``weight_check`` compiler option: error by default, or recompile = repack). ``release_dense`` frees
the dense weight's storage after packing (shape and dtype kept, so Dynamo's guards hold and nothing
recompiles); the eager model can then no longer run those linears, and weights cannot be changed any more.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

import transfigure.kernels.lut_gemm  # noqa: F401  (registers transfigure::lut_linear and ::fwht)
from transfigure.compiler.graph import GraphView, LinearCall
from transfigure.compiler.options import OptionError, option
from transfigure.compiler.passes import Pass, PassResult, register_pass
from transfigure.kernels.autotune import cache_dir
from transfigure.kernels.grids import get_grid
from transfigure.kernels.lut_format import PackedWeight, content_key, pack

from .bit_allocation import allocate_bits
from .fuse_lut import LUTFusePass, span

__all__ = ["LUTQuantOptions", "LUTQuantPass", "WeightsReleasedError", "effective_sizes", "packed_weights"]

_RELEASED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> True once its storage was freed
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> {options key: PackedWeight}
_PACKED_VERSION: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> its _version when those were packed


def _packings(weight: torch.Tensor) -> dict:
    """The memory cache of ``weight``'s packings, emptied when the weight changed in place since (so
    ``weight_check="recompile"`` repacks instead of reusing stale codes)."""
    per_weight = _PACKED.setdefault(weight, {})
    if _PACKED_VERSION.get(weight) != weight._version:
        per_weight.clear()
        _PACKED_VERSION[weight] = weight._version
    return per_weight


class WeightsReleasedError(RuntimeError):
    """A pass needed a dense weight whose storage ``release_dense`` had freed."""


@dataclasses.dataclass(frozen=True)
class LUTQuantOptions:
    bits: int = option(4, "bits per weight (uniform allocation)", choices=(2, 3, 4))
    avg_bits: float | None = option(None, "average bits per weight: per-layer bits in {2,3,4} chosen by exact DP "
                                    "(HIGGS grids only); overrides bits", low=2.0, high=4.0)
    sensitivities: str | dict | None = option(None, "per-layer sensitivities for avg_bits: dict FQN -> alpha or "
                                              "a JSON file from bit_allocation.save_sensitivities (default: equal)")
    p: int = option(1, "grid dimension: 1 = scalar, 2 = pairs of weights share one code", choices=(1, 2))
    grid: str | tuple[float, ...] = option("higgs", "'higgs' (MSE-optimal Gaussian, RMS scales), 'nf4', "
                                           "'uniform' (abs-max scales), or a codebook of 2**(p*bits) values")
    group_size: int = option(128, "weights per fp16 scale (clamped to the padded in-features)",
                             choices=(64, 128, 256))
    scale_search: int = option(17, "MSE-optimal group scales: try this many multiples (0.6x-1.4x) of each group's "
                               "RMS / abs-max and keep the least-error one (0 or 1: plain RMS / abs-max)", low=0, high=256)
    hadamard_size: int = option(512, "Hadamard block (power of two <= 32768; 0 = no rotation); reduced to "
                                "the largest power of two dividing in-features when that is >= 64")
    random_signs: bool = option(True, "random +-1 signs before the Hadamard transform")
    seed: int = option(0, "seed of the random signs")
    modules: tuple[str, ...] = option(("*",), "fnmatch patterns over linear module FQNs")
    exclude: tuple[str, ...] = option(("lm_head", "*.lm_head", "embed_out", "*embed*"),
                                      "fnmatch patterns of FQNs never quantized (output layer, embeddings)")
    release_dense: bool = option(False, "free the dense weights' storage after packing (GPU memory drops)")
    cache: bool = option(True, "cache packed weights on disk, keyed by weight bytes + options")
    fuse_siblings: bool = option(True, "linears reading the same input (q/k/v, gate/up) keep codes and scales in "
                                 "one buffer and run as ONE lut_linear with one input rotation (pass lut_fuse, "
                                 "after sparsity and LoRA; disable=['lut_fuse'] keeps them apart)")
    fuse_norms: bool = option(True, "a residual add + RMSNorm feeding a rotated linear runs inside its input "
                              "rotation (pass norm_fuse; one launch fewer per norm at decode; inference graphs)")
    fuse_activations: bool = option(True, "a SwiGLU product silu(gate) * up feeding a rotated linear runs inside "
                                    "its input rotation (pass act_fuse; inference graphs)")

    def __post_init__(self):
        h = self.hadamard_size
        if h < 0 or (h and (h & (h - 1) or h > 32768)):
            raise OptionError("lut_quant.hadamard_size", f"got {h}; expected 0 or a power of two <= 32768")
        if isinstance(self.grid, str):
            if self.grid not in ("higgs", "nf4", "uniform"):
                raise OptionError("lut_quant.grid", f"got {self.grid!r}; expected 'higgs', 'nf4', 'uniform' or a codebook")
            if self.grid == "nf4" and (self.bits != 4 or self.p != 1 or self.avg_bits is not None):
                raise OptionError("lut_quant.grid", "'nf4' has 16 scalar values: it needs bits=4, p=1, no avg_bits")
            if self.grid == "uniform" and self.p != 1:
                raise OptionError("lut_quant.grid", "'uniform' is scalar: it needs p=1")
        else:
            if len(self.grid) != 2 ** (self.p * self.bits):
                raise OptionError("lut_quant.grid", f"a codebook needs 2**(p*bits) = {2 ** (self.p * self.bits)} "
                                  f"values, got {len(self.grid)}")
        if self.avg_bits is not None and self.grid != "higgs":
            raise OptionError("lut_quant.avg_bits", "per-layer allocation needs grid='higgs' (its MSE is known)")


def effective_sizes(in_features: int, group_size: int, hadamard_size: int, p: int) -> tuple[int, int]:
    """(group, hadamard) sizes actually used for a layer with ``in_features`` columns."""
    pow2_up = 1 << max(0, (in_features - 1).bit_length())
    g = max(32 * p, min(group_size, pow2_up))
    h = hadamard_size
    if h:
        divides = in_features & -in_features  # largest power of two dividing in_features
        h = min(h, divides) if divides >= 64 else min(h, pow2_up)
    return g, h


def _key_string(opts: LUTQuantOptions, bits: int, g: int, h: int) -> str:
    grid = opts.grid if isinstance(opts.grid, str) else ",".join(f"{v:.6g}" for v in opts.grid)
    return f"v1|{grid}|b{bits}|p{opts.p}|g{g}|h{h}|s{int(opts.random_signs)}|seed{opts.seed}|ss{opts.scale_search}"


def _disk_path(key: str) -> Path:
    return cache_dir() / "lut_quant" / f"{key}.npz"


def _write_npz(path: Path, packed: PackedWeight) -> None:
    """numpy files: independent of the fake/meta tensor modes active while a pass runs under torch.compile."""
    import numpy as np

    arrays, scalars = {}, {}
    for f in dataclasses.fields(packed):
        v = getattr(packed, f.name)
        if isinstance(v, torch.Tensor):
            arrays[f.name] = v.detach().cpu().numpy()
        elif v is not None:
            scalars[f.name] = v
    with open(path, "wb") as fh:
        np.savez(fh, __meta__=np.array(json.dumps(scalars)), **arrays)


def _read_npz(path: Path) -> dict:
    import numpy as np

    with np.load(path) as data:
        fields = json.loads(str(data["__meta__"]))
        for name in ("codes", "scales", "table", "signs"):
            fields[name] = torch.from_numpy(data[name].copy()) if name in data else None
    return fields


_CACHE_WRITER: ThreadPoolExecutor | None = None
_PENDING_WRITES: dict[Path, tuple[Future, int]] = {}  # cache file -> (its write, bytes it holds)
_PENDING_LOCK = threading.Lock()
MAX_PENDING_WRITE_BYTES = 2 << 30
"""Packed bytes the background writer may hold before a new write waits for older ones (bounds the extra
device memory that queued packings keep alive)."""


def _write_in_background(path: Path, packed: PackedWeight) -> None:
    """Write a disk-cache entry on a worker thread: a cold compile does not wait for the host copies and the
    disk (8B model: ~4 GB of codes). A reader of the same entry in this process waits for it
    (:func:`_wait_for_write`); the interpreter joins the worker at exit, so no entry is lost."""
    global _CACHE_WRITER
    size = packed.codes.numel() * packed.codes.element_size() + packed.scales.numel() * 2

    def write() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            _write_npz(tmp, packed)
            tmp.replace(path)
        except OSError as error:  # a read-only or full disk costs the next compile a quantization, nothing else
            logging.getLogger(__name__).warning("lut_quant: could not write cache entry %s: %s", path, error)
        finally:
            with _PENDING_LOCK:
                _PENDING_WRITES.pop(path, None)

    with _PENDING_LOCK:
        if _CACHE_WRITER is None:
            _CACHE_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transfigure-cache-writer")
        queued = list(_PENDING_WRITES.values())
    held = sum(n for _, n in queued)
    for future, n in queued:  # oldest first
        if held + size <= MAX_PENDING_WRITE_BYTES:
            break
        future.result()
        held -= n
    with _PENDING_LOCK:  # held across submit: the write's own removal of its entry comes after this insertion
        _PENDING_WRITES[path] = (_CACHE_WRITER.submit(write), size)


def _wait_for_write(path: Path) -> None:
    with _PENDING_LOCK:
        pending = _PENDING_WRITES.get(path)
    if pending is not None:
        pending[0].result()


def flush_cache_writes() -> None:
    """Wait until every packed weight queued for the disk cache is written."""
    with _PENDING_LOCK:
        queued = list(_PENDING_WRITES.values())
    for future, _ in queued:
        future.result()


def _pack_weight(weight: torch.Tensor, opts: LUTQuantOptions, bits: int, g: int, h: int) -> tuple[PackedWeight, str]:
    """Pack (or fetch from the per-parameter memory cache / the disk cache). Returns (packed, source)."""
    key = _key_string(opts, bits, g, h)
    per_weight = _packings(weight)
    if key in per_weight:
        return per_weight[key], "memory"
    if _RELEASED.get(weight):
        raise WeightsReleasedError("lut_quant: this weight's dense storage was released (release_dense=True) and "
                                   f"no packing for {key} exists; reload the model to quantize differently")
    grid = get_grid(opts.grid, bits, opts.p)
    disk_key = None
    if opts.cache:
        disk_key = content_key(weight, quant=key)
        path = _disk_path(disk_key)
        _wait_for_write(path)
        if path.exists():
            try:
                fields = _read_npz(path)
                packed = PackedWeight(**fields).to(weight.device)
                if packed.codes.device.type == "meta":
                    raise RuntimeError("loaded onto meta")
                per_weight[key] = packed
                return packed, "disk"
            except Exception as error:  # a corrupt or old entry: quantize again
                logging.getLogger(__name__).warning("lut_quant: ignoring cache entry %s: %s", path, error)
    packed = pack(weight, grid.table, bits=bits, p=opts.p, group_size=g, hadamard_size=h,
                  signs_seed=opts.seed if opts.random_signs else None, scale_mode=grid.scale_mode, grid=grid.name,
                  scale_search=opts.scale_search)
    if disk_key is not None:
        _write_in_background(_disk_path(disk_key), packed)
    per_weight[key] = packed
    return packed, "packed"


def packed_weights(weight: torch.Tensor) -> dict[str, PackedWeight]:
    """The packings made so far for ``weight`` (options key -> :class:`PackedWeight`)."""
    return dict(_PACKED.get(weight, {}))


def _load_sensitivities(value) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {str(k): float(v) for k, v in json.loads(Path(value).read_text())["sensitivities"].items()}


@register_pass
class LUTQuantPass(Pass):
    name = "lut_quant"
    Options = LUTQuantOptions
    order = 40
    description = "Hadamard-rotated lookup-table weight quantization (HIGGS grids / NF4 / uniform, 2-4 bits)"

    def implied_passes(self) -> list[Pass]:
        from .fuse_activation import ActivationFusePass
        from .fuse_norm import NormFusePass

        implied: list[Pass] = [LUTFusePass()] if self.options.fuse_siblings else []
        implied += [NormFusePass()] if self.options.fuse_norms else []
        return implied + ([ActivationFusePass()] if self.options.fuse_activations else [])

    def run(self, graph: GraphView) -> PassResult:
        opts: LUTQuantOptions = self.options
        result = PassResult(self.name)
        sites: list[tuple[LinearCall, torch.Tensor, torch.Tensor, int, int]] = []
        for site in graph.linear_calls():
            if "transfigure_linear" in site.node.meta and site.node.target is not torch.nn.functional.linear:
                if "lut_linear" in str(site.node.target):
                    result.skip(site, "already LUT-quantized")
                    continue
            fqn = site.fqn or ""
            if not any(fnmatch.fnmatch(fqn, pat) for pat in opts.modules):
                continue
            if any(fnmatch.fnmatch(fqn, pat) or fqn.rsplit(".", 1)[-1] == pat for pat in opts.exclude):
                result.skip(site, "excluded (output layer / embedding)")
                continue
            if site.node.target not in (torch.nn.functional.linear, torch._C._nn.linear, torch.addmm):
                result.skip(site, f"rewritten by an earlier pass into {site.node.target}; not quantized")
                continue
            if not isinstance(site.weight, fx.Node) or site.weight.op != "placeholder":
                result.skip(site, "weight is not a parameter")
                continue
            weight = graph.tensor(site.weight)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
                result.skip(site, "weight is not a 2-D floating-point tensor")
                continue
            dense = weight.t() if site.transposed else weight
            n, k = dense.shape
            g, h = effective_sizes(k, opts.group_size, opts.hadamard_size, opts.p)
            sites.append((site, weight, dense, g, h))

        bits_of = {}
        if opts.avg_bits is not None and sites:
            alphas = _load_sensitivities(opts.sensitivities)
            missing = [s.fqn for s, *_ in sites if alphas and s.fqn not in alphas]
            if missing:
                result.note(f"no sensitivity for {len(missing)} layers (e.g. {missing[0]}): using the mean")
            mean = sum(alphas.values()) / len(alphas) if alphas else 1.0
            layers = [(s.fqn, d.numel(), alphas.get(s.fqn, mean)) for s, _, d, g, h in sites]
            choice = allocate_bits(layers, opts.avg_bits, p=opts.p, group_size=opts.group_size)
            bits_of = dict(zip([s.node.name for s, *_ in sites], choice))
            result.note(f"avg_bits={opts.avg_bits}: bits per layer {choice}")

        packed_sites = []
        for site, weight, dense, g, h in sites:
            bits = bits_of.get(site.node.name, opts.bits)
            try:
                if site.transposed:
                    packed, source = _pack_transposed(weight, opts, bits, g, h)
                else:
                    packed, source = _pack_weight(weight, opts, bits, g, h)
            except WeightsReleasedError as error:
                result.skip(site, str(error))
                continue
            packed_sites.append((site, weight, bits, g, h, packed, source))
        if opts.fuse_siblings:
            packed_sites = _share_sibling_buffers(packed_sites, opts)

        tables: dict[str, fx.Node] = {}
        for site, weight, bits, g, h, packed, source in packed_sites:
            name = site.weight_fqn or site.fqn
            codes = graph.add_input(f"{name}.lut_codes", packed.codes, derived_from=[weight])
            scales = graph.add_input(f"{name}.lut_scales", packed.scales)
            tkey = f"{packed.grid}|{bits}|{packed.p}|{packed.table.device}"
            if tkey not in tables:
                tables[tkey] = graph.add_input(f"lut_table.{packed.grid}.b{bits}p{packed.p}", packed.table)
            signs = graph.add_input(f"{name}.lut_signs", packed.signs) if packed.signs is not None else None
            with graph.graph.inserting_before(site.node):
                new = graph.graph.call_function(
                    torch.ops.transfigure.lut_linear.default,
                    (site.input, codes, scales, tables[tkey], signs, site.bias, bits, packed.p, g, h, packed.in_features),
                )
            weight_node = site.weight
            graph.replace_linear(site, new)
            detail = (f"lut_linear {packed.grid} {bits}-bit p={packed.p} g{g} "
                      f"{'H' + str(h) if h else 'no rotation'}"
                      f"{' pad ' + str(packed.in_features) + '->' + str(packed.padded_in_features) if packed.padded_in_features != packed.in_features else ''}"
                      f" ({source})")
            if opts.release_dense:
                if weight_node.users:
                    detail += "; dense weight kept (used elsewhere in the graph)"
                else:
                    _release(weight)
                    detail += "; dense weight released"
            result.rewrote(site, detail)
        return result


def _share_sibling_buffers(packed_sites: list, opts: LUTQuantOptions) -> list:
    """Linears that read the same input node with the same format get their codes and scales moved into one
    buffer each (row blocks, in graph order), so ``lut_fuse`` can run them as one GEMV over a view of it
    without copying. Each linear keeps its own ``lut_linear`` node (over its row-block view) until then, so
    sparsity and LoRA still see q, k, v, gate and up one by one. The per-parameter cache is updated to the
    views, so a recompile finds them adjacent already (no second copy)."""
    groups: dict[tuple, list[int]] = {}
    for i, (site, weight, bits, g, h, packed, source) in enumerate(packed_sites):
        if packed.codes.device.type == "meta":
            continue
        key = (site.input, bits, g, h, packed.p, packed.in_features, packed.padded_in_features, packed.grid,
               packed.codes.device, packed.codes.shape[1])
        groups.setdefault(key, []).append(i)
    out = list(packed_sites)
    for members in groups.values():
        if len(members) < 2:
            continue
        parts = [packed_sites[i][5] for i in members]
        if span([p.codes for p in parts]) is not None and span([p.scales for p in parts]) is not None:
            continue  # already one buffer (a recompile)
        if any(p.signs is not None and not torch.equal(p.signs, parts[0].signs) for p in parts) or \
                any((p.signs is None) != (parts[0].signs is None) for p in parts):
            continue
        codes = torch.cat([p.codes for p in parts])
        scales = torch.cat([p.scales for p in parts])
        row = 0
        for i, p in zip(members, parts):
            site, weight, bits, g, h, _, source = packed_sites[i]
            n = p.codes.shape[0]
            shared = dataclasses.replace(p, codes=codes[row : row + n], scales=scales[row : row + n])
            row += n
            per_weight = _PACKED.setdefault(weight, {})
            for key, cached in list(per_weight.items()):
                if cached is p:
                    per_weight[key] = shared
            out[i] = (site, weight, bits, g, h, shared, source)
    return out


def _pack_transposed(weight: torch.Tensor, opts, bits, g, h):
    """GPT-2 Conv1D stores (in, out): pack its transpose (a temporary copy), cached per parameter like the others."""
    key = _key_string(opts, bits, g, h)
    per_weight = _packings(weight)
    if key in per_weight:
        return per_weight[key], "memory"
    if _RELEASED.get(weight):
        raise WeightsReleasedError("lut_quant: dense weight released; reload the model to quantize differently")
    transposed = weight.detach().t().contiguous()
    per_weight[key], source = _pack_weight(transposed, opts, bits, g, h)
    _PACKED.pop(transposed, None)
    _PACKED_VERSION.pop(transposed, None)
    return per_weight[key], source


def _release(weight: torch.Tensor) -> None:
    """Free the storage of ``weight`` but keep its metadata (shape/stride/dtype: Dynamo's guards still hold)."""
    if _RELEASED.get(weight):
        return
    storage = weight.untyped_storage()
    storage.resize_(0)
    _RELEASED[weight] = True
