"""Test-time VGF: sample N responses from the reference, transport them along the scorer's value, decode,
re-score and select. With ``transport_steps=0`` it is exactly best-of-N with the same seeds and selector.

``SamplerConfig``'s defaults are the test-time winner (docs/benchmarks.md, "Test time"): per-step steering with a
prefix value (``steer_prefix``, 1 step of 0.2 per token), which beat best-of-8, best-of-16 and the checked token
edits (``verified``) on dense rewards, at best-of-N's fluency. On exact-answer rewards every decoder tied best-of-8:
there use ``transport_steps=0``. With a learned reward model as the scorer the likelihood brake is on by default
(``likelihood_weight``, ``vgf_llm.likelihood``): without it the transport climbed the proxy, not the gold. These
defaults are the sampler's own; training has its own (``VGFConfig``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from vgf_llm.adapters import active_adapter
from vgf_llm.likelihood import LikelihoodTilted, ReferenceLikelihood
from vgf_llm.rollout.config import RolloutConfig
from vgf_llm.rollout.hf import Rollouts, tokens_changed
from vgf_llm.rollout.vllm_backend import make_rollout_backend
from vgf_llm.spaces import DECODERS, Budget, Moved, make_space
from vgf_llm.value import RewardModelScorer

# each decoder's measured budget (docs/benchmarks.md: run 7's confirmation for steer_prefix, run 5 for verified)
DEFAULT_BUDGETS = {"steer_prefix": (1, 0.2), "verified": (3, 0.05)}
# the likelihood brake's weight with a learned reward model: one nat of the reward model's Bradley-Terry log-odds
# for one nat per token of the reference's likelihood (chosen before measuring; docs/benchmarks.md, issue 29)
REWARD_MODEL_LIKELIHOOD_WEIGHT = 1.0


def likelihood_weight_for(config: SamplerConfig, scorer) -> float:
    """The brake's weight: the config's, or by default ``REWARD_MODEL_LIKELIHOOD_WEIGHT`` when a reward model
    (a learned proxy of what the caller wants) drives ``steer_prefix``, and 0 for a value model fitted to the
    caller's own reward (there the score is what is judged, and the brake only costs)."""
    if config.likelihood_weight is not None:
        return config.likelihood_weight
    reward_model = isinstance(scorer, RewardModelScorer)
    return REWARD_MODEL_LIKELIHOOD_WEIGHT if reward_model and config.decoder == "steer_prefix" else 0.0


