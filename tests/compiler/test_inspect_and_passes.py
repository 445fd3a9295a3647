"""User passes, the pipeline (order, disable, verify), reports, dumps, and the stale-weight guard."""

import json
import sys
from pathlib import Path

import pytest
import torch

import transfigure
from transfigure.models import example_inputs, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from custom_pass import ExpandSilu  # noqa: E402  (the README's custom pass, kept runnable)


def test_readme_custom_pass_rewrites_and_report_shows_code_and_diff(tmp_path):
    model = tiny_model("llama")
    inputs = example_inputs("llama")
    report = transfigure.inspect(model, passes=[ExpandSilu(layers=(0,))], kwargs=inputs)
    pass_report = report.pass_report("expand_silu")
    assert len(pass_report.result.rewritten) == 1 and len(pass_report.result.skipped) == 1
    assert pass_report.result.skipped[0].detail == "layer 1 not selected"
    assert "torch.nn.functional.silu" in pass_report.code_before
    assert "torch.sigmoid" in pass_report.code_after
    assert "+    sigmoid = torch.sigmoid" in pass_report.diff and "-    silu = " in pass_report.diff
    assert pass_report.verify_error is not None and pass_report.verify_error < 1e-5
    table = str(report)
    assert "expand_silu" in table and "layer 1 not selected" in table

    saved = report.save(tmp_path / "report")
    files = {p.name for p in (saved / "graph_00").iterdir()}
    assert {"01_expand_silu.before.py", "01_expand_silu.after.py", "01_expand_silu.diff", "01_expand_silu.region.svg"} <= files
    summary = json.loads((saved / "summary.json").read_text())
    assert summary["graphs"][0]["passes"][0]["rewritten"] == 1

    compiled = torch.compile(model, backend=transfigure.backend(passes=[ExpandSilu()]))
    torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_inspect_lists_every_linear_and_sdpa_site_for_llama():
    report = transfigure.inspect(tiny_model("llama", num_hidden_layers=3), kwargs=example_inputs("llama"))
    inventory = report.graphs[0].inventory
    fqns = [site["fqn"] for site in inventory["linear"]]
    assert len(fqns) == 3 * 7 + 1 and fqns[-1] == "lm_head"
    assert "model.layers.2.mlp.down_proj" in fqns
    assert [(s["layer"], s["fqn"]) for s in inventory["attention"]] == [(i, f"model.layers.{i}.self_attn") for i in range(3)]
    table = str(report)
    assert "fqn=model.layers.2.self_attn.q_proj" in table and "layer=2" in table


class _Recorder(transfigure.Pass):
    name = "recorder"
    seen: list = []

    def __init__(self, label, order):
        super().__init__()
        self.label = label
        self.order = order

    def run(self, graph):
        _Recorder.seen.append(self.label)
        return transfigure.PassResult(self.name)


class _Second(_Recorder):
    name = "second"


class _Broken(transfigure.Pass):
    name = "broken"

    def run(self, graph):
        raise KeyError("no site named 'decoder.proj'")


def test_passes_run_in_order_and_can_be_disabled():
    _Recorder.seen = []
    model, inputs = tiny_model("llama"), example_inputs("llama")
    transfigure.inspect(model, passes=[_Second("b", 5), _Recorder("a", 1)], kwargs=inputs)
    assert _Recorder.seen == ["a", "b"]
    _Recorder.seen = []
    transfigure.inspect(model, passes=[_Second("b", 5), _Recorder("a", 1)], disable=["second"], kwargs=inputs)
    assert _Recorder.seen == ["a"]


def test_failing_pass_error_names_the_pass_and_what_to_do():
    with pytest.raises(Exception, match="(?s)transfigure pass 'broken' failed: KeyError.*decoder.proj.*disable") as error:
        transfigure.inspect(tiny_model("llama"), passes=[_Broken()], kwargs=example_inputs("llama"))
    assert "broken" in str(error.value)


class _Perturb(transfigure.Pass):
    """Scale lm_head's output by 1.01: verify must see a 1% error."""

    name = "perturb"

    def run(self, graph):
        result = transfigure.PassResult(self.name)
        head = next(s for s in graph.linear_calls() if s.fqn == "lm_head")
        with graph.graph.inserting_after(head.node):
            scaled = graph.graph.call_function(torch.mul, (head.node, 1.01))
        head.node.replace_all_uses_with(scaled)
        scaled.update_arg(0, head.node)
        result.rewrote(head, "x1.01")
        return result


def test_verify_records_the_error_each_pass_introduces():
    report = transfigure.inspect(tiny_model("llama"), passes=[ExpandSilu(), _Perturb()], kwargs=example_inputs("llama"))
    graph = report.graphs[0]
    assert graph.passes[0].verify_error < 1e-5
    assert graph.passes[1].verify_error == pytest.approx(0.01, rel=1e-3)
    assert graph.verify_error == pytest.approx(0.01, rel=1e-2)


def test_dump_dir_env_writes_report_during_torch_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFIGURE_DUMP_DIR", str(tmp_path))
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=transfigure.backend(passes=[ExpandSilu()], lowering="eager"))
    compiled(**example_inputs("llama"))
    dumps = list(tmp_path.glob("compile_*/graph_00/01_expand_silu.diff"))
    assert len(dumps) == 1 and "torch.sigmoid" in dumps[0].read_text()


def test_per_pass_graphs_are_trace_artifacts(monkeypatch):
    emitted = []
    import torch._logging._internal as logging_internal

    monkeypatch.setattr(logging_internal, "trace_structured_artifact", lambda name, encoding, payload_fn=None, **kw: emitted.append((name, payload_fn())))
    transfigure.inspect(tiny_model("llama"), passes=[ExpandSilu()], kwargs=example_inputs("llama"))
    assert emitted and emitted[0][0] == "transfigure_graph0_expand_silu_after" and "torch.sigmoid" in emitted[0][1]


class _PackHead(transfigure.Pass):
    """Replace lm_head's weight by a packed copy (here: a plain clone) computed at compile time."""

    name = "pack_head"

    def run(self, graph):
        result = transfigure.PassResult(self.name)
        head = next(s for s in graph.linear_calls() if s.fqn == "lm_head")
        weight = graph.tensor(head.weight)
        packed = graph.add_input("lm_head.packed", weight.detach().clone(), derived_from=[weight])
        head.node.replace_input_with(head.weight, packed)
        result.rewrote(head, "packed")
        return result


def test_changing_consumed_weights_after_compile_is_caught():
    model, inputs = tiny_model("llama"), example_inputs("llama")
    compiled = torch.compile(model, backend=transfigure.backend(passes=[_PackHead()], lowering="eager"))
    compiled(**inputs)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    with pytest.raises(transfigure.StaleWeightsError, match="lm_head.weight"):
        compiled(**inputs)


def test_recompile_policy_repacks_changed_weights():
    model, inputs = tiny_model("llama"), example_inputs("llama")
    compiled = torch.compile(model, backend=transfigure.backend(passes=[_PackHead()], lowering="eager", weight_check="recompile"))
    compiled(**inputs)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits)
