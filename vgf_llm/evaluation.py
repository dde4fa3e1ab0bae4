"""Held-out scoring of a model with or without its policy adapter: greedy completions, true rewards.

Used by ``VGFTrainer.evaluate`` and by the quickstart's base-vs-trained table.
"""

from __future__ import annotations

import torch

from vgf_llm.rewards import reward_texts
from vgf_llm.rollout.hf import HFGenerateBackend
from vgf_llm.value import active_adapter


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
