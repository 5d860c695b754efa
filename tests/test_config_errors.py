"""What a user reads when a run's configuration is wrong: one ``configuration error:`` line naming the key, exit code 2,
no traceback -- and secrets never reach a file. Every case runs ``python -m experiments.run`` as a real subprocess
on the real config tree."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments.wiring import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret-token-4711"


def _run(*args: str, module: str = "experiments.run", env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    e.pop("BLOCK_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**e, **(env or {})})


def _one_config_error(p: subprocess.CompletedProcess, key: str) -> str:
    """The single ``configuration error:`` line of a failed run, which must name ``key``."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("configuration error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert key in lines[0], lines[0]
    return lines[0]


def _lengths_csv(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns or {"prompt_tokens": [20] * 30, "output_tokens": [10] * 30}).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------- the six cases of the issue
def test_missing_dataset_file(tmp_path):
    line = _one_config_error(_run(f"output_root={tmp_path}", f"dataset.path={tmp_path}/missing.csv"), "dataset.path")
    assert "missing.csv" in line and "no such file" in line
    assert not list(tmp_path.rglob("summary.json"))


def test_dataset_file_with_unknown_columns(tmp_path):
    bad = _lengths_csv(tmp_path / "cols.csv", a=[1, 2], b=[3, 4])
    line = _one_config_error(_run(f"output_root={tmp_path / 'out'}", f"dataset.path={bad}"), "dataset.path")
    assert "match no known format" in line


@pytest.mark.parametrize("kind", ["file", "below_file", "read_only"])
def test_output_root_unusable(tmp_path, kind):
    f = tmp_path / "a_file"
    f.write_text("x")
    root = {"file": f, "below_file": f / "runs", "read_only": tmp_path / "ro" / "runs"}[kind]
    if kind == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
    try:
        line = _one_config_error(_run(f"output_root={root}", "workload.num_requests=10"), "output_root")
    finally:
        if kind == "read_only":
            (tmp_path / "ro").chmod(0o700)
    assert ("not writable" if kind == "read_only" else "not a directory") in line


def test_num_requests_not_an_integer(tmp_path):
    line = _one_config_error(_run(f"output_root={tmp_path}", "workload.num_requests=abc"), "workload.num_requests")
    assert "'abc'" in line and "integer" in line


def test_unknown_arrival_process(tmp_path):
    line = _one_config_error(_run(f"output_root={tmp_path}", "workload.arrival=poison"), "workload.arrival")
    assert "'poisson'" in line  # the choices are listed


def test_trace_arrivals_need_timestamps(tmp_path):
    line = _one_config_error(_run(f"output_root={tmp_path}", "workload.arrival=trace", "dataset=sharegpt",
                                  "workload.num_requests=10"), "workload.arrival")
    assert "timestamps" in line


def test_a_sweep_reports_a_bad_point_the_same_way(tmp_path):
    p = _run("-m", f"output_root={tmp_path}", "workload.num_requests=10", "workload.arrival=poisson,poison")
    _one_config_error(p, "workload.arrival")


def test_the_capacity_search_checks_the_same_schema(tmp_path):
    p = _run(f"output_root={tmp_path}", "workload.num_requests=abc", module="experiments.capacity")
    _one_config_error(p, "workload.num_requests")


def test_schema_errors_name_every_bad_key():
    from experiments import schema

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["cluster.num_instances=0", "policy.k=0", "seed=x",
                                           "accuracy.sampling_rate=2", "dataset.name=nope"])
        assert schema.check(compose("config")).workload.num_requests == 1000
    with pytest.raises(ConfigError) as err:
        schema.check(cfg)
    msg = str(err.value)
    for key in ("cluster.num_instances=0", "policy.k=0", "seed='x'", "accuracy.sampling_rate=2", "dataset.name='nope'"):
        assert key in msg, msg
    assert "\n" not in msg


