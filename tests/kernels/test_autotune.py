"""The Autotuner: picks the fastest config, remembers it on disk, prunes, and survives configs that fail."""

import time

import pytest

from transfigure.kernels.autotune import Autotuner, Config


def make_tuner(name, delays, calls, fail=()):
    def launch(config, x):
        calls.append(config.meta["id"])
        if config.meta["id"] in fail:
            raise ValueError(f"config {config.meta['id']} does not compile")
        time.sleep(delays[config.meta["id"]])
        return x + config.meta["id"]

    configs = [Config({"id": i}) for i in range(len(delays))]
    return Autotuner(name, configs, key=lambda x: x % 2, launch=launch)


@pytest.fixture
def cpu_tuning(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFIGURE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRANSFIGURE_AUTOTUNE_CPU", "1")
    return tmp_path


def test_picks_the_fastest_and_remembers_it_on_disk(cpu_tuning):
    calls = []
    tuner = make_tuner("unit", [0.02, 0.0, 0.01], calls)
    assert tuner.best_config(4).meta["id"] == 1
    assert tuner(4) == 5  # launches the chosen config
    assert (cpu_tuning / "autotune" / "unit.json").exists()
    assert set(tuner.timings[next(iter(tuner.timings))]) == {c.describe() for c in tuner.configs}
    fresh_calls = []
    fresh = make_tuner("unit", [0.02, 0.0, 0.01], fresh_calls)
    assert fresh.best_config(6).meta["id"] == 1 and fresh_calls == []  # same key (even): from disk, no benchmark
    assert fresh.best_config(5).meta["id"] == 1 and fresh_calls  # a new key is tuned


def test_interpreter_mode_without_cpu_tuning_uses_the_first_config(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFIGURE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRANSFIGURE_AUTOTUNE_CPU", "0")
    calls = []
    assert make_tuner("first", [0.01, 0.0], calls).best_config(1).meta["id"] == 0 and calls == []


def test_failing_configs_are_skipped_with_a_warning(cpu_tuning):
    calls = []
    tuner = make_tuner("flaky", [0.0, 0.01, 0.02], calls, fail={0})
    with pytest.warns(RuntimeWarning, match="1 config\\(s\\) failed.*does not compile"):
        assert tuner.best_config(2).meta["id"] == 1


def test_no_runnable_config_is_a_clear_error(cpu_tuning):
    tuner = make_tuner("broken", [0.0, 0.0], [], fail={0, 1})
    with pytest.raises(RuntimeError, match="no config could run.*does not compile"):
        tuner.best_config(2)
    pruned = Autotuner("pruned", [Config({"id": 0}), Config({"id": 1})], key=lambda x: 0, launch=lambda c, x: x,
                       prune=lambda configs, args: [])
    with pytest.raises(RuntimeError, match="every config was pruned"):
        pruned.best_config(1)
