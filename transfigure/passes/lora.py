"""LoRA: trainable low-rank adapters attached to matched linears (Hu et al. 2021, "LoRA", arXiv:2106.09685).

Math (PEFT's conventions, so adapters are interchangeable with ``peft``): for a linear ``y = x W^T + b`` with
``W`` (out x in), the adapter adds

    y = x W^T + b + s * dropout(x) A^T B^T,     A (r x in), B (out x r),  s = alpha / r  (alpha / sqrt(r): rsLoRA)

``A`` starts kaiming-uniform (``a = sqrt(5)``, PEFT's default) or Gaussian (std 1/r), ``B`` at zero, so the
adapted model starts equal to the base model. Merging for inference is ``W += s B A`` (``W^T += (s B A)^T`` for
GPT-2's ``Conv1D``, whose weight is stored in x out).

What the pass does to the Dynamo graph: every ``F.linear`` (and GPT-2 ``Conv1D`` ``addmm``) whose module FQN
matches ``target_modules`` becomes one ``transfigure::lora_linear(x, W, b, A, B, s, s)`` call -- a fused base
GEMM whose epilogue adds the rank-r product (kernels/lora.py) -- with ``A`` and ``B`` as *trainable extra
inputs*. A linear an earlier pass already replaced (e.g. ``transfigure::lut_linear`` from quantization, which
carries ``meta["transfigure_linear"]``) keeps its node as the base and gets ``+ s (x A^T) B^T`` added after it
(QLoRA-style: frozen quantized base, full-precision adapters). With ``dropout > 0`` the low-rank branch reads
``F.dropout(x)`` and is left unfused.

Adapters are created once per base weight and live in a registry keyed by that weight tensor, so recompiles
(new shapes, ``torch._dynamo.reset()``) reuse the same ``A``/``B`` -- and the optimizer keeps training them.
``transfigure.trainable_parameters(model)`` (after the first call) or :func:`lora_parameters` (any time after
adapters exist) hands them to any optimizer. Base weights are *not* frozen by the pass (Dynamo has already
traced them as they are): freeze the model first (``model.requires_grad_(False)``), as ``peft`` does.

Helpers: :func:`lora_state_dict` / :func:`save_lora` / :func:`load_lora` use PEFT's file layout
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<fqn>.lora_A.weight``), so
``PeftModel.from_pretrained`` loads ours and we load peft's; :func:`merge_lora` / :func:`unmerge_lora` fold the
adapters into the base weights and back.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

import transfigure.kernels.lora  # noqa: F401  (registers transfigure::lora_linear)
from transfigure.compiler.graph import LINEAR_TARGETS, GraphView, LinearCall
from transfigure.compiler.options import OptionError, load_file, option
from transfigure.compiler.passes import Pass, PassResult, register_pass

__all__ = [
    "LoraAdapter",
    "LoraOptions",
    "LoraPass",
    "adapters",
    "find_sites",
    "load_lora",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
    "unmerge_lora",
]

PEFT_PREFIX = "base_model.model."
_OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output_layer")


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    r: int = option(8, "adapter rank (must not exceed min(in, out) of any matched layer)", low=1)
    alpha: float = option(8.0, "scale numerator: s = alpha / r (alpha / sqrt(r) with rslora)")
    target_modules: str | tuple[str, ...] = option(
        ("q_proj", "v_proj"),
        "PEFT-style: list of module-name suffixes (or fnmatch patterns with '*'), a regex string matched against "
        "the full FQN, or 'all-linear' (every linear but the output layer)",
    )
    dropout: float = option(0.0, "dropout on the adapter input (training); > 0 leaves the branch unfused", low=0.0, high=1.0, high_open=True)
    rslora: bool = option(False, "rank-stabilized scale alpha / sqrt(r)")
    init: Literal["kaiming", "gaussian"] = option("kaiming", "initialization of A (B always starts at zero)")
    seed: int = option(0, "seed of the adapter initialization (per layer: seed + hash of its FQN)")
    adapter_dtype: Literal["float32", "base"] = option("float32", "adapter dtype: float32 (PEFT's default autocast) or the base weight's")
    fused: bool = option(True, "use the fused base+low-rank op; False emits plain linears (Inductor fuses what it can)")

    def __post_init__(self):
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            raise OptionError("lora.target_modules", "got an empty list; give module names, a regex or 'all-linear'")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclasses.dataclass
class LoraAdapter:
    """The adapter of one base weight. ``A`` (r x in) and ``B`` (out x r) are leaf tensors that require grad."""

    fqn: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    rslora: bool
    transposed: bool = False  # GPT-2 Conv1D: base weight stored (in x out)
    merged: bool = False
    target_modules: Any = None

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def delta(self) -> torch.Tensor:
        """``s B A`` in the base weight's layout (out x in, or in x out for Conv1D)."""
        d = (self.B.detach().double() @ self.A.detach().double()) * self.scale
        return d.t() if self.transposed else d


