"""``vgf-llm fit-value``: sample ``num_generations`` responses per train prompt from the model, score them with
the true reward, fit a value model and save it to ``output`` with stats.json. ``method ridge`` (default, the better
selector in docs/benchmarks.md): the frozen backbone cut after the cross-validated layer of ``ridge_layers`` and a
closed-form linear head. ``method lora``: a LoRA adapter + head on ``value_num_layers`` blocks trained by SGD
(``value_epochs``, ``value_learning_rate``, ``value_lora_r``, ``value_batch_size``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vgf_llm.cli import CLIError
from vgf_llm.cli.common import PromptArguments, parse
from vgf_llm.evaluation import json_safe

TASK_PROMPTS = 64  # train prompts of a task when num_prompts is not given


@dataclass
class FitValueArguments(PromptArguments):
    output: str | None = field(default=None, metadata={"help": "Folder for the value model and stats.json."})
    num_generations: int = field(default=4, metadata={"help": "Reference samples per prompt."})
    max_completion_length: int = field(default=64, metadata={"help": "Max new tokens per sample."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the reference."})
    method: Literal["ridge", "lora"] = field(default="ridge", metadata={"help": "How the value model is fitted."})
    ridge_layers: list[int] = field(default_factory=lambda: [4, 8, 12, 16], metadata={
        "help": "method ridge: backbone cuts the cross-validation chooses from (deeper costs more per sample)."})
    value_num_layers: int = field(default=12, metadata={"help": "method lora: backbone blocks the value model uses."})
    value_lora_r: int = field(default=8, metadata={"help": "method lora: LoRA rank (lora_alpha = 2 x rank)."})
    value_epochs: int = field(default=3, metadata={"help": "method lora: passes over the samples."})
    value_learning_rate: float = field(default=1e-3, metadata={"help": "method lora: learning rate."})
    value_batch_size: int = field(default=16, metadata={"help": "method lora: minibatch size."})

    def __post_init__(self):
        super().__post_init__()
        if not self.output:
            raise CLIError("set --output DIR")
        if not self.ridge_layers or min(self.ridge_layers) < 1:
            raise CLIError(f"--ridge_layers must be layer numbers >= 1, got {self.ridge_layers}")
        for name in ("num_generations", "max_completion_length", "value_num_layers", "value_lora_r",
                     "value_epochs", "value_batch_size"):
            if getattr(self, name) < 1:
                raise CLIError(f"--{name} must be >= 1, got {getattr(self, name)}")


def run(argv: list[str]) -> int:
    import torch

    from vgf_llm.value import ValueModelConfig
    from vgf_llm.value_fit import fit_value_model

    (args,) = parse((FitValueArguments,), argv, "vgf-llm fit-value", __doc__.split("\n\n")[0])
    funcs = args.reward_functions()
    if funcs is None:
        raise CLIError("fit-value needs a true reward: give --reward_funcs (or use --task)")
    rows = args.rows("train", TASK_PROMPTS)
    model, tokenizer = args.load_model()
    torch.manual_seed(args.seed)
    config = ValueModelConfig(num_layers=args.value_num_layers, lora_r=args.value_lora_r,
                              lora_alpha=2 * args.value_lora_r)
    vm, stats, _, _ = fit_value_model(
        model, tokenizer, funcs, rows, config=config, method=args.method, ridge_layers=args.ridge_layers,
        num_generations=args.num_generations, max_new_tokens=args.max_completion_length,
        temperature=args.temperature, reward_weights=args.reward_weights, epochs=args.value_epochs,
        lr=args.value_learning_rate, batch_size=args.value_batch_size, seed=args.seed)
    out = Path(args.output)
    vm.save(out)
    record = {**stats, "model": args.model_name_or_path, "task": args.task, "prompts": args.prompts,
              "reward_funcs": args.reward_names(), "reward_weights": args.reward_weights, "num_prompts": len(rows),
              "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
              "fit_method": args.method, "seed": args.seed,
              **({"value_epochs": args.value_epochs} if args.method == "lora" else {"ridge_layers": args.ridge_layers})}
    (out / "stats.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
    print(f"mean true reward of the {stats['num_samples']} samples: {stats['reward_mean']:.4f}")
    if args.method == "ridge":  # out-of-fold over every sample, folds split by prompt
        print(f"held-out correlation (value vs true reward, out-of-fold by prompt, {stats['num_samples']} samples): "
              f"{stats['val_corr']:.4f} (backbone cut after layer {stats['layer']}, {stats['pooling']} pooling)")
    else:
        hint = " (too few held-out samples: use more prompts or generations)" if stats["num_val"] < 3 else ""
        print(f"held-out correlation (value vs true reward, {stats['num_val']} samples): "
              f"{stats['val_corr']:.4f}{hint}")
    print(f"saved the value model to {out}")
    return 0
