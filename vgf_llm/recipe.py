"""Run a training recipe: data, rewards and LoRA from the recipe's arguments, ``VGFTrainer``, then the held-out
comparison of the base model and the trained adapter, the logs and a PNG of the reward/KL curves.

This is what ``vgf-llm train --config recipes/<name>.yaml`` runs (the CLI only parses); it also runs under
``accelerate launch`` / ``torchrun``: every process trains, the main process writes the reports.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from trl import ModelConfig

from vgf_llm.config import VGFConfig
from vgf_llm.evaluation import json_safe


@dataclass
class RecipeArguments:
    """Where the prompts and rewards come from, and what to report."""

    task: str | None = field(default="chain_sum", metadata={
        "help": "A built-in task: 'sentiment', 'helpful', 'gsm8k' (a local save_to_disk folder of openai/gsm8k, "
                "task_config's path, default data/gsm8k) or a reasoning-gym task name (chain_sum, basic_arithmetic, "
                "...). Ignored when dataset_name is set."})
    task_config: dict | str | None = field(default=None, metadata={
        "help": "kwargs of the task's dataset builder: a YAML mapping, or JSON on the command line."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "A local dataset: a folder from Dataset.save_to_disk, or a .json/.jsonl/.parquet file, with a "
                "'prompt' column. Hub names work only if already in the local cache (HF_HUB_OFFLINE)."})
    dataset_train_split: str = "train"
    dataset_test_split: str = "test"
    train_size: int = field(default=256, metadata={"help": "Training prompts (built-in tasks, or a cap)."})
    eval_size: int = field(default=32, metadata={"help": "Held-out prompts for the base-vs-trained comparison."})
    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "Reward names (vader, reasoning_gym, gsm8k, boxed), 'pkg.module:function' or reward-model paths. "
                "Default: the task's own reward."})
    eval_reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "Rewards the held-out comparison also reports, never trained on (e.g. a gold reward when training on "
                "a proxy reward model). Default: the task's own reward when reward_funcs replaces it."})
    compare_base: bool = field(default=True, metadata={
        "help": "Score the base model and the trained adapter on the held-out prompts (greedy) and print both."})
    plot: bool = field(default=True, metadata={"help": "Write training_curves.png (reward and KL per step)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace a previous run in output_dir (otherwise a run that would overwrite one stops at once)."})


def load_datasets(recipe: RecipeArguments, seed: int):
    """(train, held-out, what the held-out rows are). Held out means never trained on, for every source: a built-in
    task's test split, a dataset's ``dataset_test_split``, or, for a single table (a .jsonl/.json/.parquet/.csv
    file, a saved Dataset, a dataset without that split), its last ``eval_size`` rows, with training on the rows
    before them."""
    from vgf_llm.tasks import task_dataset

    if recipe.dataset_name:
        train, test = _local_splits(recipe.dataset_name, recipe.dataset_train_split, recipe.dataset_test_split)
        if test is not None:
            return (_first(train, recipe.train_size), _first(test, recipe.eval_size),
                    f"split {recipe.dataset_test_split!r} of {recipe.dataset_name}")
        n, held = len(train), recipe.eval_size
        if n == 0:
            raise ValueError(f"{recipe.dataset_name} has no rows")
        if not held:  # eval_size 0: nothing held out, every row trains
            return _first(train, recipe.train_size), train.select([]), "no rows (eval_size 0)"
        if held and n <= held:
            raise ValueError(f"{recipe.dataset_name} has {n} rows: too few to hold out eval_size={held} rows and "
                             "train on the rest (add rows, lower eval_size, or give a dataset with a "
                             f"{recipe.dataset_test_split!r} split)")
        rest, test = train.select(range(n - held)), train.select(range(n - held, n))
        return (_first(rest, recipe.train_size), test,
                f"the last {held} rows of {recipe.dataset_name} (not trained on)")
    if not recipe.task:
        raise ValueError("the recipe needs a task or a dataset_name")
    kwargs = json.loads(recipe.task_config) if isinstance(recipe.task_config, str) else (recipe.task_config or {})
    return (task_dataset(recipe.task, size=recipe.train_size, seed=seed, split="train", **kwargs),
            task_dataset(recipe.task, size=recipe.eval_size, seed=seed, split="test", **kwargs),
            f"the test split of task {recipe.task}")


def _first(data, size: int):
    return data.select(range(min(size, len(data)))) if size else data


def _local_splits(name: str, train_split: str, test_split: str):
    """(train table, test table or None) of a local file or folder, or of a dataset in the local HF cache."""
    import datasets

    path = Path(name)
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except IndexError:  # datasets cannot read back a table saved with no rows (no data files)
            raise ValueError(f"{name} is empty (a saved dataset with no rows)") from None
        if isinstance(data, datasets.DatasetDict):
            if train_split not in data:
                raise ValueError(f"{name} has no split {train_split!r} (it has {list(data)})")
            return data[train_split], data[test_split] if test_split in data else None
        return data, None
    if path.is_file():
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{name}: give a .json/.jsonl/.parquet/.csv file or a save_to_disk folder")
        if path.stat().st_size == 0:
            raise ValueError(f"{name} is empty")
        if path.suffix == ".jsonl":  # the reader of generate's --prompts: a bad line is named as file:line
            from vgf_llm.prompt_files import read_prompts_jsonl

            return _table(read_prompts_jsonl(path), name), None
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train"), None
        except Exception as err:  # datasets' ~60-line chain: its first line and the cause's
            cause = err.__cause__ or err
            raise ValueError(f"{name} does not read as a {kind} table: {type(cause).__name__}: "
                             f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}") from err
    try:
        data = datasets.load_dataset(name)
    except Exception as err:  # offline: the Hub is unreachable
        raise FileNotFoundError(
            f"dataset {name!r} is neither a local file/folder nor in the local Hugging Face cache ({err}). "
            "Download it where there is network (datasets.load_dataset(...).save_to_disk(DIR)) and set "
            "dataset_name to DIR.") from err
    return data[train_split], data[test_split] if test_split in data else None


def _table(rows: list[dict], name: str):
    """A Dataset of JSON rows; rows whose columns cannot share one type (a prompt that is text in one row and
    messages in another) are refused in one line."""
    import datasets
    import pyarrow

    try:
        return datasets.Dataset.from_list(rows)
    except (pyarrow.ArrowException, TypeError, ValueError) as err:
        raise ValueError(f"{name}: the rows do not form one table ({str(err).splitlines()[0]}): give every row's "
                         "fields the same form (e.g. every prompt a string, or every prompt chat messages)") from None


def reward_functions(recipe: RecipeArguments) -> list:
    """The recipe's reward_funcs, else its task's own reward."""
    from vgf_llm.tasks import task_reward_names

    names = recipe.reward_funcs or (task_reward_names(recipe.task) if recipe.task else None)
    if not names:
        raise ValueError("set reward_funcs (no built-in task to take the reward from)")
    return names


@dataclass
class VGFModelConfig(ModelConfig):
    """TRL's ``ModelConfig``, every field of which does what TRL's scripts make it do, or is refused: VGF always
    trains a LoRA adapter (``use_peft`` is true), and 8/4-bit loading is not supported."""

    use_peft: bool = field(default=True, metadata={"help": "VGF always trains a LoRA adapter; false is refused."})

    def __post_init__(self):
        super().__post_init__()
        if not self.use_peft:
            raise ValueError("use_peft=false: VGF trains a LoRA policy adapter (full fine-tuning is not supported)")
        if self.load_in_8bit or self.load_in_4bit:
            raise ValueError("load_in_8bit / load_in_4bit are not supported by vgf-llm (the transport reads the "
                             "embedding table and the value model trains its own adapter on the base): load the "
                             "model in bfloat16 (--dtype bfloat16) instead")
        if self.lora_task_type != "CAUSAL_LM":
            raise ValueError(f"lora_task_type={self.lora_task_type!r}: the policy is a causal LM (CAUSAL_LM)")


def model_init_kwargs(model_args: ModelConfig) -> dict:
    """``from_pretrained`` keywords from ``ModelConfig``, as TRL's scripts build them."""
    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def peft_config_from(model_args: ModelConfig):
    """The policy's ``LoraConfig`` from ``ModelConfig`` with TRL's own ``get_peft_config`` (rsLoRA, DoRA,
    modules_to_save, target_parameters included); unset target modules mean every attention and MLP projection."""
    from trl import get_peft_config

    from vgf_llm.trainer import default_lora_config

    if not model_args.lora_target_modules and not model_args.lora_target_parameters:
        model_args = replace(model_args, lora_target_modules=list(default_lora_config().target_modules))
    return get_peft_config(replace(model_args, use_peft=True))


