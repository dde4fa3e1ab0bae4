"""Embedding-row particles decoded by token edits among the reference's top-k.

A particle is the [T, d] matrix of input-embedding rows of one response (the scorer's table). The value gradient
moves rows off the token manifold, where a moved row usually stays nearest to its own token and the value model
can be fooled (docs/benchmarks.md), so decoding never projects a row to its nearest token. Instead the move
*proposes* swaps: every reference top-k candidate c at position t gets the first-order value gain of the swap along
the move, <u_t - e_t, e_c - e_t> / ||e_c - e_t|| (HotFlip/GCG-style), and

- ``GainEdits`` ("reference_gain") makes the ``max_edits`` best positive swaps of each response;
- ``VerifiedEdits`` ("verified", the test-time winner) checks the ``verify_candidates`` best swaps of each
  response with real scorer passes on real tokens and keeps the best only if the value rises; up to ``max_edits``
  rounds, only on the ``verify_top`` originals of each prompt with the highest value. A decoded response therefore
  never scores lower than its original under the scorer.
"""

from __future__ import annotations

import torch

from vgf_llm.rollout.hf import Rollouts
from vgf_llm.spaces.base import Particles, value_and_grad
from vgf_llm.spaces.reference import ReferenceTokens, movable_mask, special_token_ids


