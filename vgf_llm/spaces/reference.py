"""The reference model's view of a response, shared by the particle spaces: which tokens a particle may decode
to, the embedding table as it is now, and the reference's next-token logits at every position of a response."""

from __future__ import annotations

import torch

from vgf_llm.adapters import active_adapter


def special_token_ids(tokenizer) -> set[int]:
    """Ids no particle may decode to: the tokenizer's special tokens and chat markers such as ``<|im_end|>``."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for t, i in tokenizer.get_vocab().items() if t.startswith("<|") and t.endswith("|>"))
    return ids


def movable_mask(ids: torch.Tensor, completion_mask: torch.Tensor, special_ids) -> torch.Tensor:
    """1 where a position may move: a generated token that is not a special token (EOS, pad, chat markers), so a
    decoded response keeps its length and ending."""
    special = torch.tensor(sorted(special_ids), dtype=ids.dtype, device=ids.device)
    return (completion_mask.bool() & ~torch.isin(ids, special)).to(torch.float32)


def full_shape(param: torch.Tensor) -> torch.Size:
    """A tensor's shape, or a DeepSpeed ZeRO-3 parameter's unsharded shape."""
    return getattr(param, "ds_shape", param.shape)


class ReferenceTokens:
    """The reference (``model`` with adapters off) proposing tokens for the particle spaces.

    ``embedding_weight`` is the scorer's embedding table (the particles' coordinates); ``exclude_ids`` are never
    proposed; ``k`` candidates per position.
    """

    def __init__(self, model, embedding_weight: torch.Tensor, *, exclude_ids=(), k: int = 8):
        if k < 2:
            raise ValueError(f"decoder_topk must be >= 2 (the original token and at least one other), got {k}")
        self.model, self.k, self._source = model, k, embedding_weight
        vocab = full_shape(embedding_weight)[0]
        self.allowed = torch.ones(vocab, dtype=torch.bool)
        self.allowed[[i for i in exclude_ids if 0 <= i < vocab]] = False
        if not self.allowed.any():
            raise ValueError("every token is excluded: nothing to decode to")

    @property
    def table(self) -> torch.Tensor:
        """The embedding table as it is now, float32 on the CPU. Read at call time: DeepSpeed ZeRO-3 only holds it
        whole inside a parameter gather (``VGFTrainer.gathered_model``)."""
        w = self._source.detach()
        if w.shape[0] != self.allowed.shape[0]:
            raise RuntimeError("the embedding table is sharded (DeepSpeed ZeRO-3): decode inside a parameter gather, "
                               "e.g. VGFTrainer.gathered_model()")
        return w.float().cpu()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, V] float32 CPU reference logits for every response position from one pass over [prompt | response]
        (position t given the tokens before it); excluded tokens at -inf."""
        device = self.model.device
        full_ids = torch.cat([prompt_ids, ids], 1).to(device)
        full_mask = torch.cat([prompt_mask, torch.ones_like(ids)], 1).to(device)
        with active_adapter(self.model, None):
            # only the T + 1 last positions go through the LM head (the prompt's logits are never needed)
            logits = self.model(input_ids=full_ids, attention_mask=full_mask,
                                position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0),
                                logits_to_keep=ids.shape[1] + 1).logits
        return logits[:, :-1].float().cpu().masked_fill(~self.allowed, -float("inf"))

    def topk(self, ids, prompt_ids, prompt_mask) -> torch.Tensor:
        """[B, T, k] the reference's k most likely allowed tokens at every position (the original may be among them)."""
        return self.logits(ids, prompt_ids, prompt_mask).topk(min(self.k, int(self.allowed.sum())), -1).indices
