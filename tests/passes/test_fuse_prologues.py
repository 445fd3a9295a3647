import pytest
import torch

import transfigure
from transfigure.models import model_class, tiny_config
from transfigure.passes.teal_calibration import calibrate

FUSED = "torch.ops.transfigure.rmsnorm_lut_linear.default("
FUSED_SPARSE = "torch.ops.transfigure.rmsnorm_rotated_sparse_lut_linear.default("
SWIGLU = "torch.ops.transfigure.silu_mul_lut_linear.default("
SWIGLU_SPARSE = "torch.ops.transfigure.silu_mul_rotated_sparse_lut_linear.default("
UNFUSED = {"fuse_norms": False, "fuse_activations": False}


def _wide_model(arch, seed=0):
    """A tiny model whose hidden size (256) takes the fused kernel's smallest Hadamard block."""
    config = tiny_config(arch)
    for key, value in {"hidden_size": 256, "intermediate_size": 512, "n_embd": 256, "n_inner": 512}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(seed)
    return model_class(arch)(config).eval()


def _logits(model, backend, ids):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend)(input_ids=ids)[0]


def _norm_report(backend):
    return backend.report.pass_report("norm_fuse").result


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_every_norm_after_a_residual_add_moves_into_the_rotation(arch):
    """Two layers: the norms after a residual add (layer 0's post-attention norm, both of layer 1) move into the
    rotated linears they feed; layer 0's input norm reads the embeddings (no add) and stays; the outputs are
    those of the unfused graph."""
    model = _wide_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    fused = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256})
    plain = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256, **UNFUSED})
    expected, got = _logits(model, plain, ids), _logits(model, fused, ids)
    result = _norm_report(fused)
    assert [s.fqn for s in result.rewritten] == ["model.layers.0.post_attention_layernorm",
                                                 "model.layers.1.input_layernorm",
                                                 "model.layers.1.post_attention_layernorm"]
    assert [s.fqn for s in result.skipped] == ["model.layers.0.input_layernorm"]
    assert "not a residual add" in result.skipped[0].detail
    code = fused.report.graphs[0].final_code
    # q/k/v of layer 0 and the two o projections stay plain; both down projections take the SwiGLU product
    assert code.count(FUSED) == 3 and code.count("torch.ops.transfigure.lut_linear.default(") == 3
    assert code.count(SWIGLU) == 2 and "torch.nn.functional.silu(" not in code
    assert [s.fqn for s in fused.report.pass_report("act_fuse").result.rewritten] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # the three fused norms left the graph: layer 0's input norm and the final norm remain
    assert code.count("torch.rsqrt(") == 2 + (4 if arch == "qwen3" else 0)  # Qwen3 also normalizes q and k per head
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_layer_norm_models_are_left_alone(arch):
    model = _wide_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    fused = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256})
    plain = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256, **UNFUSED})
    torch.testing.assert_close(_logits(model, fused, ids), _logits(model, plain, ids), rtol=0, atol=0)
    assert not _norm_report(fused).sites  # no RMSNorm feeds a linear: nothing matched
    assert not fused.report.pass_report("act_fuse").result.sites  # GELU MLPs multiply nothing
    assert "rmsnorm" not in fused.report.graphs[0].final_code


def test_rotated_sparsity_norms_fuse_with_their_compaction():
    model = _wide_model("llama")
    calibration = calibrate(model, [torch.randint(0, model.config.vocab_size, (2, 24)) for _ in range(2)],
                            progress=False, greedy=False, rotations=(256,))
    options = {"sparsity": {"calibration": calibration, "allocation": "uniform", "rotated_basis": True}}
    fused = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256}, **options)
    plain = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256, **UNFUSED}, **options)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    torch.testing.assert_close(_logits(model, fused, ids), _logits(model, plain, ids), rtol=1e-5, atol=1e-5)
    code = fused.report.graphs[0].final_code
    assert code.count(FUSED_SPARSE) == 3 and len(_norm_report(fused).rewritten) == 3
    assert code.count(SWIGLU_SPARSE) == 2


def test_greedy_decoding_gives_the_unfused_tokens():
    model = _wide_model("llama", seed=3)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    tokens = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        backend = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256, "fuse_norms": fuse,
                                                 "fuse_activations": fuse})
        tokens[fuse] = transfigure.generate(model, prompt, 8, backend=backend)
    assert torch.equal(tokens[True], tokens[False])


def test_a_norm_computing_something_else_is_reported_not_fused(monkeypatch):
    """Gemma-style ``(1 + w)`` scaling under a Llama norm's name: the numeric check refuses it."""
    from transformers.models.llama import modeling_llama

    def gemma_like(self, hidden_states):
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1.0 + self.weight) * h.to(hidden_states.dtype)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", gemma_like)
    model = _wide_model("llama")
    fused = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256})
    _logits(model, fused, torch.randint(0, model.config.vocab_size, (1, 4)))
    result = _norm_report(fused)
    assert not result.rewritten and len(result.skipped) == 4
    assert all("1 + w" in s.detail for s in result.skipped if "residual add" not in s.detail)


def test_graphs_traced_for_training_are_left_unfused():
    """Under autograd with trainable inputs the fused ops (no backward) stay out; the backward still runs."""
    model = _wide_model("llama")
    fused = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256}, lowering="eager")
    torch._dynamo.reset()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    torch.compile(model, backend=fused)(input_ids=ids)[0].sum().backward()
    result = _norm_report(fused)
    assert not result.sites and any("training" in note for note in result.notes)
    assert not fused.report.pass_report("act_fuse").result.sites
    code = fused.report.graphs[0].final_code
    assert "rmsnorm" not in code and "silu_mul" not in code


def test_a_product_read_twice_is_reported_not_fused(monkeypatch):
    """An MLP whose SwiGLU product also feeds something else keeps it: the fused op would hide it."""
    from transformers.models.llama import modeling_llama

    def leaky(self, x):
        product = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(product) + 0.0 * product[..., : x.shape[-1]]

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", leaky)
    model = _wide_model("llama")
    fused = transfigure.backend(lut_quant={"bits": 4, "hadamard_size": 256})
    _logits(model, fused, torch.randint(0, model.config.vocab_size, (1, 4)))
    result = fused.report.pass_report("act_fuse").result
    assert not result.rewritten and len(result.skipped) == 2
    assert all("read by more than this linear" in s.detail for s in result.skipped)
