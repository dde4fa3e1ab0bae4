"""Toy 2-D continuous bandit: best-of-N cannot leave the reference support, VGF transport can.

The reference mu is a standard 2-D Gaussian truncated to radius 3 (so its support is exactly the disc of radius
3 around the origin). The reward is a smooth Gaussian bump centred at (4, 1.5), just outside that disc: the
reference sits where reward is mediocre. Best-of-N picks the highest-reward reference sample of each group, so
it is stuck inside the disc. VGF moves the N samples of each group along the reward gradient (SVGD with a
median-bandwidth RBF kernel and repulsion) for a budget of ``steps`` x ``step_size``; ``steps=0`` is best-of-N.

    python examples/toy_bandit.py                      # writes outputs/toy_bandit/{toy_bandit.png,toy_bandit.json}
    python examples/toy_bandit.py --steps 0 --no_plot  # VGF == best-of-N
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from vgf_llm.flow import mmd2, transport

SUPPORT_RADIUS = 3.0  # the reference is truncated here: every reference sample lies inside this disc
PEAK = (4.0, 1.5)  # reward maximum, about 1.3 outside the support
WIDTH = 2.0  # reward bump width


def reward(actions: torch.Tensor) -> torch.Tensor:
    """Differentiable true reward in (0, 1]: a Gaussian bump over the last dim (x, y)."""
    peak = torch.tensor(PEAK, dtype=actions.dtype)
    return torch.exp(-((actions - peak) ** 2).sum(-1) / (2 * WIDTH**2))


def sample_reference(groups: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """N(0, I) truncated to the support disc, drawn exactly by inverting the radial CDF (no rejection loop)."""
    u = torch.rand(groups, n, generator=generator)
    radius = torch.sqrt(-2 * torch.log1p(-u * (1 - math.exp(-(SUPPORT_RADIUS**2) / 2))))
    angle = 2 * math.pi * torch.rand(groups, n, generator=generator)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=-1)


def run(num_prompts=32, num_particles=8, steps=50, step_size=0.1, alpha=0.1, seed=0, out=None, plot=True) -> dict:
    """Sample the reference, run best-of-N and VGF, return the figures (and write PNG/JSON under ``out``)."""
    generator = torch.Generator().manual_seed(seed)
    ref = sample_reference(num_prompts, num_particles, generator)  # [G, N, 2]
    moved, trace = transport(ref, reward, steps=steps, step_size=step_size, alpha=alpha)

    r_ref, r_vgf = reward(ref), reward(moved)
    groups = torch.arange(num_prompts)
    bon = ref[groups, r_ref.argmax(1)]  # [G, 2]: one pick per group
    vgf = moved[groups, r_vgf.argmax(1)]
    figures = {
        "config": dict(num_prompts=num_prompts, num_particles=num_particles, steps=steps, step_size=step_size,
                       alpha=alpha, seed=seed, support_radius=SUPPORT_RADIUS, reward_peak=PEAK, reward_width=WIDTH),
        "reward_reference": r_ref.mean().item(),
        "reward_best_of_n": r_ref.max(1).values.mean().item(),
        "reward_vgf_particles": r_vgf.mean().item(),
        "reward_vgf_selected": r_vgf.max(1).values.mean().item(),
        "mean_displacement": (moved - ref).norm(dim=-1).mean().item(),
        "frac_vgf_outside_support": (moved.norm(dim=-1) > SUPPORT_RADIUS).float().mean().item(),
        "frac_vgf_selected_outside_support": (vgf.norm(dim=-1) > SUPPORT_RADIUS).float().mean().item(),
        "frac_best_of_n_outside_support": (bon.norm(dim=-1) > SUPPORT_RADIUS).float().mean().item(),
        "mmd2_reference_vs_vgf": mmd2(ref.reshape(-1, 2), moved.reshape(-1, 2), bandwidth=1.0).item(),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "toy_bandit.json").write_text(json.dumps(figures, indent=2) + "\n")
        if plot:
            _plot(ref, bon, moved, figures, out / "toy_bandit.png")
    return figures


def _plot(ref: torch.Tensor, bon: torch.Tensor, moved: torch.Tensor, figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = torch.meshgrid(torch.linspace(-4, 8, 200), torch.linspace(-4, 5, 150), indexing="xy")
    fig, ax = plt.subplots(figsize=(8, 6))
    cs = ax.contourf(xs, ys, reward(torch.stack([xs, ys], -1)), levels=12, cmap="Greens", alpha=0.7)
    fig.colorbar(cs, ax=ax, label="true reward", shrink=0.8)
    for i, (start, end) in enumerate(zip(ref.reshape(-1, 2), moved.reshape(-1, 2), strict=True)):
        ax.plot(*torch.stack([start, end]).T, color="grey", lw=0.5, alpha=0.4, label="transport" if i == 0 else None)
    ax.add_patch(plt.Circle((0, 0), SUPPORT_RADIUS, fill=False, ls="--", color="black", label="reference support"))
    ax.scatter(*ref.reshape(-1, 2).T, s=8, color="grey", label="reference samples")
    ax.scatter(*bon.T, s=40, marker="^", color="tab:blue", edgecolor="black", label="best-of-N picks")
    ax.scatter(*moved.reshape(-1, 2).T, s=12, color="tab:red", label="VGF particles")
    ax.scatter(*PEAK, s=200, marker="*", color="gold", edgecolor="black", label="reward peak")
    c = figures["config"]
    ax.set_title(f"VGF vs best-of-{c['num_particles']}: budget {c['steps']} steps x {c['step_size']}, "
                 f"alpha {c['alpha']}\nmean reward: best-of-N {figures['reward_best_of_n']:.3f}, "
                 f"VGF selected {figures['reward_vgf_selected']:.3f}")
    ax.set(xlabel="action x", ylabel="action y", xlim=(-4, 8), ylim=(-4, 5), aspect="equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_prompts", "--groups", type=int, default=32, help="groups (one per 'prompt')")
    p.add_argument("--num_particles", type=int, default=8, help="N reference samples per group")
    p.add_argument("--steps", type=int, default=50, help="transport steps L (0 = best-of-N)")
    p.add_argument("--step_size", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.1, help="temperature of the target exp(R / alpha)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/toy_bandit", help="directory for the PNG and JSON")
    p.add_argument("--no_plot", action="store_true")
    args = p.parse_args(argv)
    f = run(args.num_prompts, args.num_particles, args.steps, args.step_size, args.alpha, args.seed, args.out,
            plot=not args.no_plot)
    print("| samples | mean true reward |\n|---|---|")
    for name in ("reference", "best_of_n", "vgf_particles", "vgf_selected"):
        print(f"| {name} | {f['reward_' + name]:.3f} |")
    print(f"mean displacement {f['mean_displacement']:.3f}; VGF particles outside the support (radius "
          f"{SUPPORT_RADIUS}) {f['frac_vgf_outside_support']:.1%}; best-of-N picks outside "
          f"{f['frac_best_of_n_outside_support']:.1%}; MMD^2(reference, VGF) {f['mmd2_reference_vs_vgf']:.3f}")
    print(f"wrote {args.out}")
    return f


if __name__ == "__main__":
    main()