# ---------------------------------------------------------------------- secrets
def _files_with(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize("mode,arg", [("sim", "mode.token"), ("emulate", "mode.token"), ("deploy", "+mode.token"),
                                      ("emulate", "++mode.token")])
def test_mode_token_is_refused_in_every_mode(tmp_path, mode, arg):
    p = _run(f"mode={mode}", f"{arg}={SECRET}", f"output_root={tmp_path}")
    line = _one_config_error(p, "mode.token")
    assert "$BLOCK_API_TOKEN" in line and SECRET not in p.stderr + p.stdout
    assert not _files_with(tmp_path, SECRET) and not list(tmp_path.iterdir())  # nothing written at all


def test_a_token_in_a_config_file_is_refused_before_hydra_writes_it(tmp_path):
    conf = tmp_path / "conf"
    (conf / "mode").mkdir(parents=True)
    (conf / "mode" / "mine.yaml").write_text(f"name: sim\nsample_interval_s: 1.0\ntoken: {SECRET}\n")
    out = tmp_path / "out"
    p = _run("mode=mine", f"hydra.searchpath=[file://{conf}]", f"output_root={out}", "workload.num_requests=10")
    _one_config_error(p, "mode.token")
    assert not out.exists()  # Hydra wrote no .hydra/config.yaml with the token in it


def test_a_composed_token_is_refused_by_validation():
    from experiments import wiring

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["mode=emulate", f"+mode.token={SECRET}"])
    with pytest.raises(ConfigError, match=r"mode.token is refused.*\$BLOCK_API_TOKEN"):
        wiring.validate(cfg)


# ---------------------------------------------------------------------- run directory names
def test_a_dataset_path_names_one_flat_run_dir(tmp_path):
    a = _lengths_csv(tmp_path / "data" / "one" / "my trace.csv")
    b = _lengths_csv(tmp_path / "data" / "two" / "my trace.csv")
    out = tmp_path / "out"
    p = _run("-m", f"output_root={out}", "workload.num_requests=10", "workload.qps=5", "progress=false",
             f"dataset.path={a},{b}")
    assert p.returncode == 0, p.stderr[-3000:]
    dirs = sorted(d.name for d in (out / "default").iterdir() if d.is_dir())
    want = sorted(f"dataset.path=my_trace-{hashlib.sha1(str(f).encode()).hexdigest()[:8]},workload.num_requests=10,"
                  "workload.qps=5" for f in (a, b))
    assert dirs == want  # flat, named by stem + hash, one per file
    for d in dirs:
        assert (out / "default" / d / "summary.json").is_file()
    assert "2/2 runs complete" in p.stderr  # the sweep's progress found the same directories


def test_a_long_run_name_is_capped_with_a_hash():
    from experiments.rundir import run_dirname

    many = [f"mode.some_key_{i}=/a/long/path/number/{i}/file.yaml" for i in range(12)] + ["workload.qps=4"]
    a, b = run_dirname(many), run_dirname(many[:-1] + ["workload.qps=5"])
    assert len(a.encode()) <= 200 and len(b.encode()) <= 200 and a != b  # one path component, still unique
    assert run_dirname(["workload.qps=4", "policy=random"]) == "policy=random,workload.qps=4"  # Hydra's names


def test_predictive_provisioning_asks_the_policy_for_its_signal():
    """Predictive provisioning needs a policy that asks for predictions: decided by the policy's ``signal``, not by a
    list of names, so a plug-in rule with ``signal: prediction`` (policy=custom) is accepted and round robin is not."""
    from experiments import schema

    base = ["provisioning=predictive", "cluster.num_instances=4",
            "provisioning.initial_instances=2"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        ok = compose("config", overrides=[*base, "policy=custom", "policy.name=mine", "policy.signal=prediction",
                                          "policy.target=block.policies.predicted:block"])
        bad = compose("config", overrides=[*base, "policy=round_robin"])
    assert schema.check(ok).provisioning.strategy == "predictive"
    with pytest.raises(ConfigError, match="predictive needs predicted latencies: policy.name=round_robin"):
        schema.check(bad)
