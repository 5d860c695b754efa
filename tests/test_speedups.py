"""The compiled build (``vidur.speedups``, ``vidur.compiled``): built from the sources, loaded only for the sources it
was built from, and the same records as plain Python, bit for bit.

The build and the runs are real: Cython compiles the modules into a temporary cache folder with the machine's C
compiler (the comparison skips, saying why, where there is no Cython or no compiler), and each run is a
``python -m experiments.run`` process with and without ``BLOCK_REPRO_SPEEDUPS=1``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from subprocess_run import ROOT, run_module, run_python
from vidur import compiled, speedups


def _env(cache: Path, on: bool) -> dict[str, str | None]:
    """A subprocess's builds under ``cache``, asked for (``on``) or not."""
    return {compiled.CACHE_ENV: str(cache), compiled.ENV: "1" if on else None}


def _copy_sources(dest: Path) -> Path:
    """What a build depends on, copied under ``dest`` as it sits in the checkout."""
    for path in compiled.key_files():
        to = dest / path.relative_to(compiled.ROOT)
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, to)
    return dest


def test_the_source_key_follows_every_source_file(tmp_path):
    _copy_sources(tmp_path)
    key = compiled.source_key(tmp_path)
    assert key == compiled.source_key()
    assert {p.suffix for p in compiled.source_files()} == {".py", ".pxd"}
    for path in compiled.key_files(tmp_path):  # any edit, of code, declarations or recipe, names another build
        text = path.read_bytes()
        path.write_bytes(text + b"\n")
        assert compiled.source_key(tmp_path) != key, path
        path.write_bytes(text)
    assert compiled.source_key(tmp_path) == key


def _declared(pxd: Path) -> dict[str, set[str]]:
    """The fields each ``cdef class`` of a .pxd declares."""
    out: dict[str, set[str]] = {}
    cls = None
    for line in pxd.read_text().splitlines():
        if m := re.match(r"cdef class (\w+)", line):
            cls = out.setdefault(m.group(1), set())
        elif cls is not None and (m := re.match(r" +cdef (?:public )?(?:long long|\w+) ([\w, ]+)", line)):
            cls.update(name.strip() for name in m.group(1).split(","))  # cdef [public] <type> a, b, c
    return out


def test_the_declarations_name_every_field_the_sources_set(toy_model):
    """A field added in engine.py, candidate.py, sched/v0.py or whatif.py but not declared in the .pxd beside it would
    fail only in the compiled build (a native class has no __dict__): caught here, without a compiler."""
    from vidur.candidate import Future, _LastStep
    from vidur.engine import Engine, Seq
    from vidur.sched import make_rule
    from vidur.types import EngineConfig

    engine_decl = _declared(ROOT / "vidur" / "engine.pxd")
    cand_decl = _declared(ROOT / "vidur" / "candidate.pxd")
    assert engine_decl["Seq"] == set(Seq.__slots__)
    cfg = EngineConfig()
    e = Engine(cfg, toy_model)
    assert engine_decl["Engine"] == set(vars(e))
    e.add(Seq(0, 100, 20), 0.0)
    f = Future(e, make_rule(cfg), 0)
    assert cand_decl["Future"] == set(vars(f))
    assert cand_decl["_LastStep"] == set(_LastStep.__slots__)
    from vidur.sched.v0 import V0Rule
    from vidur.whatif import Trajectory

    assert _declared(ROOT / "vidur" / "sched" / "v0.pxd")["V0Rule"] == set(vars(V0Rule(cfg)))
    assert _declared(ROOT / "vidur" / "whatif.pxd")["Trajectory"] == set(vars(Trajectory(e.fork())))


