"""Client of vLLM's own OpenAI-compatible server (``vllm serve MODEL``): the engine ``VLLMBackend`` uses in server
mode.

Rollouts come from the frozen base model, so the server never needs new weights: a stock ``vllm serve`` of the
base model's folder is all server mode needs. Standard library only (``urllib``), so the trainer's environment
needs neither vLLM nor a GPU.

The wire format is vLLM's ``POST /v1/completions`` (``CompletionRequest`` in
``vllm/entrypoints/openai/completion/protocol.py``): the prompt goes as token ids (nothing is re-tokenised), the
sampling fields go by vLLM's own names (``SamplingParams``' keyword names are ``CompletionRequest`` fields), and
``return_token_ids`` (vLLM >= 0.10.2, vllm-project/vllm#22587) brings each choice's completion back as
``token_ids``. One HTTP request per prompt, each with its own seed; they are sent concurrently so the server
batches them.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

START_COMMAND = "vllm serve {model} --host 127.0.0.1 --port 8000"


class VLLMServerError(RuntimeError):
    """The server answered with an error, or could not be reached."""


def completion_body(model: str, prompt_token_ids: list[int], sampling: dict) -> dict:
    """The ``/v1/completions`` body of one request: ``sampling`` holds ``SamplingParams`` keyword arguments (``n``,
    ``seed``, ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop_token_ids``, ...), which vLLM's
    ``CompletionRequest`` accepts under the same names."""
    return {"model": model, "prompt": [int(t) for t in prompt_token_ids], **sampling, "stream": False,
            "return_token_ids": True}


def completions_from_response(response: dict) -> list[dict]:
    """One prompt's choices as ``{"token_ids", "logprobs", "finish_reason"}`` in sample order (``RolloutEngine``)."""
    out = []
    for choice in sorted(response.get("choices") or [], key=lambda c: c["index"]):
        ids = choice.get("token_ids")
        if ids is None:
            raise VLLMServerError("the server sent no completion token ids: vLLM >= 0.10.2 is needed "
                                  "(the `return_token_ids` field of /v1/completions)")
        logprobs = choice.get("logprobs")
        token_logprobs = [float(x) for x in logprobs["token_logprobs"]] if logprobs else None
        out.append({"token_ids": [int(t) for t in ids], "logprobs": token_logprobs,
                    "finish_reason": choice.get("finish_reason")})
    return out


class VLLMClient:
    """HTTP client of ``vllm serve``: waits for ``/health``, finds the served model (``/v1/models``) and
    generates with ``/v1/completions``.

    ``base_url`` (TRL's ``vllm_server_base_url``, with or without a trailing ``/v1``) overrides ``host``/``port``.
    ``api_key`` (default: the ``VLLM_API_KEY`` environment variable, the one ``vllm serve`` reads for
    ``--api-key``) is sent as ``Authorization: Bearer KEY``. ``model``: the served model's name (default: the
    first one the server lists). ``model_folder`` only makes the start-up error name the folder to serve.
    """

    def __init__(self, base_url: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
                 connection_timeout: float = 240.0, request_timeout: float | None = 1800.0,
                 api_key: str | None = None, model: str | None = None, model_folder: str | os.PathLike | None = None,
                 max_concurrent_requests: int = 64):
        self.base_url = (base_url or f"http://{host}:{port}").rstrip("/").removesuffix("/v1")
        self.api_key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY") or None
        self.request_timeout = request_timeout
        self.max_concurrent_requests = max_concurrent_requests
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy
        self.wait_for_server(connection_timeout, model_folder=model_folder)
        self.model = self.served_model(model)

    def _request(self, method: str, path: str, payload: dict | None = None, *, timeout: float | None = None):
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=timeout or self.request_timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            hint = " (the server wants an API key: set VLLM_API_KEY)" if err.code == 401 else ""
            raise VLLMServerError(f"{method} {self.base_url}{path} failed ({err.code}){hint}: {detail}") from err
        return json.loads(body) if body else {}

    def wait_for_server(self, timeout: float = 240.0, *, model_folder: str | os.PathLike | None = None) -> None:
        """Poll ``GET /health`` (once a second) until it answers 200, or raise after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._request("GET", "/health", timeout=5)
                return
            except (VLLMServerError, urllib.error.URLError, ConnectionError, OSError) as err:
                if time.monotonic() > deadline:
                    command = START_COMMAND.format(model=model_folder or "<model folder>")
                    raise VLLMServerError(
                        f"no vLLM server answered at {self.base_url}/health within {timeout:.0f} s ({err}). Start "
                        f"one for the base model with `{command}` (with `--api-key KEY`, set VLLM_API_KEY=KEY "
                        "here too), or point vllm_server_base_url (or vllm_server_host and vllm_server_port) at a "
                        "running one."
                    ) from err
                time.sleep(1.0)

    def served_model(self, model: str | None = None) -> str:
        """The name to send in each request: ``model`` if the server serves it, else the first one it lists."""
        served = [m["id"] for m in self._request("GET", "/v1/models").get("data", [])]
        if not served:
            raise VLLMServerError(f"{self.base_url}/v1/models lists no model")
        if model is not None and model not in served:
            raise VLLMServerError(f"{self.base_url} serves {served}, not {model!r}")
        return model or served[0]

    def _complete(self, request: dict) -> list[dict]:
        body = completion_body(self.model, request["prompt_token_ids"], request["sampling"])
        return completions_from_response(self._request("POST", "/v1/completions", body))

    def generate(self, requests: list[dict]) -> list[list[dict]]:
        """``RolloutEngine.generate``: one ``/v1/completions`` request per prompt, sent concurrently."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(len(requests), self.max_concurrent_requests)) as pool:
            return list(pool.map(self._complete, requests))

    def close(self) -> None:
        """The client holds no connection; the server is yours to stop."""
