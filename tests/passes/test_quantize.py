"""The lut_quant pass on the five tiny architectures, plus allocation, caching, release and stale weights."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import transfigure
from transfigure.compiler import OptionError
from transfigure.kernels.grids import get_grid
from transfigure.kernels.lut_format import dequantize
from transfigure.models import tiny_model
from transfigure.passes.bit_allocation import allocate_bits, brute_force_bits, estimate_sensitivities, total_error
from transfigure.passes.quantize import packed_weights

ARCHS = ["llama", "qwen3", "mistral", "gpt2", "bert"]


def _inputs(batch=2, seq=12, seed=0):
    return torch.randint(0, 200, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _out(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _linears(model):
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            out[name] = (module.weight, False)
        elif type(module).__name__ == "Conv1D":
            out[name] = (module.weight, True)
    return out


def _run(model, ids, **options):
    backend = transfigure.backend(lowering="eager", lut_quant=options)
    with torch.no_grad():
        y = _out(torch.compile(model, backend=backend)(input_ids=ids))
    return y, backend.report.graphs[0].passes[0].result


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_becomes_lut_linear_equal_to_dequantized_model(arch):
    model = tiny_model(arch)
    ids = _inputs()
    y, result = _run(model, ids, bits=4, group_size=64, hadamard_size=64, cache=False)
    linears = _linears(model)
    assert sorted(s.fqn for s in result.rewritten) == sorted(linears)
    assert all("lut_linear higgs 4-bit" in s.detail for s in result.rewritten)
    # the same model with every weight replaced by its dequantized packing gives the same output
    reference = tiny_model(arch)
    with torch.no_grad():
        for (name, (weight, transposed)), ref_module in zip(linears.items(), [dict(reference.named_modules())[n] for n in linears]):
            (packed,) = packed_weights(weight).values()
            dense = dequantize(packed)
            ref_module.weight.copy_(dense.t() if transposed else dense)
        expected = _out(reference(input_ids=ids))
    torch.testing.assert_close(y, expected, rtol=2e-4, atol=2e-4)


def test_logit_error_follows_grid_mse():
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    ids = _inputs(seed=1)
    with torch.no_grad():
        exact = _out(model(input_ids=ids))
    errs = {}
    for bits in (2, 3, 4):
        torch._dynamo.reset()
        y, _ = _run(model, ids, bits=bits, group_size=64, hadamard_size=128, cache=False)
        errs[bits] = float((y - exact).norm() / exact.norm())
        # the weights' relative error is the Gaussian grid MSE (rotation makes rows Gaussian)
        w = model.model.layers[0].mlp.up_proj.weight
        packed = [pk for pk in packed_weights(w).values() if pk.bits == bits][0]
        rel = float((dequantize(packed) - w).pow(2).sum() / w.pow(2).sum())
        assert 0.7 < rel / get_grid("higgs", bits).mse < 1.3
    assert errs[4] < errs[3] < errs[2]
    # noise amplitude scales like sqrt(mse): 3->4 bits is sqrt(0.0345/0.0095) = 1.9x
    assert 1.3 < errs[3] / errs[4] < 2.8


def test_options_are_validated():
    model = tiny_model("llama")
    for bad, key in [({"bits": 5}, "bits"), ({"grid": "nf4", "bits": 3}, "grid"), ({"hadamard_size": 100}, "hadamard"),
                     ({"group_size": 100}, "group_size"), ({"grid": (1.0, 2.0)}, "grid"), ({"avg_bits": 5.0}, "avg_bits")]:
        with pytest.raises(OptionError, match=key):
            torch.compile(model, backend=transfigure.backend(lowering="eager", lut_quant=bad))(input_ids=_inputs())
        torch._dynamo.reset()


def test_nf4_uniform_and_custom_codebooks_run():
    model = tiny_model("qwen3")
    ids = _inputs()
    with torch.no_grad():
        exact = _out(model(input_ids=ids))
    for opts in ({"grid": "nf4", "hadamard_size": 0}, {"grid": "uniform", "bits": 3},
                 {"grid": tuple(float(v) for v in torch.linspace(-1, 1, 16)), "hadamard_size": 0},
                 {"p": 2, "bits": 3}):
        torch._dynamo.reset()
        y, result = _run(model, ids, cache=False, group_size=64, **opts)
        assert result.rewritten and float((y - exact).norm() / exact.norm()) < 0.5


def test_release_dense_frees_storage_without_recompiling():
    model = tiny_model("llama")
    ids = _inputs()
    backend = transfigure.backend(lowering="eager", lut_quant={"release_dense": True, "cache": False})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        first = _out(compiled(input_ids=ids))
        weight = model.model.layers[0].self_attn.q_proj.weight
        assert weight.untyped_storage().nbytes() == 0 and weight.shape == (64, 64)
        second = _out(compiled(input_ids=ids))
        _out(compiled(input_ids=_inputs(seed=3)))
    torch.testing.assert_close(first, second)
    assert len(backend.report.graphs) == 1  # no recompile
    assert all("released" in s.detail for s in backend.report.graphs[0].passes[0].result.rewritten)
    assert model.lm_head.weight.untyped_storage().nbytes() > 0


def test_release_dense_with_the_disk_cache_and_a_tied_output_layer(tmp_path, monkeypatch):
    """The disk-cache key hashed CPU weights through Tensor.numpy(), which marks their storage not resizable, so
    release_dense failed ("Trying to resize storage that is not resizable") with the default cache on CPU. With
    the output layer quantized too, its tied embedding weight must stay (the embedding lookup reads it)."""
    monkeypatch.setenv("TRANSFIGURE_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama", tie_word_embeddings=True)
    ids = _inputs()
    with torch.no_grad():
        exact = _out(model(input_ids=ids))
        backend = transfigure.backend(lowering="eager", lut_quant={"release_dense": True, "exclude": ("*embed*",)})
        out = _out(torch.compile(model, backend=backend)(input_ids=ids))
    assert float((out - exact).norm() / exact.norm()) < 0.5
    assert model.model.layers[0].self_attn.q_proj.weight.untyped_storage().nbytes() == 0
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding and embedding.untyped_storage().nbytes() == embedding.numel() * 4
    lm_head = [s for s in backend.report.graphs[0].passes[0].result.rewritten if s.fqn == "lm_head"]
    assert lm_head and "dense weight kept" in lm_head[0].detail


@pytest.mark.parametrize("cache", [False, True])
def test_recompile_policy_repacks_a_changed_weight(tmp_path, monkeypatch, cache):
    """weight_check="recompile" must give what a fresh compile of the changed model gives. The per-parameter
    memory cache of packings used to hand the recompile the codes of the old values (silently stale)."""
    monkeypatch.setenv("TRANSFIGURE_CACHE_DIR", str(tmp_path))
    ids = _inputs()
    opts = {"lut_quant": {"cache": cache}}
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=transfigure.backend(lowering="eager", weight_check="recompile", **opts))
    with torch.no_grad():
        before = _out(compiled(input_ids=ids)).clone()
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
        after = _out(compiled(input_ids=ids))
        torch._dynamo.reset()
        fresh = _out(torch.compile(model, backend=transfigure.backend(lowering="eager", **opts))(input_ids=ids))
    torch.testing.assert_close(after, fresh)
    assert float((after - before).norm()) > 1e-3


def test_changing_weights_after_compile_is_detected():
    model = tiny_model("llama")
    ids = _inputs()
    compiled = torch.compile(model, backend=transfigure.backend(lowering="eager", lut_quant={"cache": False}))
    with torch.no_grad():
        compiled(input_ids=ids)
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
        with pytest.raises(Exception, match="changed in place"):
            compiled(input_ids=ids)


def test_disk_cache_writes_do_not_hold_up_the_compile(tmp_path, monkeypatch):
    """Cache entries are written by a background thread (a cold 8B compile spent seconds in host copies and
    disk writes). A compile returns while they are still queued; nothing is lost: a second compile in the same
    process waits for the entries it needs and reads them."""
    import threading

    from transfigure.passes import quantize

    monkeypatch.setenv("TRANSFIGURE_CACHE_DIR", str(tmp_path))
    release = threading.Event()
    real_write = quantize._write_npz

    def held_write(path, packed):
        release.wait(timeout=60)
        real_write(path, packed)

    monkeypatch.setattr(quantize, "_write_npz", held_write)
    ids = _inputs()
    y1, r1 = _run(tiny_model("llama"), ids, bits=4)
    assert all(s.detail.endswith("(packed)") for s in r1.rewritten)
    assert quantize._PENDING_WRITES and not list(tmp_path.glob("lut_quant/*.npz"))  # compiled before any write
    release.set()
    torch._dynamo.reset()
    y2, r2 = _run(tiny_model("llama"), ids, bits=4)
    assert all(s.detail.endswith("(disk)") for s in r2.rewritten)
    torch.testing.assert_close(y1, y2)
    quantize.flush_cache_writes()
    assert not quantize._PENDING_WRITES
    assert len(list(tmp_path.glob("lut_quant/*.npz"))) == len(r1.rewritten)
    assert not list(tmp_path.glob("lut_quant/*.tmp*"))


def test_queued_cache_writes_are_bounded(tmp_path, monkeypatch):
    """Queued writes keep their packed tensors alive (device memory): past the byte bound a new write waits."""
    from transfigure.passes import quantize

    monkeypatch.setenv("TRANSFIGURE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(quantize, "MAX_PENDING_WRITE_BYTES", 0)
    queued = []
    real_enqueue = quantize._write_in_background

    def enqueue(path, packed):
        real_enqueue(path, packed)
        queued.append(len(quantize._PENDING_WRITES))

    monkeypatch.setattr(quantize, "_write_in_background", enqueue)
    _, result = _run(tiny_model("llama"), _inputs(), bits=4)
    quantize.flush_cache_writes()
    assert len(queued) == len(result.rewritten) and max(queued) == 1
    assert len(list(tmp_path.glob("lut_quant/*.npz"))) == len(result.rewritten)


def test_a_failed_cache_write_is_a_warning(tmp_path, monkeypatch, caplog):
    from transfigure.passes import quantize

    monkeypatch.setenv("TRANSFIGURE_CACHE_DIR", str(tmp_path))

    def full_disk(path, packed):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quantize, "_write_npz", full_disk)
    y, result = _run(tiny_model("llama"), _inputs(), bits=4)
    quantize.flush_cache_writes()
    assert result.rewritten and torch.isfinite(y).all()
    assert any("could not write cache entry" in r.getMessage() for r in caplog.records)


def test_disk_cache_skips_quantization_on_second_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFIGURE_CACHE_DIR", str(tmp_path))
    ids = _inputs()
    y1, r1 = _run(tiny_model("mistral"), ids, bits=3)
    assert all(s.detail.endswith("(packed)") for s in r1.rewritten)
    torch._dynamo.reset()
    y2, r2 = _run(tiny_model("mistral"), ids, bits=3)  # a fresh model object with the same weights
    assert all(s.detail.endswith("(disk)") for s in r2.rewritten)
    torch.testing.assert_close(y1, y2)
    torch._dynamo.reset()
    _, r3 = _run(tiny_model("mistral", seed=1), ids, bits=3)  # different weights: no hit
    assert all(s.detail.endswith("(packed)") for s in r3.rewritten)


def test_avg_bits_allocation_in_the_pass():
    model = tiny_model("llama")
    alphas = estimate_sensitivities(model, seq_len=8)
    assert set(alphas) == set(_linears(model)) | {"lm_head"}
    assert all(a > -1e-3 for a in alphas.values()) and sum(a > 0 for a in alphas.values()) >= len(alphas) // 2
    _, result = _run(model, _inputs(), avg_bits=3.0, sensitivities=alphas, cache=False)
    bits = [int(s.detail.split()[2].split("-")[0]) for s in result.rewritten]
    sizes = [_linears(model)[s.fqn][0].numel() for s in result.rewritten]
    assert sum(b * n for b, n in zip(bits, sizes)) <= 3.0 * sum(sizes)
    assert len(set(bits)) > 1


@given(sizes=st.lists(st.sampled_from([64, 128, 192, 256]), min_size=1, max_size=6),
       alphas=st.lists(st.floats(0.01, 10.0), min_size=6, max_size=6), avg=st.floats(2.0, 4.0),
       p=st.sampled_from([1, 2]))
def test_dp_equals_brute_force(sizes, alphas, avg, p):
    layers = [(f"l{i}", n, a) for i, (n, a) in enumerate(zip(sizes, alphas))]
    dp = allocate_bits(layers, avg, p=p)
    brute = brute_force_bits(layers, avg, p=p)
    total = sum(sizes)
    assert sum(b * n for b, n in zip(dp, sizes)) <= avg * total + 1e-9
    assert total_error(layers, dp, p) == pytest.approx(total_error(layers, brute, p), rel=1e-12)


def test_inductor_lowering():
    model = tiny_model("llama")
    ids = _inputs()
    compiled = torch.compile(model, backend="transfigure", options={"lut_quant": {"bits": 4, "cache": False}})
    with torch.no_grad():
        y = _out(compiled(input_ids=ids))
        exact = _out(model(input_ids=ids))
    assert float((y - exact).norm() / exact.norm()) < 0.2
