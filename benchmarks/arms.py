"""Shared set-up of the training arms compared by ``benchmarks/train.py`` and ``benchmarks/speed.py``.

Three arms on the same base model, task, seeds, LoRA adapter and number of generated completions per optimizer step:

- ``vgf``: ``VGFTrainer`` (value model fitted online, transport, decode, re-score, distil);
- ``bon``: the same trainer with ``transport_steps=0`` (best-of-N distillation, the ablation that isolates transport);
- ``grpo``: TRL's ``GRPOTrainer`` with the same LoRA config.

Batch semantics differ between the two libraries: VGF's ``per_device_train_batch_size`` counts prompts (each with
``num_generations`` completions), TRL's GRPO counts completions. ``ArmSettings`` holds prompts per step and
completions per prompt and translates.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARMS = ("vgf", "bon", "grpo")
ARM_LABELS = {"vgf": "VGF (transport)", "bon": "VGF budget 0 (best-of-N distil)", "grpo": "TRL GRPO + LoRA"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    # VGF only (recipes/quickstart.yaml's values; VGFConfig's own defaults differ, so every one is passed)
    transport_steps: int = 2
    transport_step_size: float = 0.05
    transport_alpha: float = 1.0
    decoder: str = "reference_gain"
    decoder_topk: int = 8
    max_edits: int = 3
    # decoder="verified" only: what the trainer used before these were VGFConfig fields (every original edited,
    # 8 checked swaps per round), not VGFConfig's test-time defaults (verify_top=1, verify_candidates=4)
    verify_top: int | None = None
    verify_candidates: int = 8
    value_num_layers: int | None = 4
    value_epochs: int = 1
    value_buffer_steps: int = 2
    # TRL GRPO only
    grpo_beta: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def add_shared_arguments(p, d: ArmSettings) -> None:
    """The options ``speed.py`` and ``train.py`` share, with ``ArmSettings``' defaults."""
    from vgf_llm.spaces import DECODERS

    p.add_argument("--model", default=d.model)
    p.add_argument("--task", default=d.task)
    p.add_argument("--prompts", type=int, default=d.prompts, help="Prompts per optimizer step.")
    p.add_argument("--generations", type=int, default=d.generations, help="Completions per prompt.")
    p.add_argument("--max_completion_length", type=int, default=d.max_completion_length)
    p.add_argument("--lora_r", type=int, default=d.lora_r)
    p.add_argument("--transport_steps", type=int, default=d.transport_steps)
    p.add_argument("--transport_step_size", type=float, default=d.transport_step_size)
    p.add_argument("--decoder", default=d.decoder, choices=DECODERS)
    p.add_argument("--value_num_layers", type=int, default=d.value_num_layers)
    p.add_argument("--arms", default=",".join(ARMS), help="Comma list of vgf, bon, grpo.")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process.")


def add_probe_arguments(p, out_dir: Path) -> None:
    """The options the helpful-task probes (``transport_kl.py``, ``kl_ceiling.py``) share: the frontier's length,
    model and proxy reward model, so a probe measures what the frontier trains on."""
    p.add_argument("--max_completion_length", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=ArmSettings.model)
    p.add_argument("--reward_model", default=PROXY_REWARD_MODEL)
    p.add_argument("--out_dir", default=str(out_dir))


def settings_from(a, **more) -> ArmSettings:
    """``ArmSettings`` from the shared options (and ``more``)."""
    return ArmSettings(model=a.model, task=a.task, prompts=a.prompts, generations=a.generations,
                       max_completion_length=a.max_completion_length, lora_r=a.lora_r, lora_alpha=2 * a.lora_r,
                       transport_steps=a.transport_steps, transport_step_size=a.transport_step_size,
                       decoder=a.decoder, value_num_layers=a.value_num_layers, **more)


def chosen_arms(p, text: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(chosen) - set(ARMS)
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    return chosen


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


PROXY_REWARD_MODEL = "smollm2-135m-helpful-rm"


def training_reward(s: ArmSettings):
    """The reward every arm trains on: the proxy reward model on the ``helpful`` task (its gold reward is kept for
    evaluation), the task's checker otherwise."""
    from vgf_llm.rewards import RewardModelReward, reasoning_gym_reward

    if s.task == "helpful":
        return RewardModelReward(s.extra.get("reward_model_path", PROXY_REWARD_MODEL))
    return reasoning_gym_reward


def vgf_trainer(s: ArmSettings, arm: str, output_dir: str, dataset=None, steps: int | None = None, callbacks=None):
    """``arm`` is ``vgf`` (transport) or ``bon`` (transport_steps=0)."""
    from vgf_llm import VGFConfig, VGFTrainer

    model, tok = base_model(s)
    args = VGFConfig(
        output_dir=output_dir, max_steps=steps or s.steps, per_device_train_batch_size=s.prompts,
        num_generations=s.generations, generation_batch_size=s.prompts * s.generations,
        max_completion_length=s.max_completion_length,
        temperature=s.temperature, learning_rate=s.learning_rate, lr_scheduler_type="constant",
        transport_steps=s.transport_steps if arm == "vgf" else 0, transport_step_size=s.transport_step_size,
        transport_alpha=s.transport_alpha, decoder=s.decoder, decoder_topk=s.decoder_topk, max_edits=s.max_edits,
        verify_top=s.verify_top, verify_candidates=s.verify_candidates,
        value_num_layers=s.value_num_layers, value_epochs=s.value_epochs,
        value_buffer_steps=s.value_buffer_steps,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=use_cpu(), seed=s.seed,
        disable_tqdm=True, **s.extra)
    return VGFTrainer(model, training_reward(s), args=args, train_dataset=dataset or train_dataset(s),
                      processing_class=tok, peft_config=lora_config(s), callbacks=callbacks)


def grpo_trainer(s: ArmSettings, output_dir: str, dataset=None, steps: int | None = None, callbacks=None):
    """TRL's GRPO with the same LoRA, prompts and completions per step. TRL's GRPOConfig defaults bf16 and gradient
    checkpointing on; both are turned off here, as in the VGF arms (float32, no checkpointing)."""
    from trl import GRPOConfig, GRPOTrainer

    model, tok = base_model(s)
    args = GRPOConfig(
        output_dir=output_dir, max_steps=steps or s.steps, per_device_train_batch_size=s.prompts * s.generations,
        num_generations=s.generations, gradient_accumulation_steps=1, max_completion_length=s.max_completion_length,
        temperature=s.temperature, learning_rate=s.learning_rate, lr_scheduler_type="constant", beta=s.grpo_beta,
        bf16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=use_cpu(), seed=s.seed, disable_tqdm=True)
    return GRPOTrainer(model=model, reward_funcs=training_reward(s), args=args,
                       train_dataset=dataset or train_dataset(s), processing_class=tok, peft_config=lora_config(s),
                       callbacks=callbacks)


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
