"""The TEAL ``sparsity`` pass and its calibration, on the five tiny architectures and a trained tiny Llama."""

import fnmatch

import pytest
import torch

import transfigure
from transfigure.compiler import OptionError
from transfigure.models import text_corpus, tiny_model, trained_tiny_llama
from transfigure.passes.sparsity import SparsityPass
from transfigure.passes.teal_calibration import (
    Calibration,
    CalibrationMismatchError,
    block_errors,
    calibrate,
    measure_sparsity,
    thresholded,
)

# Where TEAL puts thresholds: one per distinct projection input in every block (module-name suffixes,
# grouped by shared input), and nowhere outside the blocks.
EXPECTED_SITES = {
    "llama": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)],
    "gpt2": [("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)],
    "bert": [("attention.self.query", "attention.self.key", "attention.self.value"), ("attention.output.dense",),
             ("intermediate.dense",), ("output.dense",)],
}
EXPECTED_SITES["qwen3"] = EXPECTED_SITES["mistral"] = EXPECTED_SITES["llama"]
BLOCKS = {"llama": "model.layers.{}", "qwen3": "model.layers.{}", "mistral": "model.layers.{}",
          "gpt2": "transformer.h.{}", "bert": "encoder.layer.{}"}


def _random_batches(count, batch=2, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (batch, seq), generator=g) for _ in range(count)]