def swap_gains(table: torch.Tensor, cand: torch.Tensor, current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, T, k] first-order gain of swapping ``current`` [B, T] for ``cand`` [B, T, k] along ``target - e_current``
    (``target`` [B, T, d] moved rows)."""
    e_cur = table[current]
    diff = table[cand] - e_cur[:, :, None]
    return (diff * (target - e_cur)[:, :, None]).sum(-1) / diff.norm(dim=-1).clamp_min(1e-6)


class EmbeddingRows:
    """Lift and gradient of embedding-row particles; subclasses decode."""

    repulsion = True

    def __init__(self, model, scorer, *, exclude_ids=(), topk: int = 8, max_edits: int = 5):
        if max_edits < 1:
            raise ValueError(f"max_edits must be >= 1, got {max_edits}")
        self.scorer, self.max_edits, self.exclude_ids = scorer, max_edits, set(exclude_ids)
        self.reference = ReferenceTokens(model, scorer.embedding_weight, exclude_ids=exclude_ids, k=topk)

    def lift(self, rollouts: Rollouts) -> Particles:
        ids = rollouts.completion_ids
        start = self.scorer.embedding_weight.detach()[ids.to(self.scorer.embedding_weight.device)].float().cpu()
        return Particles(rollouts, start, movable_mask(ids, rollouts.completion_mask, self.exclude_ids))

    def grad(self, particles: Particles, u: torch.Tensor):
        return value_and_grad(self.scorer, particles.rollouts, u)


class GainEdits(EmbeddingRows):
    """The ``max_edits`` reference top-k swaps per response with the largest positive first-order gain along the
    move. Candidates come from one reference pass over the original response: exact for a single edit."""

    @classmethod
    def from_config(cls, model, tokenizer, scorer, config):
        return cls(model, scorer, exclude_ids=special_token_ids(tokenizer), topk=config.decoder_topk,
                   max_edits=config.max_edits)

    @torch.no_grad()
    def decode(self, particles: Particles, moved: torch.Tensor):
        ro = particles.rollouts
        g, n, t = ro.shape
        p_ids, p_mask, ids, c_mask = ro.flat()
        cand = self.reference.topk(ids, p_ids, p_mask)
        target = moved.reshape(g * n, t, -1).float()
        gain = swap_gains(self.reference.table, cand, ids, target)
        ok = particles.mask.reshape(g * n, t).bool()[:, :, None] & (cand != ids[:, :, None])
        best_gain, best_c = gain.masked_fill(~ok, -float("inf")).max(-1)  # [B, T]
        top = best_gain.topk(min(self.max_edits, t), -1)
        new = ids.clone()
        for i, j in (top.values > 0).nonzero().tolist():
            pos = top.indices[i, j]
            new[i, pos] = cand[i, pos, best_c[i, pos]]
        return new.reshape(g, n, t), ro.completion_mask


class VerifiedEdits(EmbeddingRows):
    """Greedy coordinate ascent on the scorer's value, proposed by the transport and checked on real tokens.

    Each round, every reference top-k swap is ranked by its gain towards the moved row, the ``candidates`` best
    swaps of each response are scored exactly (one batched no-grad pass) and the best is kept only if it raises the
    value by more than ``margin``; a response stops at its first round without an improving swap. The reference's
    top-k is recomputed on the current tokens every round. ``top``: only the ``top`` responses of each prompt with
    the highest original value are edited (None: all) when the scorer checks; when ``Particles.verify`` (the
    trainer's true reward) checks, every response is edited and a swap is kept only if it raises that reward.
    """

    def __init__(self, model, scorer, *, exclude_ids=(), topk: int = 8, max_edits: int = 5, candidates: int = 4,
                 top: int | None = 1, margin: float = 0.0):
        super().__init__(model, scorer, exclude_ids=exclude_ids, topk=topk, max_edits=max_edits)
        if candidates < 1 or (top is not None and top < 1):
            raise ValueError(f"verify_candidates and verify_top must be >= 1, got {candidates}, {top}")
        self.candidates, self.top, self.margin = candidates, top, margin
        self.last_stats: dict = {}

    @classmethod
    def from_config(cls, model, tokenizer, scorer, config):
        return cls(model, scorer, exclude_ids=special_token_ids(tokenizer), topk=config.decoder_topk,
                   max_edits=config.max_edits,
                   candidates=config.verify_candidates, top=config.verify_top)

    def _value(self, particles: Particles, rows, p_ids, p_mask, ids, mask) -> torch.Tensor:
        """Exact values of token sequences for flat rows ``rows``: the particles' verifier, else the scorer."""
        if particles.verify is not None:
            return particles.verify(rows, ids, mask).float().cpu().nan_to_num(-float("inf"))
        return self.scorer.score_ids(p_ids[rows], p_mask[rows], ids, mask).float().cpu()

    @torch.no_grad()
    def decode(self, particles: Particles, moved: torch.Tensor):
        ro = particles.rollouts
        g, n, t = ro.shape
        b = g * n
        p_ids, p_mask, ids, mask = ro.flat()
        cur = ids.clone()
        mov = particles.mask.reshape(b, t).bool()
        target = moved.reshape(b, t, -1).float().cpu()
        table = self.reference.table
        value = self._value(particles, torch.arange(b), p_ids, p_mask, cur, mask)
        active = (moved != particles.start).reshape(b, t, -1).any(-1).any(-1).cpu() & mov.any(-1)
        if self.top is not None and self.top < n and particles.verify is None:  # a true-reward check takes all
            ranks = value.view(g, n).argsort(-1, descending=True).argsort(-1).reshape(b)
            active &= ranks < self.top
        start_value, evaluated, rounds = value.clone(), 0, 0
        for _ in range(self.max_edits):
            idx = active.nonzero().squeeze(1)
            if not len(idx):
                break
            rounds += 1
            cand = self.reference.topk(cur[idx], p_ids[idx], p_mask[idx])  # [A, T, k]
            gain = swap_gains(table, cand, cur[idx], target[idx])
            ok = mov[idx][:, :, None] & (cand != cur[idx][:, :, None]) & (gain > 0)
            flat = gain.masked_fill(~ok, -float("inf")).reshape(len(idx), -1)
            top = flat.topk(min(self.candidates, flat.shape[1]), -1)
            a, c = torch.isfinite(top.values).nonzero(as_tuple=True)
            if not len(a):
                break
            which = top.indices[a, c]
            pos, tok = which // cand.shape[-1], cand.reshape(len(idx), -1)[a, which]
            seqs = cur[idx[a]].clone()
            seqs[torch.arange(len(a)), pos] = tok
            vals = self._value(particles, idx[a], p_ids, p_mask, seqs, mask[idx[a]])
            evaluated += len(a)
            best = torch.full((len(idx),), -float("inf"))
            best.scatter_reduce_(0, a, vals, reduce="amax")
            improved = best > value[idx] + self.margin
            for j in improved.nonzero().squeeze(1).tolist():
                pick = ((a == j) & (vals == best[j])).nonzero()[0, 0]
                cur[idx[j]] = seqs[pick]
                value[idx[j]] = best[j]
            active[idx[~improved]] = False
        self.last_stats = dict(value_before=start_value.view(g, n), value_after=value.view(g, n),
                               evaluated=evaluated, rounds=rounds)
        return cur.reshape(g, n, t), ro.completion_mask
