"""vLLM server mode, the server side: ``vgf-llm vllm-serve`` (``VLLMClient`` in ``vllm_client.py`` talks to it).

The server holds one ``LocalVLLMEngine`` and answers plain HTTP/JSON (standard library only; a thread per
connection, engine calls one at a time behind a lock, so a stalled client never blocks ``/health``):

    GET  /health                  -> {"status": "ok", "model", "dtype", "vllm", "num_weight_updates"}
    POST /generate                {"requests": [...]} -> {"outputs": [...]}   (see ``RolloutEngine``)
    POST /update_weights          body: a safetensors file (the full HF-layout state dict) -> reload + reset cache
    POST /load_weights_from_path  {"weights_path": folder}: the same from inside ``--allowed_weights_dir``
    POST /reset_prefix_cache, /sleep {"level"}, /wake_up {"tags"}, /shutdown

The trainer pushes the weights over HTTP after each update (or, with ``shared_weights_dir``, writes them to a
shared filesystem and sends the path). The client needs neither vLLM nor a GPU: the trainer can run in an
environment without vLLM.

Safety: bound to 127.0.0.1 by default. With an API key (``--api_key`` or ``VGF_LLM_VLLM_API_KEY``) every POST
needs ``Authorization: Bearer KEY`` (a warning is printed when another address is bound without one); JSON bodies
are capped (``max_request_bytes``), malformed ones get a 400 naming the problem, a client that stalls mid-request
is dropped after ``socket_timeout`` seconds. There is no TLS: across machines, use a private network or a tunnel.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


class HTTPError(Exception):
    """A client error: answered with ``status`` and the message, never a traceback."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def make_handler(engine, server_state: dict):
    """The request handler. ``server_state``: ``weights_dir`` (uploads land there), and optionally ``api_key``
    (every POST then needs ``Authorization: Bearer KEY``), ``allowed_weights_dirs`` (the only folders
    ``/load_weights_from_path`` may read), ``max_request_bytes`` (JSON bodies), ``max_upload_bytes`` (weights),
    ``socket_timeout`` (seconds a client may stall before its connection is dropped)."""
    weights_dir = Path(server_state["weights_dir"])
    api_key = server_state.get("api_key")
    allowed = [Path(d).resolve() for d in server_state.get("allowed_weights_dirs") or ()]
    max_json = server_state.get("max_request_bytes", 16 << 20)
    max_upload = server_state.get("max_upload_bytes", 64 << 30)
    engine_lock = server_state.setdefault("engine_lock", threading.Lock())  # one engine call at a time

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = server_state.get("socket_timeout", 60.0)

        def log_message(self, fmt, *args):  # quieter than the default stderr line per request
            logger.debug("%s - " + fmt, self.address_string(), *args)

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _length(self, limit: int) -> int:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise HTTPError(400, "Content-Length is not a number") from None
            if length < 0 or length > limit:
                raise HTTPError(413, f"the body is {length} bytes; at most {limit} are accepted here")
            return length

        def _json_body(self) -> dict:
            length = self._length(max_json)
            raw = self.rfile.read(length)
            if len(raw) < length:
                raise HTTPError(400, "the body ended before its Content-Length")
            try:
                body = json.loads(raw or b"{}")
            except ValueError as err:
                raise HTTPError(400, f"the body is not JSON: {err}") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "the body must be a JSON object")
            return body

        def _field(self, body: dict, name: str):
            if name not in body:
                raise HTTPError(400, f"the body needs a {name!r} field")
            return body[name]

        def _authorised(self) -> bool:
            if api_key is None:
                return True
            return hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {api_key}")

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._reply(200, {"status": "ok", **engine.info()})
            else:
                self._reply(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self):  # noqa: N802
            try:
                if not self._authorised():
                    raise HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)")
                self._dispatch()
            except HTTPError as err:
                self.close_connection = True  # the rest of a refused body is never read
                self._reply(err.status, {"error": str(err)})
            except TimeoutError:  # the client stopped sending mid-request: drop it, nobody else waited
                self.close_connection = True
                self._reply(408, {"error": f"the request body did not arrive within {self.timeout} s"})
            except Exception as err:  # report to the client instead of dropping the connection
                logger.exception("request %s failed", self.path)
                self._reply(500, {"error": f"the engine failed: {type(err).__name__}: {err}"})

        def _dispatch(self) -> None:
            if self.path == "/generate":
                requests = self._field(self._json_body(), "requests")
                with engine_lock:
                    outputs = engine.generate(requests)
                self._reply(200, {"outputs": outputs})
            elif self.path == "/update_weights":
                remaining = self._length(max_upload)
                folder = weights_dir / "current"
                with engine_lock:
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                    with open(folder / "model.safetensors", "wb") as handle:
                        while remaining > 0:
                            chunk = self.rfile.read(min(_CHUNK, remaining))
                            if not chunk:
                                raise HTTPError(400, "the weights upload ended early")
                            handle.write(chunk)
                            remaining -= len(chunk)
                    engine.load_weights_from_path(folder)
                self._reply(200, {"status": "ok", "num_weight_updates": engine.num_weight_updates})
            elif self.path == "/load_weights_from_path":
                path = Path(str(self._field(self._json_body(), "weights_path"))).resolve()
                if not any(path.is_relative_to(d) for d in allowed):
                    raise HTTPError(403, "weights_path must be inside a folder the server was started with "
                                         "(vgf-llm vllm-serve --allowed_weights_dir DIR)")
                with engine_lock:
                    engine.load_weights_from_path(path)
                self._reply(200, {"status": "ok", "num_weight_updates": engine.num_weight_updates})
            elif self.path == "/reset_prefix_cache":
                with engine_lock:
                    engine.reset_prefix_cache()
                self._reply(200, {"status": "ok"})
            elif self.path == "/sleep":
                level = self._json_body().get("level", 1)
                with engine_lock:
                    engine.sleep(level=int(level))
                self._reply(200, {"status": "ok"})
            elif self.path == "/wake_up":
                tags = self._json_body().get("tags")
                with engine_lock:
                    engine.wake_up(tags)
                self._reply(200, {"status": "ok"})
            elif self.path == "/shutdown":
                self._reply(200, {"status": "shutting down"})
                threading.Thread(target=server_state["server"].shutdown, daemon=True).start()
            else:
                raise HTTPError(404, f"no such endpoint: POST {self.path}")

    return Handler


