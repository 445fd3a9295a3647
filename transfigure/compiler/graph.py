"""Graph binding: Dynamo's FX graph, copied, with every placeholder tied to its real tensor and FQN.

Dynamo hands a backend a ``GraphModule`` whose placeholders are user inputs, parameters and buffers of the
model (``example_inputs[i]`` *is* the real ``nn.Parameter``). :class:`GraphView` copies that graph (Dynamo's
own must stay untouched), classifies each placeholder, recovers original fully-qualified names
(``model.layers.3.self_attn.q_proj.weight``) and offers the lookups every pass needs: linear calls, SDPA
calls and residual adds with the FQN of the module they came from, and a networkx view for analysis.

New tensors a pass creates (packed weights, trainable adapters) become *extra inputs*: placeholders appended
after Dynamo's, whose tensors the lowered callable supplies on every call (see DESIGN.md for why not
``get_attr``).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
ADD_TARGETS = (operator.add, operator.iadd, torch.add, torch.Tensor.add, "add", "add_")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")

# Tensors created once per owning parameter and reused by every later compile of the same model.
_PERSISTENT: WeakIdKeyDictionary = WeakIdKeyDictionary()
# Trainable extra inputs, keyed by a parameter of the graph they belong to (see trainable_parameters()).
_TRAINABLE_BY_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclasses.dataclass
class Placeholder:
    """One graph input: what it is (``input``, ``parameter``, ``buffer``, ``symint``, ``extra``) and its tensor."""

    node: fx.Node
    index: int
    kind: str
    fqn: str | None
    value: Any
    trainable: bool = False


@dataclasses.dataclass
class LinearCall:
    """``y = x @ weight.T + bias`` at ``node``; ``fqn`` is the module that made the call.

    For GPT-2's Conv1D (``addmm(bias, x2d, weight)``, weight stored ``(in, out)``) ``transposed`` is True and
    ``input`` is the 2-D view of x.
    """

    node: fx.Node
    input: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    fqn: str
    weight_fqn: str | None
    in_features: int | None
    out_features: int | None
    layer: int | None
    # GPT-2's Conv1D stores the weight as (in, out) and calls addmm(bias, x2d, weight): transposed=True.
    transposed: bool = False


@dataclasses.dataclass
class AttentionCall:
    """One ``scaled_dot_product_attention`` call with its arguments spelled out."""

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: Any
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any
    fqn: str
    layer: int | None


@dataclasses.dataclass
class ResidualAdd:
    """``node = stream + branch`` where ``branch`` ends in the linear ``branch_linear`` of the same layer."""

    node: fx.Node
    stream: fx.Node
    branch: fx.Node
    branch_linear: fx.Node
    fqn: str
    layer: int | None


def _fqn_from_source(source: Any) -> str | None:
    """Walk a Dynamo ``Source`` chain (``self._modules['model']._parameters['weight']``) into an FQN."""
    parts: list[str] = []
    node = source
    for _ in range(200):
        if node is None:
            break
        base = getattr(node, "base", None)
        index = getattr(node, "index", None)
        member = getattr(node, "member", None)
        if index == 0 and getattr(base, "local_name", None) == "args" and getattr(base, "base", None) is None:
            break  # ``args[0]``: the module itself, when its forward is wrapped by a ``*args`` decorator
        if index is not None and base is not None and getattr(base, "member", None) in ("_modules", "_parameters", "_buffers"):
            parts.append(str(index))
            node = getattr(base, "base", None)
            continue
        if member is not None and base is not None:
            parts.append(str(member))
            node = base
            continue
        if index is not None and base is not None:
            parts.append(str(index))
            node = base
            continue
        if base is not None:
            node = base
            continue
        break
    if not parts:
        return None
    return ".".join(reversed(parts))


def _is_buffer_source(source: Any) -> bool:
    node = source
    for _ in range(200):
        if node is None:
            return False
        if getattr(getattr(node, "base", None), "member", None) == "_buffers":
            return True
        node = getattr(node, "base", None)
    return False


# ``L['self']`` or, since transformers 5.24 wraps model forwards in ``*args`` decorators, ``L['args'][0]``
_STACK_PREFIX = re.compile(r"^L\[['\"](?:(?:self|fn|mod|model)['\"]\]|args['\"]\]\[0\])\.?")


def normalize_module_path(path: str) -> str:
    """``L['self'].model._modules['layers'][3].mlp`` -> ``model.layers.3.mlp``."""
    path = _STACK_PREFIX.sub("", path)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def layer_index(fqn: str | None) -> int | None:
    if not fqn:
        return None
    match = _LAYER_RE.search(fqn)
    return int(match.group(1)) if match else None


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a fresh graph (node meta shallow-copied, Dynamo's placeholder sources kept)."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, value_map)
    graph.output(output)
    for old, new in value_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copied = fx.GraphModule(gm, graph)
    copied.meta = dict(getattr(gm, "meta", {}))
    # AOTAutograd recognizes a Dynamo graph by these; without them it computes no static inputs, so CUDA
    # graphs copy every parameter per replay and skip graphs that mutate a cache (transformers' StaticCache).
    for attribute in ("_param_name_to_source", "_source_to_user_stacks", "compile_subgraph_reason"):
        if hasattr(gm, attribute):
            setattr(copied, attribute, getattr(gm, attribute))
    return copied


class GraphView:
    """A mutable copy of one Dynamo graph, bound to its real tensors.

    Passes edit ``view.graph`` with the ordinary torch.fx API and use the helpers below to find what to
    rewrite. ``view.inputs()`` gives the full input list (Dynamo's plus extra inputs) for running it.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        self.gm = copy_graph_module(gm)
        self.example_inputs = list(example_inputs)
        self.extra_inputs: list[torch.Tensor] = []
        self.derived_from: list[tuple[str, torch.Tensor, int]] = []
        self.state: dict[str, Any] = {}
        self._placeholders: list[Placeholder] = []
        self._by_node: dict[fx.Node, Placeholder] = {}
        self._bind()

    # -- binding -----------------------------------------------------------------------------------
    def _bind(self) -> None:
        flat_to_fqn = dict(self.gm.meta.get("dynamo_flat_name_to_original_fqn", {}) or {})
        for index, node in enumerate(n for n in self.gm.graph.nodes if n.op == "placeholder"):
            value = self.example_inputs[index] if index < len(self.example_inputs) else None
            source = getattr(node, "_dynamo_source", None)
            if source is None and "grapharg" in node.meta:
                source = getattr(node.meta["grapharg"], "source", None)
            fqn = None
            if not isinstance(value, torch.Tensor):
                kind = "symint"
            elif isinstance(value, torch.nn.Parameter):
                kind = "parameter"
            elif source is not None and _is_buffer_source(source):
                kind = "buffer"
            else:
                kind = "input"
            if kind in ("parameter", "buffer"):
                fqn = _fqn_from_source(source) if source is not None else None
                if fqn is None:
                    fqn = flat_to_fqn.get(node.name)
            if kind in ("input", "symint"):
                fqn = source.name() if callable(getattr(source, "name", None)) else node.name
            self._add_placeholder(Placeholder(node, index, kind, fqn, value, bool(getattr(value, "requires_grad", False))))

    def _add_placeholder(self, placeholder: Placeholder) -> None:
        self._placeholders.append(placeholder)
        self._by_node[placeholder.node] = placeholder

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def placeholders(self) -> list[Placeholder]:
        return list(self._placeholders)

    def placeholder(self, node: fx.Node) -> Placeholder | None:
        return self._by_node.get(node)

    def tensor(self, node: fx.Node) -> Any:
        """The real value bound to a placeholder node (parameter, buffer, input or extra input)."""
        found = self.placeholder(node)
        if found is None:
            raise KeyError(f"{node.name} is not a placeholder of this graph")
        return found.value

    def fqn(self, node: fx.Node) -> str | None:
        found = self.placeholder(node)
        return found.fqn if found is not None else None

    def parameters(self) -> dict[str, torch.Tensor]:
        return {p.fqn: p.value for p in self._placeholders if p.kind == "parameter" and p.fqn}

    def inputs(self) -> list[Any]:
        return self.example_inputs + self.extra_inputs

    # -- module identity ---------------------------------------------------------------------------
    @staticmethod
    def module_fqn(node: fx.Node) -> str:
        """FQN of the innermost module whose forward produced ``node`` ('' at the top level)."""
        if "transfigure_linear" in node.meta:
            return node.meta["transfigure_linear"].fqn
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return normalize_module_path(path)

    # -- finding sites -----------------------------------------------------------------------------
    def calls(self, targets: Iterable[Any]) -> Iterator[fx.Node]:
        targets = tuple(targets)
        for node in self.graph.nodes:
            if node.op in ("call_function", "call_method") and node.target in targets:
                yield node

    def linear_calls(self) -> list[LinearCall]:
        """Every ``F.linear`` call, plus linears an earlier pass replaced (``meta['transfigure_linear']``)."""
        found = []
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            if "transfigure_linear" in node.meta:
                found.append(node.meta["transfigure_linear"])
                continue
            transposed = False
            if node.target in LINEAR_TARGETS:
                args = list(node.args) + [None] * 3
                x = args[0]
                weight = node.kwargs.get("weight", args[1])
                bias = node.kwargs.get("bias", args[2])
            elif node.target is torch.addmm and len(node.args) == 3 and not node.kwargs and self._is_parameter(node.args[2]):
                bias, x, weight = node.args
                transposed = True
            else:
                continue
            weight_value = self._value(weight)
            fqn = self.module_fqn(node)
            weight_fqn = self.fqn(weight) if isinstance(weight, fx.Node) else None
            if not fqn and weight_fqn:
                fqn = weight_fqn.rsplit(".", 1)[0]
            out_features, in_features = (tuple(weight_value.shape) + (None, None))[:2] if weight_value is not None else (None, None)
            if transposed:
                in_features, out_features = out_features, in_features
            found.append(LinearCall(node, x, weight, bias, fqn, weight_fqn, in_features, out_features, layer_index(fqn), transposed))
        return found

    def insert_fused(self, members: Sequence[fx.Node], target: Callable, args: tuple, widths: Sequence[int],
                     fqns: Sequence[str]) -> list[fx.Node]:
        """Insert ``target(*args)`` (sibling linears computed as one op over their stacked outputs) before the
        earliest of ``members``, then one ``narrow`` of its last dimension per member, ``widths`` in order;
        returns those pieces. The caller reroutes each member to its piece (and only then erases members: the
        insertion point is one of them)."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        first = min(members, key=order.__getitem__)
        pieces, start = [], 0
        with self.graph.inserting_before(first):
            fused = self.graph.call_function(target, args)
            fused.meta["transfigure_fused_linears"] = list(fqns)
            for width in widths:
                pieces.append(self.graph.call_function(torch.narrow, (fused, -1, start, width)))
                start += width
        return pieces

    def replace_linear(self, site: LinearCall, new_node: fx.Node) -> None:
        """Route every use of ``site.node`` to ``new_node`` and keep the linear's identity on it."""
        site.node.replace_all_uses_with(new_node)
        new_node.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
        new_site = dataclasses.replace(site, node=new_node)
        new_node.meta["transfigure_linear"] = new_site
        self.graph.erase_node(site.node)

    def attention_calls(self) -> list[AttentionCall]:
        found = []
        for node in self.calls(SDPA_TARGETS):
            names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
            defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
            bound = dict(defaults)
            bound.update(dict(zip(names, node.args)))
            bound.update(node.kwargs)
            fqn = self.module_fqn(node)
            found.append(AttentionCall(node, fqn=fqn, layer=layer_index(fqn), **{k: bound[k] for k in names}))
        return found

    def residual_adds(self) -> list[ResidualAdd]:
        """Same-shape adds inside a layer where one operand ends (through view/dropout-like ops) in a linear."""
        linear_nodes = {site.node for site in self.linear_calls()}
        found = []
        for node in self.graph.nodes:
            if node.target not in ADD_TARGETS or len(node.args) < 2:
                continue
            a, b = node.args[0], node.args[1]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            shapes = [getattr(self._meta_value(n), "shape", None) for n in (node, a, b)]
            if None in shapes or not (shapes[0] == shapes[1] == shapes[2]):
                continue
            fqn = self.module_fqn(node)
            layer = layer_index(fqn)
            if layer is None:
                continue
            ends = [self._linear_ancestor(n, linear_nodes, layer) for n in (a, b)]
            if (ends[0] is None) == (ends[1] is None):
                continue
            branch, stream = (a, b) if ends[0] is not None else (b, a)
            found.append(ResidualAdd(node, stream, branch, ends[0] or ends[1], fqn, layer))
        return found

    def _linear_ancestor(self, node: fx.Node, linear_nodes: set, layer: int, hops: int = 6) -> fx.Node | None:
        """The linear ``node`` comes from, following single-tensor-input ops (dropout, views, casts)."""
        current = node
        for _ in range(hops):
            if current in linear_nodes:
                return current if layer_index(self.module_fqn(current)) == layer else None
            tensor_args = [a for a in current.all_input_nodes if a.op != "get_attr"]
            if current.op == "placeholder" or len(tensor_args) != 1:
                return None
            current = tensor_args[0]
        return None

    def _is_parameter(self, node: Any) -> bool:
        found = self.placeholder(node) if isinstance(node, fx.Node) else None
        return found is not None and found.kind == "parameter"

    # -- values ------------------------------------------------------------------------------------
    def _value(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            found = self.placeholder(node)
            if found is not None:
                return found.value
        return self._meta_value(node)

    @staticmethod
    def _meta_value(node: fx.Node) -> Any:
        return node.meta.get("example_value", node.meta.get("val"))

    def meta_value(self, node: fx.Node) -> Any:
        """A (possibly fake) tensor with the shape/dtype of ``node``'s output, as traced by Dynamo."""
        return self._value(node)

    # -- extra inputs ------------------------------------------------------------------------------
    def add_input(
        self,
        name: str,
        tensor: torch.Tensor,
        *,
        trainable: bool = False,
        derived_from: Iterable[torch.Tensor] = (),
    ) -> fx.Node:
        """Append a placeholder fed with ``tensor`` on every call; returns its node.

        ``trainable`` tensors get gradients (they must be leaves with ``requires_grad``) and are returned by
        :func:`transfigure.trainable_parameters`. ``derived_from`` names parameters whose current values
        ``tensor`` was computed from; the lowered model checks them for in-place changes on every call.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"add_input({name!r}): expected a tensor, got {type(tensor).__name__}")
        if trainable and not tensor.requires_grad:
            raise ValueError(f"add_input({name!r}, trainable=True) needs a leaf tensor with requires_grad=True")
        safe = re.sub(r"\W", "_", name).strip("_") or "extra"
        if safe[0].isdigit():
            safe = "t_" + safe
        last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(f"tf_{safe}")
        node._dynamo_source = None
        # "unguarded" marks the input static for AOTAutograd, like Dynamo's own parameters (no CUDA-graph copies).
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        fake = self._fake(tensor)
        if fake is not None:
            node.meta["example_value"] = fake
            node.meta["val"] = fake
        index = len(self.example_inputs) + len(self.extra_inputs)
        self.extra_inputs.append(tensor)
        self._add_placeholder(Placeholder(node, index, "extra", name, tensor, trainable))
        for source in derived_from:
            owner = self._fqn_of_tensor(source)
            self.derived_from.append((owner or name, source, source._version))
        if trainable:
            for owner in self._owners():
                registered = _TRAINABLE_BY_OWNER.setdefault(owner, {})
                registered[name] = tensor
        return node

    def cached(self, owner: torch.Tensor, key: str, factory: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor made once per ``owner`` (usually a parameter) and ``key``, reused across recompiles."""
        store = _PERSISTENT.setdefault(owner, {})
        if key not in store:
            store[key] = factory()
        return store[key]

    def _owners(self) -> list[torch.Tensor]:
        return [p.value for p in self._placeholders if p.kind == "parameter"][:1]

    def _fqn_of_tensor(self, tensor: torch.Tensor) -> str | None:
        for p in self._placeholders:
            if p.value is tensor:
                return p.fqn
        return None

    @staticmethod
    def _fake(tensor: torch.Tensor) -> Any:
        try:
            from torch._guards import detect_fake_mode

            mode = detect_fake_mode()
            if mode is None:
                return None
            return mode.from_tensor(tensor, static_shapes=True)
        except Exception:
            return None

    # -- analysis ----------------------------------------------------------------------------------
    def to_networkx(self):
        """A ``networkx.DiGraph`` of the graph: node names as keys, ``op``/``target``/``fqn`` attributes."""
        import networkx as nx

        graph = nx.DiGraph()
        for node in self.graph.nodes:
            graph.add_node(node.name, op=node.op, target=_target_name(node), fqn=self.module_fqn(node), node=node)
            for parent in node.all_input_nodes:
                graph.add_edge(parent.name, node.name)
        return graph

    def recompile(self) -> None:
        self.graph.lint()
        self.gm.recompile()


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None) or str(target)


def written_operands(node: fx.Node) -> list[Any]:
    """What ``node`` writes in place: the first operand of an in-place method or function (``index_copy_``,
    ``add_``...) or of ``setitem``, an ``out=`` tensor, a custom op's arguments its schema marks as written. FX's
    ``is_impure`` knows only the last kind (a Dynamo graph's ``Tensor.index_copy_`` is not impure to it)."""
    if node.op not in ("call_function", "call_method"):
        return []
    name = _target_name(node)
    written: list[Any] = []
    if node.args and ((name.endswith("_") and not name.endswith("__")) or name == "setitem"):
        written.append(node.args[0])
    if "out" in node.kwargs:
        written.append(node.kwargs["out"])
    schema = getattr(node.target, "_schema", None)
    for position, argument in enumerate(schema.arguments if schema is not None else ()):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written.append(node.args[position] if position < len(node.args) else node.kwargs.get(argument.name))
    return written


def trainable_tensors_for(parameters: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trainable extra inputs of every compiled graph that bound one of ``parameters``."""
    found: dict[str, torch.Tensor] = {}
    for parameter in parameters:
        registered = _TRAINABLE_BY_OWNER.get(parameter)
        if registered:
            for name, tensor in registered.items():
                found.setdefault(name, tensor)
    return found
