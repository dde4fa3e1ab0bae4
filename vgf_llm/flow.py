"""Value Gradient Flow: transport groups of particles along a value gradient (SVGD with an RBF kernel).

Plain torch, no knowledge of language models. Particles are shaped ``[groups, N, *dims]``; each group is
transported independently (one group = the N samples drawn for one prompt). The update for particle i is

    phi_i = (1/N) * sum_j [ k(u_j, u_i) * grad R(u_j) / alpha  +  grad_{u_j} k(u_j, u_i) ]

with k(a, b) = exp(-||a - b||^2 / (2 s^2)). The transport budget (steps x step_size, with alpha, optionally a
per-row ``radius``) is the only regulariser: ``steps=0`` returns the particles unchanged (best-of-N).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""particles [G, N, *dims] -> values [G, N]; differentiable with respect to the particles."""
GradFn = Callable[[torch.Tensor], "tuple[torch.Tensor | None, torch.Tensor]"]
"""particles [G, N, *dims] -> (values [G, N] or None, gradient of the value [G, N, *dims])."""


@dataclass
class TransportTrace:
    """What happened during a transport, one row per step.

    values:        [steps, G, N] value of each particle at the start of each step (NaN where unknown)
    displacement:  [steps, G, N] ||u_t - u_0|| of each particle after each step (masked positions excluded)
    max_row_shift: [steps, G, N] largest per-row displacement (the quantity ``radius`` bounds)
    bandwidth:     [steps, G] kernel bandwidth s used by each group
    nonfinite:     [steps, G, N] particles whose gradient was non-finite and was zeroed for that step
    bandwidth_fallback: [steps, G] groups whose median distance was 0 and used the fallback bandwidth
    """

    values: torch.Tensor
    displacement: torch.Tensor
    max_row_shift: torch.Tensor
    bandwidth: torch.Tensor
    nonfinite: torch.Tensor
    bandwidth_fallback: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Scalar figures for logs: final mean displacement, value gain and guard counts."""
        if self.values.shape[0] == 0:
            return {"steps": 0, "displacement": 0.0, "nonfinite": 0, "bandwidth_fallback": 0}
        return {
            "steps": int(self.values.shape[0]),
            "displacement": float(self.displacement[-1].mean()),
            "max_row_shift": float(self.max_row_shift[-1].max()),
            "value_start": float(self.values[0].nanmean()),
            "value_last_step": float(self.values[-1].nanmean()),
            "bandwidth": float(self.bandwidth.mean()),
            "nonfinite": int(self.nonfinite.sum()),
            "bandwidth_fallback": int(self.bandwidth_fallback.sum()),
        }


def _expand_mask(mask: torch.Tensor | None, particles: torch.Tensor) -> torch.Tensor | None:
    """Broadcast a mask over leading particle dims ([G, N, T] say) to the particles' full shape."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(particles.shape[: mask.dim()]) or mask.dim() < 2:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the leading dims of particles {tuple(particles.shape)} "
            "and cover at least [groups, N]"
        )
    mask = mask.to(dtype=particles.dtype)
    return mask.reshape(*mask.shape, *([1] * (particles.dim() - mask.dim())))


def pairwise_sq_dists(flat: torch.Tensor) -> torch.Tensor:
    """[G, N, D] -> [G, N, N] squared Euclidean distances (exactly zero on the diagonal)."""
    gram = flat @ flat.transpose(1, 2)
    sq = gram.diagonal(dim1=1, dim2=2)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * gram).clamp_min(0.0)
    return d2 * (1.0 - torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device))


