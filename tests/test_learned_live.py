"""The learned routers in the live scheduler: real emulated engines and predictors on loopback, the scheduler's own
ASGI application in-process (so the test can read the policy's memory), outcomes handed back as requests finish."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from block.policies import make_policy
from block.scheduler.app import build_app
from block.scheduler.core import Scheduler, SchedulerConfig
from experiments.local_stack import TOKEN_VARS, LocalStack

pytest.importorskip("lightgbm", reason="the learned predictors need the ml extra (LightGBM)")


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    with LocalStack(tmp_path_factory.mktemp("learned_live"), env=dict.fromkeys(TOKEN_VARS),
                    startup_timeout_s=90) as local:
        engines = [local.start(f"engine{i}", "block.engine", ["--time-scale", "50", "--tokenizer", "none",
                                                               "--seed", str(i)], wait=False) for i in range(2)]
        local.wait_healthy(engines)
        preds = [local.start(f"predictor{i}", "block.predictor", ["--engine-url", e.url, "--tokenizer", "none",
                                                                   "--instance-id", str(i)], wait=False)
                 for i, e in enumerate(engines)]
        local.wait_healthy(preds)
        yield [str(p.url) for p in preds]


@pytest.mark.parametrize("name", ["routebalance", "llmd_latency", "lmetric"])
def test_learned_policy_learns_from_the_live_schedulers_outcomes(name, predictors):
    params = {} if name == "lmetric" else {"min_samples": 8, "refit_every": 8}
    if name == "llmd_latency":
        params["epsilon"] = 0.0
    sched = Scheduler(SchedulerConfig(instances=predictors, policy=make_policy(name, **params), tokenizer="none"))
    app = build_app(sched)
    n = 30

    async def run() -> list[int]:
        await sched.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://scheduler",
                                         timeout=60) as c:
                picked = []
                for i in range(n):
                    r = await c.post("/v1/completions", json={"prompt": [7] * (20 + 10 * (i % 5)),
                                                              "max_tokens": 8 + i % 7, "ignore_eos": True})
                    assert r.status_code == 200, r.text
                    picked.append(int(r.headers["x-block-instance"]))
                return picked
        finally:
            await sched.close()

    picked = asyncio.run(run())
    assert set(picked) <= {0, 1}
    if name == "lmetric":
        return
    st = sched.policy_state[name]
    # one request at a time: each one's outcome is back before the next decision (the last one's after it)
    assert st.outcomes == n - 1 and len(st.pending) == 1
    assert all(m.ready for m in st.models.values()) and st.decisions > 0  # the models decided the later requests
