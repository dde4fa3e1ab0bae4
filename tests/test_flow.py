"""The transport core against independent re-derivations: naive loops, autograd, an analytic target, the MMD bound."""

import math

import pytest
import torch

from vgf_llm.flow import mmd2, svgd_direction, transport


def naive_direction(x, grads, mask, alpha, repulsion=True):
    """Per-group, per-pair loops over the SVGD formula, with the lower-median bandwidth of unordered pairs."""
    g, n = x.shape[:2]
    out = torch.zeros_like(x)
    for gi in range(g):
        flat = [(x[gi, i] * mask[gi, i, :, None]).flatten() for i in range(n)]
        grad = [(grads[gi, i] * mask[gi, i, :, None]).flatten() for i in range(n)]
        pairs = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for i in range(n) for j in range(i + 1, n))
        s2 = pairs[(len(pairs) - 1) // 2] / (2 * math.log(n + 1))
        for i in range(n):
            acc = torch.zeros_like(flat[i])
            for j in range(n):
                k = math.exp(-float(((flat[j] - flat[i]) ** 2).sum()) / (2 * s2))
                acc += k * grad[j] / alpha
                if repulsion:
                    acc += k * (flat[i] - flat[j]) / s2  # grad wrt u_j of k(u_j, u_i)
            out[gi, i] = (acc / n).reshape(x.shape[2:]) * mask[gi, i, :, None]
    return out


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 3, generator=gen, dtype=torch.float64)
    grads = torch.randn(3, 5, 4, 3, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 5, 4, dtype=torch.float64)
    mask[0, 1, 3:] = 0  # a shorter response
    mask[2, :, 2:] = 0
    mask[1, 4, 1:] = 0
    return x, grads, mask


@pytest.mark.parametrize("repulsion", [True, False])
def test_batched_direction_equals_naive_loops(batch, repulsion):
    x, grads, mask = batch
    phi, _, _ = svgd_direction(x, grads, alpha=0.7, repulsion=repulsion, mask=mask)
    torch.testing.assert_close(phi, naive_direction(x, grads, mask, 0.7, repulsion), rtol=1e-10, atol=1e-12)


def test_padding_values_never_enter_the_direction(batch):
    x, grads, mask = batch
    phi, s, _ = svgd_direction(x, grads, mask=mask)
    junk = x + 100.0 * (1 - mask)[..., None]
    junk_grads = grads + float("1e6") * (1 - mask)[..., None]
    phi2, s2, _ = svgd_direction(junk, junk_grads, mask=mask)
    torch.testing.assert_close(phi, phi2)
    torch.testing.assert_close(s, s2)
    assert (phi[mask == 0] == 0).all()


def test_repulsion_matches_autograd_of_kernel_sum():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    s = 1.3
    phi, _, _ = svgd_direction(x, torch.zeros_like(x), bandwidth=s)
    leaf = x.clone().requires_grad_(True)
    energy = torch.exp(-torch.cdist(leaf, leaf).pow(2) / (2 * s * s)).sum()
    (grad,) = torch.autograd.grad(energy, leaf)
    # sum_j grad_{u_j} k(u_j, u_i) = -1/2 dE/du_i for the symmetric energy E = sum_ij k(u_i, u_j)
    torch.testing.assert_close(phi, -grad / (2 * x.shape[1]), rtol=1e-10, atol=1e-12)


def test_zero_steps_returns_input_unchanged():
    x = torch.randn(2, 4, 3, 2)
    moved, trace = transport(x, lambda u: -(u**2).sum((-1, -2)), steps=0, step_size=1.0)
    assert torch.equal(moved, x)
    assert trace.values.shape == (0, 2, 4) and trace.summary()["steps"] == 0


def _gaussian_run(repulsion, alpha=0.5, steps=300):
    torch.manual_seed(0)
    m = torch.tensor([2.0, -1.0], dtype=torch.float64)
    x = torch.randn(1, 300, 2, dtype=torch.float64)
    moved, trace = transport(
        x, lambda u: -((u - m) ** 2).sum(-1) / 2, steps=steps, step_size=0.5, alpha=alpha, repulsion=repulsion
    )
    pts = moved[0]
    return m, pts.mean(0), torch.cov(pts.T), trace


def test_flow_reaches_the_boltzmann_target():
    alpha = 0.5
    m, mean, cov, trace = _gaussian_run(repulsion=True, alpha=alpha)
    assert (mean - m).abs().max() < 0.05
    torch.testing.assert_close(cov, alpha * torch.eye(2, dtype=torch.float64), atol=0.1, rtol=0)
    assert trace.values[-1].mean() > trace.values[0].mean()