def extra_eval_rewards(recipe: RecipeArguments) -> list:
    """Rewards reported on the held-out prompts besides the training reward (``eval_reward_funcs``, else the task's
    own reward when ``reward_funcs`` replaced it)."""
    from vgf_llm.tasks import task_reward_names

    if recipe.eval_reward_funcs is not None:
        return list(recipe.eval_reward_funcs)
    own = task_reward_names(recipe.task) if recipe.task and not recipe.dataset_name else []
    return own if recipe.reward_funcs and list(recipe.reward_funcs) != own else []


def _mean(values: list[float]) -> float:
    finite = [r for r in values if not math.isnan(r)]
    return sum(finite) / len(finite) if finite else math.nan


def held_out_reward(trainer, rows: list[dict], adapter: str | None,
                    extra_funcs=()) -> tuple[float, list[float], dict[str, float]]:
    """Mean and per-prompt training reward of greedy completions (the base with ``adapter=None``), and the mean of
    each ``extra_funcs`` reward on the same completions."""
    from vgf_llm.rewards import resolve_reward_funcs, reward_func_name, reward_texts

    rewards, texts = trainer.greedy_rewards(rows, adapter)  # split across processes
    funcs = resolve_reward_funcs(list(extra_funcs)) if extra_funcs else []
    extra = {reward_func_name(f): _mean(reward_texts([f], None, rows, texts).tolist()) for f in funcs}
    return _mean(rewards), rewards, extra


