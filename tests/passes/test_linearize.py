"""The linearize pass on tiny random HF models vs the module-level quadratic reference (fp32, CPU)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import transfigure
import transfigure.passes.linearize  # noqa: F401  (registers the pass)
from transfigure.compiler.options import OptionError
from transfigure.models import tiny_model
from transfigure.passes.attention_transfer import attention_transfer_loss, distill_attention, init_state
from transfigure.passes.linearize import LinearAttentionDecoder, LinearizePass, generate_linear
from transfigure.reference.linear_attention import linearize_reference, restore_reference


def run(model, arch, ids, **kw):
    out = model(ids, **kw)
    return out.last_hidden_state if arch == "bert" else out.logits


CASES = [
    ("llama", "hedgehog", "none", True),
    ("qwen3", "liger", "liger", False),
    ("mistral", "elu", "lolcats", True),
    ("gpt2", "hedgehog", "lolcats", False),
    ("bert", "hedgehog", "none", True),
    ("bert", "elu", "none", False),
]


@pytest.mark.parametrize("arch,feature_map,window,padded", CASES)
def test_pass_equals_module_reference(arch, feature_map, window, padded):
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (2, 26), generator=torch.Generator().manual_seed(1))
    kw = {}
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :6] = 0  # left padding on one row
        kw["attention_mask"] = mask
    opts = {"feature_map": feature_map, "window": window, "window_size": 8, "chunk_size": 16}
    state = init_state(model, feature_map, window)
    gen = torch.Generator().manual_seed(2)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}  # not the identity
    if state:
        opts["state"] = state
    backend = transfigure.backend(lowering="eager", linearize=opts)
    out = run(torch.compile(model, backend=backend), arch, ids, **kw)
    result = backend.report.graphs[-1].passes[0].result
    assert len(result.rewritten) == 2 and not result.skipped, result.sites
    torch._dynamo.reset()
    linearize_reference(model, feature_map, window, window_size=8, state=state)
    ref = run(model, arch, ids, **kw)
    restore_reference(model)
    plain = run(model, arch, ids, **kw)
    keep = kw["attention_mask"].bool() if padded else slice(None)
    err = ((out - ref)[keep].abs().max() / ref[keep].abs().max()).item()
    assert err < 1e-5, err
    assert ((plain - ref)[keep].abs().max() / ref[keep].abs().max()).item() > 1e-5  # it really changed attention


def test_layer_selection_skips_with_reason_and_feature_maps_train():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    backend = transfigure.backend(lowering="eager", linearize={"layers": [1], "chunk_size": 16})
    compiled = torch.compile(model, backend=backend)
    compiled(ids).logits.square().mean().backward()
    result = backend.report.graphs[-1].passes[0].result
    assert [s.status for s in result.sites] == ["skipped", "rewritten"]
    assert "not in layers" in result.skipped[0].detail
    trainable = transfigure.named_trainable_parameters(model)
    assert set(trainable) == {"model.layers.1.self_attn.q_map", "model.layers.1.self_attn.k_map"}
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in trainable.values())


def test_bad_options_name_the_key():
    with pytest.raises(OptionError, match="linearize.feature_map"):
        LinearizePass(feature_map="cosformer")
    with pytest.raises(OptionError, match="linearize.chunk_size"):
        LinearizePass(chunk_size=48)


def test_attention_transfer_reduces_mse_and_feeds_the_pass(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama")
    batches = [torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    kw = dict(feature_map="hedgehog", window="none", chunk_size=16)
    before = attention_transfer_loss(model, batches, None, **kw)
    state = distill_attention(model, batches, steps=10, lr=6e-2, progress=False, **kw)
    after = attention_transfer_loss(model, batches, state, **kw)
    assert after < 0.8 * before, (before, after)
    assert all(not p.requires_grad is False for p in model.parameters())  # model restored
    assert model.config._attn_implementation == "sdpa"
    backend = transfigure.backend(lowering="eager", linearize={"state": state, "chunk_size": 16})
    with torch.no_grad():
        expected = torch.compile(model, backend=backend)(batches[0]).logits
    assert "trained state" in backend.report.graphs[-1].passes[0].result.rewritten[0].detail
    # the state saved to a file and named by path in torch.compile's options (read while Dynamo compiles, where a
    # plain torch.load returns meta tensors) gives the same model
    path = tmp_path / "state.pt"
    torch.save(state, path)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="transfigure_eager", options={"linearize": {"state": str(path), "chunk_size": 16}})
    with torch.no_grad():
        torch.testing.assert_close(compiled(batches[0]).logits, expected)


def _random_state(model, feature_map, window):
    gen = torch.Generator().manual_seed(2)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in init_state(model, feature_map, window).items()}


# every window; Mistral/Qwen3 tiny models have GQA (2 key/value heads for 4 query heads)
@pytest.mark.parametrize("arch,feature_map,window", [("llama", "hedgehog", "none"), ("qwen3", "liger", "liger"), ("mistral", "elu", "lolcats")])
def test_decoder_steps_equal_full_prefix_reference(arch, feature_map, window):
    """Prefill + one recurrent step per token (state and window buffer kept across calls) gives the logits of the
    linearized model run on the whole sequence (module-level reference), and greedy generation picks the same
    tokens as re-running that reference on the full prefix each step."""
    model = tiny_model(arch, num_hidden_layers=1)
    state = _random_state(model, feature_map, window)
    opts = dict(feature_map=feature_map, window=window, window_size=4, chunk_size=16, state=state)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    new = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    dec = LinearAttentionDecoder(model, **opts)
    got = torch.cat([dec.prefill(ids)] + [dec.step(new[:, t : t + 1]) for t in range(new.shape[1])], 1)
    out = generate_linear(model, ids, 5, **opts)
    linearize_reference(model, feature_map, window, window_size=4, state=state)
    with torch.no_grad():
        ref = model(torch.cat([ids, new], 1)).logits
        seq = ids
        for _ in range(5):  # full prefix every step
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    restore_reference(model)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert torch.equal(out, seq)


@given(T=st.integers(1, 90), W=st.sampled_from([16, 32]), chunk=st.sampled_from([16, 64]), G=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_lolcats_linear_part_is_linear_attention_over_blocks_at_least_one_back(T, W, chunk, G, seed):
    from transfigure.passes.linearize import _lolcats_linear_part

    gen = torch.Generator().manual_seed(seed)
    fq, fk = torch.rand(1, 2 * G, T, 8, generator=gen), torch.rand(1, 2, T, 8, generator=gen)
    v = torch.randn(1, 2, T, 4, generator=gen)
    num, den = _lolcats_linear_part(fq, fk, v, T, W, chunk)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    older = (j < (i // W - 1) * W).float()  # keys of blocks n-2 and before, for a query in block n
    scores = (fq @ fk.repeat_interleave(G, 1).transpose(-1, -2)) * older
    # the chunked form subtracts a block's worth of terms from a longer sum: fp32 cancellation, so the absolute
    # tolerance scales with the size of the terms (sums of up to 90 products of features in [0, 1])
    torch.testing.assert_close(num, scores @ v.repeat_interleave(G, 1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(den, scores.sum(-1, keepdim=True), rtol=1e-5, atol=1e-4)


def test_in_place_updates_of_the_graph_survive_the_rewrite():
    """The pass erases only what its rewrite left unused: an in-place update of a graph input in the same graph
    (here a decode step's token buffer, as in transfigure's decoding loop; a static KV cache updates likewise)
    stays. A whole-graph dead-code elimination dropped it: FX does not see ``Tensor.index_copy_`` as impure."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 6))

    def step(model, ids, buffer, position):
        token = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
        buffer.index_copy_(1, position, token[:, None])
        buffer.add_(0)

    backend = transfigure.backend(lowering="eager", linearize={"feature_map": "elu"})
    buffer = torch.full((1, 4), -1)
    torch.compile(step, backend=backend, fullgraph=True)(model, ids, buffer, torch.tensor([2]))
    assert len(backend.report.graphs[0].passes[0].result.rewritten) == 2  # the attention was linearized
    expected = torch.compile(model, backend=transfigure.backend(lowering="eager", linearize={"feature_map": "elu"}))
    with torch.no_grad():
        token = expected(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
    assert buffer.tolist() == [[-1, -1, int(token), -1]]
