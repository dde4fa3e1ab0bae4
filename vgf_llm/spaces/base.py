"""What every particle space shares: the budget a move may spend, what a move returns, and the interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from vgf_llm.flow import TransportTrace
from vgf_llm.rollout.hf import Rollouts


@dataclass(frozen=True)
class Budget:
    """How far particles may move: ``steps`` Adam steps of ``step_size`` (0 steps = best-of-N), the target's
    temperature ``alpha``, an optional cap on each row's displacement and SVGD's repulsion term."""

    steps: int
    step_size: float
    alpha: float = 1.0
    radius: float | None = None
    repulsion: bool = True

    def __post_init__(self):
        bad = [f"{name}={value}" for name, value, ok in (
            ("transport_steps", self.steps, self.steps >= 0), ("transport_step_size", self.step_size,
                                                               self.step_size >= 0),
            ("transport_alpha", self.alpha, self.alpha > 0)) if not ok]
        if bad:
            raise ValueError(f"{', '.join(bad)}: transport_steps and transport_step_size must be >= 0 and "
                             "transport_alpha > 0")

    def flow_kwargs(self) -> dict:
        """``flow.transport``'s keyword arguments (the authors' Adam step rule)."""
        return dict(steps=self.steps, step_size=self.step_size, alpha=self.alpha, step_rule="adam",
                    radius=self.radius, repulsion=self.repulsion)


@dataclass
class Moved:
    """The particles after a move: token ids [G, N, T] and completion mask, each particle's displacement [G, N]
    (in the space's own units), every transport the move ran (``trace``, steps concatenated) and space-specific
    figures for the logs (``stats``)."""

    ids: torch.Tensor
    mask: torch.Tensor
    displacement: torch.Tensor
    trace: TransportTrace
    stats: dict = field(default_factory=dict)


def empty_trace(g: int, n: int) -> TransportTrace:
    empty = torch.empty(0, g, n)
    return TransportTrace(empty, empty, empty, torch.empty(0, g), torch.empty(0, g, n, dtype=torch.bool),
                          torch.empty(0, g, dtype=torch.bool))


def concat_traces(traces: list[TransportTrace], g: int, n: int) -> TransportTrace:
    """One trace of several transports, steps after steps."""
    if not traces:
        return empty_trace(g, n)
    return TransportTrace(*[torch.cat([getattr(tr, f) for tr in traces]) for f in (
        "values", "displacement", "max_row_shift", "bandwidth", "nonfinite", "bandwidth_fallback")])


class ParticleSpace(Protocol):
    """Where VGF's particles live, how the value reaches them and how they become tokens again.

    ``fit`` is the explicit call that fits what ``move`` reads, on rollouts and their final targets (true rewards,
    or a scorer's values); a space that reads its scorer directly fits nothing and returns {}. ``move`` transports
    the rollouts' particles with ``budget`` and decodes them."""

    name: str

    def fit(self, rollouts: Rollouts, targets: torch.Tensor, *, seed: int = 0) -> dict: ...

    def move(self, rollouts: Rollouts, budget: Budget) -> Moved: ...
