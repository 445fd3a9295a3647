"""The benchmark harnesses run end to end on CPU (tiny models, eager lowering): rows, tables and plots."""

import json

import pytest
import torch

import transfigure

from transfigure import bench
from transfigure.__main__ import main


def test_training_bench_runs_every_variant_and_reports_memory(tmp_path):
    result = bench.run_training(models=["llama"], batch=2, seq_len=16, steps=1, device="cpu", lowering="eager",
                                out_dir=tmp_path, progress=False, lora_rank=4, galore_rank=8)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(bench.TRAINING_VARIANTS)
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in rows.values()), rows
    full, lora, galore = rows["transfigure-full"], rows["transfigure-lora"], rows["transfigure-galore"]
    # full fine-tuning trains every parameter; the reparameterizations far fewer, with smaller optimizer state
    assert lora["trainable_params"] < full["trainable_params"] // 2
    assert galore["optimizer_state_gib"] < full["optimizer_state_gib"]
    # the same model and batch: the first-step losses agree across variants (adapters start as no-ops)
    assert abs(lora["loss"] - full["loss"]) < 0.5
    saved = json.loads((tmp_path / "training.json").read_text())
    assert len(saved["rows"]) == 4
    assert "| llama | 2 x 16 | transfigure-lora |" in (tmp_path / "training.md").read_text()
    assert (tmp_path / "training.png").stat().st_size > 0


def test_training_bench_row_names_the_cause_of_a_failure():
    result = bench.run_training(models=["llama"], variants=["transfigure-galore"], batch=1, seq_len=8, steps=1,
                                device="cpu", lowering="eager", progress=False, galore_rank=4096)
    error = result["rows"][0]["error"]
    assert error.startswith("OptionError") and "galore.rank" in error and "larger than the layer" in error


def test_decode_bench_on_cpu_through_generate(tmp_path):
    result = bench.run(models=["llama"], new_tokens=[4], variants=["eager", "transfigure"], prompt_len=8, device="cpu",
                       out_dir=tmp_path, progress=False, warm_compile=False, lowering="eager")
    rows = {r["variant"]: r for r in result["rows"]}
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in rows.values()), rows
    assert (tmp_path / "e2e_decode.md").exists() and (tmp_path / "e2e_decode.png").exists()


def test_decode_bench_step_loop_on_cpu(tmp_path):
    result = bench.run(models=["llama"], new_tokens=[4], variants=["inductor", "transfigure+lut-4bit"], prompt_len=8,
                       device="cpu", out_dir=tmp_path, progress=False, warm_compile=True, lowering="eager", loop="step")
    rows = {r["variant"]: r for r in result["rows"]}
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in rows.values()), rows
    # the warm compile recompiled the step (Dynamo reset, compiled step dropped) and was timed
    assert all(r["compile_warm_s"] is not None and r["compile_cold_s"] is not None for r in rows.values()), rows
    assert result["loop"] == "step" and (tmp_path / "e2e_decode_step_loop.md").exists()
    assert "transfigure.generate" in (tmp_path / "e2e_decode_step_loop.md").read_text()
    # where the transfigure row's cold compile went (the Inductor row has no transfigure report)
    quant = rows["transfigure+lut-4bit"]
    assert quant["compile_graphs"] >= 1 and quant["compile_passes_s"] > 0 and quant["compile_lowering_s"] >= 0
    assert rows["inductor"]["compile_graphs"] is None
    table = (tmp_path / "e2e_decode_step_loop.md").read_text()
    assert f"transfigure+lut-4bit: {quant['compile_graphs']} graphs, passes" in table


def test_cli_training_bench(tmp_path, capsys):
    code = main(["bench", "--training", "--models", "llama", "--train-variants", "transfigure-lora", "--train-batch", "1",
                 "--seq-len", "8", "--steps", "1", "--device", "cpu", "--lowering", "eager", "--lora-rank", "2",
                 "--out", str(tmp_path)])
    assert code == 0
    assert "transfigure-lora" in capsys.readouterr().out


def test_repeated_runs_are_summarized_by_their_median_and_range(tmp_path):
    def row(variant, speed, error=None):
        return dict(model="llama-1b", variant=variant, batch=1, new_tokens=128, tokens_per_s=speed, decode_tokens_per_s=speed,
                    ttft_ms=20.0, peak_gib=2.0, compile_cold_s=10.0, compile_warm_s=None, error=error)

    result = {"device": "test", "torch": "x", "triton": "y", "date": "d", "prompt_len": 128,
              "rows": [row("inductor", 300.0), row("transfigure", 330.0), row("inductor", 360.0), row("transfigure", 310.0),
                       row("inductor", 340.0), row("transfigure", None, error="RuntimeError: boom")]}
    summary = {r["variant"]: r for r in bench.summarize(result["rows"])}
    assert summary["inductor"]["tokens_per_s"] == 340.0 and summary["inductor"]["runs"] == 3
    assert summary["transfigure"]["tokens_per_s"] == 320.0 and summary["transfigure"]["failed"] == 1
    text = bench.markdown(result)
    assert "| transfigure | 320.0 [310.0-330.0, 3 runs, 1 failed] | 0.94x |" in text
    bench.save(result, tmp_path)
    assert (tmp_path / "e2e_decode.png").stat().st_size > 0


