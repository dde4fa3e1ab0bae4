"""Embedding-row particles decoded by checked token edits among the reference's top-k (``verified``).

A particle is the [T, d] matrix of input-embedding rows of one response (the scorer's table). The value gradient
moves rows off the token manifold, where a moved row usually stays nearest to its own token and the value model
can be fooled (docs/benchmarks.md), so decoding never projects a row to its nearest token. Instead the move
*proposes* swaps: every reference top-k candidate c at position t gets the first-order value gain of the swap along
the move, <u_t - e_t, e_c - e_t> / ||e_c - e_t|| (HotFlip/GCG-style). Each round the ``candidates`` best swaps of
each response are checked with real passes of the ``verifier`` on real tokens, and the best is kept only if the
verified value rises; up to ``max_edits`` rounds, only on the ``top`` originals of each prompt with the highest
value. A decoded response therefore never scores lower than its original under the verifier.
"""

from __future__ import annotations

from typing import Protocol

import torch

from vgf_llm.flow import transport
from vgf_llm.rollout.hf import Rollouts
from vgf_llm.spaces.base import Budget, Moved
from vgf_llm.spaces.reference import ReferenceTokens, movable_mask, special_token_ids
from vgf_llm.value import SCORE_CHUNK_ROWS


class Verifier(Protocol):
    """What checks a proposed edit: values [B] of real token sequences (a scorer, or any model with this call)."""

    def score_ids(self, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor: ...


def swap_gains(table: torch.Tensor, cand: torch.Tensor, current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, T, k] first-order gain of swapping ``current`` [B, T] for ``cand`` [B, T, k] along ``target - e_current``
    (``target`` [B, T, d] moved rows)."""
    e_cur = table[current]
    diff = table[cand] - e_cur[:, :, None]
    return (diff * (target - e_cur)[:, :, None]).sum(-1) / diff.norm(dim=-1).clamp_min(1e-6)


def value_and_grad(scorer, rollouts: Rollouts, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scorer's values [G, N] of embedding-row particles ``u`` [G, N, T, d] and d values / d u, forward and
    backward ``SCORE_CHUNK_ROWS`` rows at a time (the scorer's activations never hold all G * N rows)."""
    g, n, t = rollouts.shape
    p_ids, p_mask, _, c_mask = rollouts.flat()
    flat = u.detach().reshape(g * n, t, -1)
    values, grads = [], []
    for s in range(0, g * n, SCORE_CHUNK_ROWS):
        rows = slice(s, s + SCORE_CHUNK_ROWS)
        leaf = flat[rows].requires_grad_(True)
        with torch.enable_grad():
            v = scorer.score_embeds(p_ids[rows], p_mask[rows], leaf, c_mask[rows])
            (grad,) = torch.autograd.grad(v.sum(), leaf)
        values.append(v.detach().cpu())
        grads.append(grad)
    return torch.cat(values).reshape(g, n), torch.cat(grads).reshape(u.shape)


class VerifiedEdits:
    """Greedy coordinate ascent on the verifier's value, proposed by the transport along the scorer's gradient and
    checked on real tokens. ``verifier``: what checks (default: the scorer itself); it is fixed at construction."""

    name = "verified"

    def __init__(self, model, tokenizer, scorer, *, verifier: Verifier | None = None, topk: int = 8,
                 max_edits: int = 5, candidates: int = 4, top: int | None = 1, margin: float = 0.0):
        bad = {k: v for k, v in (("max_edits", max_edits), ("verify_candidates", candidates),
                                 ("verify_top", 1 if top is None else top)) if v < 1}
        if bad:
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in bad.items())}: must be >= 1")
        self.scorer, self.verifier = scorer, verifier if verifier is not None else scorer
        self.exclude_ids = special_token_ids(tokenizer)
        self.reference = ReferenceTokens(model, scorer.embedding_weight, exclude_ids=self.exclude_ids, k=topk)
        self.max_edits, self.candidates, self.top, self.margin = max_edits, candidates, top, margin

    def fit(self, rollouts: Rollouts, targets: torch.Tensor, *, seed: int = 0) -> dict:
        """Nothing to fit: the move reads the scorer and the verifier directly."""
        return {}

    def _value(self, p_ids, p_mask, ids, mask) -> torch.Tensor:
        return self.verifier.score_ids(p_ids, p_mask, ids, mask).float().cpu()

    def lift(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """(start [G, N, T, d]: the responses' embedding rows on the scorer's device, movable mask [G, N, T])."""
        ids = rollouts.completion_ids
        weight = self.scorer.embedding_weight
        start = weight.detach()[ids.to(weight.device)].float()
        return start, movable_mask(ids, rollouts.completion_mask, self.exclude_ids).to(start.device)

    def move(self, rollouts: Rollouts, budget: Budget) -> Moved:
        """The transport of embedding rows along the scorer's gradient, then the checked edits it proposes."""
        start, mask = self.lift(rollouts)
        moved, trace = transport(start, grad_fn=lambda u: value_and_grad(self.scorer, rollouts, u), mask=mask,
                                 **budget.flow_kwargs())
        new_ids, stats = self.decode(rollouts, moved)
        disp = trace.displacement[-1].cpu() if trace.displacement.shape[0] else torch.zeros(rollouts.shape[:2])
        return Moved(new_ids, rollouts.completion_mask, disp, trace, stats)

    @torch.no_grad()
    def decode(self, ro: Rollouts, moved: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Token ids [G, N, T] after the checked edits that ``moved`` rows propose, and their figures."""
        start, movable = (x.cpu() for x in self.lift(ro))
        moved = moved.detach().cpu()
        g, n, t = ro.shape
        b = g * n
        p_ids, p_mask, ids, mask = ro.flat()
        cur = ids.clone()
        mov = movable.reshape(b, t).bool()
        target = moved.reshape(b, t, -1).float()
        table = self.reference.table
        value = self._value(p_ids, p_mask, cur, mask)
        active = (moved != start).reshape(b, t, -1).any(-1).any(-1) & mov.any(-1)
        if self.top is not None and self.top < n:
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
            vals = self._value(p_ids[idx[a]], p_mask[idx[a]], seqs, mask[idx[a]])
            evaluated += len(a)
            best = torch.full((len(idx),), -float("inf"))
            best.scatter_reduce_(0, a, vals, reduce="amax")
            improved = best > value[idx] + self.margin
            for j in improved.nonzero().squeeze(1).tolist():
                pick = ((a == j) & (vals == best[j])).nonzero()[0, 0]
                cur[idx[j]] = seqs[pick]
                value[idx[j]] = best[j]
            active[idx[~improved]] = False
        stats = dict(value_before=start_value.view(g, n), value_after=value.view(g, n), evaluated=evaluated,
                     rounds=rounds)
        return cur.reshape(g, n, t), stats
