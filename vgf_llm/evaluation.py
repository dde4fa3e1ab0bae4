"""Held-out scoring of a model with or without its policy adapter (greedy completions, true rewards), and strict
JSON for the figures it reports.

Used by ``VGFTrainer.evaluate``, the quickstart's base-vs-trained table and the CLI's result files.
"""

from __future__ import annotations

import math

import torch

from vgf_llm.adapters import active_adapter
from vgf_llm.rewards import reward_texts
from vgf_llm.rollout.hf import HFGenerateBackend


@torch.no_grad()
def policy_rewards(model, tokenizer, rows: list[dict], reward_funcs, reward_weights=None, *, adapter: str | None,
                   max_new_tokens: int = 64, batch_size: int = 8,
                   progress: bool = True) -> tuple[list[float], list[str]]:
    """True reward of one greedy completion per row (NaN where no reward applies) and the completions.

    ``adapter=None`` scores the base model (adapters off); a name scores the model with that adapter active.
    """
    if not rows:
        return [], []
    backend = HFGenerateBackend(model, tokenizer, max_new_tokens=max_new_tokens, temperature=0.0,
                                batch_size=batch_size, progress=progress)
    was_training = model.training
    model.eval()
    try:
        with active_adapter(model, adapter):
            ro = backend.generate([r["prompt"] for r in rows], 1, seed=0)
    finally:
        model.train(was_training)
    texts = [group[0] for group in ro.texts]
    return reward_texts(reward_funcs, reward_weights, rows, texts).tolist(), texts


def json_safe(value):
    """NaN/inf become null (bare NaN is not JSON), through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
