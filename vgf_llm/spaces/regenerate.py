"""Regenerating a reference sample under its own noise: the machinery of a particle the model decodes itself.

Each sample keeps the sampling noise it was drawn with: ``PosteriorNoise`` draws Gumbel noise from its posterior
given the sampled tokens (the Gumbel-max structural model: argmax(logits / temperature + noise) re-creates the
sample exactly), one position at a time on the model's device, and ``regenerate`` decodes argmax(changed logits /
temperature + the same noise). So an unchanged model re-creates the reference sample token for token (budget 0
is best-of-N), and a small change tips only the tokens it tips, every later token being the model's own
continuation under the same noise. Needs plain temperature sampling (``top_k=0``, ``top_p=1``, ``temperature > 0``).
"""

from __future__ import annotations

import torch

from vgf_llm.adapters import active_adapter
from vgf_llm.rollout.hf import Rollouts, completion_mask_from_ids
from vgf_llm.spaces.reference import ReferenceTokens


def posterior_gumbel(logits: torch.Tensor, observed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gumbel noise e [B, V] given logits [B, V] such that argmax(logits + e) == observed [B], drawn from its
    posterior (top-down sampling: the maximum is Gumbel(logsumexp) at the observed token, every other value is a
    Gumbel truncated below it). Tokens at -inf keep noise 0 (they stay impossible)."""
    finite = torch.isfinite(logits)
    safe = torch.where(finite, logits, torch.zeros_like(logits))
    top = torch.logsumexp(logits, -1, keepdim=True) + _gumbel(logits.shape[:-1] + (1,), generator)
    values = safe + _gumbel(logits.shape, generator)
    truncated = -torch.logaddexp(-top, -values)  # Gumbel(l_i) conditioned on being < top, without overflow
    truncated.scatter_(-1, observed[:, None], top)
    return torch.where(finite, truncated - safe, torch.zeros_like(logits))


def _gumbel(shape, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=generator.device).clamp(1e-12, 1 - 1e-7)
    return -torch.log(-torch.log(u))


class PosteriorNoise:
    """The Gumbel noise of every flat rollout row under which argmax(reference logits / temperature + noise)
    re-creates each sampled token (its posterior given the sample; prior noise after a sample's end), drawn one
    generated position at a time on the model's device: ``noise(t)`` is [B, V], never stored as [B, T, V].

    What a draw needs is kept instead: the reference's final states [B, T, d] (d is far below V; the logits at t
    are re-projected from them) and the sampled tokens; position t's generator is seeded from (seed, t), so every
    call of ``noise(t)`` gives the same noise."""

    @torch.no_grad()
    def __init__(self, reference: ReferenceTokens, rollouts: Rollouts, temperature: float, seed: int):
        p_ids, p_mask, ids, cmask = rollouts.flat()
        self.reference, self.temperature, self.seed = reference, temperature, seed
        self.states = reference.states(ids, p_ids, p_mask)
        self.ids, self.observed = ids.to(self.states.device), cmask.to(self.states.device).bool()

    @property
    def steps(self) -> int:
        return self.ids.shape[1]

    @torch.no_grad()
    def __call__(self, pos: int) -> torch.Tensor:
        gen = torch.Generator(self.states.device).manual_seed(self.seed * 1_000_003 + pos)
        logits = self.reference.logits(self.states[:, pos]) / self.temperature
        noise = posterior_gumbel(logits, self.ids[:, pos], gen)
        free = ~self.observed[:, pos]  # after the sample's end: no observation, prior noise
        if free.any():
            noise[free] = _gumbel((int(free.sum()), logits.shape[-1]), gen)
        return noise


def check_plain_sampling(decoder: str, temperature: float, top_k, top_p: float) -> None:
    """A space that re-creates each reference sample by Gumbel-max needs plain temperature sampling."""
    if temperature <= 0 or top_k not in (0, None) or top_p != 1.0:
        raise ValueError(f"decoder={decoder!r} re-creates each reference sample by Gumbel-max: it needs plain "
                         f"temperature sampling (temperature > 0, top_k=0, top_p=1), got {temperature}, {top_k}, "
                         f"{top_p}")


def regenerated(out, ids, mask, movable, eos: set[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [B, T] of a regeneration ``out``: the original rows where not ``movable``, padding after EOS."""
    new_mask = torch.where(movable[:, None], completion_mask_from_ids(out, eos, pad_id), mask)
    new_ids = torch.where(movable[:, None], out, ids)
    return torch.where(new_mask.bool(), new_ids, torch.full_like(new_ids, pad_id)), new_mask


@torch.no_grad()
def regenerate(model, pad_id: int, eos: set[int], p_ids, p_mask, noise: PosteriorNoise, temperature: float,
               steering) -> torch.Tensor:
    """[B, T] tokens (on the CPU): argmax(logits / temperature + noise(t)) step by step with a KV cache, on the
    model's device, the reference (adapters off) running under ``steering(step, done)`` (a context manager per
    forward call: step 0 is the prompt pass; ``done`` [B], on the device, marks rows already past their EOS);
    after a row's EOS its tokens are padding."""
    device = model.device
    b, t = p_ids.shape[0], noise.steps
    out = torch.full((b, t), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos), device=device)
    mask = p_mask.to(device)
    with active_adapter(model, None), steering(0, done):
        step = model(input_ids=p_ids.to(device), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                     use_cache=True, logits_to_keep=1)
    cache = step.past_key_values
    for pos in range(t):
        logits = step.logits[:, -1].float() / temperature + noise(pos)
        token = logits.argmax(-1).masked_fill(done, pad_id)
        out[:, pos] = token
        done |= torch.isin(token, eos)
        if pos == t - 1 or done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        with active_adapter(model, None), steering(pos + 1, done):
            step = model(input_ids=token[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                         past_key_values=cache, use_cache=True)
        cache = step.past_key_values
    return out.cpu()
