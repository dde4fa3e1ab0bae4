"""HTTP client of ``vgf-llm vllm-serve``: the engine ``VLLMBackend`` uses in server mode.

Standard library only, so the trainer's environment needs neither vLLM nor a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch


class VLLMServerError(RuntimeError):
    """The server answered with an error, or could not be reached."""


class VLLMClient:
    """HTTP client of ``vgf-llm vllm-serve``; the engine interface ``VLLMBackend`` uses in server mode."""

    def __init__(self, base_url: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
                 connection_timeout: float = 240.0, request_timeout: float | None = None,
                 shared_weights_dir: str | os.PathLike | None = None, api_key: str | None = None):
        self.base_url = (base_url or f"http://{host}:{port}").rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("VGF_LLM_VLLM_API_KEY")
        self.request_timeout = request_timeout
        self.shared_weights_dir = Path(shared_weights_dir) if shared_weights_dir else None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy
        self.server_info = self.wait_for_server(connection_timeout)
        self.dtype = self.server_info.get("dtype", "")

    def _request(self, method: str, path: str, payload: dict | None = None, *, data: bytes | None = None,
                 timeout: float | None = None) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=timeout or self.request_timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise VLLMServerError(f"{method} {self.base_url}{path} failed ({err.code}): {detail}") from err

    def wait_for_server(self, timeout: float = 240.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._request("GET", "/health", timeout=5)
            except (urllib.error.URLError, ConnectionError, OSError) as err:
                if time.monotonic() > deadline:
                    raise VLLMServerError(
                        f"no vLLM server answered at {self.base_url} within {timeout:.0f} s; start one with "
                        f"`vgf-llm vllm-serve --model MODEL --host HOST --port PORT` ({err})"
                    ) from err
                time.sleep(1.0)

    def health(self) -> dict:
        return self._request("GET", "/health")

    def generate(self, requests: list[dict]) -> list[list[dict]]:
        return self._request("POST", "/generate", {"requests": requests})["outputs"]

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.shared_weights_dir is not None:
            from safetensors.torch import save_file

            folder = self.shared_weights_dir / f"weights-{os.getpid()}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            save_file(state_dict, str(folder / "model.safetensors"))
            self._request("POST", "/load_weights_from_path", {"weights_path": str(folder)})
            return
        from safetensors.torch import save

        self._request("POST", "/update_weights", data=save(state_dict))

    def load_weights_from_path(self, weights_path: str | os.PathLike) -> None:
        self._request("POST", "/load_weights_from_path", {"weights_path": str(weights_path)})

    def reset_prefix_cache(self) -> None:
        self._request("POST", "/reset_prefix_cache", {})

    def sleep(self, level: int = 1) -> None:
        self._request("POST", "/sleep", {"level": level})

    def wake_up(self, tags: list[str] | None = None) -> None:
        self._request("POST", "/wake_up", {"tags": tags})

    def shutdown_server(self) -> None:
        self._request("POST", "/shutdown", {})

    def close(self) -> None:
        """The client holds no connection; the server keeps running (``shutdown_server`` stops it)."""
