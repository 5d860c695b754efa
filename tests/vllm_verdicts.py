"""vLLM's own verdict on OpenAI requests: its request models, validation handler and sampling checks, no model.

Run with the Python of a vLLM install (``python -m block.engine.vllm_install``); ``tests/test_service_edges.py``
compares what it prints with ``block.openai_params``. Input (stdin, JSON): a list of ``[path, body]``. Output
(stdout, last line, JSON): per case ``[status, message or null]`` as ``vllm serve`` 0.32 answers it (with
``max_model_len`` 4096, a 32,000-token vocabulary and a 3-token prompt).
"""

from __future__ import annotations

import argparse
import json
import sys


def build_app():
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.entrypoints.serve.exception_handling.handlers.validation import validation_exception_handler
    from vllm.entrypoints.serve.exception_handling.handlers.vllm_error import vllm_error_handler
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
    from vllm.exceptions import VLLMError

    class ModelConfig:  # what SamplingParams._validate_logprobs reads (vllm serve's defaults)
        max_logprobs = 20

        def get_vocab_size(self) -> int:
            return 32000

    app = FastAPI()
    app.state.args = argparse.Namespace(log_error_stack=False)
    app.exception_handler(RequestValidationError)(validation_exception_handler)
    app.exception_handler(VLLMError)(vllm_error_handler)

    def finish(req, chat: bool, n_prompt: int):
        try:
            mt = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
            req.to_sampling_params(get_max_tokens(4096, mt, n_prompt, {}), {})._validate_logprobs(ModelConfig())
        except Exception as err:  # noqa: BLE001 - vLLM's own mapping decides
            e = create_error_response(err)
            return JSONResponse(e.model_dump(), status_code=e.error.code)
        return {"ok": True}

    def endpoint(model: type, chat: bool):
        async def handle(request):
            return finish(request, chat, 3)

        handle.__annotations__ = {"request": model}  # a class, not a postponed string annotation
        return handle

    app.post("/v1/completions")(endpoint(CompletionRequest, False))
    app.post("/v1/chat/completions")(endpoint(ChatCompletionRequest, True))
    return app


def main() -> None:
    from fastapi.testclient import TestClient

    client = TestClient(build_app(), raise_server_exceptions=False)
    out = []
    for path, body in json.loads(sys.stdin.read()):
        r = client.post(path, json=body)
        message = None
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:500]
        out.append([r.status_code, message])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