# Adapters keyed by the base weight tensor they belong to (the same weak-key mechanism as GraphView.cached).
_ADAPTERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


# -- matching ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Site:
    call: LinearCall
    weight: torch.Tensor
    in_features: int
    out_features: int
    transposed: bool  # Conv1D addmm(bias, x, W[in, out])
    plain: bool  # an unrewritten F.linear / addmm that the fused op can replace


def find_sites(graph: GraphView) -> list[_Site]:
    sites = []
    for call in graph.linear_calls():  # includes GPT-2 Conv1D addmm sites (call.transposed)
        if not isinstance(call.weight, fx.Node) or call.weight.op != "placeholder":
            continue
        weight = graph.tensor(call.weight)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        transposed = bool(getattr(call, "transposed", False))
        if transposed:
            in_f, out_f = weight.shape
        else:
            out_f, in_f = weight.shape
        plain = "transfigure_linear" not in call.node.meta and (call.node.target in LINEAR_TARGETS or transposed)
        sites.append(_Site(call, weight, in_f, out_f, transposed, plain))
    return sites


def _matches(fqn: str, target_modules: str | tuple[str, ...], output_layers: set[str]) -> bool:
    if target_modules == "all-linear":
        return fqn not in output_layers and fqn.rsplit(".", 1)[-1] not in _OUTPUT_LAYER_NAMES
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, fqn) is not None
    for entry in target_modules:
        if any(c in entry for c in "*?["):
            if fnmatch.fnmatchcase(fqn, entry):
                return True
        elif fqn == entry or fqn.endswith("." + entry):
            return True
    return False


def _output_layers(graph: GraphView, sites: list[_Site]) -> set[str]:
    """FQNs of linears that produce graph outputs directly or share their weight with an embedding (tied)."""
    embedding_weights = set()
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target in (torch.nn.functional.embedding, torch.embedding):
            w = node.args[1] if node.target is torch.nn.functional.embedding else node.args[0]
            if isinstance(w, fx.Node) and w.op == "placeholder":
                embedding_weights.add(id(graph.tensor(w)))
    return {s.call.fqn for s in sites if id(s.weight) in embedding_weights}


def _no_match_error(target_modules, fqns: list[str]) -> OptionError:
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    names = sorted(set(fqns))
    suffixes = sorted({f.rsplit(".", 1)[-1] for f in names})
    near: list[str] = []
    for w in wanted:
        near += difflib.get_close_matches(w, suffixes, n=3, cutoff=0.3)
        near += difflib.get_close_matches(w, names, n=3, cutoff=0.3)
    near = list(dict.fromkeys(near))[:8] or names[:8]
    return OptionError(
        "lora.target_modules",
        f"{target_modules!r} matches none of the {len(names)} linear modules of this graph; nearest: "
        f"{', '.join(near)} (module names here: {', '.join(suffixes)})",
    )


def matched_sites(graph: GraphView, target_modules, pass_name: str = "lora") -> list[_Site]:
    sites = find_sites(graph)
    if not sites:
        return []
    outputs = _output_layers(graph, sites)
    chosen = [s for s in sites if _matches(s.call.fqn, target_modules, outputs)]
    if not chosen:
        error = _no_match_error(target_modules, [s.call.fqn for s in sites])
        if pass_name != "lora":
            error = OptionError(f"{pass_name}.target_modules", str(error).split(": ", 1)[1])
        raise error
    return chosen


# -- adapters ---------------------------------------------------------------------------------------------


def _fqn_seed(seed: int, fqn: str) -> int:
    h = 0
    for ch in fqn:
        h = (h * 131 + ord(ch)) % (2**31 - 1)
    return (seed * 1_000_003 + h) % (2**63 - 1)


