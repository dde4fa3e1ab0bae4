"""What the ``generate`` and ``fit-value`` commands share: where prompts come from, their true reward, the model,
strict JSON output."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vgf_llm.cli import CLIError


@dataclass
class PromptArguments:
    """The model, the prompts and their true reward (the same names as the training recipes)."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Model alias (see `vgf-llm models list`), local folder or Hub id in the local cache."})
    task: str | None = field(default=None, metadata={
        "help": "Prompts built offline: 'sentiment' or a reasoning-gym task name (chain_sum, basic_arithmetic, ...)."})
    prompts: str | None = field(default=None, metadata={
        "help": "FILE.jsonl instead of task: one JSON object per line with a 'prompt' (a string or chat messages); "
                "other fields are passed to reward functions as dataset columns."})
    num_prompts: int | None = field(default=None, metadata={
        "help": "Prompts to use (default: all rows of prompts; 32 test / 64 train prompts of a task)."})
    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "True reward(s): registered names (vader, reasoning_gym, gsm8k, boxed) or pkg.module:function "
                "(default for a task: its own reward)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward function."})
    seed: int = field(default=0, metadata={"help": "Seeds the task's prompts, sampling and fitting."})
    device: str = field(default="cpu", metadata={"help": "Torch device of the models."})

    def __post_init__(self):
        if (self.task is None) == (self.prompts is None):
            raise CLIError("give exactly one of --task or --prompts")
        if not self.model_name_or_path:
            raise CLIError("set --model_name_or_path (a model alias, local folder or cached Hub id)")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise CLIError(f"--num_prompts must be >= 1, got {self.num_prompts}")

    def rows(self, split: str, default_size: int) -> list[dict]:
        """Prompt rows of the task's ``split`` (``default_size`` of them unless ``num_prompts``) or of the file."""
        if self.task:
            from vgf_llm.tasks import task_dataset

            return task_dataset(self.task, size=self.num_prompts or default_size, seed=self.seed,
                                split=split).to_list()
        rows = read_prompts_jsonl(self.prompts)
        return rows[: self.num_prompts] if self.num_prompts else rows

    def reward_names(self) -> list[str] | None:
        """reward_funcs, else the true reward of the task, else None (no true reward)."""
        if self.reward_funcs:
            return self.reward_funcs
        if self.task:
            from vgf_llm.tasks import task_reward_names

            return task_reward_names(self.task)
        return None

    def reward_functions(self) -> list | None:
        from vgf_llm.rewards import resolve_reward_funcs

        names = self.reward_names()
        if names is None:
            if self.reward_weights is not None:
                raise CLIError("--reward_weights needs --reward_funcs or --task")
            return None
        if self.reward_weights is not None and len(self.reward_weights) != len(names):
            raise CLIError(f"--reward_weights has {len(self.reward_weights)} values for {len(names)} reward "
                           "functions")
        return resolve_reward_funcs(names)

    def load_model(self):
        """(model in eval mode, tokenizer)."""
        from vgf_llm.models import load_model, load_tokenizer

        return load_model(self.model_name_or_path, device=self.device).eval(), load_tokenizer(self.model_name_or_path)


def _check_prompt(prompt, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CLIError(f"{where}: the prompt is empty")
        return
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt)
    ):
        return
    raise CLIError(f'{where}: "prompt" must be a non-empty string or a list of {{"role", "content"}} messages')


def read_prompts_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a prompts file; every row has a valid "prompt" and the same fields as the first row."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"prompts file not found: {path}")
    rows, keys = [], None
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise CLIError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict) or "prompt" not in row:
                raise CLIError(f'{where}: expected a JSON object with a "prompt" field')
            _check_prompt(row["prompt"], where)
            if keys is None:
                keys = set(row)
            elif set(row) != keys:
                raise CLIError(
                    f"{where}: fields {sorted(row)} differ from the first row's {sorted(keys)} "
                    "(every row must have the same fields, as dataset columns do)"
                )
            rows.append(row)
    if not rows:
        raise CLIError(f"prompts file has no rows: {path}")
    return rows


def parse(dataclasses: tuple, argv: list[str], prog: str, description: str):
    """Parse ``argv`` (and ``--config x.yaml``) into ``dataclasses`` with TRL's parser; bad values are CLIErrors."""
    from trl import TrlParser

    parser = TrlParser(dataclasses, prog=prog, description=description + " --config x.yaml sets any of the options "
                       "below from a YAML file; options on the command line override it.")
    return parser.parse_args_and_config(argv)