@dataclass
class SamplerConfig(RolloutConfig):
    """The rollouts (``RolloutConfig``), the transport (budget and particle space) and the selection."""

    decoder: Literal["steer_prefix", "verified"] = field(default="steer_prefix", metadata={
        "help": "Particle space: 'steer_prefix' (the model's hidden state at steer_layer, moved at every generated "
                "token along a prefix value fitted to the scorer; the winner) or 'verified' (token swaps proposed "
                "by the scorer's gradient on embedding rows and checked with real scorer passes)."})
    transport_steps: int | None = field(default=None, metadata={
        "help": "L, Adam transport steps (per generated token for steer_prefix); 0 = best-of-N. None: the "
                "decoder's measured budget (steer_prefix 1, verified 3)."})
    transport_step_size: float | None = field(default=None, metadata={
        "help": "eps, the step size (steer_prefix: standard deviations per hidden unit per token). None: the "
                "decoder's measured budget (steer_prefix 0.2, verified 0.05)."})
    transport_alpha: float = field(default=1.0, metadata={"help": "Temperature of the target exp(V / alpha)."})
    transport_radius: float | None = field(default=None, metadata={
        "help": "Cap on each particle row's displacement (None: no cap)."})
    repulsion: bool = field(default=True, metadata={"help": "Keep SVGD's repulsive kernel term."})
    steer_layer: int | None = field(default=None, metadata={
        "help": "steer_prefix: the decoder layer whose output is moved and read by the prefix value (default: half "
                "the model's depth)."})
    decoder_topk: int = field(default=8, metadata={"help": "verified: reference top-k candidates per position."})
    max_edits: int = field(default=5, metadata={"help": "verified: rounds of checked edits per particle."})
    verify_top: int | None = field(default=1, metadata={
        "help": "verified: edit only the best N originals of each prompt (None: all)."})
    verify_candidates: int = field(default=4, metadata={
        "help": "verified: swaps checked with real scorer passes per particle and round."})
    union_margin: float = field(default=0.0, metadata={
        "help": "Pick a transported response only if its selector score beats the best original by this much."})
    likelihood_weight: float | None = field(default=None, metadata={
        "help": "A brake for learned reward models: the particles climb, and are selected by, the score + this x "
                "the reference's mean log-probability per token (vgf_llm.likelihood; 0: the score alone). None: "
                f"{REWARD_MODEL_LIKELIHOOD_WEIGHT:g} with a reward model as the scorer and steer_prefix (measured: "
                "docs/benchmarks.md, 'Test time with a learned reward model'), 0 with a value model fitted to your "
                "reward. steer_prefix only."})

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r}; choose one of {DECODERS}")
        steps, step_size = DEFAULT_BUDGETS[self.decoder]
        self.transport_steps = steps if self.transport_steps is None else self.transport_steps
        self.transport_step_size = step_size if self.transport_step_size is None else self.transport_step_size
        _ = self.budget  # validates the budget's three values, naming the wrong one
        w = self.likelihood_weight
        if w is not None and (w < 0 or not math.isfinite(w)):
            raise ValueError(f"likelihood_weight must be a finite number >= 0, got {w}")
        if w and self.decoder != "steer_prefix":
            raise ValueError(f"likelihood_weight needs decoder='steer_prefix' (decoder={self.decoder!r} moves along "
                             "the scorer's gradient, which the reference's likelihood does not give)")
        super().__post_init__()

    @property
    def budget(self) -> Budget:
        return Budget(self.transport_steps, self.transport_step_size, self.transport_alpha, self.transport_radius,
                      self.repulsion)


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


