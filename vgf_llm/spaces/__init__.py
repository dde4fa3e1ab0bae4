"""Particle spaces: where VGF's particles live, how the scorer's gradient reaches them, how they become tokens.

One interface (``base.ParticleSpace``), one file per space: ``token_edits`` (embedding rows decoded by checked or
unchecked token swaps), ``soft_tokens`` (distributions over the reference's top-k), ``steering`` (a hidden-state
vector the model itself decodes from, under each sample's own Gumbel noise), ``prefix_steering`` (the model's
hidden state moved at every generated token along a prefix value; moves while decoding, so it implements
``move_and_decode(particles, budget)`` instead of ``grad``/``decode``), ``logit_tilt`` (the next-token logits
moved at every generated token, in closed form: an exponential tilt by the prefix value of each candidate token,
``tilt_prefix``, or by the reward model's score of it, ``tilt_reward``).

    lift(rollouts) -> Particles            the flow's start and the positions that may move
    grad(particles, u) -> (values, grad)   the scorer's value and its gradient in this space
    decode(particles, moved) -> (ids, mask) tokens again

``SPACES`` maps the names that ``decoder=`` takes (``SamplerConfig``, ``VGFConfig``, ``vgf-llm generate``) to
them; a new space is a new file and one entry here. The variants that lost in docs/benchmarks.md (nearest-token
and reference top-k projection, re-generation, a fluency prior) are in git tag ``variants-2026-11``.
"""

from __future__ import annotations

from vgf_llm.spaces.base import Particles, ParticleSpace, value_and_grad
from vgf_llm.spaces.logit_tilt import PrefixTilt, RewardTilt
from vgf_llm.spaces.prefix_steering import PrefixSteering
from vgf_llm.spaces.reference import ReferenceTokens, movable_mask, special_token_ids
from vgf_llm.spaces.soft_tokens import SoftTokens
from vgf_llm.spaces.steering import SteeringVectors
from vgf_llm.spaces.token_edits import GainEdits, VerifiedEdits

SPACES = {"verified": VerifiedEdits, "reference_gain": GainEdits, "soft_topk": SoftTokens, "steer": SteeringVectors,
          "steer_prefix": PrefixSteering, "tilt_prefix": PrefixTilt, "tilt_reward": RewardTilt}
DECODERS = tuple(SPACES)


def make_space(name: str, model, tokenizer, scorer, config) -> ParticleSpace:
    """The particle space called ``name``, built from a ``SamplerConfig``/``VGFConfig`` (``decoder_topk``,
    ``max_edits``, ``verify_*``, ``steer_layer``, the sampling knobs)."""
    if name not in SPACES:
        raise ValueError(f"decoder={name!r}; choose one of {DECODERS}")
    return SPACES[name].from_config(model, tokenizer, scorer, config)


__all__ = ["DECODERS", "SPACES", "GainEdits", "ParticleSpace", "Particles", "PrefixSteering", "PrefixTilt",
           "ReferenceTokens", "RewardTilt", "SoftTokens", "SteeringVectors", "VerifiedEdits", "make_space",
           "movable_mask", "special_token_ids", "value_and_grad"]
