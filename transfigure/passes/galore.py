"""GaLore as one-sided LoRA: ``W = W0 + s P Z`` with a periodically refreshed projector P.

Math. GaLore (Zhao et al. 2024, arXiv:2403.03507) trains a weight W with the projected gradient
``R = P^T G`` (P: top-r left singular vectors of the gradient G, refreshed every T steps), keeps optimizer
state for R only, and applies the update ``W <- W - lr * s * P * rho(R)`` (rho: the optimizer's update rule,
s: GaLore's ``scale``). Torroba-Hennigen, Lang, Guo & Kim (2025) show that optimizing with a linear gradient map
S equals training a linear adapter ``W = W0 + S^T(z)``: with ``S(G) = P^T G`` and P frozen and orthonormal,
GaLore *is* a one-sided LoRA ``W = W0 + s P Z``, Z (r x in) trainable, initialized at 0, whose gradient is
taken as ``P^T G`` (the ``s`` is applied on the way back, as GaLore does: the op's ``grad_scale`` is 1). A
refresh of P equals merging ``s P Z`` into ``W0``, zeroing Z and starting a new adapter with the new P.
With ``proj_type="std"`` the projector goes on the smaller side, as in galore-torch: for ``out >= in`` it is a
right projector, ``W = W0 + s Z P`` with P (r x in) the top-r right singular vectors and Z (out x r). Sides
refer to the weight as stored, as galore-torch applies them to the parameter: GPT-2's Conv1D stores (in x out),
so there a stored right projector is a left one on the (out x in) weight the op sees (through a transposed view).

Consequences: any torch optimizer works unchanged on the Z tensors (SGD, Adam, Adafactor, ...); its state has
the low-rank shape (GaLore's memory saving); and autograd never materializes the full weight gradient.

What the pass does to the Dynamo graph: every matched linear becomes ``transfigure::galore_linear(x, W0, b,
A, B, s, ctl)`` -- the fused base + low-rank op of kernels/lora.py -- with Z a trainable extra input, P and a
small control tensor ``ctl`` as constant extra inputs. At a refresh step the op's backward also adds the full
fp32 gradient ``G = dy^T x`` to a side store (armed through ``ctl``), which the optimizer wrapper reads.

Training loop integration: :class:`GaLoreOptimizer` wraps ANY ``torch.optim.Optimizer`` built over
``transfigure.trainable_parameters(model)`` (or :func:`galore_parameters`); a plain loop stays
``loss.backward(); opt.step(); opt.zero_grad()``. On refresh steps ``step()`` merges ``s P Z`` into ``W0``,
computes the new P by an fp32 SVD of G, zeroes Z in place and replaces ``Z.grad`` by the new projection, then
calls the inner optimizer. Like galore-torch, the inner optimizer's state for Z is *kept* across refreshes
(``reset_state_on_refresh=True`` drops it instead). Differences from galore-torch that remain with AdamW:
torch's AdamW applies decoupled weight decay to Z, galore-torch to the full W; and the two place Adam's eps
differently with bias correction (torch: ``m_hat / (sqrt(v_hat) + eps)``; transformers-style galore-torch:
``m_hat / (sqrt(v_hat) + eps / sqrt(1 - beta2^t))``). See tests/passes/test_galore.py for the bound.
Base weights must not be trained by autograd: freeze the model (``model.requires_grad_(False)``) first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch.utils.weak import WeakIdKeyDictionary

from transfigure.compiler.graph import GraphView
from transfigure.compiler.options import OptionError, option
from transfigure.compiler.passes import Pass, PassResult, register_pass
from transfigure.kernels.lora import take_stashed_gradient
from transfigure.passes.lora import matched_sites

__all__ = ["GaLoreOptimizer", "GaLoreOptions", "GaLorePass", "GaLoreState", "galore_parameters", "galore_states", "merge_galore"]


@dataclasses.dataclass(frozen=True)
class GaLoreOptions:
    rank: int = option(128, "projection rank r (must not exceed min(in, out) of any matched layer)", low=1)
    update_proj_gap: int = option(200, "refresh the projector every T optimizer steps", low=1)
    scale: float = option(0.25, "GaLore's scale s: the update applied to W is s * P * step(Z)", low=0.0, low_open=True)
    proj_type: Literal["std", "left", "right"] = option("std", "projector side: std = the smaller side (galore-torch)")
    target_modules: str | tuple[str, ...] = option("all-linear", "PEFT-style module selection, as in the lora pass")
    state_dtype: Literal["float32", "base"] = option("float32", "dtype of Z and P: float32, or the base weight's")

    def __post_init__(self):
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            raise OptionError("galore.target_modules", "got an empty list")


@dataclasses.dataclass
class GaLoreState:
    """One projected weight. ``side == "left"``: P (out x r), Z (r x in); ``"right"``: P (r x in), Z (out x r)."""

    fqn: str
    weight: torch.Tensor
    P: torch.Tensor
    Z: torch.Tensor
    ctl: torch.Tensor  # int64 CPU [armed, count]
    side: str
    rank: int
    scale: float
    update_proj_gap: int
    step: int = 0
    refreshes: int = 0
    transposed: bool = False  # GPT-2 Conv1D: ``weight`` is stored (in x out); P, Z and delta() are out x in

    def delta(self) -> torch.Tensor:
        """``s P Z`` (left) or ``s Z P`` (right), out x in, float32."""
        p, z = self.P.detach().float(), self.Z.detach().float()
        return (p @ z if self.side == "left" else z @ p) * self.scale

    def merge(self) -> None:
        with torch.no_grad():
            delta = self.delta()
            self.weight.copy_((self.weight.float() + (delta.t() if self.transposed else delta)).to(self.weight.dtype))
            self.Z.zero_()

    def refresh(self, gradient: torch.Tensor) -> None:
        """New projector from the fp32 SVD of ``gradient`` (out x in); sets ``Z.grad`` to the new projection."""
        g = gradient.float()
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        with torch.no_grad():
            if self.side == "left":
                self.P.copy_(u[:, : self.rank].to(self.P.dtype))
                low = self.P.float().t() @ g
            else:
                self.P.copy_(vh[: self.rank].to(self.P.dtype))
                low = g @ self.P.float().t()
        self.Z.grad = low.to(self.Z.dtype)
        self.refreshes += 1


_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # base weight -> GaLoreState
_BY_Z: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Z -> GaLoreState


def _side(proj_type: str, rows: int, cols: int, transposed: bool = False) -> str:
    """Projector side in the op's (out x in) terms. ``std`` and explicit sides refer to the weight as STORED
    (rows x cols), as galore-torch applies them to the parameter; for a Conv1D weight stored (in x out) a
    stored right projector is a left one on the (out x in) weight."""
    side = ("right" if rows >= cols else "left") if proj_type == "std" else proj_type
    if transposed:
        side = "left" if side == "right" else "right"
    return side


def _state_for(weight: torch.Tensor, fqn: str, in_f: int, out_f: int, opts: GaLoreOptions,
               transposed: bool = False) -> GaLoreState:
    state = _STATES.get(weight)
    side = _side(opts.proj_type, *weight.shape, transposed=transposed)
    if state is not None:
        if state.rank != opts.rank or state.side != side:
            raise OptionError("galore.rank", f"{fqn} already has a rank-{state.rank} {state.side} projector; options ask for rank={opts.rank}, {side}")
        return state
    dtype = torch.float32 if opts.state_dtype == "float32" else weight.dtype
    r = opts.rank
    if side == "left":
        P = torch.zeros(out_f, r, device=weight.device, dtype=dtype)
        Z = torch.zeros(r, in_f, device=weight.device, dtype=dtype, requires_grad=True)
    else:
        P = torch.zeros(r, in_f, device=weight.device, dtype=dtype)
        Z = torch.zeros(out_f, r, device=weight.device, dtype=dtype, requires_grad=True)
    ctl = torch.tensor([1, 0], dtype=torch.int64)  # armed: step 0 is a refresh step
    state = GaLoreState(fqn, weight, P, Z, ctl, side, r, opts.scale, opts.update_proj_gap, transposed=transposed)
    _STATES[weight] = state
    _BY_Z[Z] = state
    return state


@register_pass
class GaLorePass(Pass):
    """GaLore as one-sided adapters W0 + s P Z with the projector refreshed through GaLoreOptimizer."""

    name = "galore"
    Options = GaLoreOptions
    order = 55
    description = "GaLore gradient projection as one-sided adapters W0 + s P Z; refresh via GaLoreOptimizer"

    def run(self, graph: GraphView) -> PassResult:
        opts: GaLoreOptions = self.options
        result = PassResult(self.name)
        sites = matched_sites(graph, opts.target_modules, pass_name="galore")
        for site in sites:
            if opts.rank > min(site.in_features, site.out_features):
                raise OptionError(
                    "galore.rank",
                    f"got rank={opts.rank}, larger than the layer {site.call.fqn} ({site.out_features} x {site.in_features})",
                )
        for site in sites:
            call = site.call
            if not site.plain:
                result.skip(call, "already rewritten by an earlier pass; GaLore adapts plain linears (F.linear, Conv1D)")
                continue
            state = _state_for(site.weight, call.fqn, site.in_features, site.out_features, opts, site.transposed)
            z = graph.add_input(f"{call.fqn}.galore_Z", state.Z, trainable=True)
            p = graph.add_input(f"{call.fqn}.galore_P", state.P)
            ctl = graph.add_input(f"{call.fqn}.galore_ctl", state.ctl)
            a, b = (z, p) if state.side == "left" else (p, z)
            with graph.graph.inserting_before(call.node):
                # Conv1D's addmm(bias, x, W[in, out]) is the linear with weight W^T: a view, no copy
                weight = graph.graph.call_function(torch.ops.aten.t.default, (call.weight,)) if site.transposed else call.weight
                new = graph.graph.call_function(
                    torch.ops.transfigure.galore_linear.default, (call.input, weight, call.bias, a, b, float(state.scale), ctl)
                )
            graph.replace_linear(call, new)
            result.rewrote(call, f"rank={state.rank} {state.side} projector, scale={state.scale:g}, T={state.update_proj_gap}")
        if result.rewritten:
            result.note("this graph runs without CUDA graphs even under mode='reduce-overhead': the projector refresh "
                        "is driven from the host (galore_linear is tagged cudagraph_unsafe)")
        return result


def galore_states(model: torch.nn.Module) -> dict[str, GaLoreState]:
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight in _STATES:
            found[name] = _STATES[weight]
    return found


def galore_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The trainable Z of every GaLore adapter of ``model``."""
    return [s.Z for s in galore_states(model).values()]