class VGFSampler:
    """N particles per prompt from the reference (the model with adapters disabled), moved by VGF, then selected.

    scorer:   the value the particles climb (``ValueModel`` or ``RewardModelScorer``).
    selector: picks the response (default: the scorer). Never a checker that needs the answer.
    backend:  rollouts (default: Hugging Face ``generate`` with the config's sampling knobs).
    Selection is among the originals and the transported particles; a transported one wins only if it beats the
    best original by more than ``union_margin``.

    What the particle space reads is fitted by an explicit call: ``fit(rollouts, targets)`` on labelled rollouts
    (e.g. true rewards), or, until it is called, on the scorer's values of each batch before it is moved.
    """

    def __init__(self, model, tokenizer, scorer, config: SamplerConfig | None = None, *, selector=None,
                 backend=None, progress: bool = True):
        self.config = c = config if config is not None else SamplerConfig()
        selector = selector or scorer
        self.likelihood_weight = w = likelihood_weight_for(c, scorer)
        self.likelihood = ReferenceLikelihood(model) if w else None
        if self.likelihood is not None:  # the space fits on, and the selection reads, the tilted scores
            scorer = LikelihoodTilted(scorer, self.likelihood, w)
            selector = scorer if selector is scorer.scorer else LikelihoodTilted(selector, self.likelihood, w)
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.selector, self.progress = selector, progress
        self.space = make_space(c.decoder, model, tokenizer, scorer, c)
        self.backend = backend or make_rollout_backend(model, tokenizer, max_new_tokens=c.max_completion_length,
                                                       temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                                       batch_size=c.prompts_per_generation,
                                                       return_logprobs=self.likelihood is not None)
        self.fitted_on_labels = False
        self.last_moved: Moved | None = None

    def rollout(self, prompts: list, seed: int) -> Rollouts:
        with active_adapter(self.model, None):
            return self.backend.generate(prompts, self.config.num_generations, seed)

    def fit(self, rollouts: Rollouts, targets: torch.Tensor, *, seed: int = 0) -> dict:
        """Fit what the particle space reads on labelled rollouts (targets [G, N], e.g. true rewards); from then on
        batches are moved with that fit instead of one on the scorer's values of each batch."""
        self.fitted_on_labels = True
        if self.likelihood is not None:  # the labels tilted like every score the sampler reads
            targets = targets.float() + self.likelihood_weight * self._score(
                self.likelihood, rollouts.completion_ids, rollouts.completion_mask, rollouts,
                rollouts.logprobs).reshape(targets.shape)
        return self.space.fit(rollouts, targets, seed=seed)

    def sample(self, prompts: list, seed: int = 0) -> list[SampleResult]:
        """One ``SampleResult`` per prompt, ``prompts_per_generation`` prompts at a time."""
        size = self.config.prompts_per_generation
        results = []
        starts = range(0, len(prompts), size)
        for c, s in enumerate(tqdm(starts, desc="vgf", disable=not self.progress)):
            chunk, chunk_seed = prompts[s:s + size], seed * 1_000_003 + c
            results.extend(self.transport_rollouts(chunk, self.rollout(chunk, chunk_seed)))
        return results

    def _score(self, scorer, ids: torch.Tensor, mask: torch.Tensor, ro: Rollouts,
               logprobs: torch.Tensor | None = None) -> torch.Tensor:
        """[G, N] scores; ``logprobs`` (the rollouts' own, [G, N, T]) spare the likelihood's pass of the originals."""
        g, n, t = ids.shape
        p_ids, p_mask, _, _ = ro.flat()
        extra = {} if logprobs is None else {"logprobs": logprobs.reshape(g * n, t)}
        return scorer.score_ids(p_ids, p_mask, ids.reshape(g * n, t), mask.reshape(g * n, t), **extra).reshape(
            g, n).float().cpu()

    def _originals_logprobs(self, ro: Rollouts) -> torch.Tensor | None:
        return ro.logprobs if self.likelihood is not None else None

    def move(self, ro: Rollouts, scores: torch.Tensor | None = None) -> Moved:
        """Transport the rollouts' particles with the budget and decode them (fitting the space on the scorer's
        values of this batch first, unless ``fit`` was given labels; ``scores``: those values, when the caller
        already has them)."""
        if not self.fitted_on_labels:
            if scores is None:
                scores = self._score(self.scorer, ro.completion_ids, ro.completion_mask, ro,
                                     self._originals_logprobs(ro))
            self.space.fit(ro, scores)
        self.last_moved = moved = self.space.move(ro, self.config.budget)
        return moved

    def transport_rollouts(self, prompts: list, ro: Rollouts) -> list[SampleResult]:
        """Transport, decode, re-score and select given rollouts (so several budgets can share one set of samples)."""
        ids, cmask = ro.completion_ids, ro.completion_mask
        before = self._score(self.selector, ids, cmask, ro, self._originals_logprobs(ro))
        moved = self.config.transport_steps > 0
        if moved:
            m = self.move(ro, before if self.selector is self.scorer else None)  # one scorer pass, not two
            new_ids, new_mask, disp = m.ids, m.mask, m.displacement
            after = self._score(self.selector, new_ids, new_mask, ro)
        else:
            new_ids, new_mask, disp, after = ids, cmask, torch.zeros(ids.shape[:2]), before
        changed = tokens_changed(ids, cmask, new_ids, new_mask)
        # a particle the move left as it was keeps its original's score: the originals' likelihood comes from the
        # sampler's log-probabilities (vLLM's kernels), the moved ones' from a teacher-forced pass, and numerical
        # noise between the two must not pick an unchanged "moved" particle
        after = torch.where(changed == 0, before, after)
        out = []
        for g, prompt in enumerate(prompts):
            texts_after = [self.tokenizer.decode(new_ids[g, n][new_mask[g, n].bool()], skip_special_tokens=True)
                           for n in range(ids.shape[1])] if moved else ro.texts[g]
            pick_moved = bool(after[g].max() > before[g].max() + self.config.union_margin)
            chosen = int(after[g].argmax()) if pick_moved else int(before[g].argmax())
            response = texts_after[chosen] if pick_moved else ro.texts[g][chosen]
            particles = [ParticleResult(ro.texts[g][n], texts_after[n], float(before[g, n]), float(after[g, n]),
                                        int(changed[g, n]), float(disp[g, n])) for n in range(ids.shape[1])]
            out.append(SampleResult(prompt, response, chosen, pick_moved, particles))
        return out
