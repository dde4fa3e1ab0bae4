"""Rollouts: N completions per prompt from a causal LM, as padded token tensors grouped by prompt.

A backend is any object with ``generate(prompts, num_generations, seed) -> Rollouts`` and ``close()``. Prompts are
chat-formatted text or message lists (TRL's conversational form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vgf_llm.checks import check_prompt_lengths, context_length, format_prompt


@dataclass
class Rollouts:
    """G prompts x N completions.

    prompt_ids [G, P] (left-padded), prompt_mask [G, P];
    completion_ids [G, N, T] (right-padded with pad_token_id), completion_mask [G, N, T] (1 = generated token,
    including the final EOS); texts[g][n] is the decoded completion without special tokens.
    logprobs [G, N, T] (optional, float, 0 at padding): the sampled tokens' log-probabilities under the model (before
    the temperature) when the backend was asked for them (``return_logprobs=True``); None otherwise.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[list[str]]
    logprobs: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.completion_ids.shape)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt_ids, prompt_mask, completion_ids, completion_mask), one row per completion ([G * N, ...]; each
        prompt repeated for its N completions): the layout scorers, rewards and the distillation take."""
        g, n, t = self.shape
        return (self.prompt_ids.repeat_interleave(n, 0), self.prompt_mask.repeat_interleave(n, 0),
                self.completion_ids.reshape(g * n, t), self.completion_mask.reshape(g * n, t))

    def __getitem__(self, groups: slice) -> Rollouts:
        """A slice of prompts (groups), e.g. to process a large set of rollouts in chunks."""
        return Rollouts(self.prompt_ids[groups], self.prompt_mask[groups], self.completion_ids[groups],
                        self.completion_mask[groups], self.texts[groups],
                        None if self.logprobs is None else self.logprobs[groups])


def encode_prompts(prompts: list, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask. Chat-formatted text already holds its special tokens."""
    texts = [format_prompt(p, tokenizer) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


def completion_mask_from_ids(ids: torch.Tensor, eos_ids: set[int], pad_id: int) -> torch.Tensor:
    """1 up to and including the first EOS; everything after it is padding."""
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= ids == e
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long()


def tokens_changed(old_ids, old_mask, new_ids, new_mask) -> torch.Tensor:
    """Response tokens that differ between two versions of the same responses ([..., T] each, masks are prefixes),
    a length difference counting as changed tokens. Shape: the leading dimensions."""
    width = max(old_ids.shape[-1], new_ids.shape[-1])

    def masked(ids, mask):  # -1 where there is no token, so a missing token differs from any real one
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, -1))
        return torch.nn.functional.pad(ids, (0, width - ids.shape[-1]), value=-1)

    return (masked(old_ids, old_mask) != masked(new_ids, new_mask)).sum(-1)


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class SampledTokenLogprobs:
    """A ``generate`` logits processor that records each drawn token's log-probability under the model's own logits
    (transformers runs custom processors before the temperature and top-k/top-p warpers), one step behind: a step's
    log-softmax is kept until the next call shows which token was drawn; ``finish`` reads the last one. One [B, V]
    tensor at a time, never the [B, T, V] that ``output_logits`` keeps."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:])[:, 0])
        self.previous = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probabilities of ``generated`` (the new tokens of the same call)."""
        if self.previous is not None and len(self.steps) < generated.shape[1]:
            self.steps.append(self.previous.gather(1, generated[:, len(self.steps):len(self.steps) + 1])[:, 0])
        return torch.stack(self.steps, 1) if self.steps else generated.new_zeros(generated.shape, dtype=torch.float)


class HFGenerateBackend:
    """Sampling with ``model.generate``. Deterministic for a given seed and ``batch_size``. ``return_logprobs``
    fills ``Rollouts.logprobs`` with the drawn tokens' log-probabilities under the model (before the temperature),
    read while sampling: no second pass."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, batch_size: int = 8, progress: bool = False,
                 return_logprobs: bool = False):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (vgf_llm.models.load_tokenizer sets one)")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.batch_size, self.progress, self.return_logprobs = batch_size, progress, return_logprobs

    @torch.no_grad()
    def _sampling_flags(self) -> dict:
        """Sampling knobs only when sampling: greedy generation with ``top_k``/``top_p`` set makes transformers warn.
        ``top_k=0`` is passed as is (no top-k filter), not left to the library's default of 50."""
        if self.temperature <= 0:
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def generate(self, prompts: list, num_generations: int, seed: int = 0) -> Rollouts:
        """``batch_size`` prompts (each with ``num_generations`` samples) per ``generate`` call."""
        tok, model = self.tokenizer, self.model
        prompt_ids, prompt_mask = encode_prompts(prompts, tok)
        check_prompt_lengths(prompt_mask.sum(1).tolist(), "the prompts", context_length(model))
        eos = eos_token_ids(model, tok)
        chunks, chunk_logprobs = [], []
        starts = range(0, len(prompts), self.batch_size)
        for c, start in enumerate(tqdm(starts, desc="rollout", disable=not self.progress, leave=False)):
            ids = prompt_ids[start:start + self.batch_size].to(model.device)
            mask = prompt_mask[start:start + self.batch_size].to(model.device)
            recorder = SampledTokenLogprobs() if self.return_logprobs else None
            torch.manual_seed(seed * 100_003 + c)
            out = model.generate(
                input_ids=ids.repeat_interleave(num_generations, 0),
                attention_mask=mask.repeat_interleave(num_generations, 0),
                **self._sampling_flags(), max_new_tokens=self.max_new_tokens,
                pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos),
                logits_processor=[recorder] if recorder is not None else None,
            )
            chunks.append(out[:, ids.shape[1]:].cpu())
            if recorder is not None:
                chunk_logprobs.append(recorder.finish(out[:, ids.shape[1]:]).cpu())
        width = max(c.shape[1] for c in chunks)

        def joined(parts, pad):
            return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad) for c in parts]).view(
                len(prompts), num_generations, width)

        completion = joined(chunks, tok.pad_token_id)
        cmask = completion_mask_from_ids(completion, eos, tok.pad_token_id)
        completion = torch.where(cmask.bool(), completion, torch.full_like(completion, tok.pad_token_id))
        logprobs = joined(chunk_logprobs, 0.0) * cmask if self.return_logprobs else None
        texts = [[tok.decode(completion[g, n][cmask[g, n].bool()], skip_special_tokens=True)
                  for n in range(num_generations)] for g in range(len(prompts))]
        return Rollouts(prompt_ids, prompt_mask, completion, cmask, texts, logprobs=logprobs)

    def close(self) -> None:
        """Nothing to release (``VLLMBackend.close`` stops its engine)."""
