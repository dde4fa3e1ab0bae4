"""Ridge regression with its strength chosen by cross-validation over folds of whole groups (prompts), and the
Pearson correlation it is judged by. Plain torch: the value heads (``value_fit``, ``prefix_value``) are fitted
with it because a closed-form head on frozen states beat SGD-fitted value models here (docs/benchmarks.md)."""

from __future__ import annotations

import torch

RIDGE_STRENGTHS = (1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)  # the cross-validated grid, relative to the sample count


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def ridge_solve(x, y, lam):
    """Standardised ridge: returns (w, b) in the original feature scale."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    ym = y.mean()
    a = z.T @ z + lam * len(z) * torch.eye(z.shape[1], dtype=z.dtype)
    w = torch.linalg.solve(a, z.T @ (y - ym)) / sd
    return w, ym - (w * mu).sum()


def ridge_cv(features: dict, targets: torch.Tensor, groups: torch.Tensor, *, lambdas=RIDGE_STRENGTHS,
             folds: int = 4, seed: int = 0) -> dict:
    """Out-of-fold correlation of every (layer, pooling, lambda), folds made of whole groups. Returns a table and
    the best entry."""
    y = targets.double()
    gen = torch.Generator().manual_seed(seed)
    uniq = groups.unique()
    uniq = uniq[torch.randperm(len(uniq), generator=gen)]
    fold_of = {int(u): i % folds for i, u in enumerate(uniq)}
    fold = torch.tensor([fold_of[int(u)] for u in groups])
    table = []
    for key, x in features.items():
        for lam in lambdas:
            oof = torch.empty_like(y)
            for f in range(folds):
                tr, va = fold != f, fold == f
                w, b = ridge_solve(x[tr], y[tr], lam)
                oof[va] = x[va] @ w + b
            table.append(dict(layer=key[0], pooling=key[1], ridge=lam, cv_corr=pearson(oof, y),
                              cv_mse=float(((oof - y) ** 2).mean())))
    best = max(table, key=lambda r: (r["cv_corr"] if r["cv_corr"] == r["cv_corr"] else -2))
    return dict(table=table, best=best)