def test_without_repulsion_the_spread_collapses():
    alpha = 0.5
    m, mean, cov, _ = _gaussian_run(repulsion=False, alpha=alpha, steps=1000)
    assert (mean - m).abs().max() < 0.05
    assert torch.linalg.eigvalsh(cov).max() < 0.01 * alpha  # kernel-smoothed ascent piles up at the mode


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_mmd_stays_under_the_budget_bound_and_displacement_grows(alpha):
    torch.manual_seed(0)
    c, s, eps = 1.5, 1.0, 0.05
    x = torch.randn(1, 64, 2, dtype=torch.float64)

    def reward(u):  # |grad R| <= c everywhere
        return c * torch.tanh(u[..., 0])

    displacements = []
    for steps in (1, 2, 5, 10, 20):
        moved, trace = transport(x, reward, steps=steps, step_size=eps, alpha=alpha, bandwidth=s)
        measured = float(mmd2(x[0], moved[0], s))
        bound = 2 * eps * steps / (s * math.sqrt(math.e)) * (c / alpha + 1 / (s * math.sqrt(math.e)))
        assert 0 < measured < bound, (steps, measured, bound)
        displacements.append(float(trace.displacement[-1].mean()))
    assert all(a < b for a, b in zip(displacements, displacements[1:], strict=False))


@pytest.mark.parametrize("step_rule", ["sgd", "adam"])
def test_radius_is_never_exceeded_and_masked_rows_never_move(step_rule):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 3)
    mask = torch.ones(2, 4, 6)
    mask[:, :, 4:] = 0
    target = torch.full((3,), 10.0)
    moved, trace = transport(
        x, lambda u: -((u - target) ** 2).sum((-1, -2)), steps=8, step_size=5.0,
        step_rule=step_rule, radius=0.3, mask=mask,
    )
    row_shift = (moved - x).norm(dim=-1)
    assert row_shift.max() <= 0.3 + 1e-5
    assert row_shift[mask == 1].max() > 0.29  # the budget is actually used
    assert torch.equal(moved[mask == 0], x[mask == 0])
    assert trace.max_row_shift.max() <= 0.3 + 1e-5


def test_adam_rule_climbs_the_value():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 2)
    _, trace = transport(x, lambda u: -((u - 3.0) ** 2).sum(-1), steps=20, step_size=0.1, step_rule="adam")
    v = trace.values.mean((1, 2))
    assert v[-1] > v[0] and torch.isfinite(trace.values).all()


def test_nonfinite_gradients_are_zeroed_and_recorded():
    x = torch.randn(1, 4, 3)

    def grad_fn(u):
        g = torch.ones_like(u)
        g[0, 2, 1] = float("nan")
        g[0, 3, 0] = float("inf")
        return None, g

    moved, trace = transport(x, grad_fn=grad_fn, steps=3, step_size=0.1)
    assert torch.isfinite(moved).all()
    assert trace.nonfinite[:, 0, 2:].all() and not trace.nonfinite[:, 0, :2].any()
    assert trace.summary()["nonfinite"] == 6
    assert torch.isnan(trace.values).all()  # grad_fn gave no values


def test_identical_particles_use_the_fallback_bandwidth_without_nan():
    x = torch.zeros(2, 5, 4)
    x[1, 0] = 1.0  # group 1: four duplicates and one other particle, median distance 0
    moved, trace = transport(x, lambda u: u.sum(-1), steps=2, step_size=0.1)
    assert torch.isfinite(moved).all()
    assert trace.bandwidth_fallback.all()
    assert torch.isfinite(trace.bandwidth).all() and (trace.bandwidth > 0).all()


def test_bad_arguments_fail_clearly():
    x = torch.randn(1, 3, 2)
    with pytest.raises(ValueError, match="exactly one"):
        transport(x, steps=1, step_size=0.1)
    with pytest.raises(ValueError, match=r"\[groups, N\]"):
        transport(x, lambda u: u.sum(), steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="step_rule"):
        transport(x, lambda u: u.sum(-1), steps=1, step_size=0.1, step_rule="rmsprop")
    with pytest.raises(ValueError, match="mask shape"):
        transport(x, lambda u: u.sum(-1), steps=1, step_size=0.1, mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="particles must be"):
        transport(torch.randn(3, 2), lambda u: u.sum(-1), steps=1, step_size=0.1)


def test_nan_at_a_padding_position_does_not_silence_the_particle():
    x = torch.randn(2, 4, 3, 5)
    mask = torch.ones(2, 4, 3)
    mask[:, :, -1] = 0

    def grad_fn(u):
        g = -2 * u.clone()
        g[0, 0, -1, 0] = float("nan")  # only in padding
        return None, g

    moved, trace = transport(x, grad_fn=grad_fn, steps=1, step_size=0.1, mask=mask)
    assert not trace.nonfinite.any() and torch.isfinite(moved).all()
    assert (moved[0, 0, :2] != x[0, 0, :2]).any()
