"""The backends with no passes: one graph, eager-equal outputs and gradients, on five architectures."""

import pytest
import torch
import torch._dynamo

import transfigure
from transfigure.models import ARCHITECTURES, example_inputs, tiny_model


def _output(out, arch):
    return out.last_hidden_state if arch == "bert" else out.logits


def test_backends_are_registered_by_name():
    names = torch._dynamo.list_backends()
    assert "transfigure" in names and "transfigure_eager" in names


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inference_matches_eager_in_one_graph(arch):
    model = tiny_model(arch)
    inputs = example_inputs(arch)
    backend = transfigure.backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        expected = _output(model(**inputs), arch)
        actual = _output(compiled(**inputs), arch)
    assert len(backend.report.graphs) == 1
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_step_gradients_match_eager(arch):
    model = tiny_model(arch).train()
    inputs = example_inputs(arch)
    loss_of = lambda m: _output(m(**inputs), arch).float().pow(2).mean()  # noqa: E731
    loss_of(model).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="transfigure", fullgraph=True)
    loss_of(compiled).backward()
    for name, parameter in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
        else:  # parameters off the loss path (BERT's pooler) get no gradient, or an all-zero one
            assert parameter.grad is None or not parameter.grad.any(), name


def test_eager_lowering_runs_rewritten_graph_without_inductor():
    model = tiny_model("llama")
    inputs = example_inputs("llama")
    compiled = torch.compile(model, backend="transfigure_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_generate_with_static_cache_matches_eager():
    model = tiny_model("llama")
    prompt = example_inputs("llama", batch=1, seq_len=8)["input_ids"]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward, backend="transfigure_eager")
    actual = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(actual, expected)


def test_parameters_and_extra_inputs_are_static_for_cuda_graphs(monkeypatch):
    """AOTAutograd must see our copied graph as Dynamo's, or CUDA graphs copy every weight per replay."""
    import torch._functorch.aot_autograd as aot_autograd

    from tests.compiler.test_graph import _TrainableScale

    recorded = []
    original = aot_autograd._try_get_metadata_from_dynamo

    def record(mod, *args, **kwargs):
        sources, static = original(mod, *args, **kwargs)
        recorded.append((len(mod.graph.find_nodes(op="placeholder")), list(static)))
        return sources, static

    monkeypatch.setattr(aot_autograd, "_try_get_metadata_from_dynamo", record)
    model = tiny_model("llama")
    with torch.no_grad():
        torch.compile(model, backend=transfigure.backend(passes=[_TrainableScale()]))(**example_inputs("llama"))
    (count, static), = recorded
    parameters = sum(1 for _ in model.parameters())
    assert len(static) == parameters + 1 + 1  # every parameter, the rotary buffer, the extra input
    assert count - 1 in static  # the extra input is the last placeholder


def test_cpp_wrapper_lowering_with_trainable_extra_inputs():
    """Inductor's cpp_wrapper takes the placeholders' meta["val"] as inputs once any has one: a pass adding inputs
    must not leave Dynamo's own placeholders without (seen: 'embedding(): weight must be Tensor, not NoneType')."""
    torch._dynamo.reset()
    model = tiny_model("llama").requires_grad_(False)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids, labels=ids).loss
    compiled = torch.compile(model, backend=transfigure.backend(
        lora={"r": 2, "target_modules": ["q_proj"]}, inductor_config={"cpp_wrapper": True}))
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, expected)  # B starts at zero: the adapted model equals the base
    assert all(p.grad is not None for p in transfigure.trainable_parameters(model))


@pytest.mark.parametrize("how", ["option", "torch.compile mode"])
def test_mode_reaches_inductor_as_config(monkeypatch, how):
    """torch.compile refuses mode= beside options=, so `mode` is also an option; both forms give Inductor the
    config torch.compile's own mode would (CUDA graphs for reduce-overhead), under the user's inductor_config."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = []
    real = compile_fx_module.compile_fx

    def spy(gm, inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return real(gm, inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    torch._dynamo.reset()
    model = tiny_model("llama")
    inputs = example_inputs("llama")
    backend = None
    if how == "option":
        compiled = torch.compile(model, backend="transfigure",
                                 options={"mode": "reduce-overhead", "inductor_config": {"max_autotune": False}})
    else:
        backend = transfigure.backend(inductor_config={"max_autotune": False})
        compiled = torch.compile(model, backend=backend, mode="max-autotune")
    torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)
    expected = {"triton.cudagraphs": True, "max_autotune": False}
    assert seen and seen[0] == expected
    if backend is not None:  # compiled through a derived backend: the graph is in the report of the user's object
        assert len(backend.report.graphs) == 1
        graph = backend.report.graphs[0]  # the table says how long lowering took of the graph's compile
        assert 0 < graph.lowering_seconds <= graph.compile_seconds
        assert f"lowering: inductor ({graph.lowering_seconds:.1f} s of a" in backend.report.table()
    with pytest.raises(transfigure.OptionError, match="'mode'"):
        transfigure.backend(mode="fastest")


def _prompt_graph_view(arch):
    """The GraphView of a tiny model's prompt step over a transformers StaticCache (as the decoding loop runs it)."""
    import transformers

    from transfigure.backends.decode import _allocate_cache
    from transfigure.compiler import GraphView

    model = tiny_model(arch)
    ids = example_inputs(arch, batch=2, seq_len=5)["input_ids"]
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    _allocate_cache(model, cache, 2, ids.device)
    views = []

    def capture(gm, example_inputs):
        views.append(GraphView(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(
            input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(5))
    return views[0], cache


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_inputs_a_prompt_graph_writes_are_the_static_cache(arch):
    """What makes replaying the eager-lowered prompt from CUDA graphs safe: every input it writes in place is a
    static tensor (the cache's keys, values and fill counters), never one the replay would copy."""
    from transfigure.backends.backend import _mutated_placeholders

    view, cache = _prompt_graph_view(arch)
    inputs = view.inputs()
    mutated = _mutated_placeholders(view)
    written = {id(inputs[i]) for i in mutated}
    expected = {id(t) for layer in cache.layers for t in (layer.keys, layer.values)}
    assert expected <= written
    assert all(hasattr(inputs[i], "_dynamo_static_input_type") for i in mutated)


def test_eager_lowering_on_cpu_ignores_the_cuda_graph_mode():
    from transfigure.backends.backend import _cuda_graphed

    view, _ = _prompt_graph_view("llama")

    def run(*args):
        return view.gm(*args)

    assert _cuda_graphed(view, run) is run  # CPU tensors: no CUDA graphs, the plain eager graph


def test_with_lowering_reports_into_the_same_backend():
    backend = transfigure.backend(lowering="inductor")
    eager = backend.with_lowering("eager")
    assert eager.lowering == "eager" and eager.report is backend.report and backend.with_lowering("inductor") is backend
    model = tiny_model("llama")
    with torch.no_grad():
        torch.compile(model, backend=eager)(**example_inputs("llama"))
    assert [g.lowering for g in backend.report.graphs] == ["eager"]


def test_eager_backend_takes_torch_compile_modes():
    model = tiny_model("llama")
    inputs = example_inputs("llama")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="transfigure_eager", mode="reduce-overhead")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="mode"):
        with torch.no_grad():
            torch.compile(model, backend="transfigure_eager", mode="fastest")(**inputs)