def _new_adapter(weight: torch.Tensor, fqn: str, in_f: int, out_f: int, transposed: bool, opts: LoraOptions) -> LoraAdapter:
    dtype = torch.float32 if opts.adapter_dtype == "float32" else weight.dtype
    gen = torch.Generator().manual_seed(_fqn_seed(opts.seed, fqn))
    a = torch.empty(opts.r, in_f, dtype=torch.float32)
    if opts.init == "kaiming":
        # kaiming_uniform_(a=sqrt(5)) on an (r x in) weight: bound = sqrt(6 / ((1 + 5) * in)) = 1 / sqrt(in)
        bound = 1.0 / math.sqrt(in_f)
        a.uniform_(-bound, bound, generator=gen)
    else:
        a.normal_(0.0, 1.0 / opts.r, generator=gen)
    A = a.to(device=weight.device, dtype=dtype).requires_grad_()
    B = torch.zeros(out_f, opts.r, device=weight.device, dtype=dtype).requires_grad_()
    return LoraAdapter(fqn, A, B, opts.alpha, opts.rslora, transposed, target_modules=opts.target_modules)


def adapter_for(weight: torch.Tensor, fqn: str, in_f: int, out_f: int, transposed: bool, opts: LoraOptions) -> LoraAdapter:
    """The adapter of ``weight``: created on first use, reused by every later compile."""
    adapter = _ADAPTERS.get(weight)
    if adapter is None:
        adapter = _new_adapter(weight, fqn, in_f, out_f, transposed, opts)
        _ADAPTERS[weight] = adapter
    elif adapter.r != opts.r or adapter.A.shape[1] != in_f or adapter.B.shape[0] != out_f:
        raise OptionError(
            "lora.r",
            f"{fqn} already has a rank-{adapter.r} adapter ({tuple(adapter.A.shape)}, {tuple(adapter.B.shape)}); "
            f"options ask for r={opts.r}. Use the same r, or drop it with transfigure.passes.lora.remove_lora(model)",
        )
    return adapter


def adapters(model: torch.nn.Module) -> dict[str, LoraAdapter]:
    """Adapters attached to ``model``'s weights, keyed by module FQN (as in ``model.named_modules()``)."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight in _ADAPTERS:
            adapter = _ADAPTERS[weight]
            if adapter.fqn != name:
                adapter.fqn = name
            found[name] = adapter
    return found


def lora_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every adapter tensor (A then B per layer) of ``model``: give them to any optimizer."""
    return [t for a in adapters(model).values() for t in (a.A, a.B)]


