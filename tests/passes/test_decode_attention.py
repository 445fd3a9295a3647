"""The ``decode_attention`` pass on real architectures: decode steps rewritten, prefill and encoders left alone."""

import re

import pytest
import torch

import transfigure
from transfigure.compiler import OptionError
from transfigure.models import example_inputs, tiny_model


def _pass_result(backend, name="decode_attention"):
    return [p.result for g in _steps(backend) for p in g.passes if p.result.pass_name == name]



def _steps(backend):
    """The graphs but the decoding loop's prompt graphs (those go through the same passes and skip every site)."""
    return [g for g in backend.report.graphs if g.label != "prompt"]


def _prompt(vocab, batch=2, length=7, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gpt2"])
def test_decode_steps_rewritten_tokens_unchanged(arch):
    model = tiny_model(arch)
    prompt = _prompt(model.config.vocab_size)
    expected = transfigure.generate(model, prompt, 10, backend=transfigure.backend(lowering="eager"))
    torch._dynamo.reset()
    backend = transfigure.backend(lowering="eager", decode_attention={})
    assert torch.equal(transfigure.generate(model, prompt, 10, backend=backend), expected)
    (result,) = _pass_result(backend)
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    assert len(result.rewritten) == layers and not result.skipped
    gqa = model.config.num_attention_heads != getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
    assert all(("repeat_kv (looked through)" in s.detail) == gqa for s in result.rewritten)


def test_rewritten_graph_has_no_sdpa_and_no_repeated_cache():
    model = tiny_model("llama")
    backend = transfigure.backend(lowering="eager", decode_attention={})
    transfigure.generate(model, _prompt(model.config.vocab_size), 4, backend=backend)
    (report,) = [p for g in _steps(backend) for p in g.passes if p.result.pass_name == "decode_attention"]
    repeat_kv = re.compile(r"\.expand\((\d+, ){4}\d+\)")  # x[:, :, None].expand(B, Hk, G, L, d): a copy per step
    assert report.code_before.count("scaled_dot_product_attention") == 2 and len(repeat_kv.findall(report.code_before)) == 4
    assert "scaled_dot_product_attention" not in report.code_after
    assert report.code_after.count("transfigure.decode_attention") == 2
    assert not repeat_kv.findall(report.code_after)


def test_decode_step_logits_match_with_inductor():
    model = tiny_model("qwen3")
    prompt = _prompt(model.config.vocab_size, batch=1, length=9)
    expected = transfigure.generate(model, prompt, 6, backend=transfigure.backend(lowering="eager"))
    torch._dynamo.reset()
    backend = transfigure.backend(decode_attention={})  # Inductor lowering around the custom op
    assert torch.equal(transfigure.generate(model, prompt, 6, backend=backend), expected)
    assert _pass_result(backend)[0].rewritten


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_prefill_and_encoder_sites_keep_sdpa_with_the_reason(arch):
    model = tiny_model(arch)
    backend = transfigure.backend(lowering="eager", decode_attention={})
    compiled = torch.compile(model, backend=backend)
    inputs = example_inputs(arch, batch=2, seq_len=12)
    with torch.no_grad():
        got, want = compiled(**inputs), model(**inputs)
    out = (lambda o: o.logits if hasattr(o, "logits") else o.last_hidden_state)  # noqa: E731
    torch.testing.assert_close(out(got), out(want))
    (result,) = _pass_result(backend)
    assert not result.rewritten and result.skipped
    assert all("query length 12 > max_query_tokens=4" in s.detail for s in result.skipped)


def test_speculative_length_is_an_option():
    """A 3-token query (e.g. a speculative draft verified against the cache) is rewritten once allowed."""
    import transformers

    model = tiny_model("llama")
    ids = _prompt(model.config.vocab_size, batch=1, length=8)
    step, position = _prompt(model.config.vocab_size, batch=1, length=3, seed=1), torch.arange(8, 11)

    def prefilled_cache():  # the cache tracks its own fill level: each run gets its own copy
        cache = transformers.StaticCache(config=model.config, max_cache_len=20)
        with torch.no_grad():
            model(ids, past_key_values=cache, cache_position=torch.arange(8), use_cache=True)
        return cache

    with torch.no_grad():
        want = model(step, past_key_values=prefilled_cache(), cache_position=position, use_cache=True).logits
    for allowed, rewritten in ((2, False), (3, True)):
        torch._dynamo.reset()
        backend = transfigure.backend(lowering="eager", decode_attention={"max_query_tokens": allowed})
        with torch.no_grad():
            got = torch.compile(model, backend=backend)(step, past_key_values=prefilled_cache(), cache_position=position,
                                                        use_cache=True).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        (result,) = _pass_result(backend)
        assert bool(result.rewritten) == rewritten


@pytest.mark.parametrize("bad", [{"max_query_tokens": 0}, {"max_query_tokens": 65}, {"max_query_token": 2}])
def test_bad_options_name_the_key(bad):
    with pytest.raises(OptionError, match="max_query_token"):
        torch.compile(tiny_model("llama"), backend=transfigure.backend(lowering="eager", decode_attention=bad))(
            **example_inputs("llama"))
