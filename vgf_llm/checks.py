"""Checks of a run's inputs, made before any work: the prompt rows (their form, emptiness and length against the
model's context) and the checkpoint a run resumes from.

A bad input is a ``ValueError`` that says where it is (file, row) and what to do, so the command line prints it
as one line and a Python caller gets the same message; nothing here knows about the command line.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

MESSAGES_FORM = 'a non-empty string or a list of {"role", "content"} chat messages'


def prompt_problem(prompt) -> str | None:
    """What is wrong with one prompt in TRL's two forms (a string, or chat messages), or None when nothing is."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "the prompt is empty (or only whitespace): drop the row or fill it in"
    if not isinstance(prompt, list) or not prompt:
        what = "an empty list" if isinstance(prompt, list) else type(prompt).__name__
        return f'"prompt" must be {MESSAGES_FORM}, got {what}'
    for j, message in enumerate(prompt):
        if not isinstance(message, dict):
            return f'chat message {j} of the prompt is a {type(message).__name__}, not a {{"role", "content"}} mapping'
        # a table fills a key that some rows lack with None: count it as missing
        missing = [key for key in ("role", "content") if message.get(key) is None]
        if missing:
            return (f"chat message {j} of the prompt has no {' and no '.join(repr(k) for k in missing)} key (every "
                    f"message needs 'role' and 'content'; its keys are {sorted(message)})")
        if not isinstance(message["role"], str):
            return f"chat message {j} of the prompt has a role of type {type(message['role']).__name__}, not a string"
    if all(isinstance(m["content"], str) and not m["content"].strip() for m in prompt):
        return "every chat message of the prompt is empty: drop the row or fill it in"
    return None


def prompts_of(dataset) -> list:
    """The ``prompt`` of every row of a ``datasets.Dataset`` or a list of dict rows."""
    if hasattr(dataset, "column_names"):
        return dataset["prompt"]
    return [row["prompt"] for row in dataset]


def check_prompts(prompts, where: str) -> None:
    """Refuse the first prompt that is empty or of the wrong form, naming its row in ``where``."""
    for i, prompt in enumerate(prompts):
        problem = prompt_problem(prompt)
        if problem:
            raise ValueError(f"{where}, row {i}: {problem}")


def context_length(model) -> int | None:
    """The most positions the model was built for (``max_position_embeddings``), None where its config has none."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def format_prompt(prompt, tokenizer) -> str:
    """TRL's two prompt forms: a string is used as is; a message list goes through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    raise TypeError(prompt_problem(prompt) or f"a prompt must be {MESSAGES_FORM}")


def prompt_lengths(prompts, tokenizer) -> list[int]:
    """Tokens of each prompt as the rollouts encode it (chat template applied, no extra special tokens)."""
    texts = [format_prompt(p, tokenizer) for p in prompts]
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def check_prompt_lengths(lengths: list[int], where: str, context: int | None,
                         max_completion_length: int | None = None) -> None:
    """Refuse the first prompt longer than the model's ``context`` (generation would crawl or fail on it), naming
    its row, its length and the context; warn once when the longest prompt plus ``max_completion_length`` new
    tokens goes past the context (None: no warning)."""
    if not context or not lengths:
        return
    for i, n in enumerate(lengths):
        if n > context:
            raise ValueError(f"{where}, row {i}: the prompt is {n} tokens, more than the model's context of "
                             f"{context} tokens (max_position_embeddings): shorten the prompt or drop the row")
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if max_completion_length is not None and lengths[longest] + max_completion_length > context:
        logger.warning("%s: the longest prompt (row %d, %d tokens) + max_completion_length %d = %d tokens, more than "
                       "the model's context of %d tokens: completions that long go past the positions the model was "
                       "trained on; lower max_completion_length or shorten the prompts", where, longest,
                       lengths[longest], max_completion_length, lengths[longest] + max_completion_length, context)


def check_prompts_fit(prompts, where: str, tokenizer, model, max_completion_length: int | None = None) -> None:
    """``check_prompts`` and ``check_prompt_lengths`` of ``prompts`` for ``model`` and its ``tokenizer``."""
    check_prompts(prompts, where)
    check_prompt_lengths(prompt_lengths(prompts, tokenizer), where, context_length(model), max_completion_length)


def damaged_file(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from: the first file in it that does not read back (a safetensors
    header, a torch zip archive, a JSON file), named with the reason; None when every file reads. Only headers and
    archive directories are read, so this is quick even for large checkpoints."""
    from safetensors import safe_open

    for file in sorted(Path(folder).rglob("*")):
        if not file.is_file():
            continue
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):
                return f"{file} is not a readable torch file (not a zip archive)"
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except Exception as err:  # safetensors raises its own error types; JSON and decoding errors too
            return f"{file} is damaged ({type(err).__name__}: {err})"
    return None