def remove_lora(model: torch.nn.Module) -> None:
    """Forget ``model``'s adapters (unmerging merged ones first); recompile to drop them from graphs."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight in _ADAPTERS:
            if _ADAPTERS[weight].merged:
                _unmerge_one(weight, _ADAPTERS[weight])
            del _ADAPTERS[weight]


# -- the pass ---------------------------------------------------------------------------------------------


def _check_rank(site: _Site, r: int, key: str) -> None:
    if r > min(site.in_features, site.out_features):
        raise OptionError(
            key,
            f"got r={r}, larger than the layer {site.call.fqn} ({site.out_features} x {site.in_features}); "
            f"use r <= {min(site.in_features, site.out_features)} or exclude that module",
        )


def _lowrank_branch(graph: fx.Graph, x: fx.Node, a: fx.Node, b: fx.Node, scale: float, dropout: float) -> fx.Node:
    """``F.linear(F.linear(dropout(x), A), B) * s`` in the dtype of ``x``."""
    inp = graph.call_function(torch.nn.functional.dropout, (x,), {"p": dropout, "training": True}) if dropout > 0 else x
    dtype = graph.call_function(getattr, (x, "dtype"))
    a_cast = graph.call_method("to", (a, dtype))
    b_cast = graph.call_method("to", (b, dtype))
    t = graph.call_function(torch.nn.functional.linear, (inp, a_cast))
    u = graph.call_function(torch.nn.functional.linear, (t, b_cast))
    return graph.call_function(torch.mul, (u, scale))


def attach(graph: GraphView, site: _Site, a_node: fx.Node, b_node: fx.Node, scale: float, grad_scale: float,
           dropout: float, fused: bool) -> str:
    """Rewrite ``site`` into base + adapter; returns a short description of the form used."""
    call = site.call
    g = graph.graph
    if site.plain and fused and dropout == 0.0:
        with g.inserting_before(call.node):
            weight = call.weight
            if site.transposed:
                weight = g.call_method("t", (call.weight,))
            new = g.call_function(
                torch.ops.transfigure.lora_linear.default,
                (call.input, weight, call.bias, a_node, b_node, float(scale), float(grad_scale)),
            )
        graph.replace_linear(call, new)
        return "fused lora_linear"
    # keep the base node (plain linear, Conv1D addmm, or an earlier pass's replacement) and add the branch
    base = call.node
    users = list(base.users)
    with g.inserting_before(base.next):  # inserting_before keeps the new nodes in program order
        low = _lowrank_branch(g, call.input, a_node, b_node, scale, dropout)
        new = g.call_function(torch.add, (base, low))
    for user in users:
        user.replace_input_with(base, new)
    info = base.meta.pop("transfigure_linear", None)
    new.meta.update({k: v for k, v in base.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
    new.meta["transfigure_linear"] = dataclasses.replace(info or call, node=new)
    return "base + low-rank branch" + (" (dropout)" if dropout else "") + ("" if site.plain else f" over {call.node.target}")


@register_pass
class LoraPass(Pass):
    """Attach trainable LoRA adapters (PEFT conventions) to matched linears."""

    name = "lora"
    Options = LoraOptions
    order = 50
    description = "trainable low-rank adapters W + s B A on matched linears, fused base+adapter GEMM"

    def run(self, graph: GraphView) -> PassResult:
        opts: LoraOptions = self.options
        result = PassResult(self.name)
        sites = matched_sites(graph, opts.target_modules)
        for site in sites:
            _check_rank(site, opts.r, "lora.r")
        for site in sites:
            adapter = adapter_for(site.weight, site.call.fqn, site.in_features, site.out_features, site.transposed, opts)
            if adapter.merged:
                result.skip(site.call, "adapter merged into the base weight")
                continue
            if site.weight.requires_grad:
                result.note(f"{site.call.fqn}: base weight requires grad (freeze the model as peft does)")
            a_node = graph.add_input(f"{site.call.fqn}.lora_A.weight", adapter.A, trainable=True)
            b_node = graph.add_input(f"{site.call.fqn}.lora_B.weight", adapter.B, trainable=True)
            form = attach(graph, site, a_node, b_node, adapter.scale, adapter.scale, opts.dropout, opts.fused)
            result.rewrote(site.call, f"r={adapter.r} s={adapter.scale:g} {form}")
        return result


# -- PEFT-format state, save/load, merge ------------------------------------------------------------------


def lora_state_dict(model: torch.nn.Module, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """``{"base_model.model.<fqn>.lora_A.weight": A, ...}``, PEFT's saved key layout (adapter name stripped)."""
    state = {}
    for fqn, adapter in adapters(model).items():
        state[f"{prefix}{fqn}.lora_A.weight"] = adapter.A.detach()
        state[f"{prefix}{fqn}.lora_B.weight"] = adapter.B.detach()
    return state


def peft_config(model: torch.nn.Module) -> dict[str, Any]:
    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters (compile it with the lora pass and call it once, or load_lora)")
    ranks = {a.r for a in found.values()}
    alphas = {a.alpha for a in found.values()}
    rs = {a.rslora for a in found.values()}
    if len(ranks) != 1 or len(alphas) != 1 or len(rs) != 1:
        raise ValueError(f"adapters differ in r/alpha/rslora ({ranks}, {alphas}, {rs}); PEFT's config holds one of each")
    transposed = any(a.transposed for a in found.values())
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "use_rslora": rs.pop(),
        "target_modules": sorted({f.rsplit(".", 1)[-1] for f in found}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": transposed,
        "init_lora_weights": True,
        "inference_mode": False,
        "modules_to_save": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }


