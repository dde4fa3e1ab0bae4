"""``vgf-llm vllm-serve``: a vLLM engine behind a small HTTP server that ``VLLMBackend(vllm_mode='server')``
generates from and pushes the policy weights to after each update (docs/vllm.md). Needs vLLM (on CPU:
scripts/install_vllm.sh). Bound to 127.0.0.1 by default; set an API key (VGF_LLM_VLLM_API_KEY) before binding another
address, and keep it on a private network (no TLS)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from vgf_llm.cli import CLIError
from vgf_llm.cli.common import parse


@dataclass
class VLLMServeArguments:
    """TRL's ``trl vllm-serve`` names."""

    model: str | None = field(default=None, metadata={"help": "Model alias, local folder, or cached Hub id."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    dtype: str = field(default="auto", metadata={"help": "vLLM dtype: auto, bfloat16, float16, float32."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per engine."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "GPU memory share for vLLM."})
    max_model_len: int | None = field(default=None, metadata={"help": "Context length (default: the model's)."})
    kv_cache_memory_bytes: int | None = field(default=None, metadata={"help": "KV-cache bytes (CPU default 1 GiB)."})
    enforce_eager: bool | None = field(default=None, metadata={
        "help": "Disable CUDA graphs / compilation (default: on for CPU, off for GPU)."})
    enable_sleep_mode: bool = field(default=False, metadata={"help": "Allow /sleep and /wake_up."})
    seed: int = field(default=0, metadata={"help": "Engine seed (requests carry their own seeds)."})
    ready_file: str | None = field(default=None, metadata={"help": "Write the server's URL here once it listens."})
    api_key: str | None = field(default=None, metadata={
        "help": "Require 'Authorization: Bearer KEY' on every POST (default: $VGF_LLM_VLLM_API_KEY; the trainer's "
                "client sends that variable)."})
    allowed_weights_dir: str | None = field(default=None, metadata={
        "help": "The shared folder /load_weights_from_path may read (vllm_server_shared_dir); none by default."})


def run(argv: list[str]) -> int:
    from vgf_llm.models import prepare_model
    from vgf_llm.rollout.vllm_engine import VLLMUnavailableError, require_vllm
    from vgf_llm.rollout.vllm_server import serve

    (args,) = parse((VLLMServeArguments,), argv, "vgf-llm vllm-serve", __doc__.split("\n\n")[0])
    if not args.model:
        raise CLIError("set --model")
    try:
        require_vllm()
    except VLLMUnavailableError as err:
        raise CLIError(str(err)) from err
    settings = asdict(args)
    if settings["api_key"] is None:
        settings["api_key"] = os.environ.get("VGF_LLM_VLLM_API_KEY") or None
    model = settings.pop("model")
    serve(prepare_model(model), **settings)
    return 0
