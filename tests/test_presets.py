"""Experiment presets (conf/experiment/*.yaml), the sweep machinery (resume, progress bar, launchers), errors and the
run logger. Presets are composed from the real config tree; the smoke preset really runs (seconds)."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from experiments import wiring

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
Q_FIG6 = [float(q) for q in range(20, 37)]
Q_EXT = [float(q) for q in range(48, 71)]

# name -> (experiment_name, swept params {key: values}, fixed expectations {dotted key: value})
PRESETS = {
    "smoke": ("smoke", {"policy": ["round_robin", "block_oracle"], "workload.qps": [4.0, 8.0]},
              {"cluster.num_instances": 4, "workload.num_requests": 200}),
    "fig5": ("fig5", {"engine": ["vllm", "vllm_chunked"], "workload.qps": [20.0, 24.0, 28.0, 32.0, 36.0]},
             {"cluster.num_instances": 12, "policy.name": "random", "dataset.name": "sharegpt",
              "accuracy.sampling_rate": 0.01, "workload.num_requests": 9777, "model.name": "meta-llama/Llama-2-7b-hf",
              "engine.max_num_seqs": 48}),
    "fig6": ("fig6", {"policy": ["block_star", "block_oracle", "llumnix", "infaas", "round_robin", "min_qpm", "random"],
                      "workload.qps": Q_FIG6[::-1]},  # costliest first (see test_fig6_runs_one_run_per_core)
             {"cluster.num_instances": 12, "dataset.name": "sharegpt_predicted", "engine.name": "vllm_chunked",
              "engine.max_num_seqs": 48, "engine.chunk_size": 512, "workload.num_requests": 10000,
              "provisioning.enabled": False}),
    "fig8": ("fig8", {"provisioning": ["none", "reactive", "predictive"]},
             {"cluster.num_instances": 10, "policy.name": "block_oracle", "workload.qps": 24,
              "workload.num_requests": 9777}),
    "table2": ("table2/reference", {"policy": ["block_oracle", "block_star", "llumnix"], "workload.qps": Q_FIG6},
               {"engine.max_num_seqs": 48, "engine.chunk_size": 512, "dataset.name": "sharegpt_predicted"}),
    "table2_batch": ("table2/batch", {"policy": ["block_oracle", "block_star"], "workload.qps": Q_FIG6},
                     {"engine.max_num_seqs": 24, "engine.chunk_size": 512, "cluster.num_instances": 12}),
    "table2_chunk": ("table2/chunk", {"policy": ["block_oracle", "block_star"], "workload.qps": Q_FIG6},
                     {"engine.max_num_seqs": 48, "engine.chunk_size": 2048, "cluster.num_instances": 12}),
    "table2_qwen": ("table2/qwen", {"policy": ["block_oracle", "block_star", "llumnix"], "workload.qps": Q_EXT},
                    {"model.name": "Qwen/Qwen2-7B", "dataset.name": "sharegpt_predicted"}),
    "table2_azure": ("table2/azure", {"policy": ["block_oracle", "block_noisy", "llumnix"],
                                      "workload.qps": [float(q) for q in range(6, 19)]},
                     {"dataset.name": "azure_conv", "workload.arrival": "trace", "model.name": "meta-llama/Llama-2-7b-hf"}),
    # Block's artifact: Llama-2-70B, TP 4, 2 x A100-40GB instances, against full Llumnix (live migration)
    "llumnix_full": ("llumnix_full", {"policy": ["block_oracle", "llumnix", "llumnix_full"],
                                      "workload.qps": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 24.0, 36.0]},
                     {"cluster.num_instances": 2, "engine.tensor_parallel": 4, "gpu.name": "A100-SXM4-40GB",
                      "model.name": "meta-llama/Llama-2-70b-hf", "workload.num_requests": 10000}),
    # a single run (no sweep) on real vLLM (CPU): benchmarks/vllm_accuracy.py runs it
    "vllm_cpu_accuracy": ("vllm_cpu_accuracy", {},
                          {"cluster.num_instances": 2, "mode.name": "emulate", "mode.state_source": "proxy",
                           "engine.scheduler": "v1", "workload.num_requests": 40, "accuracy.sampling_rate": 0.3}),
    # Block's artifact suite (issue 17): run sweeps at one QPS whose capacity keys serve python -m experiments.capacity
    "capacity_refine": ("capacity_refine", {"policy": ["block_oracle", "block_star", "llumnix", "infaas", "round_robin",
                                                       "min_qpm", "random"]},
                        {"cluster.num_instances": 12, "workload.num_requests": 10000, "capacity.tol": 0.1,
                         "capacity.seeds": 5, "dataset.name": "sharegpt_predicted"}),
    "nablation": ("nablation", {"policy": ["block_star", "block_oracle"], "block_k": [2.0, 4.0, 6.0, 8.0, 12.0],
                                "workload.qps": [30.0]},
                  {"workload.num_requests": 10000, "slo.ttft_s": 10.0, "capacity.seeds": 5}),
    "burstiness": ("burstiness", {"policy": ["block_star", "llumnix"], "workload.burstiness": [0.25, 0.5, 1.0, 2.0],
                                  "workload.qps": [30.0]},
                   {"workload.arrival": "gamma", "workload.num_requests": 10000, "slo.ttft_s": 10.0}),
    "error_heatmap": ("error_heatmap", {"policy.length_noise_pct": [0.0, 25.0, 50.0, 100.0],
                                        "policy.latency_noise_pct": [0.0, 25.0, 50.0, 100.0], "workload.qps": [30.0]},
                      {"policy.name": "block_oracle", "policy.k": 2, "workload.num_requests": 10000}),
    "overhead": ("overhead", {"policy": ["block_star"], "block_k": [2.0, 12.0],
                              "workload.qps": [float(q) for q in range(20, 37, 2)]},
                 {"workload.num_requests": 10000, "cluster.num_instances": 12}),
    # mixed pools (docs/beyond_block.md): 6 A30 + 2 A100-80GB
    "mixed_pool": ("mixed_pool", {"policy": ["round_robin", "least_requests", "llumnix", "lmetric", "block_nosim",
                                             "block", "block_ttft"],
                                  "workload.qps": [12.0, 16.0, 20.0, 24.0, 28.0, 32.0, 36.0, 40.0, 44.0, 48.0]},
                   {"cluster.num_instances": 8, "cluster.name": "mixed_a30x6_a100x2", "workload.num_requests": 1000,
                    "dataset.name": "sharegpt_predicted"}),
}
SELF_ORDER_MSG = ("conf/config.yaml must list `_self_` before `experiment` in its defaults list, otherwise the base "
                  "config's own keys (experiment_name, seed, accuracy, ...) override every preset")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WANDB_MODE", None)
    return env


def _run(*args, timeout=120, check=True):
    p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n"
                             f"{p.stderr[-3000:]}")
    return p


def _values(s) -> list:
    """The values of a basic-sweeper string 'a,b,c' (numbers as floats)."""
    out = []
    for v in str(s).split(","):
        v = v.strip()
        try:
            out.append(float(v))
        except ValueError:
            out.append(v)
    return out


@pytest.fixture(scope="module")
def composer():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides: compose("config", overrides=list(overrides), return_hydra_config=True)


def test_preset_files_are_all_covered():
    names = {p.stem for p in (CONF / "experiment").glob("*.yaml")} - {"default"}
    assert names == set(PRESETS)
    for name in names:
        assert (CONF / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_")


def test_presets_override_the_base_config(composer):
    cfg = composer(["experiment=fig5"])
    assert cfg.experiment_name == "fig5", SELF_ORDER_MSG
    assert cfg.accuracy.sampling_rate == 0.01, SELF_ORDER_MSG


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_composes_and_every_sweep_point_validates(composer, name):
    exp_name, swept, fixed = PRESETS[name]
    base = composer([f"experiment={name}"])
    assert base.experiment_name == exp_name, SELF_ORDER_MSG
    params = {k: _values(v) for k, v in (base.hydra.sweeper.params or {}).items()}
    assert params == swept
    assert base.hydra.callbacks.sweep_progress._target_ == "experiments.logger.SweepProgress"
    # every combination: the group choices are composed, the QPS (a plain value) is set on the composed config
    keys = [k for k in swept if k != "workload.qps"]
    for combo in itertools.product(*(swept[k] for k in keys)):
        cfg = composer([f"experiment={name}"] + [f"{k}={v}" for k, v in zip(keys, combo)])
        for key, want in fixed.items():
            assert OmegaConf.select(cfg, key) == want, (name, combo, key)
        for k, v in zip(keys, combo):
            got = OmegaConf.select(cfg, f"{k}.name" if k in ("policy", "engine") else k)
            if k == "provisioning":
                assert cfg.provisioning.enabled == (v != "none")
            else:
                assert got == v
        for q in swept.get("workload.qps", [cfg.workload.qps]):
            cfg.workload.qps = q
            ec = wiring.validate(cfg)
            assert ec.max_num_seqs == cfg.engine.max_num_seqs


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_workload_builds_at_full_scale(composer, name):
    cfg = composer([f"experiment={name}"])
    first = {k: _values(v)[0] for k, v in (cfg.hydra.sweeper.params or {}).items()}
    if "workload.qps" in first:
        cfg.workload.qps = first["workload.qps"]
    requests = wiring.workload(cfg)
    assert len(requests) == cfg.workload.num_requests
    if cfg.dataset.predicted_length != "none":
        assert all(r.predicted_output_tokens is not None for r in requests[:100])


def test_fig6_block_family_probes_k(composer):
    for policy, k in [("block_oracle", 12), ("block_star", 12), ("llumnix", None), ("random", None)]:
        cfg = composer(["experiment=fig6", f"policy={policy}"])
        assert cfg.policy.k == k
    assert composer(["experiment=fig6", "policy=block_star", "block_k=2"]).policy.k == 2
    assert composer(["experiment=fig6", "policy=llumnix", "block_k=2"]).policy.k is None
    cfg = composer(["experiment=fig6", "policy=block_star"])
    assert cfg.dataset.predicted_length == "column"


def test_fig6_runs_one_run_per_core(composer):
    """The 119 runs of Fig 6 are independent single-threaded processes: the preset runs one per core (joblib), without
    per-run bars; the basic launcher is one override away, and other presets keep it."""
    cfg = composer(["experiment=fig6"])
    assert "JoblibLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.n_jobs == -1  # one per core
    assert cfg.progress is False
    # the costliest runs go first (Block* past capacity, then Block), so that both cores finish about together
    params = cfg.hydra.sweeper.params
    assert str(params.policy).split(",")[:2] == ["block_star", "block_oracle"]
    qps = [float(q) for q in str(params["workload.qps"]).split(",")]
    assert qps == sorted(qps, reverse=True)
    assert "BasicLauncher" in composer(["experiment=fig6", "hydra/launcher=basic"]).hydra.launcher._target_
    assert "BasicLauncher" in composer(["experiment=fig5"]).hydra.launcher._target_


def test_fig8_variants(composer):
    static = composer(["experiment=fig8", "provisioning=none"])
    assert static.cluster.num_instances == 10 and not static.provisioning.enabled
    for strategy in ("reactive", "predictive"):
        cfg = composer(["experiment=fig8", f"provisioning={strategy}"])
        p = cfg.provisioning
        assert (p.enabled, p.strategy, p.initial_instances, p.slo_s) == (True, strategy, 6, 70.0)
        assert wiring.provisioning(cfg) is not None


def test_sweep_run_dirs_follow_the_command_line(composer):
    from experiments.logger import sweep_run_dirs

    cfg = composer(["experiment=smoke", "output_root=/x", "workload.num_requests=50"])
    # compose() runs in RUN mode (no sweep values): set the command line as a -m run records it
    OmegaConf.update(cfg, "hydra.overrides.task",
                     ["experiment=smoke", "output_root=/x", "workload.qps=1,2,3", "workload.num_requests=50"],
                     force_add=True)
    dirs = sweep_run_dirs(cfg)
    assert len(dirs) == 6  # 2 policies x the command line's 3 QPS (the preset's list is replaced)
    assert Path("/x/smoke/policy=block_oracle,workload.num_requests=50,workload.qps=3") in dirs
    # an ad-hoc sweep without a preset (no sweeper params)
    cfg = composer(["output_root=/y"])
    OmegaConf.update(cfg, "hydra.overrides.task", ["output_root=/y", "policy=random,llumnix", "seed=1"],
                     force_add=True)
    assert sweep_run_dirs(cfg) == [Path("/y/default/policy=random,seed=1"), Path("/y/default/policy=llumnix,seed=1")]


def test_sweep_progress_pickles_without_its_bar():
    from experiments.logger import SweepProgress

    cb = SweepProgress(interval_s=0.5)
    cb._bar = object()
    copy = pickle.loads(pickle.dumps(cb))
    assert copy.interval_s == 0.5 and copy._bar is None


# ---------------------------------------------------------------------- running sweeps
def _summaries(root: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/summary.json")}


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    p = _run("experiments.run", "-m", "experiment=smoke", f"output_root={out}")  # progress on, stderr a pipe
    return out, p


def test_smoke_preset_runs_end_to_end(smoke_sweep):
    out, proc = smoke_sweep
    root = out / "smoke"
    runs = sorted(d.name for d in root.iterdir() if d.is_dir())
    assert runs == ["policy=block_oracle,workload.qps=4", "policy=block_oracle,workload.qps=8",
                    "policy=round_robin,workload.qps=4", "policy=round_robin,workload.qps=8"]
    for name in runs:
        d = root / name
        s = json.loads((d / "summary.json").read_text())
        req = pd.read_parquet(d / "requests.parquet")
        assert len(req) == 200 and s["completed"] + s["failed"] == 200
        assert s["policy"] == name.split(",")[0].split("=")[1]
        assert s["qps"] == float(name.split("=")[-1]) and s["num_instances"] == 4
        assert (d / "instances.parquet").is_file()
        cfg = OmegaConf.load(d / "config.yaml")
        assert cfg.experiment_name == "smoke" and cfg.workload.num_requests == 200
    assert "sweep smoke" in proc.stderr and "4/4" in proc.stderr  # the sweep's progress bar


def test_progress_in_a_log_is_one_plain_line_per_finished_run(smoke_sweep):
    _, proc = smoke_sweep  # stderr is a pipe, as in a log file or a batch job: no bars, no escape codes
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr[:500]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sweep smoke: ")]
    assert len(lines) == 4, proc.stderr
    assert [ln.split(" runs complete")[0] for ln in lines] == [f"sweep smoke: {i}/4" for i in range(1, 5)]
    named = {ln.split("(")[-1].rstrip(")") for ln in lines}
    assert named == {d.name for d in (smoke_sweep[0] / "smoke").iterdir() if d.is_dir()}


def test_resume_redoes_only_missing_runs(smoke_sweep, tmp_path):
    import shutil

    src, _ = smoke_sweep
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    root = tmp_path / "smoke"
    before = _summaries(root)
    victim = "policy=round_robin,workload.qps=8"
    (root / victim / "summary.json").unlink()
    _run("experiments.run", "-m", "experiment=smoke", f"output_root={tmp_path}", "progress=false")
    after = _summaries(root)
    assert set(after) == set(before)
    redone = {k for k in after if after[k] != before[k]}
    assert redone == {victim}


def test_a_run_made_under_another_execution_model_is_redone(smoke_sweep, tmp_path):
    """A finished run records its execution model's fingerprint; when the profiles, the fitting code or the specs
    change it (simulated here by editing one recorded fingerprint), a resumed sweep does that run again and says why;
    runs whose fingerprint matches, or that have none (written before fingerprints), are kept."""
    import shutil

    src, _ = smoke_sweep
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    root = tmp_path / "smoke"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/summary.json")}
    fp = {s["execution_model"] for s in summaries.values()}
    assert len(fp) == 1 and len(fp.pop()) == 16  # one model (local4's) for every run
    stale, old = "policy=round_robin,workload.qps=8", "policy=block_oracle,workload.qps=8"
    for name, value in ((stale, "0123456789abcdef"), (old, None)):
        s = dict(summaries[name])
        if value is None:
            s.pop("execution_model")
        else:
            s["execution_model"] = value
        (root / name / "summary.json").write_text(json.dumps(s))
    before = _summaries(root)
    p = _run("experiments.run", "-m", "experiment=smoke", f"output_root={tmp_path}", "progress=false")
    after = _summaries(root)
    assert {k for k in after if after[k] != before[k]} == {stale}
    assert "its execution model changed since it ran (0123456789abcdef ->" in p.stderr + p.stdout
    redone = json.loads((root / stale / "summary.json").read_text())
    assert redone["execution_model"] == summaries[stale]["execution_model"]
    assert redone["p99_ttft_ms"] == summaries[stale]["p99_ttft_ms"]  # the same run, done again


def test_a_crashed_run_leaves_no_summary_and_is_redone(tmp_path):
    # a crash while one run writes its records (after config.yaml and requests.parquet)
    crash = (
        "import runpy, sys, vidur.records as r\n"
        "orig = r.write_parquet\n"
        "def boom(path, df):\n"
        "    if 'block_oracle,workload.qps=4' in str(path) and str(path).endswith('instances.parquet'):\n"
        "        raise RuntimeError('simulated crash')\n"
        "    return orig(path, df)\n"
        "r.write_parquet = boom\n"
        f"sys.argv = ['run', '-m', 'experiment=smoke', 'output_root={tmp_path}', 'progress=false']\n"
        "runpy.run_module('experiments.run', run_name='__main__')\n"
    )
    p = subprocess.run([sys.executable, "-c", crash], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "simulated crash" in p.stderr
    root = tmp_path / "smoke"
    crashed = root / "policy=block_oracle,workload.qps=4"
    assert (crashed / "requests.parquet").is_file() and not (crashed / "summary.json").exists()
    before = _summaries(root)
    # Hydra's launcher goes on with the other runs and reports the failure at the end
    assert set(before) == {"policy=round_robin,workload.qps=4", "policy=round_robin,workload.qps=8",
                           "policy=block_oracle,workload.qps=8"}
    _run("experiments.run", "-m", "experiment=smoke", f"output_root={tmp_path}", "progress=false")
    after = _summaries(root)
    assert len(after) == 4
    assert all(after[k] == before[k] for k in before)  # finished runs untouched


def test_ctrl_c_stops_a_parallel_sweep_cleanly(tmp_path):
    """Ctrl-C on a sweep with one run per core (the fig6 preset's joblib): every run stops, the sweep ends with exit
    130 and one line saying what reruns (no traceback), no worker is left, no summary is written."""
    root = tmp_path / "fig6"
    # two long runs (Block* past capacity: a minute or more here); Ctrl-C once both have started
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", "-m", "experiment=fig6", "policy=block_star",
                             "workload.qps=35,36", f"output_root={tmp_path}"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (a background job's
    # children ignore SIGINT: the terminal's default is what a user's Ctrl-C meets)
    try:
        deadline = time.monotonic() + 300
        while len(list(root.glob("*/run.log"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep's two runs never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    # each run says so too, unless the sweep's exit ends its worker first (joblib stops its workers on the way out)
    assert err.count("has no summary.json (it reruns next time)") <= 2, err[-3000:]
    assert "interrupted: the sweep stopped" in err and "Traceback" not in err, err[-3000:]
    assert not list(root.glob("*/summary.json"))
    def group() -> list[str]:
        return subprocess.run(["ps", "-g", str(proc.pid), "-o", "pid=,args="], capture_output=True,
                              text=True).stdout.splitlines()

    deadline = time.monotonic() + 120  # the workers and joblib's resource trackers end once the sweep's pipes close
    while group() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group(), f"processes left in the sweep's group: {group()}"


def test_progress_on_a_terminal_keeps_the_bars(tmp_path):
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", "-m", "experiment=smoke", "policy=round_robin",
                             f"output_root={tmp_path}"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:  # drain the terminal while the sweep runs (a full pty buffer would block it)
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.wait(timeout=120) == 0
    reader.join(timeout=10)
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert "\r" in out and "sweep smoke" in out and "2/2" in out  # tqdm redraws in place
    assert "runs complete (" not in out  # the plain lines are for logs only


def test_a_rerun_removes_what_a_killed_writer_left(tmp_path):
    run_dir = tmp_path / "default" / "run"
    args = ("experiments.run", f"output_root={tmp_path}", "workload.num_requests=20", "progress=false",
            f"hydra.run.dir={run_dir}")
    run_dir.mkdir(parents=True)
    # a writer killed mid-write leaves write_atomic's hidden temp files (and no summary.json)
    stale = [run_dir / ".requests.parquet.k1ll3d.tmp", run_dir / ".config.yaml.x7y8z9.tmp"]
    for f in stale:
        f.write_bytes(b"half a file")
    (run_dir / "requests.parquet").write_bytes(b"half a file")
    _run(*args)
    assert not [f for f in stale if f.exists()]
    assert not list(run_dir.glob(".*.tmp"))
    assert len(pd.read_parquet(run_dir / "requests.parquet")) == 20
    assert json.loads((run_dir / "summary.json").read_text())["completed"] == 20


def test_write_atomic_never_leaves_a_partial_file(tmp_path):
    from vidur.records import write_atomic

    target = tmp_path / "t.parquet"
    write_atomic(target, b"old")

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, crash)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
    write_atomic(target, lambda tmp: pd.DataFrame({"a": [1, 2]}).to_parquet(tmp))
    assert pd.read_parquet(target)["a"].tolist() == [1, 2]


def test_a_killed_run_leaves_no_summary(tmp_path):
    run_dir = tmp_path / "default" / "big"
    cmd = [sys.executable, "-m", "experiments.run", f"output_root={tmp_path}", "cluster=local4", "policy=block_oracle",
           "workload.qps=40", "workload.num_requests=20000", "workload.wrap=true", "progress=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (run_dir / ".hydra").is_dir() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(1.0)
        assert proc.poll() is None, "the run finished before it could be killed: make it bigger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert run_dir.is_dir() and not (run_dir / "summary.json").exists()


# ---------------------------------------------------------------------- errors
def test_bad_override_is_hydras_error(tmp_path):
    p = _run("experiments.run", "policy=no_such_policy", f"output_root={tmp_path}", check=False)
    assert p.returncode != 0 and "no_such_policy" in p.stderr and "policy" in p.stderr
    p = _run("experiments.run", "workload.no_such_key=1", f"output_root={tmp_path}", check=False)
    assert p.returncode != 0 and "no_such_key" in p.stderr


def test_impossible_combination_names_the_keys(tmp_path):
    p = _run("experiments.run", "engine.chunk_size=4096", "engine.max_num_batched_tokens=512",
             f"output_root={tmp_path}", check=False)
    assert p.returncode == 2
    assert "engine" in p.stderr and "chunk_size" in p.stderr and "max_num_batched_tokens" in p.stderr
    p = _run("experiments.run", "workload.qps=0", f"output_root={tmp_path}", check=False)
    assert p.returncode == 2 and "workload.qps" in p.stderr
    assert not list(tmp_path.rglob("summary.json"))


# ---------------------------------------------------------------------- logger
def test_logger_none_is_default_and_wandb_composes(composer):
    assert composer([]).logger.name == "none"
    cfg = composer(["logger=wandb", "experiment=smoke"])
    assert cfg.logger.mode == "offline" and cfg.logger.group == "smoke"


def test_wandb_logger_logs_config_and_summary_offline(composer, monkeypatch, tmp_path):
    import types

    from experiments import logger

    calls = {}

    class FakeRun:
        def __init__(self):
            self.summary = {}

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        calls["env_mode"] = os.environ.get("WANDB_MODE")
        calls["run"] = FakeRun()
        return calls["run"]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_MODE", "unset")  # recorded, so log_run's setting is undone after the test
    monkeypatch.delenv("WANDB_MODE")
    cfg = composer(["logger=wandb", "experiment=smoke", "workload.qps=4"])
    with open_dict(cfg):
        del cfg["hydra"]  # a task's config has no hydra node
    logger.check(cfg)
    logger.log_run(cfg, tmp_path / "run", {"completed": 200, "p99_ttft_ms": 400.0, "itl": None, "x": [1]})
    kw = calls["init"]
    assert kw["mode"] == "offline" and calls["env_mode"] == "offline"
    assert kw["config"]["workload"]["qps"] == 4 and kw["group"] == "smoke" and kw["name"] == "run"
    assert calls["run"].summary == {"completed": 200, "p99_ttft_ms": 400.0} and calls["finished"]


def test_wandb_missing_is_a_clear_error(composer, monkeypatch):
    from experiments import logger

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    cfg = composer(["logger=wandb"])
    with pytest.raises(logger.LoggerError, match="pip install wandb"):
        logger.check(cfg)


def test_wandb_missing_exits_before_running(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    p = _run("experiments.run", "logger=wandb", f"output_root={tmp_path}", "workload.num_requests=20", check=False)
    assert p.returncode == 2 and "pip install wandb" in p.stderr
    assert not list(tmp_path.rglob("summary.json"))


# ---------------------------------------------------------------------- launchers
@pytest.mark.parametrize("launcher,plugin", [("joblib", "hydra_plugins.hydra_joblib_launcher"),
                                             ("slurm", "hydra_plugins.hydra_submitit_launcher")])
def test_launcher_configs_compose(composer, launcher, plugin):
    pytest.importorskip(plugin)
    cfg = composer(["experiment=smoke", f"hydra/launcher={launcher}"])
    assert "_target_" in cfg.hydra.launcher


def test_joblib_launcher_runs_the_smoke_sweep_in_parallel(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    p = _run("experiments.run", "-m", "experiment=smoke", f"output_root={tmp_path}", "hydra/launcher=joblib",
             "hydra.launcher.n_jobs=2", "progress=false")
    assert len(_summaries(tmp_path / "smoke")) == 4
    assert "Joblib.Parallel(n_jobs=2" in p.stdout + p.stderr and "4/4" in p.stderr