def save_lora(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout) into ``directory``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = peft_config(model)
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(state, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<fqn>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def load_lora(model: torch.nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor],
              config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load PEFT-format adapters into ``model`` (a directory written by peft or :func:`save_lora`, or a state dict).

    Existing adapters get the loaded values in place (so optimizers and compiled graphs keep working);
    missing ones are created. Returns the ``lora`` options to compile with (``{"r", "alpha", "rslora",
    "target_modules"}``).
    """
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        from safetensors.torch import load_file as load_safetensors

        path = os.path.join(source, "adapter_model.safetensors")
        if os.path.exists(path):
            state = load_safetensors(path)
        else:
            state = load_file(os.path.join(source, "adapter_model.bin"), weights_only=True)
        if config is None:
            with open(os.path.join(source, "adapter_config.json")) as f:
                config = json.load(f)
    config = dict(config or {})
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            raise KeyError(f"load_lora: {key!r} is not a LoRA key (expected ...<module>.lora_A.weight / lora_B.weight)")
        pairs.setdefault(m.group("fqn"), {})[m.group("which")] = value
    modules = dict(model.named_modules())
    rslora = bool(config.get("use_rslora", False))
    for fqn, pair in pairs.items():
        module = modules.get(fqn)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            near = difflib.get_close_matches(fqn, list(modules), n=3)
            raise KeyError(f"load_lora: module {fqn!r} not in the model; nearest: {', '.join(near)}")
        if set(pair) != {"A", "B"}:
            raise KeyError(f"load_lora: {fqn} needs both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        r = a.shape[0]
        alpha = float(config.get("alpha_pattern", {}).get(fqn.rsplit(".", 1)[-1], config.get("lora_alpha", r)))
        weight = module.weight
        transposed = type(module).__name__ == "Conv1D"
        in_f, out_f = (weight.shape if transposed else weight.shape[::-1])
        if a.shape != (r, in_f) or b.shape != (out_f, r):
            raise ValueError(f"load_lora: {fqn}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit weight {tuple(weight.shape)}")
        adapter = _ADAPTERS.get(weight)
        if adapter is not None and adapter.r == r:
            with torch.no_grad():
                was_merged = adapter.merged
                if was_merged:
                    _unmerge_one(weight, adapter)
                adapter.A.copy_(a)
                adapter.B.copy_(b)
                adapter.alpha, adapter.rslora = alpha, rslora
                if was_merged:
                    _merge_one(weight, adapter)
        else:
            dtype = adapter.A.dtype if adapter is not None else torch.float32
            A = a.detach().to(device=weight.device, dtype=dtype).clone().requires_grad_()
            B = b.detach().to(device=weight.device, dtype=dtype).clone().requires_grad_()
            _ADAPTERS[weight] = LoraAdapter(fqn, A, B, alpha, rslora, transposed)
    ranks = {p["A"].shape[0] for p in pairs.values()}
    r = ranks.pop() if len(ranks) == 1 else int(config.get("r", 8))
    return {
        "r": r,
        "alpha": float(config.get("lora_alpha", r)),
        "rslora": rslora,
        "target_modules": tuple(sorted({f.rsplit(".", 1)[-1] for f in pairs})),
    }


def _merge_one(weight: torch.Tensor, adapter: LoraAdapter) -> None:
    with torch.no_grad():
        weight.copy_((weight.double() + adapter.delta()).to(weight.dtype))
    adapter.merged = True


def _unmerge_one(weight: torch.Tensor, adapter: LoraAdapter) -> None:
    with torch.no_grad():
        weight.copy_((weight.double() - adapter.delta()).to(weight.dtype))
    adapter.merged = False


def merge_lora(model: torch.nn.Module) -> int:
    """Fold every adapter into its base weight (``W += s B A``); returns how many were merged.

    Graphs compiled with the lora pass still add the adapter: after merging, compile the model without the
    pass for inference (or ``torch._dynamo.reset()``: a recompile with the pass skips merged adapters).
    """
    count = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight in _ADAPTERS and not _ADAPTERS[weight].merged:
            _merge_one(weight, _ADAPTERS[weight])
            count += 1
    return count


def unmerge_lora(model: torch.nn.Module) -> int:
    """Undo :func:`merge_lora` (``W -= s B A``, in float64 then rounded to the weight's dtype)."""
    count = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight in _ADAPTERS and _ADAPTERS[weight].merged:
            _unmerge_one(weight, _ADAPTERS[weight])
            count += 1
    return count


def _iter_tensors(values: Iterable[Any]) -> Iterable[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
