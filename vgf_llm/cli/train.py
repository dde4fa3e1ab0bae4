"""``vgf-llm train --config recipe.yaml [--key value ...] [--accelerate_config NAME --num_processes N]``.

TRL's parser owns the options (``RecipeArguments``, ``VGFConfig``, ``VGFModelConfig`` = TRL's ``ModelConfig``); with
``--accelerate_config`` the command re-runs itself in N processes (``accelerate launch`` with CUDA, ``torchrun``
over gloo without) and ``vgf_llm.recipe.run`` does the work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vgf_llm.cli import CLIError

ACCELERATE_CONFIGS = ("multi_gpu", "zero2", "zero3")


def launch_configs_dir() -> Path:
    """The accelerate and DeepSpeed configs shipped in the package (also at recipes/ of a checkout)."""
    return Path(__file__).resolve().parents[1] / "launch"


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove ``--name value`` (or ``--name=value``) from argv and return the value."""
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv):
                raise CLIError(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def launch_command(argv: list[str], accelerate_config: str, num_processes: int, cuda: bool) -> list[str]:
    """The command that re-runs ``vgf-llm train argv`` in ``num_processes`` processes.

    With CUDA: ``accelerate launch`` with the named config (vgf_llm/launch/accelerate/NAME.yaml) or a path. Without
    (CPU machines, CI): ``torchrun`` over gloo, the named DeepSpeed config passed to the Trainer as
    ``--deepspeed vgf_llm/launch/deepspeed/NAME.json``, since accelerate's CPU launcher starts a single process.
    """
    train = ["-m", "vgf_llm.cli", "train", *argv]
    named = accelerate_config in ACCELERATE_CONFIGS
    if cuda:
        path = launch_configs_dir() / "accelerate" / f"{accelerate_config}.yaml" if named else Path(accelerate_config)
        if not path.exists():
            raise CLIError(f"no accelerate config {path} (names: {', '.join(ACCELERATE_CONFIGS)}, or a path)")
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
                "--num_processes", str(num_processes), *train]
    if not named:
        raise CLIError(f"without CUDA, --accelerate_config takes one of {ACCELERATE_CONFIGS} (run torchrun or "
                       "accelerate launch yourself for a custom config)")
    extra = ["--use_cpu", "true", "--ddp_backend", "gloo"]
    if accelerate_config.startswith("zero"):
        extra += ["--deepspeed", str(launch_configs_dir() / "deepspeed" / f"{accelerate_config}.json")]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), *train, *extra]


def run(argv: list[str]) -> int:
    """``vgf-llm train --config recipe.yaml [--key value ...] [--accelerate_config NAME --num_processes N]``."""
    from vgf_llm.cli.common import parse
    from vgf_llm.config import VGFConfig
    from vgf_llm.recipe import RecipeArguments, VGFModelConfig, run

    argv = list(argv)
    accelerate_config = _pop_option(argv, "--accelerate_config")
    num_processes = _pop_option(argv, "--num_processes")
    if accelerate_config and "LOCAL_RANK" not in os.environ:
        import subprocess

        import torch

        cmd = launch_command(argv, accelerate_config, int(num_processes or max(torch.cuda.device_count(), 2)),
                             torch.cuda.is_available())
        print("launching:", " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    recipe, args, model_args = parse((RecipeArguments, VGFConfig, VGFModelConfig), argv, "vgf-llm train",
                                     "Fine-tune a LoRA policy with Value Gradient Flow. Options come from --config "
                                     "recipe.yaml; --key value on the command line overrides the file.")
    if not model_args.model_name_or_path:
        raise CLIError("set model_name_or_path (in the recipe or with --model_name_or_path)")
    run(recipe, args, model_args)
    return 0