class VLLMHTTPServer(ThreadingHTTPServer):
    """One thread per connection (a slow client never blocks /health); engine calls are serialised by a lock."""

    daemon_threads = True
    request_queue_size = 256  # many trainer ranks may connect at once


def serve(model: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, ready_file: str | None = None,
          api_key: str | None = None, allowed_weights_dir: str | os.PathLike | None = None,
          max_request_bytes: int = 16 << 20, **engine_kwargs) -> None:
    """Start a ``LocalVLLMEngine`` on ``model`` and answer requests until ``/shutdown`` or Ctrl-C.

    ``api_key``: every POST must carry ``Authorization: Bearer KEY`` (the client sends ``VGF_LLM_VLLM_API_KEY``).
    ``allowed_weights_dir``: the shared folder ``/load_weights_from_path`` may read (none by default).
    ``engine_kwargs`` go to ``vgf_llm.rollout.vllm_engine.engine_kwargs`` (dtype, gpu_memory_utilization,
    kv_cache_memory_bytes, max_model_len, tensor_parallel_size, enforce_eager, enable_sleep_mode, seed).
    """
    from vgf_llm.rollout.vllm_engine import LocalVLLMEngine

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("vgf-llm vllm-serve listens on %s without an API key: anyone who can reach it can generate, "
                       "replace the weights and shut it down; set VGF_LLM_VLLM_API_KEY (or --api_key)", host)
    engine = LocalVLLMEngine(model, **engine_kwargs)
    state = {"weights_dir": tempfile.mkdtemp(prefix="vgf_llm_vllm_server_"), "api_key": api_key,
             "allowed_weights_dirs": [allowed_weights_dir] if allowed_weights_dir else [],
             "max_request_bytes": max_request_bytes}
    server = VLLMHTTPServer((host, port), make_handler(engine, state))
    state["server"] = server
    address = f"http://{host}:{server.server_address[1]}"
    print(f"vgf-llm vllm-serve: {model} ({engine.dtype}) listening on {address}", flush=True)
    if ready_file:
        Path(ready_file).write_text(address)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
        shutil.rmtree(state["weights_dir"], ignore_errors=True)
