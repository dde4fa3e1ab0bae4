"""Prompt rows from a JSON-lines file, each bad line named as ``file:line`` (the one reader behind ``--prompts`` of
``generate`` / ``fit-value`` and a ``.jsonl`` ``dataset_name`` of ``train``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vgf_llm.checks import prompt_problem


def _lines(path: Path):
    """(line number, text) of each line; bytes that are not UTF-8 are named with their line and column."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1}): save the file as UTF-8") from None


def read_prompts_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a prompts file; every row has a valid "prompt" and the same fields as the first row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    rows, keys = [], None
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f'{where}: expected a JSON object with a "prompt" field')
        problem = prompt_problem(row["prompt"])
        if problem:
            raise ValueError(f"{where}: {problem}")
        if keys is None:
            keys = set(row)
        elif set(row) != keys:
            raise ValueError(
                f"{where}: fields {sorted(row)} differ from the first row's {sorted(keys)} "
                "(every row must have the same fields, as dataset columns do)"
            )
        rows.append(row)
    if not rows:
        raise ValueError(f"prompts file has no rows: {path}")
    return rows
