"""``POST /predict``: read a candidate request, run the what-if on the current state, answer a ``Prediction``.

The what-if itself is ``vidur.whatif.predict`` -- the function the simulated cluster calls too -- so a live
prediction and a simulated one differ only by the state they start from.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from block.service import ServiceError, int_field, json_object, show
from vidur.engine import StepTimeModel
from vidur.types import InstanceState, Request as VRequest
from vidur.whatif import predict

log = logging.getLogger("block.predictor")

BIG = 1e18  # stands for "never" (a request that can never fit): JSON has no infinity
CANDIDATE_ID = -2  # the what-if's id for the candidate (never a tracked request's)


def _pos_int(name: str, v: Any) -> int:
    """A required integer >= 1 (block.service.int_field: integral floats too, 64-bit bound); no digit strings."""
    if v is None:
        raise ServiceError(400, f"{name} is required")
    if isinstance(v, str):
        raise ServiceError(400, f"{name} must be an integer, got {show(v)}")
    return int_field(name, v, lo=1)  # type: ignore[return-value]


def parse_predict(raw: bytes) -> tuple[int, int]:
    """(prompt tokens, expected output tokens) of a /predict body; ours or Block's field names. 400 on bad input."""
    prompt, expected, _ = parse_predict_options(raw)
    return prompt, expected


def parse_predict_options(raw: bytes) -> tuple[int, int, bool]:
    """``parse_predict`` plus the optional ``"others_delay": true`` (fill ``others_delay_s``; a boolean or 400)."""
    d = json_object(raw)  # bounded: block.service.loads_json
    others = d.get("others_delay", False)
    if not isinstance(others, bool):
        raise ServiceError(400, f"others_delay must be a boolean, got {show(others)}")
    return (*_lengths(d), others)


def _lengths(d: dict[str, Any]) -> tuple[int, int]:
    p = d.get("prompt_tokens")
    name_p = "prompt_tokens"
    if p is None and "num_context_tokens" in d:
        p, name_p = d.get("num_context_tokens"), "num_context_tokens"
    e = d.get("expected_output_tokens")
    name_e = "expected_output_tokens"
    if e is None and "num_decode_tokens" in d:
        e, name_e = d.get("num_decode_tokens"), "num_decode_tokens"
    return _pos_int(name_p, p), _pos_int(name_e, e)


def whatif(st: InstanceState, prompt: int, expected: int, model: StepTimeModel, *, instance_id: int,
           overrun_tokens: int, others_delay: bool = False) -> dict[str, Any]:
    """The ``Prediction`` (as JSON) of a candidate with ``prompt`` / ``expected`` tokens joining ``st``.

    400 when the prompt cannot fit the model; the expected length is cut where the engine would stop; infinite
    times (a request that can never fit) become :data:`BIG`. A what-if that fails on an inconsistent state is a 500.
    """
    lim = st.config.max_model_len
    if prompt >= lim:
        raise ServiceError(400, f"prompt_tokens={prompt} must be below the engine's max_model_len={lim}")
    expected = min(expected, lim - prompt)  # the engine would stop there
    try:
        p = predict(st, VRequest(CANDIDATE_ID, 0.0, prompt, expected), model, instance_id=instance_id,
                    overrun_tokens=overrun_tokens, expected_output_tokens=expected, others_delay=others_delay)
    except Exception as err:  # noqa: BLE001 - e.g. an inconsistent injected or engine state
        log.exception("what-if failed")
        raise ServiceError(500, f"what-if failed: {type(err).__name__}: {err}", "server_error") from None
    d = p.to_dict()
    for k in ("e2e_s", "ttft_s", "queue_s"):
        if not math.isfinite(d[k]):
            d[k] = BIG
    return d
