"""Rollouts from Hugging Face generate (vgf_llm.rollout.hf) on the tiny offline model."""

import pytest
import torch
from conftest import CHAT_PROMPTS as PROMPTS  # the chat prompts the conftest rollouts fixture samples
from transformers.utils import logging as transformers_logging

from vgf_llm.rollout.hf import HFGenerateBackend, eos_token_ids, tokens_changed


def test_rollouts_have_the_documented_shape_and_are_seeded(tiny_lm, tokenizer, rollouts):
    g, n, t = rollouts.shape
    assert (g, n) == (3, 4) and t <= 12
    assert rollouts.prompt_ids.shape[0] == 3 and rollouts.prompt_mask[:, -1].all()  # left-padded
    eos = eos_token_ids(tiny_lm, tokenizer)
    for gi in range(g):
        for ni in range(n):
            m = rollouts.completion_mask[gi, ni].bool()
            assert m[: int(m.sum())].all()  # the mask is a prefix
            real = rollouts.completion_ids[gi, ni][m]
            assert not any(int(x) in eos for x in real[:-1])  # EOS only at the end
            assert rollouts.texts[gi][ni] == tokenizer.decode(real, skip_special_tokens=True)
    again = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=12, batch_size=2).generate(PROMPTS, 4, seed=3)
    assert torch.equal(again.completion_ids, rollouts.completion_ids)
    other = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=12, batch_size=2).generate(PROMPTS, 4, seed=4)
    assert not torch.equal(other.completion_ids, rollouts.completion_ids)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_sends_no_flag_transformers_calls_invalid(tiny_lm, tokenizer, temperature, caplog):
    """Greedy generation with sampling knobs set (top_k=0 by default) used to make transformers warn on every call."""
    transformers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            ro = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=4, temperature=temperature).generate(PROMPTS, 2)
    finally:
        transformers_logging.disable_propagation()
    assert ro.shape[:2] == (3, 2)
    assert not [r for r in caplog.records if "not valid" in r.getMessage()]


def test_tokens_changed_counts_swaps_and_length_differences():
    old = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    old_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    new = torch.tensor([[5, 9, 7, 4, 4, 0], [5, 6, 0, 0, 0, 0]])  # wider; a pad id equal to a real one is not real
    new_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    assert tokens_changed(old, old_mask, new, new_mask).tolist() == [1 + 2, 2]
    assert tokens_changed(old, old_mask, old, old_mask).tolist() == [0, 0]


def test_flat_repeats_each_prompt_for_its_completions(rollouts):
    p_ids, p_mask, c_ids, c_mask = rollouts.flat()
    g, n, t = rollouts.shape
    assert p_ids.shape[0] == c_ids.shape[0] == g * n and c_ids.shape[1] == t
    for i in range(g * n):
        assert torch.equal(p_ids[i], rollouts.prompt_ids[i // n])
        assert torch.equal(p_mask[i], rollouts.prompt_mask[i // n])
        assert torch.equal(c_ids[i], rollouts.completion_ids[i // n, i % n])
        assert torch.equal(c_mask[i], rollouts.completion_mask[i // n, i % n])