def _held_out_split(seq_len, batch, count, part, seed):
    """Windows of the pydoc corpus cut in 4 KiB chunks: even chunks calibrate, odd chunks are held out."""
    data = torch.frombuffer(bytearray(text_corpus()), dtype=torch.uint8).long()
    chunks = data[: len(data) // 4096 * 4096].view(-1, 4096)[part::2]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        rows = torch.randint(0, len(chunks), (batch,), generator=g).tolist()
        cols = torch.randint(0, 4096 - seq_len, (batch,), generator=g).tolist()
        out.append(torch.stack([chunks[r, c:c + seq_len] for r, c in zip(rows, cols)]))
    return out


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two busy ones
    try:
        model = trained_tiny_llama()
        calibration = calibrate(model, _held_out_split(128, 8, 12, part=0, seed=1), progress=False,
                                greedy_step=0.1, greedy_batches=1)
        yield model, calibration
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gpt2", "bert"])
def test_thresholds_exactly_where_teal_puts_them(arch):
    model = tiny_model(arch)
    calibration = calibrate(model, _random_batches(2), progress=False, greedy=False)
    expected = [tuple(BLOCKS[arch].format(layer) + "." + suffix for suffix in group)
                for layer in range(2) for group in EXPECTED_SITES[arch]]
    assert [s.members for s in calibration.sites] == expected

    backend = transfigure.backend(lowering="eager", sparsity={"calibration": calibration, "target": 0.5, "allocation": "uniform"})
    compiled = torch.compile(model, backend=backend)
    x = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        out = _output(compiled(x))
        thresholds = calibration.thresholds(0.5, "uniform")
        with thresholded(model, thresholds):
            reference = _output(model(x))
        dense = _output(model(x))
    result = backend.report.graphs[0].passes[0].result
    rewritten = {s.fqn for s in result.rewritten}
    assert rewritten == {m for group in expected for m in group}
    assert not result.skipped
    # the graph: one sparse_linear per TEAL site (q/k/v and gate/up fused over their stacked columns)
    graph = backend.report.graphs[0].final_code
    assert graph.count("transfigure.sparse_linear") == len(expected)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert (out - dense).abs().max() > 1e-4  # the thresholds did change the output

    separate = transfigure.backend(lowering="eager", sparsity={"calibration": calibration, "target": 0.5,
                                                               "allocation": "uniform", "fuse_siblings": False})
    with torch.no_grad():
        torch.testing.assert_close(_output(torch.compile(model, backend=separate)(x)), reference, rtol=1e-5, atol=1e-5)
    assert separate.report.graphs[0].final_code.count("transfigure.sparse_linear") == len(rewritten)


def test_held_out_sparsity_within_two_points(trained):
    model, calibration = trained
    held_out = _held_out_split(128, 8, 8, part=1, seed=2)
    for target in (0.4, 0.5):
        for allocation in ("uniform", "greedy"):
            levels = calibration.sparsities(target, allocation)
            measured = measure_sparsity(model, calibration, calibration.thresholds(target, allocation), held_out)
            worst = max(abs(measured[name] - levels[name]) for name in measured)
            assert worst < 0.02, (target, allocation, measured, levels)
            for block_level in calibration.block_sparsity(levels).values():
                assert block_level == pytest.approx(target, abs=1e-9)


def test_greedy_beats_uniform_block_error(trained):
    model, calibration = trained
    held_out = _held_out_split(128, 8, 4, part=1, seed=3)
    errors = {a: block_errors(model, calibration, calibration.thresholds(0.5, a), held_out) for a in ("uniform", "greedy")}
    assert sum(errors["greedy"].values()) < 0.9 * sum(errors["uniform"].values()), errors
    levels = calibration.sparsities(0.5, "greedy")
    assert max(levels.values()) - min(levels.values()) > 0.1  # greedy really reallocates


def test_save_load_roundtrip(tmp_path, trained):
    model, calibration = trained
    path = tmp_path / "teal.pt"
    calibration.save(path)
    loaded = Calibration.load(path)
    for allocation in ("uniform", "greedy"):
        assert loaded.thresholds(0.45, allocation) == calibration.thresholds(0.45, allocation)
    # a path works as the option value too
    backend = transfigure.backend(lowering="eager", sparsity={"calibration": str(path), "target": 0.45})
    compiled = torch.compile(model, backend=backend)
    x = torch.randint(0, 256, (1, 3))
    with torch.no_grad(), thresholded(model, calibration.thresholds(0.45, "greedy")):
        torch.testing.assert_close(_output(compiled(x)), _output(model(x)), rtol=1e-5, atol=1e-5)
    # ... also through backend="transfigure_eager", whose options are read while Dynamo compiles: torch.load
    # inside Dynamo's tracing context returns meta tensors ("Tensor.item() cannot be called on meta tensors")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="transfigure_eager", options={"sparsity": {"calibration": str(path), "target": 0.45}})
    with torch.no_grad(), thresholded(model, calibration.thresholds(0.45, "greedy")):
        torch.testing.assert_close(_output(compiled(x)), _output(model(x)), rtol=1e-5, atol=1e-5)


def test_mismatched_calibration_names_first_difference():
    calibration = calibrate(tiny_model("llama"), _random_batches(1), progress=False, greedy=False)
    wider = tiny_model("llama", intermediate_size=96)
    backend = transfigure.backend(lowering="eager", sparsity={"calibration": calibration, "allocation": "uniform"})
    with pytest.raises(Exception, match=r"model\.layers\.0\.mlp\.down_proj.*in_features=96"):
        torch.compile(wider, backend=backend)(torch.randint(0, 256, (1, 4)))
    deeper = tiny_model("llama", num_hidden_layers=3)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"model\.layers\.2\.self_attn\.q_proj"):
        torch.compile(deeper, backend=backend)(torch.randint(0, 256, (1, 4)))
    with pytest.raises(CalibrationMismatchError, match="gpt2|transformer.h.0"):
        calibration.check({"transformer.h.0.attn.c_attn": 64})
    # a layer this graph holds must be complete; layers it does not hold (another graph's) are not asked for
    layer0 = {fqn: site.in_features for fqn, site in calibration.site_of().items() if site.layer == 0}
    calibration.check(layer0)
    with pytest.raises(CalibrationMismatchError, match=r"model\.layers\.0\.mlp\.up_proj.*layer 0"):
        calibration.check({k: v for k, v in layer0.items() if not k.endswith("up_proj")})


