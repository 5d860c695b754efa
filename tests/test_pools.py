"""Mixed pools (experiments/pools.py, cluster.pools): a config mixes instance kinds, the schema refuses bad pools
naming the key, and in mode=sim every instance runs -- and is predicted -- with its own GPU, engine config and
execution model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments import schema
from experiments.pools import engines, instance_kinds, run_pools
from experiments.wiring import ConfigError
from vidur.cluster import Cluster
from vidur.policy_contract import RoutingPolicy
from vidur.types import Request
from vidur.whatif import predict

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["cluster=mixed_a30x6_a100x2", *overrides])


def test_preset_pools_build_each_kind():
    cfg = _cfg()
    schema.check(cfg)
    pools = run_pools(cfg)
    assert [(p.name, p.count) for p in pools] == [("a30", 6), ("a100_80gb", 2)]
    a30, a100 = (p.setup for p in pools)
    assert a100.engine.max_num_seqs == 128 and a30.engine.max_num_seqs == cfg.engine.max_num_seqs
    assert a100.engine.num_blocks > 5 * a30.engine.num_blocks  # its own memory decides its KV blocks
    assert instance_kinds(cfg) == ["a30"] * 6 + ["a100_80gb"] * 2
    assert run_pools(_cfg("cluster=a30x12")) is None


@pytest.mark.parametrize("override, message", [
    ("cluster.num_instances=9", "cluster.num_instances=9 but cluster.pools count 8"),
    ("cluster.pools.1.gpu=tpu_v9", "cluster.pools[1].gpu: gpu 'tpu_v9' is not one of"),
    ("cluster.pools.0.count=0", "cluster.pools[0].count=0"),
    ("+cluster.pools.1.engine.max_num_sequences=3", "cluster.pools[1].engine: unknown key(s) ['max_num_sequences']"),
    ("cluster.pools.1.name=a30", "share a name"),
    ("mode=deploy", "not yet mode=deploy"),
])
def test_bad_pools_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        schema.check(_cfg(override))
    assert message in str(err.value)


def test_each_instance_is_predicted_with_its_own_model():
    """An empty cluster: the first request's what-if on an A100 instance is the A100 engine's own (faster) one."""
    pools = run_pools(_cfg())
    engs = engines(pools)
    assert engs[0].cfg.num_blocks != engs[7].cfg.num_blocks and engs[0].model is not engs[7].model
    seen = {}

    def choose(req, cands, ctx):
        if not seen:
            seen.update({c.instance_id: c.prediction for c in cands})
        return cands[0].instance_id

    req = Request(0, 0.0, 400, 200)
    Cluster(engs, RoutingPolicy("spy", choose, "prediction", None)).run([req])
    fresh = engines(pools)
    for i in (0, 7):
        own = predict(fresh[i].snapshot(0.0), req, fresh[i].model)
        assert math.isclose(seen[i].e2e_s, own.e2e_s, rel_tol=1e-9)
    assert seen[7].e2e_s < 0.8 * seen[0].e2e_s  # the A100's step times, not the A30's


def test_sim_runs_and_figure_over_the_pool(tmp_path):
    """Real runs (python -m experiments.run -m): the records carry the pools, Block sends the faster kind more work
    than round robin does, and analysis.mixed_pool draws capacity and work per kind from them."""
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "-m", "cluster=mixed_a30x6_a100x2", "dataset=sharegpt_predicted",
         "policy=round_robin,block", "policy.k=null", "workload.num_requests=300", "workload.qps=8,40",
         f"output_root={tmp_path}", "experiment_name=mix", "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(tmp_path.rglob("summary.json"))
    assert len(runs) == 4
    summary = json.loads(runs[0].read_text())
    assert summary["pools"] == "6xa30+2xa100_80gb" and summary["instance_kinds"] == ["a30"] * 6 + ["a100_80gb"] * 2
    from analysis.mixed_pool import main

    assert main([str(tmp_path / "mix"), "--qps", "8", "--slo", "3"]) == 0
    tab = pd.read_csv(tmp_path / "mix" / "figures" / "mixed_pool.csv").set_index("label")
    assert (tmp_path / "mix" / "figures" / "mixed_pool.png").is_file()
    share = tab["tokens_share_a100_80gb"]
    assert ((share + tab["tokens_share_a30"] - 1).abs() < 1e-9).all()
    block = next(lab for lab in tab.index if lab.lower().startswith("block"))
    rr = next(lab for lab in tab.index if lab != block)
    assert share[block] > share[rr] + 0.1  # round robin gives the A100s a quarter of the requests, Block more


def test_emulate_gives_each_instance_its_pool(tmp_path):
    """mode=emulate: instance i's engine and predictor run with its pool's GPU and engine config (real services)."""
    pools = "[{count:1,gpu:a30},{count:1,gpu:a100_80gb,engine:{max_num_seqs:64}}]"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "mode=emulate", "cluster.num_instances=2", f"+cluster.pools={pools}",
         "policy=block", "policy.k=null", "workload.num_requests=16", "workload.qps=3", "mode.time_scale=4",
         f"output_root={tmp_path}", f"hydra.run.dir={tmp_path}/run", "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["completed"] == 16 and s["instance_kinds"] == ["a30", "a100_80gb"]
    free = pd.read_parquet(run / "instances.parquet").groupby("instance")["free_blocks"].max()
    assert free[1] > 5 * free[0]  # the A100 engine holds its own GPU's KV cache
    assert "max_num_seqs: 64" in (run / "services" / "pool1" / "engine.yaml").read_text()
    assert pd.read_parquet(run / "requests.parquet")["predicted_e2e_s"].notna().all()
