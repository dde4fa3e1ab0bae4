"""The reference model's likelihood as part of the value: a brake on climbing a learned reward model's errors.

VGF's target is exp(V / alpha) over the reference's samples; with a learned (proxy) reward model as V, the transport
and the selection find the proxy's errors: text the proxy scores high and the base model finds unlikely (issue 29).
``LikelihoodTilted`` scores a response by ``V + weight * (mean log-probability per token under the reference)``, so
the particles climb, and are selected by, the log of mu(y|x)^(weight/T) * exp(V) (T the response's length): the
KL-regularised target of RLHF, with the reference's log-likelihood per token rather than in total so that it does not
prefer short answers. This deviates from the paper, whose target is exp(V / alpha) with the transport budget as the
only regulariser (docs/benchmarks.md, "Test time with a learned reward model").
"""

from __future__ import annotations

import torch

from vgf_llm.adapters import active_adapter
from vgf_llm.distill import completion_logps


class ReferenceLikelihood:
    """Mean log-probability per token of each response under the reference (the model with its adapters off)."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def score_ids(self, prompt_ids, prompt_mask, response_ids, response_mask,
                  logprobs: torch.Tensor | None = None) -> torch.Tensor:
        """``logprobs`` [B, T]: the responses' token log-probabilities when the sampler already has them
        (``Rollouts.logprobs``, read while sampling); otherwise one forward pass of the reference."""
        if logprobs is None:
            device = self.model.device
            ids = torch.cat([prompt_ids, response_ids], 1).to(device)
            mask = torch.cat([prompt_mask, response_mask], 1).to(device)
            with active_adapter(self.model, None):
                logprobs = completion_logps(self.model, ids, mask, prompt_ids.shape[1])
        logprobs = logprobs.float()
        rmask = response_mask.to(device=logprobs.device, dtype=logprobs.dtype)
        return (logprobs * rmask).sum(1) / rmask.sum(1).clamp_min(1)  # an empty response: 0


class LikelihoodTilted:
    """``scorer`` plus ``weight`` x the reference's mean log-probability per token: a scorer (``score_ids``) for the
    particle space to fit on and the sampler to select by."""

    def __init__(self, scorer, likelihood: ReferenceLikelihood, weight: float):
        if not weight > 0:
            raise ValueError(f"likelihood_weight must be > 0 to tilt a scorer, got {weight}")
        self.scorer, self.likelihood, self.weight = scorer, likelihood, weight

    def score_ids(self, prompt_ids, prompt_mask, response_ids, response_mask,
                  logprobs: torch.Tensor | None = None) -> torch.Tensor:
        value = self.scorer.score_ids(prompt_ids, prompt_mask, response_ids, response_mask).float()
        logp = self.likelihood.score_ids(prompt_ids, prompt_mask, response_ids, response_mask, logprobs)
        return value + self.weight * logp.to(value.device)
