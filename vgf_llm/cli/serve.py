"""``vgf-llm serve``: test-time VGF as an OpenAI-compatible HTTP server (``vgf_llm.serve``, run with uvicorn).
Options: the model, an optional LoRA adapter and the scorer below, the server's limits (``ServeConfig``) and the
sampler's defaults (``SamplerConfig``; a request may override them with extra body fields of the same names).

With ``--adapter_path`` the adapter is merged into a copy of the base and that model is served: the particles are
sampled from it and steered on it (it is the transport's reference), while a value model keeps reading the frozen
base it was fitted on. (The library runs "the reference" with adapters switched off, so an adapter merely loaded
beside the base would be ignored.)"""

from __future__ import annotations

import copy
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from vgf_llm.cli import CLIError
from vgf_llm.cli.common import parse
from vgf_llm.cli.generate import build_scorer
from vgf_llm.sampler import SamplerConfig
from vgf_llm.serve import ServeConfig


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


def run(argv: list[str]) -> int:
    import uvicorn

    from vgf_llm.serve import create_app

    args, config, defaults = parse((ServeArguments, ServeConfig, SamplerConfig), argv, "vgf-llm serve",
                                   __doc__.split("\n")[0])
    check_exposure(args, config)
    config.served_model_name = config.served_model_name or args.model_name_or_path
    model, tokenizer, scorer = load_served(args)
    app = create_app(model, tokenizer, scorer, defaults, config)
    print(f"serving {config.served_model_name} at http://{args.host}:{args.port}/v1 "
          f"({'API key required' if config.api_key else 'no API key'})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