def median_bandwidth_sq(d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Median heuristic per group: s^2 = median_{i != j} d2_ij / (2 log(N + 1)).

    A group whose median is 0 (many duplicate particles) falls back to the mean off-diagonal distance, and a
    group of identical particles to s^2 = 1, so the kernel never divides by zero. Returns (s^2 [G], fallback [G]).
    """
    g, n, _ = d2.shape
    if n < 2:
        return torch.ones(g, dtype=d2.dtype, device=d2.device), torch.ones(g, dtype=torch.bool, device=d2.device)
    off = ~torch.eye(n, dtype=torch.bool, device=d2.device)
    pairs = d2[:, off]  # [G, N(N-1)]
    denom = 2.0 * math.log(n + 1)
    s2 = pairs.median(dim=1).values / denom
    fallback = s2 <= torch.finfo(d2.dtype).tiny
    mean_s2 = pairs.mean(dim=1) / denom
    s2 = torch.where(fallback, torch.where(mean_s2 > 0, mean_s2, torch.ones_like(mean_s2)), s2)
    return s2, fallback


def svgd_direction(
    particles: torch.Tensor,
    grads: torch.Tensor,
    *,
    alpha: float = 1.0,
    bandwidth: float | None = None,
    repulsion: bool = True,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVGD direction phi for every particle of every group.

    particles, grads: [G, N, *dims]. ``bandwidth`` fixes s for all groups (default: median heuristic).
    Returns (phi [G, N, *dims], s [G], fallback [G]).
    """
    m = _expand_mask(mask, particles)
    if m is not None:
        particles = particles * m
        grads = torch.where(m > 0, grads, torch.zeros_like(grads))
    g, n = particles.shape[:2]
    x = particles.reshape(g, n, -1)
    dr = grads.reshape(g, n, -1)
    d2 = pairwise_sq_dists(x)
    if bandwidth is None:
        s2, fallback = median_bandwidth_sq(d2)
    else:
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        s2 = torch.full((g,), float(bandwidth) ** 2, dtype=x.dtype, device=x.device)
        fallback = torch.zeros(g, dtype=torch.bool, device=x.device)
    k = torch.exp(-d2 / (2.0 * s2[:, None, None]))  # symmetric: k[j, i] = k[i, j]
    if repulsion:
        # sum_j grad_{u_j} k(u_j, u_i) = sum_j k_ij (u_i - u_j) / s^2 = ((diag(k 1) - k) @ u)_i / s^2:
        # folded into one N x N matrix so the [N, D] particles are read once
        lap = (torch.diag_embed(k.sum(-1)) - k) / s2[:, None, None]
        phi = torch.baddbmm(lap @ x, k, dr, alpha=1.0 / alpha)
    else:
        phi = k @ dr / alpha
    phi = (phi / n).reshape(particles.shape)
    if m is not None:
        phi = phi * m
    return phi, s2.sqrt(), fallback


def _value_and_grad(
    x: torch.Tensor, score_fn: ScoreFn | None, grad_fn: GradFn | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    if grad_fn is not None:
        values, grads = grad_fn(x)
        return (None if values is None else values.detach()), grads.detach()
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        values = score_fn(leaf)
        if values.shape != leaf.shape[:2]:
            raise ValueError(f"score_fn must return [groups, N] = {tuple(leaf.shape[:2])}, got {tuple(values.shape)}")
        (grads,) = torch.autograd.grad(values.sum(), leaf)
    return values.detach(), grads


def _project_rows(x: torch.Tensor, start: torch.Tensor, radius: float) -> torch.Tensor:
    """Pull every row (last dim) whose displacement from its start exceeds ``radius`` back onto the ball."""
    delta = x - start
    norm = delta.norm(dim=-1, keepdim=True)
    scale = torch.clamp(radius / norm.clamp_min(torch.finfo(x.dtype).tiny), max=1.0)
    return start + delta * scale


def transport(
    particles: torch.Tensor,
    score_fn: ScoreFn | None = None,
    *,
    grad_fn: GradFn | None = None,
    steps: int,
    step_size: float,
    alpha: float = 1.0,
    step_rule: Literal["sgd", "adam"] = "sgd",
    radius: float | None = None,
    repulsion: bool = True,
    bandwidth: float | None = None,
    mask: torch.Tensor | None = None,
    adam_betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[torch.Tensor, TransportTrace]:
    """Move ``particles`` [G, N, *dims] for ``steps`` SVGD steps along the value gradient.

    Give exactly one of ``score_fn`` (values, differentiated with autograd) or ``grad_fn`` (values and
    gradients supplied by the caller, e.g. a scorer with its own backward). ``step_rule="sgd"`` applies
    ``u += step_size * phi``; ``"adam"`` applies Adam(lr=step_size) to ``-phi`` as the authors' code does.
    ``radius`` bounds each row's (last dim) distance from its start. ``mask`` ([G, N, ...] over leading dims)
    marks positions that may move; masked-out positions never move and never enter kernel distances.
    Non-finite gradients are zeroed for the affected particle (recorded in the trace), never propagated.
    """
    if (score_fn is None) == (grad_fn is None):
        raise ValueError("give exactly one of score_fn or grad_fn")
    if particles.dim() < 3:
        raise ValueError(f"particles must be [groups, N, *dims], got shape {tuple(particles.shape)}")
    if steps < 0 or step_size < 0 or alpha <= 0:
        raise ValueError(f"need steps >= 0, step_size >= 0, alpha > 0 (got {steps}, {step_size}, {alpha})")
    if step_rule not in ("sgd", "adam"):
        raise ValueError(f"step_rule must be 'sgd' or 'adam', got {step_rule!r}")
    if radius is not None and radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")

    g, n = particles.shape[:2]
    start = particles.detach()
    x = start.clone()
    m = _expand_mask(mask, particles)
    rows = []
    optimizer = torch.optim.Adam([x], lr=step_size, betas=adam_betas) if step_rule == "adam" and steps else None

    for _ in range(steps):
        values, grads = _value_and_grad(x, score_fn, grad_fn)
        if grads.shape != x.shape:
            raise ValueError(f"gradient shape {tuple(grads.shape)} != particles shape {tuple(x.shape)}")
        if m is not None:  # a NaN at a padding position must not silence the particle's real rows
            grads = torch.where(m > 0, grads, torch.zeros_like(grads))
        bad = ~torch.isfinite(grads.reshape(g, n, -1).sum(-1))  # one pass: any inf/NaN makes the sum non-finite
        if bad.any():
            grads = torch.where(bad.reshape(g, n, *([1] * (x.dim() - 2))), torch.zeros_like(grads), grads)
        phi, s, fallback = svgd_direction(x, grads, alpha=alpha, bandwidth=bandwidth, repulsion=repulsion, mask=mask)
        with torch.no_grad():
            if optimizer is None:
                x.add_(step_size * phi)
            else:
                x.grad = -phi
                optimizer.step()
                if m is not None:  # Adam's moment estimates are zero there already; keep it exact
                    x.copy_(torch.where(m > 0, x, start))
            if radius is not None:
                x.copy_(_project_rows(x, start, radius))
        delta = x - start if m is None else (x - start) * m
        rows.append(
            (
                values if values is not None else torch.full((g, n), float("nan"), dtype=x.dtype),
                delta.reshape(g, n, -1).norm(dim=-1),
                delta.norm(dim=-1).reshape(g, n, -1).amax(-1),
                s,
                bad,
                fallback,
            )
        )

    if rows:
        cols = [torch.stack(c) for c in zip(*rows, strict=True)]
    else:
        empty = torch.empty(0, g, n, dtype=x.dtype)
        cols = [empty, empty, empty, torch.empty(0, g, dtype=x.dtype),
                torch.empty(0, g, n, dtype=torch.bool), torch.empty(0, g, dtype=torch.bool)]
    x = x.detach()
    x.grad = None
    return x, TransportTrace(*[c.detach().cpu() for c in cols])


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Biased (V-statistic) squared MMD between point sets a [n, D] and b [m, D] under the RBF kernel."""
    s2 = 2.0 * bandwidth**2

    def kmean(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(p, q).pow(2) / s2).mean()

    return kmean(a, a) + kmean(b, b) - 2.0 * kmean(a, b)
