"""vLLM server mode, the server side: ``vgf-llm vllm-serve`` (``VLLMClient`` in ``vllm_client.py`` talks to it).

The server holds one ``LocalVLLMEngine`` and answers plain HTTP/JSON (standard library only, one request at a
time, so the engine is never used concurrently):

    GET  /health                  -> {"status": "ok", "model", "dtype", "vllm", "num_weight_updates"}
    POST /generate                {"requests": [...]} -> {"outputs": [...]}   (see ``RolloutEngine``)
    POST /update_weights          body: a safetensors file (the full HF-layout state dict) -> reload + reset cache
    POST /load_weights_from_path  {"weights_path": folder}: the same from a folder the server can read
    POST /reset_prefix_cache, /sleep {"level"}, /wake_up {"tags"}, /shutdown

The trainer pushes the weights over HTTP after each update (or, with ``shared_weights_dir``, writes them to a
shared filesystem and sends the path). The client needs neither vLLM nor a GPU: the trainer can run in an
environment without vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def make_handler(engine, server_state: dict):
    weights_dir = Path(server_state["weights_dir"])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quieter than the default stderr line per request
            logger.debug("%s - " + fmt, self.address_string(), *args)

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json_body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._reply(200, {"status": "ok", **engine.info()})
            else:
                self._reply(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self):  # noqa: N802
            try:
                if self.path == "/generate":
                    self._reply(200, {"outputs": engine.generate(self._json_body()["requests"])})
                elif self.path == "/update_weights":
                    folder = weights_dir / "current"
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                    remaining = int(self.headers["Content-Length"])
                    with open(folder / "model.safetensors", "wb") as handle:
                        while remaining > 0:
                            chunk = self.rfile.read(min(_CHUNK, remaining))
                            if not chunk:
                                raise ConnectionError("the weights upload ended early")
                            handle.write(chunk)
                            remaining -= len(chunk)
                    engine.load_weights_from_path(folder)
                    self._reply(200, {"status": "ok", "num_weight_updates": engine.num_weight_updates})
                elif self.path == "/load_weights_from_path":
                    engine.load_weights_from_path(self._json_body()["weights_path"])
                    self._reply(200, {"status": "ok", "num_weight_updates": engine.num_weight_updates})
                elif self.path == "/reset_prefix_cache":
                    engine.reset_prefix_cache()
                    self._reply(200, {"status": "ok"})
                elif self.path == "/sleep":
                    engine.sleep(level=int(self._json_body().get("level", 1)))
                    self._reply(200, {"status": "ok"})
                elif self.path == "/wake_up":
                    engine.wake_up(self._json_body().get("tags"))
                    self._reply(200, {"status": "ok"})
                elif self.path == "/shutdown":
                    self._reply(200, {"status": "shutting down"})
                    threading.Thread(target=server_state["server"].shutdown, daemon=True).start()
                else:
                    self._reply(404, {"error": f"no such endpoint: POST {self.path}"})
            except Exception as err:  # report to the client instead of dropping the connection
                logger.exception("request %s failed", self.path)
                self._reply(500, {"error": f"{type(err).__name__}: {err}"})

    return Handler


class _Server(HTTPServer):
    request_queue_size = 256  # many trainer ranks may connect at once; requests are still served one at a time


def serve(model: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, ready_file: str | None = None,
          **engine_kwargs) -> None:
    """Start a ``LocalVLLMEngine`` on ``model`` and answer requests until ``/shutdown`` or Ctrl-C.

    ``engine_kwargs`` go to ``vgf_llm.rollout.vllm_engine.engine_kwargs`` (dtype, gpu_memory_utilization,
    kv_cache_memory_bytes, max_model_len, tensor_parallel_size, enforce_eager, enable_sleep_mode, seed).
    """
    from vgf_llm.rollout.vllm_engine import LocalVLLMEngine

    engine = LocalVLLMEngine(model, **engine_kwargs)
    state = {"weights_dir": tempfile.mkdtemp(prefix="vgf_llm_vllm_server_")}
    server = _Server((host, port), make_handler(engine, state))
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