def test_a_missing_or_stale_build_is_not_loaded(tmp_path):
    code = "import vidur.engine, vidur.compiled as c; print('ACTIVE', c.active())"
    p = run_python("-c", code, env=_env(tmp_path, on=True))
    assert "ACTIVE False" in p.stdout
    assert "missing or older than the sources" in p.stderr and "python -m vidur.speedups build" in p.stderr
    # a folder named for these sources whose modules are not all there (an interrupted copy, a hand edit): not used
    d = tmp_path / compiled.source_key()
    d.mkdir()
    (d / compiled.MANIFEST).write_text(json.dumps({"key": d.name, "modules": {m: f"{m}.so" for m in compiled.MODULES}}))
    assert compiled.built(cache=tmp_path) is None
    p = run_python("-c", code, env=_env(tmp_path, on=True))
    assert "ACTIVE False" in p.stdout, p.stderr[-2000:]
    # not asked: nothing is looked up, nothing is said
    p = run_python("-c", code, env=_env(tmp_path, on=False))
    assert "ACTIVE False" in p.stdout and "speedups" not in p.stderr.lower()


def test_build_says_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "Cython", None)  # as if Cython were not installed
    with pytest.raises(speedups.SpeedupsError, match="needs Cython >= 3: pip install"):
        speedups.build(log=lambda *_: None)
    assert not list(tmp_path.iterdir())  # nothing half-made
    p = run_module("vidur.speedups", "build", "--jobs", "0", env=_env(tmp_path, on=False), check=False)
    assert p.returncode == 2 and "--jobs must be >= 1" in p.stderr


def test_clean_removes_builds_and_nothing_else(tmp_path):
    build = tmp_path / "0123abcd"
    build.mkdir()
    (build / compiled.MANIFEST).write_text("{}")
    half = tmp_path / ".build-xyz"
    half.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "other").mkdir()
    p = run_module("vidur.speedups", "clean", env=_env(tmp_path, on=False))
    assert "removed 2 build(s)" in p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["notes.txt", "other"]


@pytest.mark.skipif(bool(speedups.missing()), reason=speedups.missing() or "ok")
def test_a_compile_error_is_reported_with_cythons_message(tmp_path, monkeypatch):
    src = _copy_sources(tmp_path / "src")
    pxd = src / "vidur" / "engine.pxd"  # a declaration that contradicts the source: a typed field of an unknown type
    pxd.write_text(pxd.read_text().replace("cdef public double time", "cdef public no_such_type time"))
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(speedups.SpeedupsError, match="the compile failed") as err:
        speedups.build(src_root=src, jobs=1, log=lambda *_: None)
    assert "Error compiling Cython file" in str(err.value) and "engine.pxd" in str(err.value)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # nothing left behind, no half build


RUN = ["experiment=fig6", "workload.num_requests=400", "workload.qps=36", "cluster.num_instances=4", "progress=false",
       "force=true"]


@pytest.mark.skipif(bool(speedups.missing()), reason=speedups.missing() or "ok")
@pytest.mark.parametrize("policy,extra", [("block_star", []), ("block_oracle", []),
                                          ("block_oracle", ["engine=vllm_v1", "block_k=2"])])
def test_the_compiled_build_gives_the_same_records(tmp_path_factory, policy, extra):
    cache = tmp_path_factory.getbasetemp() / "speedups-cache"  # one build for the three cases
    if compiled.built(cache=cache) is None:
        run_module("vidur.speedups", "build", env=_env(cache, on=False), timeout=900)
    files = compiled.built(cache=cache)
    assert files is not None and set(files) == set(compiled.MODULES)
    out = tmp_path_factory.mktemp("runs")
    frames, summaries = [], []
    for on in (False, True):
        run_dir = out / f"{policy}-{len(extra)}-{on}"
        p = run_module("experiments.run", f"output_root={out}", f"policy={policy}", *RUN, *extra,
                       f"hydra.run.dir={run_dir}", env=_env(cache, on=on), timeout=600)
        assert "compiled build" not in p.stderr  # no warning: the build was found
        frames.append(pd.read_parquet(run_dir / "requests.parquet"))
        summaries.append(json.loads((run_dir / "summary.json").read_text()))
    assert [s["compiled_sim"] for s in summaries] == [False, True]
    timing = ["decision_ms"]  # wall-clock measurements of the run itself, not simulated quantities
    a, b = (f.drop(columns=timing) for f in frames)
    assert len(a) == 400 and a["status"].eq("ok").all()
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a["instance"].nunique() > 1
