"""Graph binding: placeholder kinds and FQNs, site finders, extra inputs, networkx view."""

import torch

import transfigure
from transfigure.compiler import GraphView
from transfigure.models import example_inputs, tiny_model


def _capture(model, inputs):
    views = []

    def capture(gm, example_inputs):
        views.append(GraphView(gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True)(**inputs)
    return views[0], capture


def test_placeholders_are_bound_to_real_tensors_and_fqns():
    model = tiny_model("llama")
    view, _ = _capture(model, example_inputs("llama"))
    params = dict(model.named_parameters())
    kinds = {p.kind for p in view.placeholders}
    assert kinds == {"input", "parameter", "buffer"}
    for placeholder in view.placeholders:
        if placeholder.kind == "parameter":
            assert params[placeholder.fqn] is placeholder.value
    buffers = [p for p in view.placeholders if p.kind == "buffer"]
    assert buffers[0].fqn == "model.rotary_emb.inv_freq"


def test_dynamo_graph_is_not_mutated():
    model = tiny_model("llama")
    seen = []

    def backend(gm, example_inputs):
        before = gm.code
        view = GraphView(gm, example_inputs)
        view.add_input("extra", torch.ones(3))
        view.graph.erase_node(next(n for n in view.graph.nodes if n.op == "output").prev) if False else None
        view.recompile()
        seen.append((before, gm.code, view.gm.code))
        return gm.forward

    torch.compile(model, backend=backend)(**example_inputs("llama"))
    before, after, copy = seen[0]
    assert before == after and copy != before


def test_linear_attention_and_residual_sites_for_llama():
    model = tiny_model("llama")
    view, _ = _capture(model, example_inputs("llama"))
    linears = view.linear_calls()
    names = {s.fqn for s in linears}
    for layer in range(2):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"model.layers.{layer}.{proj}" in names
    assert "lm_head" in names and len(linears) == 15
    q = next(s for s in linears if s.fqn == "model.layers.1.self_attn.k_proj")
    assert (q.out_features, q.in_features, q.layer) == (32, 64, 1)
    assert q.weight_fqn == "model.layers.1.self_attn.k_proj.weight"
    attention = view.attention_calls()
    assert [a.layer for a in attention] == [0, 1] and attention[0].fqn == "model.layers.0.self_attn"
    adds = view.residual_adds()
    assert [(a.layer, view.module_fqn(a.branch_linear).rsplit(".", 1)[-1]) for a in adds] == [
        (0, "o_proj"), (0, "down_proj"), (1, "o_proj"), (1, "down_proj")
    ]
    nx_graph = view.to_networkx()
    assert nx_graph.number_of_nodes() == len(view.graph.nodes)
    import networkx as nx

    assert nx.is_directed_acyclic_graph(nx_graph)


def test_tied_lm_head_keeps_module_fqn():
    model = tiny_model("llama", tie_word_embeddings=True)
    view, _ = _capture(model, example_inputs("llama"))
    head = next(s for s in view.linear_calls() if s.fqn == "lm_head")
    assert head.weight_fqn == "model.embed_tokens.weight"


def test_gpt2_and_bert_sites():
    for arch, expected_linears, expected_adds in (("gpt2", 9, 4), ("bert", 13, 4)):
        view, _ = _capture(tiny_model(arch), example_inputs(arch))
        assert len(view.linear_calls()) == expected_linears, arch
        assert len(view.attention_calls()) == 2, arch
        assert len(view.residual_adds()) == expected_adds, arch


class _TrainableScale(transfigure.Pass):
    """logits * s with a trainable scalar s added as an extra input."""

    name = "trainable_scale"

    def run(self, graph):
        result = transfigure.PassResult(self.name)
        head = next(s for s in graph.linear_calls() if s.fqn == "lm_head")
        weight = graph.tensor(head.weight)
        scale = graph.cached(weight, "scale", lambda: torch.nn.Parameter(torch.full((), 2.0)))
        node = graph.add_input("lm_head.scale", scale, trainable=True)
        with graph.graph.inserting_after(head.node):
            scaled = graph.graph.call_function(torch.mul, (head.node, node))
        head.node.replace_all_uses_with(scaled)
        scaled.update_arg(0, head.node)
        result.rewrote(head, "scaled")
        return result


def test_trainable_extra_input_gets_gradients_through_inductor():
    model = tiny_model("llama")
    inputs = example_inputs("llama")
    backend = transfigure.backend(passes=[_TrainableScale()])
    compiled = torch.compile(model, backend=backend)
    out = compiled(**inputs).logits
    torch.testing.assert_close(out, 2 * model(**inputs).logits, rtol=1e-5, atol=1e-5)
    (scale,) = transfigure.trainable_parameters(model)
    out.sum().backward()
    expected = model(**inputs).logits.sum()
    torch.testing.assert_close(scale.grad, expected.detach(), rtol=1e-4, atol=1e-4)
    assert model.lm_head.weight.grad is not None
    report = backend.report.graphs[0].passes[0]
    assert report.result.tensors_added[0].trainable and report.result.tensors_added[0].name == "lm_head.scale"