def merge_galore(model: torch.nn.Module) -> int:
    """Fold ``s P Z`` into every base weight and zero Z (the model then equals its trained weights)."""
    states = galore_states(model)
    for state in states.values():
        state.merge()
    return len(states)


def import_galore_torch():
    """Import galore-torch (the comparison oracle of the tests and benchmarks; not a dependency).

    galore-torch imports bitsandbytes at package import, only for its 8-bit AdamW; where bitsandbytes is absent a
    stub module stands in, so its projector and GaLoreAdamW import. Raises ImportError when galore-torch is missing.
    """
    import sys
    import types

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        stub = types.ModuleType("bitsandbytes.optim.optimizer")
        stub.Optimizer2State = object
        sys.modules.setdefault("bitsandbytes", types.ModuleType("bitsandbytes"))
        sys.modules.setdefault("bitsandbytes.optim", types.ModuleType("bitsandbytes.optim"))
        sys.modules.setdefault("bitsandbytes.optim.optimizer", stub)
    import galore_torch

    return galore_torch


class GaLoreOptimizer:
    """Wrap any ``torch.optim.Optimizer`` whose parameters include GaLore's Z tensors.

    ``step()`` performs the projector refreshes that are due, then the inner optimizer's step. Everything
    else (``zero_grad``, ``param_groups``, ``state``, ``state_dict``, LR schedulers via ``.optimizer``) is
    the inner optimizer's. ``reset_state_on_refresh`` drops the inner optimizer's state of a Z whose
    projector changed (galore-torch keeps it, which is the default here too).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, reset_state_on_refresh: bool = False):
        self.optimizer = optimizer
        self.reset_state_on_refresh = reset_state_on_refresh

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["optimizer"], name)

    def _states(self) -> list[GaLoreState]:
        found = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = _BY_Z.get(p)
                if state is not None:
                    found.append(state)
        return found

    @torch.no_grad()
    def refresh_due(self) -> None:
        for state in self._states():
            if state.step % state.update_proj_gap == 0:
                gradient = take_stashed_gradient(state.ctl)
                if gradient is None:
                    raise RuntimeError(
                        f"GaLore: {state.fqn} is due a projector refresh (step {state.step}) but no full gradient was "
                        "recorded: run the compiled model's forward and backward before optimizer.step()"
                    )
                state.merge()
                state.refresh(gradient)
                if self.reset_state_on_refresh:
                    self.optimizer.state.pop(state.Z, None)
            state.step += 1
            state.ctl[0] = 1 if state.step % state.update_proj_gap == 0 else 0

    def step(self, closure=None):
        self.refresh_due()
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        return f"GaLoreOptimizer({self.optimizer!r})"
