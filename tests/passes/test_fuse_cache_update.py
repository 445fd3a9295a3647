"""The ``cache_update_fuse`` pass: RoPE, the static-cache write and the fill counter of each decode step move into
the decode attention op, on real architectures, with the tokens of the unfused graph."""

import pytest
import torch
import transformers

import transfigure
from transfigure.models import tiny_model

FUSED = "torch.ops.transfigure.decode_attention_update.default("


def _result(backend, name="cache_update_fuse"):
    return [p.result for g in _steps(backend) for p in g.passes if p.result.pass_name == name]


def _final_code(backend):
    return [g.final_code for g in _steps(backend)]



def _steps(backend):
    """The graphs but the decoding loop's prompt graphs (those go through the same passes and skip every site)."""
    return [g for g in backend.report.graphs if g.label != "prompt"]


def _prompt(vocab, batch=2, length=7, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _layers(model):
    return getattr(model.config, "num_hidden_layers", None) or model.config.n_layer


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gpt2"])
@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_every_decode_step_update_moves_into_the_attention_op(arch, lowering):
    model = tiny_model(arch)
    prompt = _prompt(model.config.vocab_size)
    unfused = transfigure.backend(lowering=lowering, decode_attention={"fuse_cache_update": False})
    expected = transfigure.generate(model, prompt, 10, backend=unfused)
    torch._dynamo.reset()
    fused = transfigure.backend(lowering=lowering, decode_attention={})
    assert torch.equal(transfigure.generate(model, prompt, 10, backend=fused), expected)
    (result,) = _result(fused)
    assert len(result.rewritten) == _layers(model) and not result.skipped
    rope = arch != "gpt2"  # GPT-2 has learned absolute positions: the op only writes the cache
    assert all(s.detail.startswith("RoPE + ") == rope for s in result.rewritten)
    (code,) = _final_code(fused)
    assert code.count(FUSED) == _layers(model)
    assert "index_copy_(2" not in code  # the cache writes are gone
    # so are the fill counters' increments, but for layer 0's: the mask and the rotary positions also read it
    assert code.count(".add_(") == 1 and "counter read elsewhere" in result.rewritten[0].detail
    assert code.count("torch.cat(") == int(rope)  # only the rotary table (freqs, freqs) is left: no rotate_half
    # the tables and the mask every layer reads go through one op, so Inductor computes them once per step
    assert code.count("torch.ops.transfigure.shared_step_inputs.default(") == 1
    assert not _result(unfused)  # the option turns the pass off


def test_fill_counters_and_cache_match_the_unfused_step():
    """After a prefill and three fused decode steps, each layer's cache and fill counter hold what transformers'
    own ``StaticLayer.update`` wrote."""
    model = tiny_model("llama")
    ids = _prompt(model.config.vocab_size, batch=1, length=5)
    steps = [_prompt(model.config.vocab_size, batch=1, length=1, seed=s) for s in (1, 2, 3)]

    def run(compiled):
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
            logits = [compiled(step, past_key_values=cache, use_cache=True).logits for step in steps]
        return cache, torch.stack(logits)

    want_cache, want = run(model)
    backend = transfigure.backend(lowering="eager", decode_attention={})
    got_cache, got = run(torch.compile(model, backend=backend))
    assert len(_result(backend)[0].rewritten) == _layers(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(got_cache.layers, want_cache.layers):
        assert int(mine.cumulative_length) == int(theirs.cumulative_length) == 8
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)


def test_graphs_traced_for_training_are_left_alone():
    model = tiny_model("llama").train()
    cache = transformers.StaticCache(config=model.config, max_cache_len=12)
    ids = _prompt(model.config.vocab_size, batch=1, length=4)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    backend = transfigure.backend(lowering="eager", decode_attention={})
    torch.compile(model, backend=backend)(ids[:, :1], past_key_values=cache, use_cache=True)
    (result,) = _result(backend)
    assert not result.sites and any("traced for training" in n for n in result.notes)
