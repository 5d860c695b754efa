"""Prediction feedback in the predictor side-car: predicted vs actual per served request, /metrics, the residual
correction and its switch -- in-process on the bookkeeping, then real engine + predictor servers on loopback."""

from __future__ import annotations

import httpx
import pytest

from block import prom
from block.predictor.feedback import Feedback
from block.prom import get_histogram, get_value, parse_prometheus
from experiments.local_stack import TOKEN_VARS, LocalStack


def _answer(e2e=1.0, ttft=0.1):
    return {"instance_id": 0, "e2e_s": e2e, "ttft_s": ttft, "queue_s": 0.0, "free_blocks": 100, "num_requests": 1,
            "num_running": 1, "num_waiting": 0, "num_preemptions": 0, "predict_ms": 0.1}


def test_feedback_matches_predictions_to_requests_learns_and_the_switch_keeps_answers_raw():
    now = [0.0]
    for correct in (True, False):
        reg = prom.Registry()
        fb = Feedback(reg, correct=correct, total_blocks=1000, min_samples=20, clock=lambda: now[0])
        for i in range(30):
            now[0] += 1.0
            served = fb.answer(_answer(e2e=0.8), prompt=100, expected=50)
            fb.answer(_answer(e2e=0.5), prompt=101, expected=50)  # another candidate's probe, never served here
            assert fb.finished(100, 50, arrived_at=now[0], e2e_s=1.0, ttft_s=0.1)
        assert not fb.finished(7, 7, arrived_at=now[0], e2e_s=1.0, ttft_s=0.1)  # no /predict for it
        served = fb.answer(_answer(e2e=0.8), prompt=100, expected=50)
        m = parse_prometheus(reg.render())
        assert get_value(m, "block_predictor_feedback_requests_total", {"result": "matched"}) == 30
        assert get_value(m, "block_predictor_feedback_requests_total", {"result": "unmatched"}) == 1
        h = get_histogram(m, "block_predictor_e2e_predicted_over_actual", {"prediction": "whatif"})
        assert h.count == 30 and h.mean == pytest.approx(0.8)
        if correct:
            assert served["e2e_s"] == pytest.approx(1.0, rel=0.02) and served["whatif_e2e_s"] == 0.8
            assert get_value(m, "block_predictor_residual_e2e_factor") == pytest.approx(1.25, rel=0.02)
        else:
            assert served["e2e_s"] == 0.8 and "whatif_e2e_s" not in served
            assert get_value(m, "block_predictor_residual_correction") == 0.0
    # a probe older than the match window, or made after the request arrived, is not this request's prediction
    fb = Feedback(prom.Registry(), match_window_s=5.0, clock=lambda: now[0])
    fb.answer(_answer(), 10, 10)
    assert not fb.finished(10, 10, arrived_at=now[0] + 6.0, e2e_s=1.0, ttft_s=0.1)
    now[0] += 10
    fb.answer(_answer(), 10, 10)
    assert not fb.finished(10, 10, arrived_at=now[0] - 1.0, e2e_s=1.0, ttft_s=0.1)


SCALE = "50"  # the engine runs 50x faster than the model: the what-if (model time) is far too slow for it
ENGINE_ARGS = ("--time-scale", SCALE, "--max-num-seqs", "4", "--tokenizer", "none", "--seed", "3")
PRED_ARGS = ("--max-num-seqs", "4", "--tokenizer", "none", "--metrics-interval-s", "0.1")


def _serve(c: httpx.Client, prompt: int, out: int) -> dict:
    p = c.post("/predict", json={"prompt_tokens": prompt, "expected_output_tokens": out})
    assert p.status_code == 200, p.text
    r = c.post("/v1/completions", json={"prompt": list(range(1, prompt + 1)), "max_tokens": out,
                                        "ignore_eos": True}, headers={"x-expected-output-tokens": str(out)})
    assert r.status_code == 200, r.text
    return p.json()


def test_live_predictor_records_its_error_and_corrects_a_wrong_model_only_when_switched_on(tmp_path):
    from block.ports import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with LocalStack(tmp_path, env=dict.fromkeys(TOKEN_VARS)) as stack:
        stack.start("e", "block.engine", ENGINE_ARGS, port=port, wait=False)
        on = stack.start("p_on", "block.predictor", ("--engine-url", url, "--residual-correction", *PRED_ARGS),
                         wait=False)
        off = stack.start("p_off", "block.predictor", ("--engine-url", url, *PRED_ARGS), wait=False)
        stack.wait_healthy()
        for svc, corrected in ((on, True), (off, False)):
            with svc.client(timeout=60) as c:
                first = _serve(c, 64, 40)
                for _ in range(59):
                    last = _serve(c, 64, 40)
                m = parse_prometheus(c.get("/metrics").text)
                # every served request was compared with the prediction made for it
                assert get_value(m, "block_predictor_feedback_requests_total", {"result": "matched"}) == 60
                h = get_histogram(m, "block_predictor_e2e_predicted_over_actual", {"prediction": "whatif"})
                assert h.count == 60 and h.mean > 2.0  # model time vs an engine 50x faster: far too slow
                assert get_value(m, "block_predictor_residual_correction") == (1.0 if corrected else 0.0)
                if corrected:
                    assert "whatif_e2e_s" not in first  # nothing learned yet: the raw what-if
                    assert last["whatif_e2e_s"] > 0 and last["e2e_s"] < 0.5 * last["whatif_e2e_s"]
                    served = get_histogram(m, "block_predictor_e2e_predicted_over_actual", {"prediction": "served"})
                    assert served.mean < h.mean
                else:
                    assert "whatif_e2e_s" not in last
