"""What every particle space shares: the ``Particles`` a space lifts rollouts into, the interface a space
implements, and the scorer's value gradient taken through the space's map to embedding rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vgf_llm.rollout.hf import Rollouts


@dataclass
class Particles:
    """N particles per prompt, lifted from ``rollouts``.

    start [G, N, ...]: where the flow starts (``flow.transport`` moves a tensor of this shape);
    mask [G, N, ...] over the start's leading dims: 1 where a particle (or a response position) may move;
    state: whatever the space's ``decode`` needs besides the moved tensor (e.g. candidate tokens);
    verify: what a checking decoder (``verified``) asks whether an edit is better: ``verify(rows, ids, mask)`` -> [A]
    values of token sequences ids/mask [A, T] for flat rollout rows ``rows`` [A] (index into ``rollouts.flat()``).
    None: the scorer's value. The trainer passes its true reward here, which it computes for moved particles anyway.
    """

    rollouts: Rollouts
    start: torch.Tensor
    mask: torch.Tensor
    state: dict = field(default_factory=dict)
    verify: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


class ParticleSpace(Protocol):
    """Where VGF's particles live. ``repulsion``: whether SVGD's kernel between two particles means anything here
    (it does not when particles index different candidate sets).

    A space whose particles only exist while the model generates (``moves_while_decoding = True``, e.g.
    ``steer_prefix``) implements ``move_and_decode(particles, budget) -> (ids, mask, displacement, trace)`` instead
    of ``grad`` and ``decode``: the sampler hands it the budget (``flow.transport``'s keyword arguments) and it runs
    the transport at every generated token."""

    repulsion: bool

    def lift(self, rollouts: Rollouts) -> Particles: ...

    def grad(self, particles: Particles, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values [G, N] of the particles ``u`` and their gradient with respect to ``u``."""

    def decode(self, particles: Particles, moved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [G, N, T'] and completion mask of the moved particles."""


def value_and_grad(scorer, rollouts: Rollouts, u: torch.Tensor,
                   to_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scorer's values [G, N] of particles ``u`` and d values / d u; ``to_rows`` maps particles to the scorer's
    embedding rows [G, N, T, d] (differentiably) when they are not rows themselves."""
    g, n, t = rollouts.shape
    p_ids, p_mask, _, c_mask = rollouts.flat()
    leaf = u.detach().requires_grad_(True)
    with torch.enable_grad():
        rows = to_rows(leaf) if to_rows is not None else leaf
        values = scorer.score_embeds(p_ids, p_mask, rows.reshape(g * n, t, -1), c_mask)
        (grad,) = torch.autograd.grad(values.sum(), leaf)
    return values.detach().reshape(g, n), grad
