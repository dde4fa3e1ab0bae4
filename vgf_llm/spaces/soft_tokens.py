"""Soft-token particles: each response position is a distribution over the reference's top-k tokens there.

Instead of free embedding rows (which leave the token manifold, where the value model is fooled), a particle is a
logit vector z_t over k candidates per position: the original token in slot 0, then the reference's top k - 1 other
next tokens given the original prefix. Its embedding row is softmax(z_t) @ E[candidates], so every point the flow
visits is a convex mix of plausible tokens. The start puts ``init_margin`` logits between the original token and
the others (the start row is almost exactly the original embedding); the flow moves z along the value gradient
(chain rule through the mixture; the step size is in logits), and decoding takes the candidate that overtook the
original at the ``max_edits`` positions with the largest margins. No repulsion: the logits of two particles index
different candidate sets, so a kernel between them means nothing.
"""

from __future__ import annotations

import torch

from vgf_llm.rollout.hf import Rollouts
from vgf_llm.spaces.base import Particles, value_and_grad
from vgf_llm.spaces.reference import ReferenceTokens, movable_mask, special_token_ids


class SoftTokens:
    repulsion = False

    def __init__(self, model, scorer, *, exclude_ids=(), topk: int = 8, max_edits: int = 3,
                 init_margin: float = 6.0):
        if max_edits < 1 or init_margin <= 0:
            raise ValueError(f"max_edits must be >= 1 and init_margin > 0, got {max_edits}, {init_margin}")
        self.scorer, self.max_edits, self.init_margin = scorer, max_edits, init_margin
        self.exclude_ids = set(exclude_ids)
        self.reference = ReferenceTokens(model, scorer.embedding_weight, exclude_ids=exclude_ids, k=topk)

    @classmethod
    def from_config(cls, model, tokenizer, scorer, config):
        return cls(model, scorer, exclude_ids=special_token_ids(tokenizer), topk=config.decoder_topk,
                   max_edits=config.max_edits)

    def lift(self, rollouts: Rollouts) -> Particles:
        g, n, t = rollouts.shape
        p_ids, p_mask, ids, _ = rollouts.flat()
        candidates = self.reference.candidates(ids, p_ids, p_mask).reshape(g, n, t, -1)
        z = torch.full(candidates.shape, -self.init_margin)
        z[..., 0] = 0.0
        mask = movable_mask(rollouts.completion_ids, rollouts.completion_mask, self.exclude_ids)
        return Particles(rollouts, z, mask, {"candidates": candidates, "table": self.reference.table})

    @staticmethod
    def rows(z: torch.Tensor, particles: Particles) -> torch.Tensor:
        """Embedding rows [G, N, T, d] of logits ``z`` (differentiable in z)."""
        emb = particles.state["table"][particles.state["candidates"]]
        return torch.softmax(z.float(), -1)[..., None, :].matmul(emb).squeeze(-2)

    def grad(self, particles: Particles, u: torch.Tensor):
        return value_and_grad(self.scorer, particles.rollouts, u, lambda z: self.rows(z, particles))

    def decode(self, particles: Particles, moved: torch.Tensor):
        ro = particles.rollouts
        g, n, t, _ = moved.shape
        best, which = moved[..., 1:].max(-1)
        margin = (best - moved[..., 0]).masked_fill(~particles.mask.bool(), -float("inf")).reshape(g * n, t)
        top = margin.topk(min(self.max_edits, t), -1)
        new = ro.completion_ids.reshape(g * n, t).clone()
        cand, pick = particles.state["candidates"].reshape(g * n, t, -1), which.reshape(g * n, t)
        for i, j in (top.values > 0).nonzero().tolist():
            pos = int(top.indices[i, j])
            new[i, pos] = cand[i, pos, 1 + pick[i, pos]]
        return new.reshape(g, n, t), ro.completion_mask
