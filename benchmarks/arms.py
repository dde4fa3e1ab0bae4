"""Shared set-up of the training arms compared by ``benchmarks/frontier.py`` and ``benchmarks/speed.py``.

The arms, on the same base model, task, seeds, LoRA adapter and number of generated completions per optimizer step:

- ``vgf_steer_prefix``: ``VGFTrainer`` with its defaults (per-step steering along a prefix value refitted on the
  true rewards of recent rollouts), the name the frontier's runs have always given this arm;
- ``bon``: the same trainer with ``transport_steps=0`` (best-of-N distillation, the ablation that isolates transport);
- ``grpo`` / ``grpo_kl``: TRL's ``GRPOTrainer`` with the same LoRA config, without / with a KL penalty.

A VGF arm followed by ``:<step size>`` (e.g. ``vgf_steer_prefix:0.4``) is a point of a budget sweep: the arm with
another ``transport_step_size``.

Batch semantics differ between the two libraries: VGF's ``per_device_train_batch_size`` counts prompts (each with
``num_generations`` completions), TRL's GRPO counts completions. ``ArmSettings`` holds prompts per step and
completions per prompt and translates.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

# arm -> the trainer that runs it
ARMS = {"vgf_steer_prefix": "vgf", "bon": "bon", "grpo": "grpo", "grpo_kl": "grpo"}
ARM_LABELS = {"vgf_steer_prefix": "VGF, per-step steering, prefix value", "bon": "VGF budget 0 (best-of-N distil)",
              "grpo": "TRL GRPO (beta 0)", "grpo_kl": "TRL GRPO (beta > 0)"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROXY_REWARD_MODEL = "smollm2-135m-helpful-rm"


def set_threads(n: int) -> None:
    """One knob for every thread pool torch may use (set before heavy work starts)."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set in this process
        pass


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_DISABLED", "true")


@dataclass
class ArmSettings:
    """What every arm shares. ``prompts`` per optimizer step, ``generations`` completions per prompt."""

    model: str = "smollm2-135m-instruct"
    task: str = "chain_sum"
    steps: int = 6
    prompts: int = 4
    generations: int = 8
    max_completion_length: int = 32
    learning_rate: float = 5e-4
    lora_r: int = 16
    lora_alpha: int = 32
    temperature: float = 1.0
    seed: int = 0
    reward_model: str = PROXY_REWARD_MODEL  # the training reward on the helpful task
    # VGF only: VGFConfig's defaults (the frontier's run 3), passed explicitly so the results record them
    transport_steps: int = 1
    transport_step_size: float = 0.2
    steer_layer: int | None = None  # None: half the model's depth
    value_buffer_steps: int = 8
    # TRL GRPO only: the KL coefficient of the grpo_kl arm
    grpo_beta: float = 0.04

    def as_dict(self) -> dict:
        return asdict(self)


def add_shared_arguments(p, d: ArmSettings) -> None:
    """The options ``speed.py`` and ``frontier.py`` share, with ``ArmSettings``' defaults."""
    p.add_argument("--model", default=d.model)
    p.add_argument("--task", default=d.task)
    p.add_argument("--prompts", type=int, default=d.prompts, help="Prompts per optimizer step.")
    p.add_argument("--generations", type=int, default=d.generations, help="Completions per prompt.")
    p.add_argument("--max_completion_length", type=int, default=d.max_completion_length)
    p.add_argument("--lora_r", type=int, default=d.lora_r)
    p.add_argument("--transport_steps", type=int, default=d.transport_steps,
                   help="VGF arms: Adam steps per generated token.")
    p.add_argument("--transport_step_size", type=float, default=d.transport_step_size,
                   help="VGF arms: step per generated token, in standard deviations per hidden unit.")
    p.add_argument("--steer_layer", type=int, default=d.steer_layer,
                   help="VGF arms: the steered layer (default: half the model's depth).")
    p.add_argument("--grpo_beta", type=float, default=d.grpo_beta, help="The KL coefficient of the grpo_kl arm.")
    p.add_argument("--arms", default="vgf_steer_prefix,bon,grpo",
                   help=f"Comma list of {', '.join(ARMS)} (a VGF arm may carry ':<step size>').")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process.")


