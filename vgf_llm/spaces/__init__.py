"""Particle spaces: where VGF's particles live, how the value reaches them, how they become tokens again.

Only the spaces that won somewhere are here (the others, and the numbers that retired them, are in
docs/benchmarks.md "Retired"; git tags ``retired-2026-12`` and ``variants-2026-11`` keep their code):

- ``steer_prefix`` (``prefix_steering.PrefixSteering``): the model's hidden state, moved at every generated token
  along a prefix value; the test-time winner and the training transport.
- ``verified`` (``token_edits.VerifiedEdits``): embedding rows moved along a scorer's gradient, decoded by token
  swaps a verifier checks on real tokens; works with any scorer on the model's vocabulary.

Every space implements ``base.ParticleSpace``: ``fit(rollouts, targets)`` (an explicit call: what the move reads)
and ``move(rollouts, budget) -> Moved``. ``regenerate`` holds the machinery of particles the model decodes itself.
"""

from __future__ import annotations

from vgf_llm.spaces.base import Budget, Moved, ParticleSpace
from vgf_llm.spaces.prefix_steering import PrefixSteering
from vgf_llm.spaces.token_edits import VerifiedEdits, Verifier

DECODERS = ("steer_prefix", "verified")


def make_space(name: str, model, tokenizer, scorer, config) -> ParticleSpace:
    """The particle space called ``name``, built from a ``SamplerConfig`` (``steer_layer``, ``decoder_topk``,
    ``max_edits``, ``verify_*``, the sampling knobs)."""
    if name == "steer_prefix":
        return PrefixSteering(model, tokenizer, steer_layer=config.steer_layer, temperature=config.temperature,
                              top_p=config.top_p, top_k=config.top_k)
    if name == "verified":
        return VerifiedEdits(model, tokenizer, scorer, topk=config.decoder_topk, max_edits=config.max_edits,
                             candidates=config.verify_candidates, top=config.verify_top)
    raise ValueError(f"decoder={name!r}; choose one of {DECODERS}")


__all__ = ["DECODERS", "Budget", "Moved", "ParticleSpace", "PrefixSteering", "VerifiedEdits", "Verifier",
           "make_space"]
