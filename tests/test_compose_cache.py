"""The composition cache (experiments/compose_cache.py): a hit gives what Hydra composes, a changed config file or
preset is seen, errors and secrets are never cached, warnings come back, and a run that hits writes the same files.

Hydra composes for real here (the project's config tree, or a copy of it edited by the test), through the same
``ConfigLoaderImpl.load_configuration`` the commands use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf

from experiments import compose_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache installed in this process, in a folder of its own, with fresh statistics."""
    folder = tmp_path / "compose-cache"
    monkeypatch.setenv(compose_cache.ENV_DIR, str(folder))
    monkeypatch.delenv(compose_cache.ENV_SWITCH, raising=False)
    monkeypatch.setattr(compose_cache, "STATS", compose_cache.Stats())
    compose_cache.install()
    yield folder
    compose_cache.uninstall()
    GlobalHydra.instance().clear()


def _compose(conf: Path, overrides: list[str], multirun: bool = False, uncached: bool = False):
    """Compose as the commands do (through the installed cache), or with Hydra's own function (``uncached``)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    load = ConfigLoaderImpl.load_configuration
    load = load.uncached if uncached else load
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return load(loader, "config", overrides, RunMode.MULTIRUN if multirun else RunMode.RUN)


def _same(a, b) -> None:
    assert OmegaConf.to_container(a, resolve=False) == OmegaConf.to_container(b, resolve=False)
    assert OmegaConf.is_struct(a) == OmegaConf.is_struct(b)
    assert OmegaConf.is_readonly(a.hydra) == OmegaConf.is_readonly(b.hydra)


@pytest.mark.parametrize("overrides,multirun", [
    (["policy=block", "workload.qps=24", "workload.num_requests=100"], False),
    (["experiment=fig6"], True),
    (["experiment=smoke", "seed=3", "hydra.searchpath=[file://" + str(ROOT / "conf" / "experiment") + "]"], False),
])
def test_a_hit_is_what_hydra_composes(cache, overrides, multirun):
    conf = ROOT / "conf"
    first = _compose(conf, overrides, multirun)
    assert (compose_cache.STATS.hits, compose_cache.STATS.misses) == (0, 1), compose_cache.STATS
    again = _compose(conf, overrides, multirun)
    assert (compose_cache.STATS.hits, compose_cache.STATS.misses) == (1, 1), compose_cache.STATS
    fresh = _compose(conf, overrides, multirun, uncached=True)
    _same(again, fresh)
    _same(first, fresh)
    again.workload.qps = 99  # a hit is a config of its own: changing it changes no later hit
    assert _compose(conf, overrides, multirun).workload.qps == fresh.workload.qps
    assert len(list(cache.glob("*.pkl"))) == 1


def test_other_overrides_are_another_entry(cache):
    conf = ROOT / "conf"
    a = _compose(conf, ["workload.qps=20"])
    b = _compose(conf, ["workload.qps=21"])
    assert (a.workload.qps, b.workload.qps) == (20, 21)
    assert compose_cache.STATS.misses == 2 and compose_cache.STATS.hits == 0
    assert len(list(cache.glob("*.pkl"))) == 2


def test_an_edited_config_file_or_a_new_preset_is_composed_again(cache, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    workload = conf / "workload" / "default.yaml"
    before = _compose(conf, []).workload.num_requests
    assert _compose(conf, []).workload.num_requests == before and compose_cache.STATS.hits == 1
    text = workload.read_text()
    assert f"num_requests: {before}" in text
    workload.write_text(text.replace(f"num_requests: {before}", f"num_requests: {before + 7}"))
    assert _compose(conf, []).workload.num_requests == before + 7
    assert compose_cache.STATS.hits == 1 and any("changed" in r for r in compose_cache.STATS.reasons)
    # a file that composition never read still belongs to the source: a new preset is seen too
    (conf / "experiment" / "zz_new.yaml").write_text("# @package _global_\nseed: 5\n")
    assert _compose(conf, []).workload.num_requests == before + 7
    assert compose_cache.STATS.hits == 1
    assert _compose(conf, ["experiment=zz_new"]).seed == 5


def test_errors_are_not_cached_and_a_corrupt_entry_is_composed_again(cache):
    conf = ROOT / "conf"
    for _ in range(2):
        with pytest.raises(ConfigCompositionException):
            _compose(conf, ["policy=no_such_policy"])
    assert not list(cache.glob("*.pkl"))
    good = _compose(conf, ["workload.qps=7"])
    (entry,) = cache.glob("*.pkl")
    entry.write_bytes(b"not a pickle")
    _same(_compose(conf, ["workload.qps=7"]), good)
    assert compose_cache.STATS.hits == 0 and any("unreadable" in r for r in compose_cache.STATS.reasons)
    assert _compose(conf, ["workload.qps=7"]).workload.qps == 7 and compose_cache.STATS.hits == 1
    # a pickle of something else under the entry's name (another version's layout): composed again, then rewritten
    import pickle

    for foreign in ({"key": "another", "cfg": good}, {}, {"key": None}):
        raw = pickle.loads(entry.read_bytes())
        entry.write_bytes(pickle.dumps({**raw, **foreign} if foreign else {k: v for k, v in raw.items()
                                                                          if k != "sources"}))
        hits = compose_cache.STATS.hits
        _same(_compose(conf, ["workload.qps=7"]), good)
        assert compose_cache.STATS.hits == hits and compose_cache.STATS.reasons[-1] == "foreign entry"
        assert _compose(conf, ["workload.qps=7"]).workload.qps == 7 and compose_cache.STATS.hits == hits + 1


def test_a_config_with_a_secret_is_not_written(cache, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "experiment" / "leaky.yaml").write_text("# @package _global_\nmode:\n  token: s3cret-4711\n")
    cfg = _compose(conf, ["experiment=leaky"])
    assert cfg.mode.token == "s3cret-4711"
    assert not list(cache.glob("*.pkl"))
    assert compose_cache.STATS.uncacheable == 1 and "secret" in compose_cache.STATS.reasons[-1]


def test_warnings_of_a_composition_come_back_on_a_hit(cache):
    conf = ROOT / "conf"

    def warns_then_composes(self, *args):
        warnings.warn("composition said something", UserWarning)
        return _real(self, *args)

    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    installed = ConfigLoaderImpl.load_configuration
    _real = installed.uncached
    ConfigLoaderImpl.load_configuration = compose_cache.cached(warns_then_composes)
    try:
        for expect_hits in (0, 1):
            with pytest.warns(UserWarning, match="composition said something"):
                _compose(conf, ["workload.qps=3"])
            assert compose_cache.STATS.hits == expect_hits
    finally:
        ConfigLoaderImpl.load_configuration = installed


def test_off_switch_composes_every_time(cache, monkeypatch):
    monkeypatch.setenv(compose_cache.ENV_SWITCH, "0")
    _compose(ROOT / "conf", ["workload.qps=5"])
    _compose(ROOT / "conf", ["workload.qps=5"])
    assert compose_cache.STATS == compose_cache.Stats()
    assert not cache.exists()


def test_a_config_source_too_big_to_read_on_every_run_is_not_cached(cache, monkeypatch):
    monkeypatch.setattr(compose_cache, "MAX_TREE_FILES", 20)  # conf/ has more
    cfg = _compose(ROOT / "conf", ["workload.qps=4"])
    assert cfg.workload.qps == 4 and not list(cache.glob("*.pkl"))
    assert compose_cache.STATS.uncacheable == 1 and "too big" in compose_cache.STATS.reasons[-1]


def test_the_least_recently_used_entries_go(cache, monkeypatch):
    monkeypatch.setattr(compose_cache, "MAX_ENTRIES", 3)
    for q in range(5):
        _compose(ROOT / "conf", [f"workload.qps={q + 1}"])
    assert len(list(cache.glob("*.pkl"))) == 3


def test_a_run_that_hits_writes_what_a_run_that_composes_writes(tmp_path):
    """Real ``python -m experiments.run`` processes, one command line: the first composes and stores, the second
    finds the entry (it is touched, not rewritten), a third composes with the cache off; all three write the same
    config, Hydra's .hydra/ files and the same request records (all but the measured decision time)."""
    import pyarrow.parquet as pq

    folder = tmp_path / "cc"
    env = {**os.environ, compose_cache.ENV_DIR: str(folder), "PYTHONPATH": str(ROOT)}
    env.pop(compose_cache.ENV_SWITCH, None)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", f"hydra.run.dir={out}", f"output_root={tmp_path}",
           "workload.num_requests=60", "workload.qps=8", "progress=false", "force=true"]
    kept = []
    for i, switch in enumerate(("1", "1", "0")):
        p = subprocess.run(cmd, cwd=ROOT, env={**env, compose_cache.ENV_SWITCH: switch}, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        (entry,) = folder.glob("*.pkl")
        st = entry.stat()
        kept.append({"inode": st.st_ino, "mtime": st.st_mtime_ns,
                     "config": (out / "config.yaml").read_text(),
                     "hydra": [(out / ".hydra" / n).read_text() for n in ("config.yaml", "hydra.yaml",
                                                                          "overrides.yaml")],
                     "requests": pq.read_table(out / "requests.parquet").drop_columns(["decision_ms"])})
    first, hit, off = kept
    assert hit["inode"] == first["inode"] and hit["mtime"] > first["mtime"]  # read and touched, not written
    assert off["inode"] == hit["inode"] and off["mtime"] == hit["mtime"]  # off: neither read nor written
    for other in (hit, off):
        assert other["config"] == first["config"]
        assert other["hydra"] == first["hydra"]
        assert other["requests"].equals(first["requests"])
