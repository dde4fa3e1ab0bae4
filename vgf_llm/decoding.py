"""Decoders that consult the reference model, so moved particles decode to text the reference finds plausible.

- ``ReferenceTopKDecoder`` (after COLD decoding): position t is decoded among the reference's top-k next tokens,
  plus the original token; the candidate nearest to the moved row wins. Small moves therefore keep the original
  tokens, and edits stay on the reference's support. ``sequential=True`` conditions each position on the decoded
  prefix (one reference step per position); ``sequential=False`` on the original prefix (one forward pass, ~T times
  cheaper), which is exact up to and including the first edit, i.e. for everything re-generation keeps.
- ``ReferenceGainDecoder`` / ``VerifiedGainDecoder``: swaps ranked by their first-order value gain along the
  displacement (the verified one checks each proposal with a real value pass).
- ``SoftTokenDecoder``: the particles themselves are distributions over each position's reference candidates.
- ``regenerate_after_first_change``: keep the decoded response up to its first edited token and let the
  reference sample the rest, so one gradient-chosen edit is followed by a fluent continuation.
"""

from __future__ import annotations

import torch

from vgf_llm.particles import NearestTokenDecoder
from vgf_llm.rollout import completion_mask_from_ids
from vgf_llm.scorers import active_adapter

# the particle decoders VGFSampler (and so VGFTrainer) accepts by name
DECODERS = ("nearest", "reference_topk", "reference_gain", "verified", "soft_topk")


def _left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


class ReferenceTopKDecoder:
    """Decode moved rows among the reference model's top-k candidates, left to right, with a KV cache."""

    def __init__(self, model, *, k: int = 8, exclude_ids=(), metric: str = "l2", embedding_weight=None,
                 sequential: bool = True):
        self.model, self.k, self.sequential = model, k, sequential
        weight = model.get_input_embeddings().weight if embedding_weight is None else embedding_weight
        self.nearest = NearestTokenDecoder(weight, exclude_ids=exclude_ids, metric=metric)

    @torch.no_grad()
    def decode(self, moved, start, ids, movable, prompt_ids, prompt_mask) -> torch.Tensor:
        """moved/start [G, N, T, d], ids/movable [G, N, T], prompt [G, P] -> new ids [G, N, T]."""
        g, n, t = ids.shape
        changed = movable.bool() & (moved != start).any(-1)
        if not changed.any():
            return ids.clone()
        flat_ids, flat_changed = ids.reshape(g * n, t), changed.reshape(g * n, t)
        rows = moved.reshape(g * n, t, -1)
        p_ids = prompt_ids.repeat_interleave(n, 0).to(self.model.device)
        p_mask = prompt_mask.repeat_interleave(n, 0).to(self.model.device)
        new = flat_ids.clone()
        if not self.sequential:
            return self._decode_teacher_forced(rows, flat_ids, flat_changed, p_ids, p_mask).reshape(g, n, t)
        with active_adapter(self.model, None):
            out = self.model(input_ids=p_ids, attention_mask=p_mask,
                             position_ids=(p_mask.cumsum(-1) - 1).clamp_min(0), use_cache=True)
            cache, logits, mask = out.past_key_values, out.logits[:, -1], p_mask
            for pos in range(t):
                need = flat_changed[:, pos]
                if need.any():  # the original token always competes with the top-k
                    choice = self._choose(logits, flat_ids[:, pos], rows[:, pos])
                    new[:, pos] = torch.where(need, choice, flat_ids[:, pos])
                if pos == t - 1 or not flat_changed[:, pos + 1:].any():
                    break
                # rows past their EOS are never edited, so what they attend to does not matter
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = self.model(input_ids=new[:, pos:pos + 1].to(self.model.device), attention_mask=mask,
                                 position_ids=(mask.sum(-1, keepdim=True) - 1), past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1]
        return new.reshape(g, n, t)

    def _choose(self, logits, original, rows):
        """Among the top-k of ``logits`` [B, V] plus ``original`` [B], the candidate nearest to ``rows`` [B, d]."""
        (table, _), allowed, metric = self.nearest.tables(), self.nearest.allowed, self.nearest.metric
        cand = logits.float().masked_fill(~allowed.to(logits.device), -float("inf"))
        cand = cand.topk(min(self.k, int(allowed.sum())), dim=-1).indices.cpu()
        cand = torch.cat([cand, original[:, None]], dim=1)
        emb = table[cand]
        r = rows.float()
        if metric == "cosine":
            score = (emb * torch.nn.functional.normalize(r, dim=-1)[:, None]).sum(-1)
        else:
            score = -((emb - r[:, None]) ** 2).sum(-1)
        return cand[torch.arange(len(cand)), score.argmax(-1)]

    @torch.no_grad()
    def _teacher_forced_logits(self, ids, p_ids, p_mask) -> torch.Tensor:
        """[B, T, V] reference logits for every response position from one pass over [prompt | response]."""
        full_ids = torch.cat([p_ids, ids.to(p_ids.device)], 1)
        full_mask = torch.cat([p_mask, torch.ones_like(ids, device=p_mask.device)], 1)
        with active_adapter(self.model, None):
            # only the T + 1 last positions go through the LM head (the prompt's logits are never needed)
            logits = self.model(input_ids=full_ids, attention_mask=full_mask,
                                position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0),
                                logits_to_keep=ids.shape[1] + 1).logits
        return logits[:, :-1]  # position t is predicted from everything before it

    @torch.no_grad()
    def candidates(self, ids, prompt_ids, prompt_mask, batch_size: int = 32) -> torch.Tensor:
        """ids [G, N, T] -> [G, N, T, k] token ids: the original token in slot 0, then the reference's top k - 1
        other tokens at that position given the original prefix (``batch_size`` sequences per reference pass)."""
        g, n, t = ids.shape
        flat = ids.reshape(g * n, t)
        p_ids, p_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
        allowed = self.nearest.allowed.cpu()
        out = []
        for s in range(0, g * n, batch_size):
            chunk = flat[s:s + batch_size]
            logits = self._teacher_forced_logits(chunk, p_ids[s:s + batch_size].to(self.model.device),
                                                 p_mask[s:s + batch_size].to(self.model.device)).float().cpu()
            logits = logits.masked_fill(~allowed, -float("inf"))
            logits.scatter_(-1, chunk[:, :, None], -float("inf"))  # the original goes to slot 0, never twice
            others = logits.topk(min(self.k, int(allowed.sum())) - 1, -1).indices
            out.append(torch.cat([chunk[:, :, None], others], -1))
        return torch.cat(out).reshape(g, n, t, -1)

    def _decode_teacher_forced(self, rows, ids, changed, p_ids, p_mask):
        """Candidates for every position from one reference pass over [prompt | original response]."""
        logits = self._teacher_forced_logits(ids, p_ids, p_mask)
        new = ids.clone()
        pos = changed.nonzero()
        if len(pos):
            chosen = self._choose(logits[pos[:, 0], pos[:, 1]], ids[pos[:, 0], pos[:, 1]], rows[pos[:, 0], pos[:, 1]])
            new[pos[:, 0], pos[:, 1]] = chosen
        return new


