"""The reference model's view of a response, shared by the particle spaces: which tokens a particle may decode
to, the embedding table as it is now, and the reference's next-token logits at every position of a response."""

from __future__ import annotations

import torch

from vgf_llm.adapters import active_adapter

REFERENCE_CHUNK_ROWS = 4  # rows per reference pass: the top-k's logits are 4 x tokens x vocabulary at most


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
    def states(self, ids: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, d] the reference's final hidden states that predict each response token (position t given the
        tokens before it), teacher-forced over [prompt | response], on the model's device in its dtype.
        ``REFERENCE_CHUNK_ROWS`` rows per pass; d is far below the vocabulary, so these are what a caller keeps."""
        decoder, device, width = self.model.get_decoder(), self.model.device, prompt_ids.shape[1]
        out = []
        with active_adapter(self.model, None):
            for s in range(0, len(ids), REFERENCE_CHUNK_ROWS):
                rows = slice(s, s + REFERENCE_CHUNK_ROWS)
                full_ids = torch.cat([prompt_ids[rows], ids[rows]], 1).to(device)
                mask = torch.cat([prompt_mask[rows], torch.ones_like(ids[rows])], 1).to(device)
                h = decoder(input_ids=full_ids, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).last_hidden_state
                out.append(h[:, width - 1:-1])
        return torch.cat(out)

    @torch.no_grad()
    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """[..., V] float32 reference logits of final ``states`` [..., d], on their device; excluded tokens at -inf."""
        allowed = self.allowed.to(states.device)
        return self.model.get_output_embeddings()(states).float().masked_fill(~allowed, -float("inf"))

    def topk(self, ids, prompt_ids, prompt_mask) -> torch.Tensor:
        """[B, T, k] the reference's k most likely allowed tokens at every position (the original may be among them),
        on the CPU. Computed on the model's device ``REFERENCE_CHUNK_ROWS`` rows at a time: only the indices leave
        it, never a [B, T, V] logits tensor."""
        k = min(self.k, int(self.allowed.sum()))
        return torch.cat([
            self.logits(self.states(ids[s:s + REFERENCE_CHUNK_ROWS], prompt_ids[s:s + REFERENCE_CHUNK_ROWS],
                                    prompt_mask[s:s + REFERENCE_CHUNK_ROWS])).topk(k, -1).indices.cpu()
            for s in range(0, len(ids), REFERENCE_CHUNK_ROWS)])