def plot_curves(log_history: list[dict], path: Path, base_reward: float | None = None) -> None:
    """Three panels: the held-out reward of the *policy* (greedy; the base at step 0), the particles' true reward
    before and after transport (the rollouts come from the base, so "before" stays flat by design), and the KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e for e in log_history if "reward" in e]
    evals = [(e["step"], e["eval_reward"]) for e in log_history if "eval_reward" in e]
    if evals and base_reward is not None and math.isfinite(base_reward):
        evals = [(0, base_reward)] + evals
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    if evals:
        axes[0].plot(*zip(*evals, strict=True), marker="o", label="eval_reward (policy, greedy)")
    else:
        axes[0].text(0.5, 0.5, "no held-out evaluation during training\n(set eval_strategy: steps)",
                     ha="center", va="center", transform=axes[0].transAxes, fontsize=8)
    axes[0].set_title("held-out reward of the policy")
    renamed = {"reward": "before transport (base rollouts)", "transport/reward_after": "after transport"}
    for ax, keys, title in ((axes[1], ("reward", "transport/reward_after"), "particles' true reward"),
                            (axes[2], ("kl",), "KL(policy || base) on targets")):
        for key in keys:
            points = [(e["step"], e[key]) for e in steps if key in e]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=renamed.get(key, key))
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resume_argument(value):
    """``resume_from_checkpoint`` as transformers means it: ``true``/``last`` on the command line or in YAML is the
    last checkpoint of output_dir (True), ``false``/empty is none, anything else a checkpoint folder."""
    if isinstance(value, str) and value.strip().lower() in ("true", "last"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "none", ""):
        return None
    return value


PREVIOUS_RUN_FILES = ("adapter_model.safetensors", "eval_results.json", "log_history.json")


@contextmanager
def output_dir_lock(args: VGFConfig, recipe: RecipeArguments):
    """One run per output_dir: a second run while one is writing stops with a message, and a run that would
    overwrite a finished or interrupted one stops too, unless it resumes it or ``overwrite_output_dir`` is set.
    Only the main process holds the lock (the ranks of one launch share the folder)."""
    from filelock import FileLock, Timeout

    out = Path(args.output_dir)
    resuming = resume_argument(args.resume_from_checkpoint) is not None
    previous = [f for f in PREVIOUS_RUN_FILES if (out / f).exists()] + sorted(p.name for p in out.glob("checkpoint-*"))
    if previous and not resuming and not recipe.overwrite_output_dir:
        raise ValueError(f"{out} holds a previous run ({', '.join(previous[:3])}): pass --overwrite_output_dir true "
                         "to replace it, --resume_from_checkpoint true to continue it, or another --output_dir")
    if args.process_index != 0:
        yield
        return
    lock = FileLock(str(out / ".vgf_llm.lock"))
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"another vgf-llm run is writing to {out} (it holds {lock.lock_file}); wait for it to end "
                         "or choose another --output_dir") from None
    except OSError as err:  # read-only file system, a file in the way, no permission: before the model loads
        raise ValueError(f"cannot write to output_dir {out}: {err.strerror or err}; choose a writable "
                         "--output_dir") from None
    try:
        yield
    finally:
        lock.release()


def run(recipe: RecipeArguments, args: VGFConfig, model_args) -> dict:
    """Train, save the adapter, compare with the base model on held-out prompts; returns the summary."""
    with output_dir_lock(args, recipe):
        return _run(recipe, args, model_args)


def _run(recipe: RecipeArguments, args: VGFConfig, model_args) -> dict:
    from vgf_llm.checks import check_prompts, check_prompts_fit, prompts_of
    from vgf_llm.trainer import POLICY, VGFTrainer

    train_data, eval_data, held_out = load_datasets(recipe, args.seed)
    trained_on = f"the training rows of {recipe.dataset_name}" if recipe.dataset_name else \
        f"the train split of task {recipe.task}"
    check_prompts(prompts_of(train_data), trained_on)  # before the model loads: bad rows named with their source
    check_prompts(prompts_of(eval_data), held_out)
    args.model_init_kwargs = {**model_init_kwargs(model_args), **(args.model_init_kwargs or {})}
    evaluating = str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no"
    trainer = VGFTrainer(model_args.model_name_or_path, reward_functions(recipe), args=args,
                         train_dataset=train_data, eval_dataset=eval_data if evaluating else None,
                         peft_config=peft_config_from(model_args))
    rows = [dict(r) for r in eval_data]
    for prompts, where in ((prompts_of(train_data), trained_on), (prompts_of(eval_data), held_out)):
        check_prompts_fit(prompts, where, trainer.processing_class, trainer.model)  # before the base comparison
    summary: dict = {"model": model_args.model_name_or_path, "held_out_prompts": len(rows), "held_out": held_out,
                     "world_size": args.world_size, "prompts_per_step": args.prompts_per_step,
                     "dtype": str(trainer.model.dtype).removeprefix("torch.")}
    extra = extra_eval_rewards(recipe)
    if recipe.compare_base and rows:
        summary["base_reward"], base, summary["base_also"] = held_out_reward(trainer, rows, None, extra)
    trainer.train(resume_from_checkpoint=resume_argument(args.resume_from_checkpoint))
    trainer.save_model()
    if recipe.compare_base and rows:
        summary["trained_reward"], trained, summary["trained_also"] = held_out_reward(trainer, rows, POLICY, extra)
        summary["per_prompt"] = [{"prompt": r["prompt"], "base": b, "trained": t}
                                 for r, b, t in zip(rows, base, trained, strict=True)]
    summary["train_runtime_s"] = next((e["train_runtime"] for e in trainer.state.log_history
                                       if "train_runtime" in e), None)
    if trainer.is_world_process_zero():
        out = Path(args.output_dir)
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        (out / "eval_results.json").write_text(json.dumps(json_safe(summary), indent=2, default=str))
        if recipe.plot:
            plot_curves(trainer.state.log_history, out / "training_curves.png", summary.get("base_reward"))
        if rows and recipe.compare_base and math.isnan(summary["base_reward"]):
            print("warning: no reward function scored any held-out completion (all returned None): the held-out "
                  "figures below are undefined")
        if "trained_reward" in summary:
            print(f"\nheld-out reward on {len(rows)} prompts ({held_out}; greedy): base {summary['base_reward']:.3f} | "
                  f"trained adapter {summary['trained_reward']:.3f}")
            for name, value in summary["trained_also"].items():
                print(f"  {name} (not trained on): base {summary['base_also'][name]:.3f} | trained adapter "
                      f"{value:.3f}")
        print(f"adapter, logs and plots in {out}")
    if args.push_to_hub:
        trainer.push_to_hub()
    if args.world_size > 1:  # several processes: tear the group down before the interpreter does (a live gloo
        # group at exit aborted a rank with "terminate called without an active exception" after a successful
        # ZeRO-3 run in CI); a single process keeps its state for whatever runs next in it
        trainer.accelerator.end_training()
    return summary