def test_graph_fragments_after_a_graph_break():
    """GPT-2 with labels compiles to two graphs (model, then the loss): the loss graph has no linears."""
    model = tiny_model("gpt2")
    calibration = calibrate(model, _random_batches(1), progress=False, greedy=False)
    ids = torch.randint(0, 256, (2, 12))
    torch._dynamo.reset()
    backend = transfigure.backend(lowering="eager", sparsity={"calibration": calibration, "allocation": "uniform"},
                                  ladder={"layers": "all"})
    loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert len(backend.report.graphs) == 2
    main, fragment = backend.report.graphs
    by_name = {p.name: p for p in main.passes}
    assert len(by_name["sparsity"].result.rewritten) == 4 * model.config.n_layer and by_name["ladder"].result.rewritten
    assert [len(p.result.rewritten) for p in fragment.passes] == [0, 0]
    assert any("graph break" in note for note in fragment.passes[0].result.notes)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_target_outside_unit_interval_is_an_option_error(bad):
    calibration = calibrate(tiny_model("llama"), _random_batches(1), progress=False, greedy=False)
    with pytest.raises(OptionError, match="sparsity.target"):
        transfigure.backend(sparsity={"calibration": calibration, "target": bad})
    with pytest.raises(OptionError, match="sparsity"):
        transfigure.backend(sparsity={"target": 0.5})  # no calibration


def test_modules_filter_and_dense_prefill():
    model = tiny_model("llama")
    calibration = calibrate(model, _random_batches(2), progress=False, greedy=False)
    backend = transfigure.backend(lowering="eager", sparsity={
        "calibration": calibration, "allocation": "uniform", "modules": ["*.mlp.*"], "sparse_prefill": False})
    compiled = torch.compile(model, backend=backend, dynamic=False)
    thresholds = {k: v for k, v in calibration.thresholds(0.5, "uniform").items() if fnmatch.fnmatch(k, "*.mlp.*")}
    with torch.no_grad():
        short, long = torch.randint(0, 256, (1, 4)), torch.randint(0, 256, (1, 12))
        with thresholded(model, thresholds):
            expected_short = _output(model(short))
        torch.testing.assert_close(_output(compiled(short)), expected_short, rtol=1e-5, atol=1e-5)
        # 12 tokens > 8: dense prefill, same as the unmodified model
        torch.testing.assert_close(_output(compiled(long)), _output(model(long)), rtol=1e-5, atol=1e-5)
    result = backend.report.graphs[0].passes[0].result
    assert {s.fqn.split(".")[-2] for s in result.rewritten} == {"mlp"}
    assert len(result.skipped) == 8


def test_pass_is_registered_with_order_after_quantization():
    assert transfigure.compiler.builtin_passes()["sparsity"] is SparsityPass
    assert SparsityPass.order == 45


class _LutQuantForTest(transfigure.Pass):
    """Stands in for the quantization pass (order 40): every block linear -> transfigure::lut_linear."""

    name = "test_lut"
    order = 40

    def __init__(self, hadamard_size=0):
        super().__init__()
        self.hadamard_size = hadamard_size

    def run(self, graph):
        from transfigure.kernels import lut_gemm  # noqa: F401  (registers the op)
        from transfigure.kernels.lut_format import pack

        result = transfigure.PassResult(self.name)
        for site in graph.linear_calls():
            if site.layer is None:
                continue
            w = graph.tensor(site.weight)
            packed = pack(w.detach(), torch.linspace(-1.5, 1.5, 16), bits=4, group_size=32, hadamard_size=self.hadamard_size)
            args = list(packed.op_args())
            args[0] = graph.add_input(f"{site.fqn}.codes", packed.codes)
            args[1] = graph.add_input(f"{site.fqn}.scales", packed.scales)
            args[2] = graph.add_input(f"{site.fqn}.table", packed.table)
            if packed.signs is not None:
                args[3] = graph.add_input(f"{site.fqn}.signs", packed.signs)
            args[4] = site.bias
            with graph.graph.inserting_before(site.node):
                new = graph.graph.call_function(torch.ops.transfigure.lut_linear.default, (site.input, *args))
            graph.replace_linear(site, new)
            result.rewrote(site, "lut4")
        return result


