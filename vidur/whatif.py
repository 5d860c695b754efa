"""What-if: "how long would one more request take on this instance?"

``predict`` rebuilds the engine from an ``InstanceState`` (what a predictor knows), adds the candidate request at the
back of the waiting queue and simulates the engine forward -- with the same ``Engine`` the cluster experiments use,
under the scheduling rule the state's engine config names (``scheduler``: vLLM V0 or V1, ``vidur.sched``) --
until that request finishes. Nothing else arrives in the meantime: the answer is the latency the request would see if
it were dispatched now and the instance received nothing more (Block's ``min_new_request_latency``).

In-flight requests run to their expected output length; one that has already decoded past it is assumed to end
``overrun_tokens`` (10) tokens later, as Block does. A state with ``busy_for_s > 0`` starts the simulation at that
offset: the step in flight must end before anything new is scheduled.
"""

from __future__ import annotations

import time

from vidur.engine import Engine, Seq, StepTimeModel
from vidur.types import InstanceState, Prediction, Request

TARGET_ID = -1  # id of the candidate inside the what-if engine (real request ids are >= 0)


def predict(state: InstanceState, request: Request, model: StepTimeModel, *, instance_id: int = 0,
            overrun_tokens: int = 10, expected_output_tokens: int | None = None) -> Prediction:
    """Predicted e2e, TTFT and queueing delay (seconds from now) of ``request`` on the instance in ``state``.

    ``expected_output_tokens`` overrides the request's own hint (``predicted_output_tokens`` or, failing that,
    its true length): this is how a policy injects noise or uses an estimator's answer.
    """
    t0 = time.perf_counter()
    eng = Engine.from_state(state, model, overrun_tokens=overrun_tokens)
    out = expected_output_tokens if expected_output_tokens is not None else request.expected_output_tokens()
    target = Seq(TARGET_ID, request.prompt_tokens, max(1, int(out)))
    eng.add(target, 0.0)
    eng.run_until_finished(target)
    if target.finish is None:  # rejected: it can never fit on this instance
        e2e = ttft = queue = float("inf")
    else:
        e2e, ttft, queue = target.finish, target.first_token, target.first_sched
    return Prediction(
        instance_id=instance_id, e2e_s=e2e, ttft_s=ttft, queue_s=queue, free_blocks=state.free_blocks,
        num_requests=state.num_requests, num_running=len(state.running), num_waiting=len(state.waiting),
        num_preemptions=state.num_preemptions, predict_ms=(time.perf_counter() - t0) * 1e3,
    )
