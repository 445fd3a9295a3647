"""The command line: passes table, inspect, demo."""

import subprocess
import sys

from transfigure.__main__ import main


def test_passes_lists_compiler_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "verify" in out and "weight_check" in out and "'error' | 'recompile' | 'ignore'" in out


def test_inspect_prints_sites_and_saves(tmp_path, capsys):
    assert main(["inspect", "--model", "qwen3", "--out", str(tmp_path / "dump")]) == 0
    out = capsys.readouterr().out
    assert "fqn=model.layers.1.self_attn.q_proj" in out and "attention sites: 2" in out
    assert (tmp_path / "dump" / "summary.json").exists()


def test_inspect_calibrates_sparsity_like_the_demo(capsys):
    assert main(["inspect", "--model", "mistral", "--passes", "sparsity", "--set", "sparsity.target=0.4"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("sparsity "))
    assert "calibrating thresholds" in out and int(row[1]) == int(row[2]) == 14  # matched == rewritten


def test_bad_option_on_cli_is_a_clear_error(capsys):
    assert main(["inspect", "--model", "gpt2", "--set", "verify=maybe"]) == 2
    assert "'verify'" in capsys.readouterr().err


def test_demo_runs_on_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "transfigure", "demo", "--hidden", "64", "--seq-len", "16", "--repeats", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max relative error vs the original model" in result.stdout
    assert "eager:" in result.stdout and "transfigure:" in result.stdout