@pytest.mark.parametrize("hadamard_size", [0, 32])
def test_composes_with_lut_quantization(hadamard_size):
    model = tiny_model("llama")
    calibration = calibrate(model, _random_batches(2), progress=False, greedy=False)
    both = transfigure.backend(passes=[_LutQuantForTest(hadamard_size)], lowering="eager",
                               sparsity={"calibration": calibration, "allocation": "uniform"})
    x = torch.randint(0, 256, (1, 4))
    with torch.no_grad():
        sparse = _output(torch.compile(model, backend=both)(x))
    result = both.report.pass_report("sparsity").result
    assert len(result.rewritten) == 14
    code = both.report.graphs[0].final_code
    if hadamard_size == 0:
        assert code.count("torch.ops.transfigure.sparse_lut_linear") == 14 and all("sparse LUT GEMV" in s.detail for s in result.rewritten)
        assert not result.warnings
    else:
        # one threshold op per distinct input, as in TEAL (q/k/v share one, gate/up share one): 4 per block
        assert code.count("torch.ops.transfigure.sparsify") == 8 and code.count("torch.ops.transfigure.lut_linear") == 14
        # thresholds before a rotation buy no sparse kernel: the report says so, with what to do
        assert len(result.warnings) == 1 and "14 quantized linear(s)" in result.warnings[0]
        assert "sparsity.modules" in result.warnings[0] and "warning: 14 quantized" in both.report.table()
    # reference: an eager replica whose block linears hold the dequantized weights, inputs thresholded
    replica = tiny_model("llama")
    from transfigure.kernels.lut_format import dequantize, pack

    for fqn, module in replica.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in fqn:
            packed = pack(module.weight.detach(), torch.linspace(-1.5, 1.5, 16), bits=4, group_size=32, hadamard_size=hadamard_size)
            module.weight.data.copy_(dequantize(packed))
    with torch.no_grad(), thresholded(replica, calibration.thresholds(0.5, "uniform")):
        reference = _output(replica(x))
    torch.testing.assert_close(sparse, reference, rtol=1e-4, atol=1e-4)


def test_inductor_lowering_matches_eager_thresholds():
    """The default lowering (Inductor, extra inputs, custom ops) gives the same numbers as eager thresholds."""
    model = tiny_model("llama")
    calibration = calibrate(model, _random_batches(2), progress=False, greedy=False)
    compiled = torch.compile(model, backend=transfigure.backend(sparsity={"calibration": calibration, "allocation": "uniform"}))
    x = torch.randint(0, 256, (1, 6))
    with torch.no_grad(), thresholded(model, calibration.thresholds(0.5, "uniform")):
        expected = _output(model(x))
    with torch.no_grad():
        torch.testing.assert_close(_output(compiled(x)), expected, rtol=1e-5, atol=1e-5)


