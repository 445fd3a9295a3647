"""The ladder pass against the plain-PyTorch reference ladder model, on tiny random HF models (fp32)."""

import operator

import pytest
import torch
import transformers

from transfigure.compiler.graph import GraphView
from transfigure.compiler.options import OptionError
from transfigure.passes.ladder import LadderError, LadderPass, find_residual_chain
from transfigure.reference.ladder import LadderReference

LAYERS = 4


def tiny(arch, seed=0):
    common = dict(vocab_size=256, max_position_embeddings=64)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common, **llama_like),
        "qwen3": lambda: transformers.Qwen3Config(**common, **llama_like, head_dim=16),
        "mistral": lambda: transformers.MistralConfig(**common, **llama_like, sliding_window=None),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=LAYERS, n_head=4, bos_token_id=0, eos_token_id=0),
        "bert": lambda: transformers.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
    }[arch]()
    config._attn_implementation = "sdpa"
    cls = {"llama": transformers.LlamaForCausalLM, "qwen3": transformers.Qwen3ForCausalLM, "mistral": transformers.MistralForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel, "bert": transformers.BertModel}[arch]
    torch.manual_seed(seed)
    return cls(config).eval()


def ids(seed=0, batch=2, length=12):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


_CAPTURED = {}


def captured(arch, **kwargs):
    """Dynamo's graph of ``arch`` (captured once per module), its inputs, the model and the token ids.

    Each test applies the pass to its own copy (GraphView copies), so one Dynamo trace serves many tests.
    """
    key = (arch, tuple(sorted(kwargs.items())))
    if key not in _CAPTURED:
        model, x, graphs = tiny(arch), ids(), []

        def grab(gm, example_inputs):
            graphs.append((gm, list(example_inputs)))
            return gm.forward

        with torch.no_grad():
            torch.compile(model, backend=grab, fullgraph=True)(x, **kwargs)
        torch._dynamo.reset()
        _CAPTURED[key] = (*graphs[0], model, x)
    return _CAPTURED[key]


def run_ladder(arch, call_kwargs=None, **options):
    """Apply the pass to a fresh copy of the captured graph; return (logits, view, result)."""
    gm, example_inputs, model, x = captured(arch, **(call_kwargs or {"use_cache": False}))
    view = GraphView(gm, example_inputs)
    result = LadderPass(**options).run(view)
    with torch.no_grad():
        outputs = view.gm(*view.inputs())
    logits = [o for o in outputs if isinstance(o, torch.Tensor) and o.shape[-1] == 256 and o.dim() == 3]
    return logits[0], view, result