def settings_from(a, **more) -> ArmSettings:
    """``ArmSettings`` from the shared options (and ``more``)."""
    return ArmSettings(model=a.model, task=a.task, prompts=a.prompts, generations=a.generations,
                       max_completion_length=a.max_completion_length, lora_r=a.lora_r, lora_alpha=2 * a.lora_r,
                       transport_steps=a.transport_steps, transport_step_size=a.transport_step_size,
                       steer_layer=a.steer_layer, grpo_beta=a.grpo_beta, **more)


def split_arm(arm: str) -> tuple[str, float | None]:
    """``'vgf_steer_prefix:0.1'`` -> ``('vgf_steer_prefix', 0.1)``: a point of a budget sweep is its arm with another
    ``transport_step_size``."""
    name, _, step = arm.partition(":")
    return name, (float(step) if step else None)


def kind(arm: str) -> str:
    """The trainer that runs ``arm``: ``vgf``, ``bon`` or ``grpo``."""
    return ARMS[split_arm(arm)[0]]


def arm_label(arm: str) -> str:
    name, step = split_arm(arm)
    return ARM_LABELS[name] + ("" if step is None else f", step {step:g}")


def chosen_arms(p, text: str) -> list[str]:
    """The arms of ``--arms``, checked before any training (``p.error`` names what is wrong)."""
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    try:
        parsed = [split_arm(arm) for arm in chosen]
    except ValueError as err:
        p.error(f"--arms: an arm's budget is a number after ':' (e.g. vgf_steer_prefix:0.1): {err}")
    unknown = sorted({arm for arm, (name, _) in zip(chosen, parsed, strict=True) if name not in ARMS})
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {list(ARMS)} (a VGF arm may carry ':<step size>')")
    if any(step is not None and (ARMS[name] != "vgf" or step <= 0) for name, step in parsed):
        p.error(f"--arms: only VGF arms take a budget, and it must be > 0: {chosen}")
    return chosen


def mean(values) -> float:
    """Mean of the finite values (NaN if none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else float("nan")


def std(values) -> float:
    """Sample standard deviation of the finite values (0 for fewer than two)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def use_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def lora_config(s: ArmSettings):
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=list(LORA_TARGETS))


def train_dataset(s: ArmSettings, size: int | None = None):
    """Exactly one epoch of prompts for ``steps`` steps, so that every arm sees the same prompts (order differs)."""
    from vgf_llm.tasks import task_dataset

    return task_dataset(s.task, size or s.steps * s.prompts, seed=s.seed, split="train")


def base_model(s: ArmSettings):
    from vgf_llm.models import load_model, load_tokenizer

    model = load_model(s.model)
    if not use_cpu():
        model = model.to("cuda")
    return model, load_tokenizer(s.model)


def training_reward(s: ArmSettings):
    """The reward every arm trains on: the proxy reward model on the ``helpful`` task (its gold reward is kept for
    evaluation), the task's checker otherwise."""
    from vgf_llm.rewards import RewardModelReward, reasoning_gym_reward

    if s.task == "helpful":
        return RewardModelReward(s.reward_model)
    return reasoning_gym_reward


def vgf_config(s: ArmSettings, arm: str, output_dir: str):
    """The ``VGFConfig`` of a VGF arm: ``bon`` is ``transport_steps=0``, ``<arm>:<step>`` another step size."""
    from vgf_llm import VGFConfig

    step = split_arm(arm)[1]
    return VGFConfig(
        output_dir=output_dir, max_steps=s.steps, per_device_train_batch_size=s.prompts,
        num_generations=s.generations, generation_batch_size=s.prompts * s.generations,
        max_completion_length=s.max_completion_length,
        temperature=s.temperature, learning_rate=s.learning_rate, lr_scheduler_type="constant",
        transport_steps=0 if kind(arm) == "bon" else s.transport_steps,
        transport_step_size=s.transport_step_size if step is None else step, steer_layer=s.steer_layer,
        value_buffer_steps=s.value_buffer_steps,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=use_cpu(), seed=s.seed, disable_tqdm=True)