# -- thresholds in the rotated basis of Hadamard-rotated LUT linears -----------------------------------------
def _rotated_hooks(model, calibration, target, allocation="uniform"):
    """Eager reference of rotated-basis sparsity: each block linear sees ``R^T s_R(R x)``, so a rotated LUT
    linear computes ``s_R(R x) W_r^T`` (R is orthogonal; lut_quant's effective Hadamard size and signs)."""
    from transfigure.kernels.fwht import ifwht_reference
    from transfigure.kernels.lut_format import random_signs, rotate_input
    from transfigure.kernels.rotated_sparse_lut import rotated_sparsify_reference
    from transfigure.passes.quantize import effective_sizes

    handles = []
    modules = dict(model.named_modules())
    for fqn, module in modules.items():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in fqn:
            continue
        k = module.in_features
        h = effective_sizes(k, 128, 512, 1)[1]
        tau = calibration.rotated_thresholds(target, allocation, h)[fqn]
        signs = random_signs(-(-k // h) * h, 0)

        def pre(module, args, h=h, tau=tau, signs=signs, k=k):
            z = rotate_input(args[0], signs, h, signs.numel())
            return (ifwht_reference(rotated_sparsify_reference(z, tau, h), signs, h)[..., :k], *args[1:])

        handles.append(module.register_forward_pre_hook(pre))
    return handles


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rotated_basis_sparsity_with_lut_quant(arch):
    """4-bit rotated LUT linears: the threshold moves into the rotated basis, q/k/v and gate/up become one
    ``rotated_sparse_lut_linear`` each, and the output equals lut_quant alone fed ``R^T s_R(R x)``."""
    model = tiny_model(arch)
    calibration = calibrate(model, _random_batches(2), progress=False, greedy=False)
    both = transfigure.backend(lowering="eager", lut_quant={"bits": 4},
                               sparsity={"calibration": calibration, "allocation": "uniform", "rotated_basis": True})
    x = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        sparse = _output(torch.compile(model, backend=both)(x))
    result = both.report.graphs[0].passes[1].result
    assert result.pass_name == "sparsity" and not result.warnings and len(result.rewritten) == 14
    assert all("rotated-basis sparse LUT GEMV" in s.detail for s in result.rewritten)
    code = both.report.graphs[0].final_code
    assert code.count("torch.ops.transfigure.rotated_sparse_lut_linear.default(") == 8  # qkv, o, gate/up, down x 2
    assert "torch.ops.transfigure.sparsify" not in code and "torch.ops.transfigure.lut_linear" not in code
    torch._dynamo.reset()
    quant_only = transfigure.backend(lowering="eager", lut_quant={"bits": 4})
    compiled = torch.compile(model, backend=quant_only)
    handles = _rotated_hooks(model, calibration, 0.5)
    try:
        with torch.no_grad():
            expected = _output(compiled(x))
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(sparse, expected, rtol=2e-4, atol=2e-4)
    with torch.no_grad():
        assert (_output(compiled(x)) - sparse).abs().max() > 1e-3  # the thresholds did change the output


def test_rotated_basis_off_or_uncalibrated_thresholds_before_the_rotation():
    model = tiny_model("llama")
    x = torch.randint(0, 256, (1, 5))
    for calibration, options in ((calibrate(model, _random_batches(2), progress=False, greedy=False),
                                  {}),
                                 (calibrate(model, _random_batches(2), progress=False, greedy=False, rotations=()),
                                  {"rotated_basis": True})):
        torch._dynamo.reset()
        backend = transfigure.backend(lowering="eager", lut_quant={"bits": 4},
                                      sparsity={"calibration": calibration, "allocation": "uniform", **options})
        with torch.no_grad():
            torch.compile(model, backend=backend)(x)
        result = backend.report.graphs[0].passes[1].result
        code = backend.report.graphs[0].final_code
        assert "rotated_sparse_lut_linear" not in code and code.count("torch.ops.transfigure.sparsify") == 8
        assert any("only threshold their input" in w for w in result.warnings)
        assert any("rotations=(64, 128)" in w for w in result.warnings) == bool(options)


def test_rotated_thresholds_hold_out_within_two_points(trained):
    """tau calibrated on even chunks of the corpus gives the allocated sparsity of |Rx|/rms on the odd ones."""
    from transfigure.kernels.lut_format import random_signs, rotate_input
    from transfigure.kernels.rotated_sparse_lut import rotated_keep
    from transfigure.passes.quantize import effective_sizes

    model, calibration = trained
    held_out = _held_out_split(128, 8, 6, part=1, seed=2)
    modules = dict(model.named_modules())
    for target, allocation in ((0.4, "uniform"), (0.5, "greedy")):
        levels = calibration.sparsities(target, allocation)
        dropped: dict[str, list[float]] = {}
        handles = []
        for site in calibration.sites:
            k = site.in_features
            h = effective_sizes(k, 128, 512, 1)[1]
            tau = calibration.rotated_thresholds(target, allocation, h)[site.name]
            signs = random_signs(k, 0)

            def pre(module, args, name=site.name, h=h, tau=tau, signs=signs):
                keep = rotated_keep(rotate_input(args[0], signs, h, signs.numel()), tau, h)
                dropped.setdefault(name, []).append(1.0 - keep.float().mean().item())

            handles.append(modules[site.name].register_forward_pre_hook(pre))
        try:
            with torch.no_grad():
                for batch in held_out:
                    model(input_ids=batch)
        finally:
            for handle in handles:
                handle.remove()
        worst = max(abs(sum(v) / len(v) - levels[name]) for name, v in dropped.items())
        assert worst < 0.02, (target, allocation, worst)
    path_levels = calibration.rotated_thresholds(0.5, "uniform", 64)
    assert all(0.55 < t < 0.8 for fqn, t in path_levels.items() if not fqn.endswith("down_proj"))
