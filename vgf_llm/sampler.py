"""Test-time VGF: sample N responses from the reference, transport them along the scorer's gradient, decode,
re-score and select. With ``transport_steps=0`` it is exactly best-of-N with the same seeds and selector.

``TransportConfig`` holds the knobs the sampler and the trainer share (rollouts, budget, particle space), and
``SamplerConfig`` adds test-time selection. Their defaults are the one set in the code: the best arm of
benchmarks/test_time.py run 5 (``verified5-top1-c4-b3+union``, docs/benchmarks.md). On exact-answer rewards it lost
to best-of-N: there use ``transport_steps=0`` or a ``union_margin`` of 0.2 or more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from vgf_llm.flow import TransportTrace, transport
from vgf_llm.rollout.hf import Rollouts, tokens_changed
from vgf_llm.rollout.vllm_backend import make_rollout_backend
from vgf_llm.spaces import DECODERS, make_space
from vgf_llm.value import active_adapter


@dataclass
class TransportConfig:
    """How particles are drawn (TRL's names), how far they may move, and in which space."""

    # -- rollouts --------------------------------------------------------------------------------------------
    num_generations: int = field(default=8, metadata={"help": "Particles (reference samples) per prompt."})
    max_completion_length: int = field(default=64, metadata={"help": "Max new tokens per sample."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the rollouts."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the rollouts (0: off)."})
    generation_batch_size: int | None = field(default=None, metadata={
        "help": "Completions per generate() call (TRL's unit): generation_batch_size / num_generations prompts, "
                "each with its num_generations samples; a multiple of num_generations (None: 4 prompts' worth)."})
    # -- transport budget ------------------------------------------------------------------------------------
    transport_steps: int = field(default=3, metadata={"help": "L, Adam transport steps per group (0 = best-of-N)."})
    transport_step_size: float = field(default=0.05, metadata={"help": "eps, the step size (logits for soft_topk)."})
    transport_alpha: float = field(default=1.0, metadata={"help": "Temperature of the target exp(V / alpha)."})
    transport_radius: float | None = field(default=None, metadata={
        "help": "Cap on each particle row's displacement (None: no cap)."})
    repulsion: bool = field(default=True, metadata={"help": "Keep SVGD's repulsive kernel term."})
    # -- particle space / decoder ----------------------------------------------------------------------------
    decoder: Literal["verified", "reference_gain", "soft_topk", "steer", "steer_prefix", "tilt_prefix",
                     "tilt_reward"] = field(
        default="verified", metadata={
            "help": "Particle space and decoder: 'verified' (transport proposes reference top-k swaps, the scorer "
                    "checks them on real tokens), 'reference_gain' (the swaps with the largest first-order gain), "
                    "'soft_topk' (particles are logits over each position's reference top-k), 'steer' (a "
                    "hidden-state vector the model generates from again, under each sample's own noise), "
                    "'steer_prefix' (the hidden state itself, moved at every generated token along a prefix value "
                    "read at that layer), 'tilt_prefix' (the next-token logits of the decoder_topk candidates, "
                    "moved at every generated token by steps x step size x their prefix value: an exponential "
                    "tilt, the budget in nats per unit of value), 'tilt_reward' (the same tilt by the reward "
                    "model's score of each candidate continuation; needs a reward-model scorer)."})
    decoder_topk: int = field(default=8, metadata={"help": "Reference top-k candidates per position."})
    max_edits: int = field(default=5, metadata={
        "help": "Token edits per particle (reference_gain, soft_topk); rounds of checked edits (verified)."})
    verify_top: int | None = field(default=1, metadata={
        "help": "verified: edit only the best N originals of each prompt (None: all)."})
    verify_candidates: int = field(default=4, metadata={
        "help": "verified: swaps checked with real scorer passes per particle and round."})
    steer_layer: int | None = field(default=None, metadata={
        "help": "steer, steer_prefix, tilt_prefix: the decoder layer whose output the particle shifts or the "
                "prefix value reads (default: half the value model's depth; steer_prefix, tilt_prefix: half the "
                "model's)."})

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r}; choose one of {DECODERS}")
        for name in ("num_generations", "max_completion_length", "decoder_topk", "max_edits", "verify_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.transport_steps < 0 or self.transport_step_size < 0 or self.transport_alpha <= 0:
            raise ValueError("transport_steps and transport_step_size must be >= 0 and transport_alpha > 0")
        if self.generation_batch_size is not None and (self.generation_batch_size < self.num_generations
                                                       or self.generation_batch_size % self.num_generations):
            raise ValueError(f"generation_batch_size={self.generation_batch_size} counts completions (as in TRL): it "
                             f"must be a multiple of num_generations={self.num_generations}")
        if self.verify_top is not None and self.verify_top < 1:
            raise ValueError(f"verify_top must be >= 1 or None, got {self.verify_top}")
        parent = getattr(super(), "__post_init__", None)  # TrainingArguments, when VGFConfig mixes this in
        if parent is not None:
            parent()

    @property
    def prompts_per_generation(self) -> int:
        """Prompts per generate() call: ``generation_batch_size`` completions of ``num_generations`` each."""
        return 4 if self.generation_batch_size is None else self.generation_batch_size // self.num_generations


@dataclass
class SamplerConfig(TransportConfig):
    """``TransportConfig`` plus how the sampler picks one response per prompt."""

    union_margin: float = field(default=0.0, metadata={
        "help": "Pick a transported response only if its selector score beats the best original by this much "
                "(use >= 0.2, or transport_steps 0, for exact-answer rewards)."})


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

    scorer:   gives the value gradient (``ValueModel`` or ``RewardModelScorer``).
    selector: picks the response (default: the scorer). Never a checker that needs the answer.
    config:   ``SamplerConfig`` (or a ``VGFConfig``: the trainer's sampler only moves particles).
    backend:  rollouts (default: Hugging Face ``generate`` with the config's sampling knobs).
    Selection is among the originals and the transported particles; a transported one wins only if it beats the
    best original by more than ``union_margin``.
    """

    def __init__(self, model, tokenizer, scorer, config: TransportConfig | None = None, *, selector=None,
                 backend=None, progress: bool = True):
        self.config = c = config if config is not None else SamplerConfig()
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.selector, self.progress = selector or scorer, progress
        self.space = make_space(c.decoder, model, tokenizer, scorer, c)
        self.backend = backend or make_rollout_backend(model, tokenizer, max_new_tokens=c.max_completion_length,
                                                       temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                                       batch_size=c.prompts_per_generation)
        self.last_trace: TransportTrace | None = None

    def rollout(self, prompts: list, seed: int) -> Rollouts:
        with active_adapter(self.model, None):
            return self.backend.generate(prompts, self.config.num_generations, seed)

    def sample(self, prompts: list, seed: int = 0) -> list[SampleResult]:
        """One ``SampleResult`` per prompt, ``prompts_per_generation`` prompts at a time."""
        size = self.config.prompts_per_generation
        results = []
        starts = range(0, len(prompts), size)
        for c, s in enumerate(tqdm(starts, desc="vgf", disable=not self.progress)):
            chunk, chunk_seed = prompts[s:s + size], seed * 1_000_003 + c
            results.extend(self.transport_rollouts(chunk, self.rollout(chunk, chunk_seed)))
        return results

    def _score(self, ids: torch.Tensor, mask: torch.Tensor, ro: Rollouts) -> torch.Tensor:
        g, n, t = ids.shape
        p_ids, p_mask, _, _ = ro.flat()
        return self.selector.score_ids(p_ids, p_mask, ids.reshape(g * n, t), mask.reshape(g * n, t)).reshape(
            g, n).float().cpu()

    def transport_rollouts(self, prompts: list, ro: Rollouts) -> list[SampleResult]:
        """Transport, decode, re-score and select given rollouts (so several budgets can share one set of samples)."""
        ids, cmask = ro.completion_ids, ro.completion_mask
        before = self._score(ids, cmask, ro)
        moved = self.config.transport_steps > 0
        if moved:
            new_ids, new_mask, disp = self.move(ro)
            after = self._score(new_ids, new_mask, ro)
        else:
            new_ids, new_mask, disp, after = ids, cmask, torch.zeros(ids.shape[:2]), before
        changed = tokens_changed(ids, cmask, new_ids, new_mask)
        out = []
        for g, prompt in enumerate(prompts):
            texts_after = [self.tokenizer.decode(new_ids[g, n][new_mask[g, n].bool()], skip_special_tokens=True)
                           for n in range(ids.shape[1])] if moved else ro.texts[g]
            pick_moved = bool(after[g].max() > before[g].max() + getattr(self.config, "union_margin", 0.0))
            chosen = int(after[g].argmax()) if pick_moved else int(before[g].argmax())
            response = texts_after[chosen] if pick_moved else ro.texts[g][chosen]
            particles = [ParticleResult(ro.texts[g][n], texts_after[n], float(before[g, n]), float(after[g, n]),
                                        int(changed[g, n]), float(disp[g, n])) for n in range(ids.shape[1])]
            out.append(SampleResult(prompt, response, chosen, pick_moved, particles))
        return out

    def move(self, ro: Rollouts, verify=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transport the rollouts' particles with the budget and decode them: (ids [G, N, T], mask, displacement
        [G, N]). The trainer distils these (passing its true reward as ``verify``, see ``Particles``);
        ``transport_rollouts`` selects among them."""
        c = self.config
        particles = self.space.lift(ro)
        particles.verify = verify
        budget = dict(steps=c.transport_steps, step_size=c.transport_step_size, alpha=c.transport_alpha,
                      step_rule="adam", radius=c.transport_radius, repulsion=c.repulsion and self.space.repulsion)
        if getattr(self.space, "moves_while_decoding", False):  # one transport per generated token, inside decoding
            new_ids, new_mask, disp, self.last_trace = self.space.move_and_decode(particles, budget)
            return new_ids, new_mask, disp
        moved, trace = transport(particles.start, grad_fn=lambda u: self.space.grad(particles, u),
                                 mask=particles.mask, **budget)
        self.last_trace = trace  # the trainer logs its non-finite count
        new_ids, new_mask = self.space.decode(particles, moved)
        disp = trace.displacement[-1] if trace.displacement.shape[0] else torch.zeros(ro.shape[:2])
        return new_ids, new_mask, disp