def test_lora_training_profile_smoke_and_summary(tmp_path, monkeypatch):
    """benchmarks/profile_training.py on CPU (tiny model): PEFT and our pass start from the same adapters (equal
    first losses), kernel tables are written, and --summarize compares each mode against PEFT."""
    import importlib.util
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("peft")
    path = Path(__file__).parents[1] / "benchmarks" / "profile_training.py"
    spec = importlib.util.spec_from_file_location("profile_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["profile_training.py", "--smoke", "--out", str(tmp_path),
                                      "--variants", "peft+inductor,lora-unfused"])
    module.main()
    result = json.loads((tmp_path / "profile_training.json").read_text())
    rows = {v["name"]: v for v in result["variants"]}
    assert set(rows) == {"peft+inductor", "lora-unfused"} and all("error" not in v for v in rows.values()), rows
    assert abs(rows["peft+inductor"]["first_loss"] - rows["lora-unfused"]["first_loss"]) < 1e-4
    assert rows["lora-unfused"]["kernels"]
    summary = module.summarize([str(tmp_path / "profile_training.json")], str(tmp_path))
    assert "| default | lora-unfused |" in summary and (tmp_path / "lora_training.png").stat().st_size > 0


def test_decode_bench_custom_loop_beside_the_generate_baseline(tmp_path):
    """loop="custom" times generate(custom_generate=transfigure.decoding_loop(...)); merged with a generate() run,
    the table labels each row's loop and takes ratios against Inductor through transformers' own loop."""
    parts = []
    for loop, variants in (("generate", ["inductor"]), ("custom", ["inductor", "transfigure"])):
        out = tmp_path / loop
        result = bench.run(models=["llama"], new_tokens=[4], variants=variants, prompt_len=8, device="cpu",
                           out_dir=out, progress=False, warm_compile=False, lowering="eager", loop=loop)
        assert all(r["error"] is None and r["tokens_per_s"] > 0 and r["loop"] == loop for r in result["rows"]), result
        parts.append(out / f"{bench.stem_for([loop])}.json")
    merged = bench.merge(parts)
    assert merged["loop"] == "mixed" and len(merged["rows"]) == 3
    text = bench.markdown(merged)
    base = next(r["tokens_per_s"] for r in merged["rows"] if r["loop"] == "generate")
    custom = next(r for r in merged["rows"] if r["loop"] == "custom" and r["variant"] == "transfigure")
    assert f"| transfigure [{bench.LOOP_NAMES['custom']}] | {custom['tokens_per_s']:.1f} | " \
           f"{custom['tokens_per_s'] / base:.2f}x |" in text
    assert "| inductor [transformers generate()] |" in text and "| 1.00x |" in text
    bench.save(merged, tmp_path, stem=bench.stem_for([r["loop"] for r in merged["rows"]]))
    assert (tmp_path / "e2e_decode_custom_generate_loop.png").exists()
    assert bench.stem_for(["generate"]) == "e2e_decode" and bench.stem_for(["step"]) == "e2e_decode_step_loop"


def test_a_pass_that_rewrote_nothing_is_named_with_its_reason():
    """A decode step over a KV cache: linearize leaves its attention softmax, so a bench row would time the original
    model under the variant's name; the bench turns such a row into an error carrying the pass's skip reason."""
    import transformers

    from transfigure.bench import _passes_that_rewrote_nothing
    from transfigure.models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 5))
    idle = {}
    for options in ({"linearize": {"feature_map": "elu"}}, {"lut_quant": {"bits": 4}}):
        torch._dynamo.reset()
        backend = transfigure.backend(lowering="eager", **options)
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(5))
            step = torch.compile(model, backend=backend, fullgraph=True)
            step(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, cache_position=torch.tensor([5]))
        idle[next(iter(options))] = _passes_that_rewrote_nothing(backend)
    assert idle["lut_quant"] == {}
    assert list(idle["linearize"]) == ["linearize"] and "KV cache" in idle["linearize"]["linearize"]


@pytest.mark.parametrize("decoding", ["sample", "padded"])
def test_decode_bench_sampling_and_padded_batches_through_the_loop(tmp_path, decoding):
    """decoding="sample" / "padded" time the same loops; the rows say how they decoded, and ratios pair rows of one
    decoding (a padded row against a padded baseline)."""
    result = bench.run(models=["llama"], batches=[2], new_tokens=[4], variants=["inductor", "transfigure"],
                       prompt_len=24, device="cpu", out_dir=None, progress=False, warm_compile=False,
                       lowering="eager", loop="custom", decoding=decoding)
    assert all(r["error"] is None and r["tokens_per_s"] > 0 and r["decoding"] == decoding for r in result["rows"]), result
    text = bench.markdown(result)
    assert f"| transfigure ({decoding}) |" in text and f"| inductor ({decoding}) |" in text and "| 1.00x |" in text


def test_decode_bench_rejects_a_padded_single_row_and_unknown_decodings():
    with pytest.raises(ValueError, match="at least 2"):
        bench._decoding_kwargs("padded", torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="greedy, sample, padded"):
        bench.run_variant("llama", "transfigure", 1, 2, 8, "cpu", torch.float32, decoding="beam")
    mask = bench._decoding_kwargs("padded", torch.zeros(3, 20, dtype=torch.long))["attention_mask"]
    assert mask.sum(1).tolist() == [20, 12, 4] and bool(mask[:, -1].all())


def test_a_custom_loop_row_that_handed_over_to_transformers_is_an_error(monkeypatch):
    from transfigure.backends.decode import decoding_loop

    monkeypatch.setattr(decoding_loop, "unsupported", staticmethod(lambda *args: "a reason the loop cannot cover"))
    row = bench.run_variant("llama", "transfigure", 1, 3, 8, "cpu", torch.float32, warm_compile=False,
                            lowering="eager", loop="custom")
    assert row.error and "a reason the loop cannot cover" in row.error
