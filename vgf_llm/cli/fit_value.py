"""``vgf-llm fit-value``: sample ``num_generations`` responses per train prompt from the model, score them with
the true reward, fit a value model and save it to ``output`` with stats.json: the frozen backbone cut after the
cross-validated layer of ``ridge_layers`` and a closed-form linear head (ridge; a LoRA value model fitted by SGD
was retired: held-out correlation 0.32 against ridge's 0.577, docs/benchmarks.md "Retired")."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vgf_llm.cli import CLIError
from vgf_llm.cli.common import PromptArguments, parse
from vgf_llm.evaluation import json_safe
from vgf_llm.rollout.config import check_sampling

TASK_PROMPTS = 64  # train prompts of a task when num_prompts is not given


@dataclass
class FitValueArguments(PromptArguments):
    output: str | None = field(default=None, metadata={"help": "Folder for the value model and stats.json."})
    num_generations: int = field(default=4, metadata={"help": "Reference samples per prompt."})
    max_completion_length: int = field(default=64, metadata={"help": "Max new tokens per sample."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the reference."})
    ridge_layers: list[int] = field(default_factory=lambda: [4, 8, 12, 16], metadata={
        "help": "Backbone cuts the cross-validation chooses from (deeper costs more per sample)."})

    def __post_init__(self):
        super().__post_init__()
        if not self.output:
            raise CLIError("set --output DIR")
        if not self.ridge_layers or min(self.ridge_layers) < 1:
            raise CLIError(f"--ridge_layers must be layer numbers >= 1, got {self.ridge_layers}")
        for name in ("num_generations", "max_completion_length"):
            if getattr(self, name) < 1:
                raise CLIError(f"--{name} must be >= 1, got {getattr(self, name)}")
        check_sampling(self.num_generations, self.temperature)


def run(argv: list[str]) -> int:
    import torch

    from vgf_llm.value_fit import fit_value_model

    (args,) = parse((FitValueArguments,), argv, "vgf-llm fit-value", __doc__.split("\n\n")[0])
    funcs = args.reward_functions()
    if funcs is None:
        raise CLIError("fit-value needs a true reward: give --reward_funcs (or use --task)")
    rows = args.rows("train", TASK_PROMPTS)
    model, tokenizer = args.load_model()
    args.check_fit(rows, model, tokenizer, args.max_completion_length, "train")
    torch.manual_seed(args.seed)
    vm, stats, _, _ = fit_value_model(
        model, tokenizer, funcs, rows, ridge_layers=args.ridge_layers, num_generations=args.num_generations,
        max_new_tokens=args.max_completion_length, temperature=args.temperature, reward_weights=args.reward_weights,
        seed=args.seed)
    out = Path(args.output)
    vm.save(out)
    record = {**stats, "model": args.model_name_or_path, "task": args.task, "prompts": args.prompts,
              "reward_funcs": args.reward_names(), "reward_weights": args.reward_weights, "num_prompts": len(rows),
              "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
              "seed": args.seed, "ridge_layers": args.ridge_layers}
    (out / "stats.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
    print(f"mean true reward of the {stats['num_samples']} samples: {stats['reward_mean']:.4f}")
    print(f"held-out correlation (value vs true reward, out-of-fold by prompt, {stats['num_samples']} samples): "
          f"{stats['val_corr']:.4f} (backbone cut after layer {stats['layer']}, {stats['pooling']} pooling)")
    print(f"saved the value model to {out}")
    return 0
