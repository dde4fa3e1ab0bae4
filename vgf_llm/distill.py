"""The distillation step's arithmetic: target weights within a prompt group from true rewards, the per-token
log-probabilities of the targets (in row chunks, so memory never holds rows x tokens x vocabulary at once), and
padding helpers for batches of ragged rollouts."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.trainer.utils import selective_log_softmax

MIN_TARGET_WEIGHT = 1e-3  # targets below this weight within their group are dropped (and the rest renormalised)
LOGPS_CHUNK_ROWS = 4  # rows per vocabulary projection: at Qwen's 151,936 tokens x 512 positions, ~1.2 GB in fp32


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


def distill_weights(rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """[G, K] softmax(rewards / temperature) within each group (NaN = not a target, weight 0), each group summing
    to 1 (or 0 if empty)."""
    finite = torch.isfinite(rewards)
    r = torch.where(finite, rewards, torch.full_like(rewards, -math.inf))
    w = torch.softmax(r / temperature, dim=-1)
    return torch.nan_to_num(torch.where(finite, w, 0), nan=0.0)


def _chunk_logps(head, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return selective_log_softmax(head(hidden).float(), ids)  # TRL's: row by row, less memory


def completion_logps(model, input_ids, attention_mask, completion_start: int,
                     chunk_rows: int = LOGPS_CHUNK_ROWS) -> torch.Tensor:
    """[B, T] log-probabilities of the tokens ``input_ids[:, completion_start:]`` (prompts left-padded).

    The model runs once (through its wrapper, so DDP and DeepSpeed see an ordinary forward) with the vocabulary
    projection cut to one position; the decoder's final states are taken from a hook and projected
    ``chunk_rows`` rows at a time. With gradients on, each chunk is recomputed in backward (activation
    checkpointing), so no [B, T, V] logits tensor ever exists, in forward or backward: the same values and
    gradients as one full projection, at memory that does not grow with rows x vocabulary. Under DeepSpeed ZeRO-3
    the rows go in one piece, not recomputed: every call of the sharded head is a collective, ranks hold different
    row counts, and a recomputed gather does not match the forward's."""
    zero3 = is_deepspeed_zero3_enabled()
    if zero3:
        chunk_rows = max(1, input_ids.shape[0])
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engines keep the model in .module
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    captured = {}
    handle = decoder.register_forward_hook(lambda _m, _i, out: captured.__setitem__("h", out[0]))
    try:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured["h"][:, completion_start - 1:-1]  # the states that predict each completion token
    targets = input_ids[:, completion_start:]
    grad = torch.is_grad_enabled() and hidden.requires_grad and not zero3
    return torch.cat([
        checkpoint(_chunk_logps, head, hidden[s:s + chunk_rows], targets[s:s + chunk_rows], use_reentrant=False)
        if grad else _chunk_logps(head, hidden[s:s + chunk_rows], targets[s:s + chunk_rows])
        for s in range(0, input_ids.shape[0], chunk_rows)
    ])
