"""``vgf-llm generate``: N particles per prompt from the reference, VGF transport, decode, re-score, select; one
JSON line per prompt. Options: ``PromptArguments``, the scorer and output below, ``VLLMArguments`` (the N samples
from vLLM) and ``SamplerConfig`` (the test-time defaults: per-step steering, the winner of the test-time
benchmark)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from vgf_llm.cli import CLIError
from vgf_llm.cli.common import PromptArguments, VLLMArguments, parse
from vgf_llm.evaluation import json_safe
from vgf_llm.sampler import SamplerConfig

TASK_PROMPTS = 32  # test prompts of a task when num_prompts is not given


@dataclass
class GenerateArguments(PromptArguments):
    output: str | None = field(default=None, metadata={"help": "OUT.jsonl: one JSON line per prompt."})
    split: str = field(default="test", metadata={"help": "Split of the task: train or test."})
    value_model_path: str | None = field(default=None, metadata={
        "help": "The scorer: a value model from `vgf-llm fit-value` on this model."})
    reward_model_path: str | None = field(default=None, metadata={
        "help": "The scorer instead: a sequence-classification reward model with the model's vocabulary."})

    def __post_init__(self):
        super().__post_init__()
        if not self.output:
            raise CLIError("set --output OUT.jsonl")
        if self.split not in ("train", "test"):
            raise CLIError(f"--split must be train or test, got {self.split!r}")
        if (self.value_model_path is None) == (self.reward_model_path is None):
            raise CLIError("give exactly one scorer: --value_model_path or --reward_model_path")


def build_scorer(args: GenerateArguments, model, tokenizer):
    if args.value_model_path:
        from vgf_llm.value import ValueModel

        try:
            return ValueModel.load(model, args.value_model_path)
        except ValueError as err:  # the value model was fitted on another base model
            stats = Path(args.value_model_path) / "stats.json"
            fitted_on = json.loads(stats.read_text()).get("model") if stats.is_file() else None
            raise CLIError(
                f"the value model in {args.value_model_path} does not fit --model_name_or_path "
                f"{args.model_name_or_path}" + (f" (it was fitted on {fitted_on})" if fitted_on else "")
                + f": {str(err).strip().splitlines()[-1].strip()}"
            ) from err
    from transformers import AutoModelForSequenceClassification

    from vgf_llm.models import load_model, load_tokenizer
    from vgf_llm.value import RewardModelScorer

    reward_tokenizer = load_tokenizer(args.reward_model_path, padding_side="right")
    reward_model = load_model(args.reward_model_path, device=args.device,
                              model_class=AutoModelForSequenceClassification)
    return RewardModelScorer(reward_model, reward_tokenizer, tokenizer)


def run(argv: list[str]) -> int:
    import torch

    from vgf_llm.rewards import reward_texts
    from vgf_llm.sampler import VGFSampler

    args, vllm, config = parse((GenerateArguments, VLLMArguments, SamplerConfig), argv, "vgf-llm generate",
                               __doc__.split("\n\n")[0])
    funcs = args.reward_functions()
    rows = args.rows(args.split, TASK_PROMPTS)
    model, tokenizer = args.load_model()
    args.check_fit(rows, model, tokenizer, config.max_completion_length, args.split)
    torch.manual_seed(args.seed)
    backend = vllm.rollout_backend(model, tokenizer, config, batch_size=config.prompts_per_generation)
    sampler = VGFSampler(model, tokenizer, build_scorer(args, model, tokenizer), config, backend=backend)
    try:
        results = sampler.sample([r["prompt"] for r in rows], seed=args.seed)
    finally:
        if backend is not None:
            backend.close()
    true = reward_texts(funcs, args.reward_weights, rows, [r.response for r in results]).tolist() if funcs else None

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for i, (row, result) in enumerate(zip(rows, results, strict=True)):
            line = result.to_dict()
            if true is not None:
                line["true_reward"] = true[i]
            columns = {k: v for k, v in row.items() if k != "prompt"}
            if columns:
                line["columns"] = columns
            handle.write(json.dumps(json_safe(line), ensure_ascii=False) + "\n")
    moved = sum(r.chosen_moved for r in results)
    brake = (f"; likelihood brake {sampler.likelihood_weight:g} (--likelihood_weight 0 turns it off)"
             if sampler.likelihood_weight else "")
    print(f"wrote {len(results)} lines to {out} (chosen response transported for {moved}/{len(results)} prompts"
          f"{brake})")
    if true is not None:
        finite = [v for v in true if math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        print(f"mean true reward of the chosen responses ({'+'.join(args.reward_names())}, {len(finite)} prompts): "
              f"{mean:.4f}")
    return 0