CHOICES = [
    ({}, "all", 0),
    ({"layers": "upper_half"}, "upper_half", 0),
    ({"layers": "last_n", "n": 1}, "last_n", 1),
    ({"layers": [0, 2]}, (0, 2), 0),
]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gpt2"])
@pytest.mark.parametrize("options,layers,n", CHOICES, ids=["all", "upper_half", "last_1", "list_0_2"])
def test_pass_equals_reference(arch, options, layers, n):
    got, _, result = run_ladder(arch, **options)
    _, _, model, x = captured(arch, use_cache=False)
    with torch.no_grad():
        want = LadderReference(model, layers, n)(x)
        stock = model(x, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # The rewrite must change the function (else the comparison above proves nothing).
    assert (got - stock).abs().max() > 1e-3
    converted = LadderReference(model, layers, n).layers
    assert len(result.rewritten) == 2 * len(converted)


def test_reference_without_ladder_is_the_stock_model():
    for arch in ("llama", "gpt2"):
        model = tiny(arch)
        with torch.no_grad():
            assert torch.allclose(LadderReference(model, ())(ids()), model(ids()).logits, atol=1e-6)


def test_chain_structure_llama():
    blocks = find_residual_chain(captured("llama", use_cache=False)[0].graph)
    assert [b.layer for b in blocks] == [i // 2 for i in range(2 * LAYERS)]
    assert [b.kind for b in blocks] == ["attention", "mlp"] * LAYERS


def test_overlap_moves_delayed_adds_after_next_subblock():
    _, view, _ = run_ladder("llama")
    blocks = find_residual_chain(captured("llama", use_cache=False)[0].graph)  # names of the original adds
    names = {node.name: node for node in view.graph.nodes}
    position = {node: i for i, node in enumerate(view.graph.nodes)}
    linears = [n for n in view.graph.nodes if n.target is torch._C._nn.linear]
    for prev, block in zip(blocks, blocks[1:]):
        add = names[prev.add.name]
        next_projections = [n for n in linears if n.name in {b.name for b in block.body}]
        assert next_projections
        assert position[add] > max(position[n] for n in next_projections), f"{add.name} should follow sub-block {block.index}"


def test_no_overlap_keeps_order():
    _, view, _ = run_ladder("llama", overlap=False)
    blocks = find_residual_chain(captured("llama", use_cache=False)[0].graph)
    names = {node.name: node for node in view.graph.nodes}
    position = {node: i for i, node in enumerate(view.graph.nodes)}
    for prev, block in zip(blocks, blocks[1:]):
        assert position[names[prev.add.name]] < min(position[names[n.name]] for n in block.body)


def test_refuses_post_norm_bert():
    gm, example_inputs = None, None
    graphs = []
    torch.compile(tiny("bert"), backend=lambda g, ex: graphs.append((g, ex)) or g.forward, fullgraph=True)(ids())
    with pytest.raises(LadderError) as info:
        LadderPass().run(GraphView(*graphs[0]))
    message = str(info.value)
    assert "post-norm" in message and "layer_norm" in message and "Disable the 'ladder' pass" in message


def test_refuses_graph_without_residual():
    def f(x, w):
        return torch.relu(x @ w)

    graphs = []
    torch.compile(f, backend=lambda g, ex: graphs.append((g, ex)) or g.forward, fullgraph=True)(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(LadderError, match="no residual add found"):
        LadderPass().run(GraphView(*graphs[0]))


def test_refuses_parallel_blocks():
    class Parallel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]) for _ in range(2))

        def forward(self, x):
            for attn, mlp in self.layers:
                x = x + attn(x) + mlp(x)  # GPT-J style: both branches read the same stream
            return x

    graphs = []
    torch.compile(Parallel(), backend=lambda g, ex: graphs.append((g, ex)) or g.forward, fullgraph=True)(torch.randn(2, 8))
    with pytest.raises(LadderError, match="residual stream is interrupted.*parallel block"):
        LadderPass().run(GraphView(*graphs[0]))


def test_option_validation():
    with pytest.raises(OptionError, match="ladder"):
        LadderPass(layers="bogus")
    with pytest.raises(OptionError, match="ladder"):
        LadderPass(layers="last_n")  # n missing
    with pytest.raises(OptionError, match="ladder.overlap"):
        LadderPass(overlap="yes")
    with pytest.raises(LadderError, match="out of range"):
        run_ladder("llama", layers=[7])


def test_decode_with_kv_cache_matches_reference_prefix():
    """Prefill with a KV cache goes through the same rewrite (cache writes are not on the stream)."""
    got, _, _ = run_ladder("llama", call_kwargs={"use_cache": True})
    _, _, model, x = captured("llama", use_cache=True)
    with torch.no_grad():
        want = LadderReference(model, "all")(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_graph_is_valid_after_pass():
    _, view, result = run_ladder("gpt2", layers="upper_half")
    view.graph.lint()
    assert any(n.target is operator.add for n in view.graph.nodes)
    assert any("delayed past sub-block" in note for note in result.notes)


def test_through_transfigure_backend_options():
    """options={"ladder": {...}} on the real backend (eager lowering), with the pass's report."""
    import transfigure
    import transfigure.passes.ladder  # noqa: F401  (registers the pass)

    model = tiny("qwen3")
    x = ids(seed=2)
    backend = transfigure.backend(lowering="eager", ladder={"layers": [1, 3]})
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(x, use_cache=False).logits
        want = LadderReference(model, (1, 3))(x)
    assert torch.allclose(got, want, atol=1e-5)
    report = backend.report.graphs[-1].passes[0]
    assert report.name == "ladder" and len(report.result.rewritten) == 4
