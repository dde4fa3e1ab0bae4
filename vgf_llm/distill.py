"""The distillation step's arithmetic: target weights within a prompt group from true rewards, the policy's
per-token log-probabilities of the targets, and padding helpers for batches of ragged rollouts."""

from __future__ import annotations

import math

import torch
from trl.trainer.utils import selective_log_softmax

MIN_TARGET_WEIGHT = 1e-3  # targets below this weight within their group are dropped (and the rest renormalised)


def pad_cat(tensors: list[torch.Tensor], value, left: bool = False) -> torch.Tensor:
    """Concatenate along dim 0 tensors whose dim 1 differs, padding on the left or the right."""
    width = max(t.shape[1] for t in tensors)
    pads = [(width - t.shape[1], 0) if left else (0, width - t.shape[1]) for t in tensors]
    return torch.cat([torch.nn.functional.pad(t, pad, value=value) for t, pad in zip(tensors, pads, strict=True)])


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """[G] standard deviation of each group's finite rewards (0 for groups with fewer than two)."""
    finite = torch.isfinite(rewards)
    return torch.stack([rewards[i][finite[i]].std() if finite[i].sum() > 1 else torch.tensor(0.0)
                        for i in range(rewards.shape[0])]).nan_to_num(0)


def distill_weights(rewards: torch.Tensor, how: str, temperature: float) -> torch.Tensor:
    """[G, K] target weights from true rewards (NaN = not a target), each group summing to 1 (or 0 if empty)."""
    finite = torch.isfinite(rewards)
    r = torch.where(finite, rewards, torch.full_like(rewards, -math.inf))
    if how == "softmax":
        w = torch.softmax(r / temperature, dim=-1)
    elif how == "best":
        w = torch.nn.functional.one_hot(r.argmax(-1), rewards.shape[-1]).to(rewards.dtype)
    else:  # advantage: the part of the reward above the group mean
        mean = torch.where(finite, rewards, 0).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True).clamp_min(1)
        w = torch.where(finite, (rewards - mean).clamp_min(0), 0)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.nan_to_num(torch.where(finite, w, 0), nan=0.0)


def completion_logits(model, input_ids, attention_mask, completion_start: int) -> torch.Tensor:
    """[B, T, V] the logits that predict each token of ``input_ids[:, completion_start:]`` (prompts left-padded).
    Only the completion's logits are computed (``logits_to_keep``): the vocabulary projection dominates small
    models."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    width = input_ids.shape[1] - completion_start
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                 logits_to_keep=width + 1).logits[:, :-1]


def token_logps(logits: torch.Tensor, input_ids, completion_start: int) -> torch.Tensor:
    """[B, T] log-probabilities of the completion tokens under ``completion_logits``' output."""
    return selective_log_softmax(logits.float(), input_ids[:, completion_start:])  # TRL's: row by row, less memory


def completion_logps(model, input_ids, attention_mask, completion_start: int) -> torch.Tensor:
    """Per-token log-probabilities of ``input_ids[:, completion_start:]`` (prompts left-padded)."""
    return token_logps(completion_logits(model, input_ids, attention_mask, completion_start), input_ids,
                       completion_start)


def token_kl(teacher_logps: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """[B, T] KL(teacher || student) of two [B, T, V] next-token log-distributions, position by position."""
    teacher = teacher_logps.float()
    return (teacher.exp() * (teacher - student.float())).sum(-1)
