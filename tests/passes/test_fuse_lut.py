"""lut_fuse: sibling LUT linears (q/k/v, gate/up) run as one lut_linear over one shared buffer."""

import pytest
import torch

import transfigure
from transfigure.models import tiny_model
from transfigure import calibrate

# linears per block that read a shared input: (groups fused, linears in them); GPT-2's c_attn is one linear
EXPECTED = {"llama": (2, 5), "qwen3": (2, 5), "mistral": (2, 5), "bert": (1, 3), "gpt2": (0, 0)}


def _ids(seed=0):
    return torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(seed))


def _out(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _compile(model, **options):
    backend = transfigure.backend(lowering="eager", **options)
    with torch.no_grad():
        y = _out(torch.compile(model, backend=backend)(input_ids=_ids()))
    return y, backend.report.graphs[0]


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_siblings_fuse_exactly_and_share_storage(arch):
    torch._dynamo.reset()
    model = tiny_model(arch)
    layers = model.config.num_hidden_layers
    apart, graph_apart = _compile(model, lut_quant={"fuse_siblings": False, "cache": False})
    torch._dynamo.reset()
    fused, graph = _compile(model, lut_quant={"cache": False})
    groups, members = EXPECTED[arch]
    names = [p.name for p in graph.passes]
    assert names == ["lut_quant", "lut_fuse", "norm_fuse", "act_fuse"]
    assert [p.name for p in graph_apart.passes] == ["lut_quant", "norm_fuse", "act_fuse"]
    fuse = graph.passes[1].result
    assert sum(note.startswith("fused ") for note in fuse.notes) == groups * layers
    assert len(fuse.rewritten) == members * layers
    calls = graph.final_code.count("torch.ops.transfigure.lut_linear.default(")
    assert calls == graph_apart.final_code.count("torch.ops.transfigure.lut_linear.default(") - (members - groups) * layers
    # the same numbers, one GEMV per group
    assert torch.equal(fused, apart)
    # the fused inputs are views of buffers the graph already has: no memory added (BERT's concatenated biases are)
    added = sum(t.bytes for t in fuse.tensors_added)
    assert (added == 0) == (arch != "bert")
    if groups:
        # the fused codes are a view over the per-linear codes (no copy): same storage
        added = {r.name: r for r in graph.passes[0].result.tensors_added}
        assert any(".lut_codes" in name for name in added)
        from transfigure.passes.quantize import packed_weights

        attn = model.model.layers[0].self_attn if hasattr(model, "model") and hasattr(model.model, "layers") else None
        if attn is not None:
            q, k = (next(iter(packed_weights(p.weight).values())) for p in (attn.q_proj, attn.k_proj))
            assert q.codes.untyped_storage().data_ptr() == k.codes.untyped_storage().data_ptr()
            assert k.codes.storage_offset() == q.codes.storage_offset() + q.codes.numel()


def test_disable_keeps_siblings_apart():
    model = tiny_model("llama")
    torch._dynamo.reset()
    _, graph = _compile(model, lut_quant={"cache": False}, disable=["lut_fuse"])
    assert [p.name for p in graph.passes] == ["lut_quant", "norm_fuse", "act_fuse"]
    assert graph.final_code.count("torch.ops.transfigure.lut_linear.default(") == 7 * model.config.num_hidden_layers


def test_fuses_after_sparsity_shares_one_threshold():
    model = tiny_model("llama")
    batches = [torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibration = calibrate(model, batches, progress=False, greedy=False)
    sparsity = {"calibration": calibration, "allocation": "uniform", "target": 0.5}
    torch._dynamo.reset()
    apart, graph_apart = _compile(model, lut_quant={"cache": False}, sparsity=sparsity, disable=["lut_fuse"])
    torch._dynamo.reset()
    fused, graph = _compile(model, lut_quant={"cache": False}, sparsity=sparsity)
    layers = model.config.num_hidden_layers
    assert [p.name for p in graph.passes] == ["lut_quant", "sparsity", "lut_fuse", "norm_fuse", "act_fuse"]
    assert graph.final_code.count("torch.ops.transfigure.sparsify") == 4 * layers
    assert graph.final_code.count("torch.ops.transfigure.lut_linear.default(") == 4 * layers
    assert torch.equal(fused, apart)


def test_weight_change_after_compile_is_still_detected():
    model = tiny_model("llama")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=transfigure.backend(lowering="eager", lut_quant={"cache": False}))
    with torch.no_grad():
        compiled(input_ids=_ids())
        model.model.layers[1].self_attn.k_proj.weight.mul_(2)
        with pytest.raises(Exception, match="changed in place"):
            compiled(input_ids=_ids())
