"""``vgf-llm serve``: test-time VGF as an OpenAI-compatible HTTP server (``vgf_llm.serve``, run with uvicorn).
Options: the model, an optional LoRA adapter and the scorer below, the server's limits (``ServeConfig``) and the
sampler's defaults (``SamplerConfig``; a request may override them with extra body fields of the same names), and
``VLLMArguments``: the N reference samples from vLLM (one engine for all requests, each batch with its own sampling
knobs), the transport and selection in-process.

With ``--adapter_path`` the adapter is merged into a copy of the base and that model is served: the particles are
sampled from it and steered on it (it is the transport's reference), while a value model keeps reading the frozen
base it was fitted on. (The library runs "the reference" with adapters switched off, so an adapter merely loaded
beside the base would be ignored.) So ``--use_vllm`` is refused with ``--adapter_path``: vLLM would sample from the
base folder, not from the merged model the particles are steered on."""

from __future__ import annotations

import copy
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from vgf_llm.cli import CLIError
from vgf_llm.cli.common import VLLMArguments, parse, with_sampling
from vgf_llm.cli.generate import build_scorer
from vgf_llm.sampler import SamplerConfig
from vgf_llm.serve import ServeConfig, batch_sampler


@dataclass
class ServeArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Base model: an alias (see `vgf-llm models list`), local folder or Hub id in the local cache."})
    adapter_path: str | None = field(default=None, metadata={
        "help": "A LoRA adapter folder written by `vgf-llm train`, merged into the served model."})
    value_model_path: str | None = field(default=None, metadata={
        "help": "The scorer: a value model from `vgf-llm fit-value` on this base model."})
    reward_model_path: str | None = field(default=None, metadata={
        "help": "The scorer instead: a sequence-classification reward model with the model's vocabulary."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Interface to bind; anything but loopback needs --api_key (or $VGF_LLM_API_KEY)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    device: str = field(default="cpu", metadata={"help": "Torch device of the models."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise CLIError("set --model_name_or_path (a model alias, local folder or cached Hub id)")
        if (self.value_model_path is None) == (self.reward_model_path is None):
            raise CLIError("give exactly one scorer: --value_model_path or --reward_model_path")
        if self.adapter_path and not (Path(self.adapter_path) / "adapter_config.json").is_file():
            raise CLIError(f"--adapter_path {self.adapter_path} holds no adapter_config.json (a folder written by "
                           "`vgf-llm train`)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def check_exposure(args: ServeArguments, config: ServeConfig) -> None:
    """Take the key from $VGF_LLM_API_KEY when not given; refuse a non-loopback bind without one (as vllm serve
    would be run behind a key)."""
    config.api_key = config.api_key or os.environ.get("VGF_LLM_API_KEY") or None
    if not is_loopback(args.host) and not config.api_key:
        raise CLIError(f"--host {args.host} is reachable from other machines: set --api_key (or $VGF_LLM_API_KEY) "
                       "so that every /v1 request must send it")


def load_served(args: ServeArguments):
    """(served model, tokenizer, scorer): the base with the adapter merged in, if one is given; a value model reads
    the unmerged base."""
    from vgf_llm.models import load_model, load_tokenizer

    base = load_model(args.model_name_or_path, device=args.device).eval()
    tokenizer = load_tokenizer(args.model_name_or_path)
    served = base
    if args.adapter_path:
        from peft import PeftModel

        try:
            copied = copy.deepcopy(base) if args.value_model_path else base
            served = PeftModel.from_pretrained(copied, args.adapter_path).merge_and_unload().eval()
        except (RuntimeError, KeyError) as err:
            raise CLIError(f"the adapter in {args.adapter_path} does not fit --model_name_or_path "
                           f"{args.model_name_or_path}: {str(err).strip().splitlines()[0]}") from err
    scorer = build_scorer(args, base, tokenizer)
    return served, tokenizer, scorer


def check_vllm(args: ServeArguments, vllm: VLLMArguments) -> None:
    """vLLM must sample from the model the particles are steered on; with an adapter that is the merged model,
    which no vLLM engine here has loaded."""
    if vllm.use_vllm and args.adapter_path:
        raise CLIError("--use_vllm with --adapter_path: vLLM would sample the particles from the base model, but "
                       "they are steered on the base with the adapter merged in. Merge the adapter into a model "
                       "folder and serve that folder as --model_name_or_path (and to `vllm serve` in server mode), "
                       "or drop --use_vllm")


def vllm_sample_batch(vllm: VLLMArguments, model, tokenizer, scorer, defaults: SamplerConfig, config: ServeConfig):
    """``create_app``'s ``sample_batch`` over one vLLM backend sized for the largest batch the caps allow, or None
    (HF generate) without ``--use_vllm``."""
    backend = vllm.rollout_backend(model, tokenizer, defaults, batch_size=config.max_batch_size,
                                   max_new_tokens=config.max_tokens, num_generations=config.max_num_generations,
                                   max_prompt_length=config.max_prompt_tokens)
    if backend is None:
        return None
    return batch_sampler(model, tokenizer, scorer, backend=lambda c: with_sampling(backend, c))


def run(argv: list[str]) -> int:
    import uvicorn

    from vgf_llm.serve import create_app

    args, config, vllm, defaults = parse((ServeArguments, ServeConfig, VLLMArguments, SamplerConfig), argv,
                                         "vgf-llm serve", __doc__.split("\n")[0])
    check_exposure(args, config)
    check_vllm(args, vllm)
    config.served_model_name = config.served_model_name or args.model_name_or_path
    model, tokenizer, scorer = load_served(args)
    app = create_app(model, tokenizer, scorer, defaults, config,
                     sample_batch=vllm_sample_batch(vllm, model, tokenizer, scorer, defaults, config))
    print(f"serving {config.served_model_name} at http://{args.host}:{args.port}/v1 "
          f"({'API key required' if config.api_key else 'no API key'})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
