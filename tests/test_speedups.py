"""The compiled build (``vidur.speedups``, ``vidur.compiled``): built from the sources, loaded only for the sources it
was built from, and the same records as plain Python, bit for bit.

The build and the runs are real: Cython compiles the modules into a temporary cache folder with the machine's C
compiler (the comparison skips, saying why, where there is no Cython or no compiler), and each run is a
``python -m experiments.run`` process with and without ``BLOCK_REPRO_SPEEDUPS=1``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

from vidur import compiled, speedups

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path, on: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env[compiled.CACHE_ENV] = str(cache)
    env.pop(compiled.ENV, None)
    if on:
        env[compiled.ENV] = "1"
    return env


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_source_key_follows_every_source_file(tmp_path):
    for path in compiled.key_files():
        dest = tmp_path / path.relative_to(compiled.ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
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
        m = re.match(r"cdef class (\w+)", line)
        if m:
            cls = out.setdefault(m.group(1), set())
        elif cls is not None and line.startswith("    cdef "):
            words = line.split("#")[0].replace(",", " ").split()
            names = words[2:] if words[1] != "public" else words[3:]  # cdef [public] <type> a, b, c
            if words[2:3] == ["long"] and words[1] == "public" and words[3:4] == ["long"]:  # (long long)
                names = words[4:]
            cls.update(names)
    return out


def test_the_declarations_name_every_field_the_sources_set(toy_model):
    """A field added in engine.py or candidate.py but not declared in the .pxd beside it would fail only in the
    compiled build (a native class has no __dict__): caught here, without a compiler."""
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


def test_a_missing_or_stale_build_is_not_loaded(tmp_path):
    code = "import vidur.engine, vidur.compiled as c; print('ACTIVE', c.active())"
    p = _python(code, _env(tmp_path, on=True))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ACTIVE False" in p.stdout
    assert "missing or older than the sources" in p.stderr and "python -m vidur.speedups build" in p.stderr
    # a folder named for these sources whose modules are not all there (an interrupted copy, a hand edit): not used
    d = tmp_path / compiled.source_key()
    d.mkdir()
    (d / compiled.MANIFEST).write_text(json.dumps({"key": d.name, "modules": {m: f"{m}.so" for m in compiled.MODULES}}))
    assert compiled.built(cache=tmp_path) is None
    p = _python(code, _env(tmp_path, on=True))
    assert "ACTIVE False" in p.stdout, p.stderr[-2000:]
    # not asked: nothing is looked up, nothing is said
    p = _python(code, _env(tmp_path, on=False))
    assert "ACTIVE False" in p.stdout and "speedups" not in p.stderr.lower()


def test_build_says_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "Cython", None)  # as if Cython were not installed
    with pytest.raises(speedups.SpeedupsError, match="needs Cython >= 3: pip install"):
        speedups.build(log=lambda *_: None)
    assert not list(tmp_path.iterdir())  # nothing half-made
    p = subprocess.run([sys.executable, "-m", "vidur.speedups", "build", "--jobs", "0"], cwd=ROOT,
                       env=_env(tmp_path, on=False), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--jobs must be >= 1" in p.stderr


def test_clean_removes_builds_and_nothing_else(tmp_path):
    build = tmp_path / "0123abcd"
    build.mkdir()
    (build / compiled.MANIFEST).write_text("{}")
    half = tmp_path / ".build-xyz"
    half.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "other").mkdir()
    p = subprocess.run([sys.executable, "-m", "vidur.speedups", "clean"], cwd=ROOT, env=_env(tmp_path, on=False),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "removed 2 build(s)" in p.stdout, p.stderr[-2000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["notes.txt", "other"]


def _compiler_missing() -> str:
    try:
        import Cython
    except ImportError:
        return "Cython is not installed (pip install -e '.[dev]')"
    if int(Cython.__version__.split(".")[0]) < 3:
        return f"Cython {Cython.__version__} < 3"
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}) on this machine"
    return ""


@pytest.mark.skipif(bool(_compiler_missing()), reason=_compiler_missing() or "ok")
def test_a_compile_error_is_reported_with_cythons_message(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for path in compiled.key_files():
        dest = src / path.relative_to(compiled.ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    pxd = src / "vidur" / "engine.pxd"  # a declaration that contradicts the source: a typed field of an unknown type
    pxd.write_text(pxd.read_text().replace("cdef public double time", "cdef public no_such_type time"))
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(speedups.SpeedupsError, match="the compile failed") as err:
        speedups.build(src_root=src, jobs=1, log=lambda *_: None)
    assert "Error compiling Cython file" in str(err.value) and "engine.pxd" in str(err.value)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # nothing left behind, no half build


RUN = ["experiment=fig6", "workload.num_requests=400", "workload.qps=36", "cluster.num_instances=4", "progress=false",
       "force=true"]


@pytest.mark.skipif(bool(_compiler_missing()), reason=_compiler_missing() or "ok")
@pytest.mark.parametrize("policy,extra", [("block_star", []), ("block_oracle", []),
                                          ("block_oracle", ["engine=vllm_v1", "block_k=2"])])
def test_the_compiled_build_gives_the_same_records(tmp_path_factory, policy, extra):
    cache = tmp_path_factory.getbasetemp() / "speedups-cache"  # one build for the three cases
    if compiled.built(cache=cache) is None:
        p = subprocess.run([sys.executable, "-m", "vidur.speedups", "build"], cwd=ROOT, env=_env(cache, on=False),
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    files = compiled.built(cache=cache)
    assert files is not None and set(files) == set(compiled.MODULES)
    out = tmp_path_factory.mktemp("runs")
    frames, summaries = [], []
    for on in (False, True):
        run_dir = out / f"{policy}-{len(extra)}-{on}"
        p = subprocess.run([sys.executable, "-m", "experiments.run", f"output_root={out}", f"policy={policy}", *RUN,
                            *extra, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=_env(cache, on=on),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert "compiled build" not in p.stderr  # no warning: the build was found
        frames.append(pd.read_parquet(run_dir / "requests.parquet"))
        summaries.append(json.loads((run_dir / "summary.json").read_text()))
    assert [s["compiled_sim"] for s in summaries] == [False, True]
    timing = ["decision_ms"]  # wall-clock measurements of the run itself, not simulated quantities
    a, b = (f.drop(columns=timing) for f in frames)
    assert len(a) == 400 and a["status"].eq("ok").all()
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a["instance"].nunique() > 1