def grpo_config(s: ArmSettings, arm: str, output_dir: str):
    """TRL's GRPO with the same LoRA, prompts and completions per step (``grpo_kl``: ``beta=s.grpo_beta``). TRL's
    GRPOConfig defaults bf16 and gradient checkpointing on; both are turned off here, as in the VGF arms (float32,
    no checkpointing)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir, max_steps=s.steps, per_device_train_batch_size=s.prompts * s.generations,
        num_generations=s.generations, gradient_accumulation_steps=1, max_completion_length=s.max_completion_length,
        temperature=s.temperature, learning_rate=s.learning_rate, lr_scheduler_type="constant",
        beta=s.grpo_beta if arm == "grpo_kl" else 0.0, bf16=False, gradient_checkpointing=False, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=use_cpu(), seed=s.seed, disable_tqdm=True)


def trainer(s: ArmSettings, arm: str, output_dir: str, callbacks=None):
    """The trainer of ``arm`` (``VGFTrainer`` or TRL's ``GRPOTrainer``): ``s.steps`` steps, one epoch of prompts."""
    model, tok = base_model(s)
    common = dict(train_dataset=train_dataset(s), processing_class=tok, peft_config=lora_config(s),
                  callbacks=callbacks)
    if kind(arm) == "grpo":
        from trl import GRPOTrainer

        return GRPOTrainer(model=model, reward_funcs=training_reward(s), args=grpo_config(s, arm, output_dir),
                           **common)
    from vgf_llm import VGFTrainer

    return VGFTrainer(model, training_reward(s), args=vgf_config(s, arm, output_dir), **common)


class MethodTimer:
    """Adds wall-clock seconds spent in chosen methods of one object (instance-level wrappers, nothing global)."""

    def __init__(self, obj, names: dict[str, str]):
        self.seconds: dict[str, float] = {label: 0.0 for label in names.values()}
        self.records: list[dict[str, float]] = []
        for method, label in names.items():
            original = getattr(obj, method)

            def wrapped(*args, _original=original, _label=label, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds[_label] += time.perf_counter() - start

            setattr(obj, method, wrapped)

    def snapshot(self) -> None:
        """Close one step: store the seconds since the last snapshot."""
        self.records.append(dict(self.seconds))
        self.seconds = {k: 0.0 for k in self.seconds}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


@contextmanager
def rss_sampler(period: float = 0.5):
    """Samples this process's RSS in a thread; yields a dict whose ``peak_mb`` holds the peak seen inside the block."""
    out = {"peak_mb": current_rss_mb(), "start_mb": current_rss_mb()}
    stop = threading.Event()

    def run():
        while not stop.wait(period):
            out["peak_mb"] = max(out["peak_mb"], current_rss_mb())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_mb"] = max(out["peak_mb"], current_rss_mb())


def gpu_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def machine_info() -> dict:
    import platform

    import peft
    import torch
    import transformers
    import trl

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(script: str, argv: list[str] | None) -> dict:
    """What every result file records of where it came from: the machine and the command line that made it."""
    return {"machine": machine_info(),
            "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])}


def write_json(path, result: dict) -> Path:
    """Write a benchmark's results as indented JSON (folders made; anything JSON cannot hold written as text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def in_subprocess(func, *args, **kwargs):
    """Run ``func(*args, **kwargs)`` in a fresh spawned process and return its result: each arm gets its own peak
    memory figure and no state (threads, caches, adapters) leaks from one arm into the next."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(func, *args, **kwargs).result()


class StepClock:
    """A ``TrainerCallback`` that records the wall-clock of every optimizer step (on_step_begin -> on_step_end)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.steps: list[float] = []
                self._start = None

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if self._start is not None:
                    self.steps.append(time.perf_counter() - self._start)
                self._start = None

        return _Clock()
