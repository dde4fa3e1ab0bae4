"""Test-time VGF: sample N responses from the reference, transport them along the scorer's gradient, decode,
re-score and select. With ``transport_steps=0`` it is exactly best-of-N with the same seeds and selector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from vgf_llm.decoding import (
    DECODERS,
    ReferenceGainDecoder,
    ReferenceTopKDecoder,
    SoftTokenDecoder,
    VerifiedGainDecoder,
    regenerate_after_first_change,
)
from vgf_llm.flow import transport
from vgf_llm.particles import NearestTokenDecoder, lift, movable_mask
from vgf_llm.rollout import HFGenerateBackend, Rollouts, eos_token_ids, tokens_changed
from vgf_llm.scorers import active_adapter, join_inputs


@dataclass
class ParticleResult:
    text_before: str
    text_after: str
    score_before: float
    score_after: float
    tokens_changed: int
    displacement: float


@dataclass
class SampleResult:
    prompt: object
    response: str  # the selected response
    chosen: int  # index of the chosen particle
    chosen_moved: bool  # whether the chosen response is the transported one (False: an original sample)
    particles: list[ParticleResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TransportBudget:
    steps: int = 0
    step_size: float = 0.1
    alpha: float = 1.0
    step_rule: Literal["sgd", "adam"] = "adam"
    radius: float | None = None
    repulsion: bool = True


def special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for t, i in tokenizer.get_vocab().items() if t.startswith("<|") and t.endswith("|>"))
    return ids


class VGFSampler:
    """N particles per prompt from the reference (the model with adapters disabled), moved by VGF, then selected.

    scorer:   gives the value gradient (``ValueModel`` or ``RewardModelScorer``).
    selector: picks the response at test time (default: the scorer). Never a checker that needs the answer.
    decoder:  "nearest" (nearest embedding row), "reference_topk" (the reference's top-k candidate nearest to the
        moved row, COLD-style) or "reference_gain" (the ``max_edits`` top-k swaps with the largest first-order value
        gain along the displacement) or "verified" (``VerifiedGainDecoder``: the transport proposes reference
        top-k swaps, ``verify_candidates`` of them per response are scored exactly by the scorer on real tokens and
        the best is kept only if the value rises by more than ``verify_margin``; up to ``max_edits`` rounds;
        ``verify_top`` limits editing to the best ``verify_top`` originals of each prompt) or "soft_topk"
        (``SoftTokenDecoder``: particles are logits over each position's reference top-k tokens, moved through the
        mixture of their embeddings; budget steps x step size are in logits; at most ``max_edits`` edits).
    sequential_decoding: reference top-k conditioned on the decoded prefix (exact, one reference step per position)
        or on the original prefix (one pass). Default: sequential unless ``regenerate``, where both are identical.
    regenerate: after decoding, the reference re-samples everything after the first edited token.
    fluency_weight: adds ``w * grad log mu(y | x)`` of the reference (current tokens as targets) to the value
        gradient, i.e. targets mu^w exp(V / alpha): a deviation from the paper's untilted target.
    selection: "final" picks among transported particles only; "union" among originals and transported ones.
    union_margin: with "union", a transported particle is chosen only if its selector score beats the best
        original by more than this margin (0: plain argmax over the union, ties to the original).
    """

    def __init__(self, model, tokenizer, scorer, *, selector=None, num_particles: int = 8,
                 budget: TransportBudget | None = None,
                 decoder: Literal["nearest", "reference_topk", "reference_gain", "verified", "soft_topk"] = "nearest",
                 max_edits: int = 1,
                 topk: int = 8, metric: Literal["l2", "cosine"] = "l2", regenerate: bool = False,
                 sequential_decoding: bool | None = None,
                 fluency_weight: float = 0.0, selection: Literal["final", "union"] = "final",
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 batch_size: int = 4, backend=None, progress: bool = True, verify_candidates: int = 8,
                 verify_margin: float = 0.0, verify_top: int | None = None, union_margin: float = 0.0):
        if num_particles < 1:
            raise ValueError("num_particles must be >= 1")
        if selection not in ("final", "union") or decoder not in DECODERS:
            raise ValueError(f"bad selection/decoder: {selection!r}/{decoder!r}")
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.selector = selector or scorer
        self.num_particles, self.budget = num_particles, budget or TransportBudget()
        self.regenerate, self.fluency_weight, self.selection = regenerate, fluency_weight, selection
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.batch_size, self.progress, self.union_margin = batch_size, progress, union_margin
        self.special = special_token_ids(tokenizer)
        self.eos = eos_token_ids(model, tokenizer)
        self.backend = backend or HFGenerateBackend(model, tokenizer, max_new_tokens=max_new_tokens,
                                                    temperature=temperature, top_p=top_p, top_k=top_k,
                                                    batch_size=batch_size)
        weight = scorer.embedding_weight
        self._fluency_targets = NearestTokenDecoder(model.get_input_embeddings().weight) if fluency_weight else None
        sequential = (not regenerate) if sequential_decoding is None else sequential_decoding
        if decoder == "soft_topk":
            self.decoder = SoftTokenDecoder(model, k=topk, max_edits=max_edits, exclude_ids=self.special,
                                            embedding_weight=weight)
        elif decoder == "verified":
            self.decoder = VerifiedGainDecoder(model, self._value_of_ids, k=topk, max_edits=max_edits,
                                               candidates=verify_candidates, margin=verify_margin, top=verify_top,
                                               exclude_ids=self.special, embedding_weight=weight)
        elif decoder == "reference_gain":
            self.decoder = ReferenceGainDecoder(model, k=topk, max_edits=max_edits, exclude_ids=self.special,
                                                embedding_weight=weight)
        elif decoder == "reference_topk":
            self.decoder = ReferenceTopKDecoder(model, k=topk, exclude_ids=self.special, metric=metric,
                                                embedding_weight=weight, sequential=sequential)
        else:
            self.decoder = NearestTokenDecoder(weight, exclude_ids=self.special, metric=metric)

    # -- pieces -------------------------------------------------------------------------------------------------
    def rollout(self, prompts: list, seed: int) -> Rollouts:
        with active_adapter(self.model, None):
            return self.backend.generate(prompts, self.num_particles, seed)

    def _score(self, scorer, ro_prompt_ids, ro_prompt_mask, ids, mask) -> torch.Tensor:
        g, n, t = ids.shape
        return scorer.score_ids(ro_prompt_ids.repeat_interleave(n, 0), ro_prompt_mask.repeat_interleave(n, 0),
                                ids.reshape(g * n, t), mask.reshape(g * n, t)).reshape(g, n).float().cpu()

    def _value_of_ids(self, prompt_ids, prompt_mask, ids, mask) -> torch.Tensor:
        """[B] scorer values of real token sequences (one prompt row per sequence)."""
        return self.scorer.score_ids(prompt_ids, prompt_mask, ids, mask).float().cpu()

    def _grad_fn(self, prompt_ids, prompt_mask, completion_mask, rows_of=None):
        """Values and their gradient w.r.t. the particles; ``rows_of`` maps particles to embedding rows when the
        particles are not rows themselves (soft tokens)."""
        g, n, t = completion_mask.shape
        p_ids, p_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
        r_mask = completion_mask.reshape(g * n, t)

        def grad_fn(u):
            particle = u.detach().requires_grad_(True)
            with torch.enable_grad():
                rows = rows_of(particle) if rows_of else particle
                leaf = rows.reshape(g * n, t, -1)
                values = self.scorer.score_embeds(p_ids, p_mask, leaf, r_mask)
                objective = values.sum()
                if self.fluency_weight:
                    objective = objective + self.fluency_weight * self._reference_logprob(p_ids, p_mask, leaf,
                                                                                          r_mask).sum()
                (grad,) = torch.autograd.grad(objective, particle)
            return values.detach().reshape(g, n), grad

        return grad_fn

    def _reference_logprob(self, p_ids, p_mask, rows, r_mask) -> torch.Tensor:
        """log mu(y | x) with the rows' current nearest tokens as targets; gradients flow through the context."""
        emb = self.model.get_input_embeddings().weight
        targets = self._fluency_targets.nearest(rows.detach())
        inputs, mask, positions = join_inputs(emb, p_ids, p_mask, rows, r_mask)
        with active_adapter(self.model, None):
            logits = self.model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).logits
        p = p_ids.shape[1]
        logp = torch.log_softmax(logits[:, p - 1:-1].float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        return (logp * r_mask).sum(-1)

    # -- the whole thing ----------------------------------------------------------------------------------------
    def sample(self, prompts: list, seed: int = 0) -> list[SampleResult]:
        """One ``SampleResult`` per prompt, processed ``batch_size`` prompts at a time."""
        results = []
        starts = range(0, len(prompts), self.batch_size)
        for c, s in enumerate(tqdm(starts, desc="vgf", disable=not self.progress)):
            results.extend(self._sample_chunk(prompts[s:s + self.batch_size], seed * 1_000_003 + c))
        return results

    def _sample_chunk(self, prompts: list, seed: int) -> list[SampleResult]:
        return self.transport_rollouts(prompts, self.rollout(prompts, seed), seed)

    def transport_rollouts(self, prompts: list, ro: Rollouts, seed: int = 0) -> list[SampleResult]:
        """Transport, decode, re-score and select given rollouts (so several budgets can share one set of samples)."""
        ids, cmask = ro.completion_ids, ro.completion_mask
        before = self._score(self.selector, ro.prompt_ids, ro.prompt_mask, ids, cmask)
        new_ids, new_mask, disp = ids, cmask, torch.zeros(ids.shape[:2])
        if self.budget.steps > 0:
            new_ids, new_mask, disp = self.move(ro, seed)
        after = before if new_ids is ids else self._score(self.selector, ro.prompt_ids, ro.prompt_mask, new_ids,
                                                          new_mask)
        out = []
        for g, prompt in enumerate(prompts):
            texts_after = ro.texts[g] if new_ids is ids else [
                self.tokenizer.decode(new_ids[g, n][new_mask[g, n].bool()], skip_special_tokens=True)
                for n in range(ids.shape[1])]
            changed = tokens_changed(ids[g], cmask[g], new_ids[g], new_mask[g]).tolist()
            if self.selection == "union":
                moved = bool(after[g].max() > before[g].max() + self.union_margin)
                chosen = int(after[g].argmax()) if moved else int(before[g].argmax())
            else:
                chosen, moved = int(after[g].argmax()), new_ids is not ids
            response = texts_after[chosen] if moved else ro.texts[g][chosen]
            particles = [ParticleResult(ro.texts[g][n], texts_after[n], float(before[g, n]), float(after[g, n]),
                                        changed[n], float(disp[g, n])) for n in range(ids.shape[1])]
            out.append(SampleResult(prompt, response, chosen, bool(moved), particles))
        return out

    def move(self, ro: Rollouts, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transport the rollouts' particles with the budget and decode them: (ids [G, N, T], mask, displacement
        [G, N]). The trainer distils these; ``transport_rollouts`` selects among them."""
        ids, cmask = ro.completion_ids, ro.completion_mask
        movable = movable_mask(ids, cmask, self.special)
        b = self.budget
        if isinstance(self.decoder, SoftTokenDecoder):
            # particles are logits over each position's reference candidates; their rows come from the mixture.
            # Repulsion is off: logits of different particles index different candidate sets.
            candidates = self.decoder.candidates(ids, ro.prompt_ids, ro.prompt_mask)
            grad_fn = self._grad_fn(ro.prompt_ids, ro.prompt_mask, cmask,
                                    rows_of=lambda z: self.decoder.rows(z, candidates))
            moved, trace = transport(self.decoder.start(candidates), grad_fn=grad_fn, steps=b.steps,
                                     step_size=b.step_size, alpha=b.alpha, step_rule=b.step_rule, radius=b.radius,
                                     repulsion=False, mask=movable)
            new_ids = self.decoder.decode_soft(moved, candidates, ids, movable)
            return self._finish(ro, new_ids, trace, seed)
        start = lift(self.scorer.embedding_weight, ids).float()
        moved, trace = transport(start, grad_fn=self._grad_fn(ro.prompt_ids, ro.prompt_mask, cmask),
                                 steps=b.steps, step_size=b.step_size, alpha=b.alpha, step_rule=b.step_rule,
                                 radius=b.radius, repulsion=b.repulsion, mask=movable)
        if isinstance(self.decoder, VerifiedGainDecoder):
            new_ids = self.decoder.decode(moved, start, ids, movable, ro.prompt_ids, ro.prompt_mask, cmask)
        elif isinstance(self.decoder, ReferenceTopKDecoder):
            new_ids = self.decoder.decode(moved, start, ids, movable, ro.prompt_ids, ro.prompt_mask)
        else:
            new_ids = self.decoder.decode(moved, start, ids, movable)
        return self._finish(ro, new_ids, trace, seed)

    def _finish(self, ro: Rollouts, new_ids: torch.Tensor, trace, seed: int):
        """Optional re-generation after the first edit; the move's (ids, mask, displacement)."""
        ids, cmask = ro.completion_ids, ro.completion_mask
        new_mask = cmask
        if self.regenerate:
            new_ids, new_mask = regenerate_after_first_change(
                self.model, self.tokenizer, ro.prompt_ids, ro.prompt_mask, new_ids, ids, cmask, eos_ids=self.eos,
                max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k, seed=seed + 7)
        self.last_trace = trace  # the trainer logs its non-finite count
        disp = trace.displacement[-1] if trace.displacement.shape[0] else torch.zeros(ids.shape[:2])
        return new_ids, new_mask, disp


def best_of_n(model, tokenizer, selector, prompts: list, *, num_particles: int, seed: int = 0, batch_size: int = 4,
              **generation) -> list[tuple[str, int]]:
    """Plain best-of-N (the L = 0 reference point): sample N, score with the selector, keep the argmax.

    Written without the transport machinery so tests can hold ``VGFSampler(steps=0)`` against it.
    """
    backend = HFGenerateBackend(model, tokenizer, batch_size=batch_size, **generation)
    picks = []
    for c, s in enumerate(range(0, len(prompts), batch_size)):
        with active_adapter(model, None):
            ro = backend.generate(prompts[s:s + batch_size], num_particles, seed * 1_000_003 + c)
        g, n, t = ro.completion_ids.shape
        scores = selector.score_ids(ro.prompt_ids.repeat_interleave(n, 0), ro.prompt_mask.repeat_interleave(n, 0),
                                    ro.completion_ids.reshape(g * n, t), ro.completion_mask.reshape(g * n, t))
        best = scores.reshape(g, n).argmax(-1)
        picks.extend((ro.texts[i][int(best[i])], int(best[i])) for i in range(g))
    return picks
