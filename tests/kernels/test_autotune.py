"""The Autotuner: picks the fastest config, remembers it on disk, prunes, and survives configs that fail."""

import time

import pytest
import torch

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


def test_shipped_tuning_applies_to_its_own_key_and_the_users_cache_wins(cpu_tuning, monkeypatch):
    """A shipped table (data/autotune) answers keys it holds without benchmarking; keys it does not hold are
    tuned; an entry in the user's cache overrides it; TRANSFIGURE_SHIPPED_TUNING=0 ignores it."""
    import json

    from transfigure.kernels import autotune

    shipped_dir = cpu_tuning / "shipped"
    shipped_dir.mkdir()
    monkeypatch.setattr(autotune, "SHIPPED_TUNING_DIR", shipped_dir)
    probe = make_tuner("shipped", [0.0, 0.0, 0.0], [])
    even_key = probe._full_key((4,))
    (shipped_dir / "shipped.json").write_text(json.dumps({even_key: {"config": Config({"id": 2}).as_json()}}))

    calls = []
    tuner = make_tuner("shipped", [0.02, 0.0, 0.01], calls)
    assert tuner.best_config(4).meta["id"] == 2 and calls == []  # shipped: no benchmark, its choice
    assert tuner.best_config(3).meta["id"] == 1 and calls  # not shipped: tuned

    (cpu_tuning / "autotune").mkdir(exist_ok=True)
    (cpu_tuning / "autotune" / "shipped.json").write_text(json.dumps({even_key: {"config": Config({"id": 0}).as_json()}}))
    assert make_tuner("shipped", [0.02, 0.0, 0.01], []).best_config(4).meta["id"] == 0  # the user's cache wins

    (cpu_tuning / "autotune" / "shipped.json").unlink()
    monkeypatch.setenv("TRANSFIGURE_SHIPPED_TUNING", "0")
    calls = []
    assert make_tuner("shipped", [0.02, 0.0, 0.01], calls).best_config(4).meta["id"] == 1 and calls


def test_shipped_tables_name_known_configs():
    """Every shipped entry names a config its tuner still has (else it would be silently re-tuned)."""
    import importlib
    import json
    import pkgutil

    import transfigure.kernels
    from transfigure.kernels import autotune

    modules = [importlib.import_module(f"transfigure.kernels.{m.name}")
               for m in pkgutil.iter_modules(transfigure.kernels.__path__)]
    tuners = {t.name: t for t in (getattr(m, n) for m in modules for n in dir(m)) if isinstance(t, autotune.Autotuner)}
    assert {"lut_linear", "fwht_dot"} <= set(tuners)
    for path in sorted(autotune.SHIPPED_TUNING_DIR.glob("*.json")):
        assert path.stem in tuners, f"{path.name}: no tuner of that name"
        known = {json.dumps(c.as_json(), sort_keys=True) for c in tuners[path.stem].configs}
        for key, entry in json.loads(path.read_text()).items():
            assert json.dumps(entry["config"], sort_keys=True) in known, (path.name, key)
            # tuned from HBM (rotating_copies), the key form the tuner looks up by default: else it never matches
            assert "|hbm|" in key, (path.name, key)


def test_rotating_copies_clone_only_the_large_tensors_enough_to_exceed_the_cache(monkeypatch):
    from transfigure.kernels.autotune import rotating_copies

    monkeypatch.delenv("TRANSFIGURE_AUTOTUNE_L2", raising=False)
    weight = torch.randn(256, 256)  # 256 KiB
    x = torch.randn(4, 256)  # 4 KiB: shared by every set
    sets = rotating_copies((x, weight, 3), min_bytes=64 << 10, l2_bytes=1 << 20)
    assert len(sets) == 12  # ceil(3 * 1 MiB / 256 KiB)
    pointers = {s[1].data_ptr() for s in sets}
    assert len(pointers) == 12
    assert all(s[0] is x and s[2] == 3 and torch.equal(s[1], weight) for s in sets)
    assert rotating_copies((x, weight), min_bytes=64 << 10) == [(x, weight)]  # off the GPU: no L2 to avoid
    assert len(rotating_copies((x,), min_bytes=64 << 10, l2_bytes=1 << 20)) == 1  # nothing large
    monkeypatch.setenv("TRANSFIGURE_AUTOTUNE_L2", "hot")
    assert len(rotating_copies((x, weight), min_bytes=64 << 10, l2_bytes=1 << 20)) == 1