@torch.no_grad()
def regenerate_after_first_change(model, tokenizer, prompt_ids, prompt_mask, new_ids, old_ids, completion_mask,
                                  *, eos_ids: set[int], max_new_tokens: int, temperature: float = 1.0,
                                  top_p: float = 1.0, top_k: int = 0, seed: int = 0):
    """Keep each edited response up to and including its first changed token; the reference samples the rest.

    Responses without an edit are returned unchanged. Returns (ids [G, N, T'], mask [G, N, T']).
    """
    g, n, t = new_ids.shape
    pad = tokenizer.pad_token_id
    diff = (new_ids != old_ids) & completion_mask.bool()
    edited = diff.any(-1).reshape(-1)
    flat_new, flat_mask = new_ids.reshape(g * n, t), completion_mask.reshape(g * n, t)
    results = [flat_new[i][flat_mask[i].bool()] for i in range(g * n)]
    if edited.any():
        first = diff.reshape(g * n, t).long().argmax(-1)
        todo = edited.nonzero().squeeze(1).tolist()
        rows = [torch.cat([prompt_ids[i // n][prompt_mask[i // n].bool()], flat_new[i, :first[i] + 1]]) for i in todo]
        ids, mask = _left_pad(rows, pad)
        torch.manual_seed(seed)
        with active_adapter(model, None):
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=temperature > 0, temperature=temperature or None, top_p=top_p, top_k=top_k,
                                 max_new_tokens=max(1, max_new_tokens - int(first[todo].min()) - 1),
                                 pad_token_id=pad, eos_token_id=sorted(eos_ids))
        cont = out[:, ids.shape[1]:].cpu()
        cont_mask = completion_mask_from_ids(cont, eos_ids, pad)
        for j, i in enumerate(todo):
            prefix = flat_new[i, :first[i] + 1]
            ends_in_eos = bool(torch.isin(prefix[-1:], torch.tensor(sorted(eos_ids))).any())
            tail = cont[j][cont_mask[j].bool()] if not ends_in_eos else cont[j][:0]
            results[i] = torch.cat([prefix, tail])[:max_new_tokens]
    width = max(len(r) for r in results)
    out_ids = torch.full((g * n, width), pad, dtype=torch.long)
    out_mask = torch.zeros((g * n, width), dtype=torch.long)
    for i, r in enumerate(results):
        out_ids[i, : len(r)] = r
        out_mask[i, : len(r)] = 1
    return out_ids.view(g, n, width), out_mask.view(g, n, width)


class ReferenceGainDecoder(ReferenceTopKDecoder):
    """Edit each response where the transport points *towards* a plausible token, not where it lands.

    The value gradient moves rows off the token manifold, so the moved row usually stays nearest to its own token
    (docs/benchmarks.md). Here every reference top-k candidate c at position t gets the first-order value gain of
    the swap along the displacement, <u_t - u0_t, e_c - e_t> / ||e_c - e_t|| (HotFlip/GCG-style), and the
    ``max_edits`` best positive swaps per response are made. Candidates come from one reference pass over the
    original response: exact for a single edit, and for everything before the first edit.
    """

    def __init__(self, model, *, k: int = 8, max_edits: int = 1, exclude_ids=(), embedding_weight=None):
        super().__init__(model, k=k, exclude_ids=exclude_ids, embedding_weight=embedding_weight, sequential=False)
        if max_edits < 1:
            raise ValueError(f"max_edits must be >= 1, got {max_edits}")
        self.max_edits = max_edits

    @torch.no_grad()
    def decode(self, moved, start, ids, movable, prompt_ids, prompt_mask) -> torch.Tensor:
        g, n, t = ids.shape
        b = g * n
        flat_ids = ids.reshape(b, t)
        delta = (moved - start).reshape(b, t, -1).float()
        p_ids = prompt_ids.repeat_interleave(n, 0).to(self.model.device)
        p_mask = prompt_mask.repeat_interleave(n, 0).to(self.model.device)
        logits = self._teacher_forced_logits(flat_ids, p_ids, p_mask).float().cpu()
        allowed = self.nearest.allowed.cpu()
        cand = logits.masked_fill(~allowed, -float("inf")).topk(min(self.k, int(allowed.sum())), -1).indices
        table = self.nearest.weight.float().cpu()
        diff = table[cand] - table[flat_ids][:, :, None]  # [B, T, k, d]
        gain = (diff * delta[:, :, None]).sum(-1) / diff.norm(dim=-1).clamp_min(1e-6)
        ok = movable.reshape(b, t).bool()[:, :, None] & (cand != flat_ids[:, :, None])
        gain = gain.masked_fill(~ok, -float("inf"))
        best_gain, best_c = gain.max(-1)  # [B, T]
        top = best_gain.topk(min(self.max_edits, t), -1)
        new = flat_ids.clone()
        for i in range(b):
            for value, pos in zip(top.values[i], top.indices[i], strict=True):
                if value > 0:
                    new[i, pos] = cand[i, pos, best_c[i, pos]]
        return new.reshape(g, n, t)


class VerifiedGainDecoder(ReferenceTopKDecoder):
    """Greedy coordinate ascent on the value, proposed by the transport and checked with real forward passes.

    The value gradient moves rows off the token manifold, where the value model can be fooled (docs/benchmarks.md).
    Here the transport only *proposes*: each round, every reference top-k swap (c at position t) is ranked by its
    first-order gain towards the moved row, <u_t - e_cur_t, e_c - e_cur_t> / ||e_c - e_cur_t||, the ``candidates``
    best swaps of each response are scored exactly by ``value_fn`` on real tokens (one batched no-grad pass), and
    the best one is kept only if it raises the value by more than ``margin``. Up to ``max_edits`` rounds; a response
    stops at its first round without an improving swap, so the decoded response never scores lower than the
    original under ``value_fn``. The reference's top-k is recomputed on the current tokens every round.
    ``top`` (optional): only the ``top`` responses of each prompt with the highest original value are edited.
    """

    def __init__(self, model, value_fn, *, k: int = 8, max_edits: int = 3, candidates: int = 8, margin: float = 0.0,
                 top: int | None = None, exclude_ids=(), embedding_weight=None):
        super().__init__(model, k=k, exclude_ids=exclude_ids, embedding_weight=embedding_weight, sequential=False)
        if max_edits < 1 or candidates < 1 or (top is not None and top < 1):
            raise ValueError(f"max_edits, candidates and top must be >= 1, got {max_edits}, {candidates}, {top}")
        self.value_fn, self.max_edits, self.candidates = value_fn, max_edits, candidates
        self.margin, self.top = margin, top
        self.last_stats: dict = {}

    @torch.no_grad()
    def decode(self, moved, start, ids, movable, prompt_ids, prompt_mask, completion_mask) -> torch.Tensor:
        g, n, t = ids.shape
        b = g * n
        cur = ids.reshape(b, t).clone()
        mask = completion_mask.reshape(b, t)
        mov = movable.reshape(b, t).bool()
        p_ids, p_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
        device = self.model.device
        target = moved.reshape(b, t, -1).float().cpu()
        table = self.nearest.weight.float().cpu()
        allowed = self.nearest.allowed.cpu()
        value = self.value_fn(p_ids, p_mask, cur, mask).float().cpu()
        active = (moved != start).reshape(b, t, -1).any(-1).any(-1).cpu() & mov.any(-1)
        if self.top is not None and self.top < n:
            ranks = value.view(g, n).argsort(-1, descending=True).argsort(-1).reshape(b)
            active &= ranks < self.top
        start_value, evaluated, rounds = value.clone(), 0, 0
        for _ in range(self.max_edits):
            idx = active.nonzero().squeeze(1)
            if not len(idx):
                break
            rounds += 1
            logits = self._teacher_forced_logits(cur[idx], p_ids[idx].to(device), p_mask[idx].to(device))
            logits = logits.float().cpu().masked_fill(~allowed, -float("inf"))
            cand = logits.topk(min(self.k, int(allowed.sum())), -1).indices  # [A, T, k]
            e_cur = table[cur[idx]]  # [A, T, d]
            diff = table[cand] - e_cur[:, :, None]
            gain = (diff * (target[idx] - e_cur)[:, :, None]).sum(-1) / diff.norm(dim=-1).clamp_min(1e-6)
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
            vals = self.value_fn(p_ids[idx[a]], p_mask[idx[a]], seqs, mask[idx[a]]).float().cpu()
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
        return cur.reshape(g, n, t)


class SoftTokenDecoder(ReferenceTopKDecoder):
    """Soft-token particles: each response position is a distribution over the reference's top-k tokens there.

    Instead of moving free embedding rows (which leave the token manifold, where the value model is fooled), the
    particle is a logit vector z_t over k candidates per position: the reference's top-k next tokens given the
    original prefix, with the original token always in slot 0. Its embedding row is softmax(z_t) @ E[candidates],
    so every point the transport visits is a convex mix of plausible tokens. The start puts ``init_margin`` logits
    between the original token and the others (the start row is almost exactly the original embedding); the
    transport moves z along the value gradient (chain rule through the mixture), and decoding takes the argmax
    candidate where it overtook the original, at most ``max_edits`` positions per response (largest margins first).
    """

    def __init__(self, model, *, k: int = 8, max_edits: int = 3, init_margin: float = 6.0, exclude_ids=(),
                 embedding_weight=None):
        super().__init__(model, k=k, exclude_ids=exclude_ids, embedding_weight=embedding_weight, sequential=False)
        if max_edits < 1 or init_margin <= 0:
            raise ValueError(f"max_edits must be >= 1 and init_margin > 0, got {max_edits}, {init_margin}")
        self.max_edits, self.init_margin = max_edits, init_margin

    def start(self, candidates: torch.Tensor) -> torch.Tensor:
        """Logits [G, N, T, k]: 0 for the original token, -init_margin for the others."""
        z = torch.full(candidates.shape, -self.init_margin)
        z[..., 0] = 0.0
        return z

    def rows(self, z: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Embedding rows [G, N, T, d] of the particles (differentiable in z)."""
        table = self.nearest.weight
        return torch.softmax(z.float(), -1)[..., None, :].matmul(table[candidates].float()).squeeze(-2)

    def decode_soft(self, z: torch.Tensor, candidates: torch.Tensor, ids: torch.Tensor,
                    movable: torch.Tensor) -> torch.Tensor:
        """The argmax candidate where it beats the original, at most ``max_edits`` positions per response."""
        g, n, t, _ = z.shape
        best, which = z[..., 1:].max(-1)
        margin = (best - z[..., 0]).masked_fill(~movable.bool(), -float("inf")).reshape(g * n, t)
        top = margin.topk(min(self.max_edits, t), -1)
        new = ids.reshape(g * n, t).clone()
        flat_cand, flat_which = candidates.reshape(g * n, t, -1), which.reshape(g * n, t)
        for i, pos in (top.values > 0).nonzero().tolist():
            p = int(top.indices[i, pos])
            new[i, p] = flat_cand[i, p, 1 + flat_which[i, p]]
        return new.reshape(g, n, t)
