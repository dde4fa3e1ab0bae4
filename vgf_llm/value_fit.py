"""Fit a value model to the true rewards of reference rollouts.

Two ways to fit: ``method="lora"`` trains the value adapter and head by SGD (``ValueModel.fit``);
``method="ridge"`` keeps the adapter at zero (the frozen reference backbone) and solves a ridge regression of the
rewards on pooled response states, choosing the layer cut, the pooling and the ridge strength by K-fold
cross-validation *by prompt*. Ridge needs one forward pass over the samples, so it affords many more samples than
SGD on this machine, and its held-out correlation is an out-of-fold figure over every sample.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vgf_llm.rewards import reward_rollouts
from vgf_llm.rollout.hf import HFGenerateBackend, Rollouts
from vgf_llm.value import ValueModel, ValueModelConfig, active_adapter, first_layers, join_inputs, pearson

RIDGE_STRENGTHS = (1e-2, 0.1, 0.3, 1.0, 3.0, 10.0)  # the cross-validated grid, relative to the sample count


def fit_value_model(model, tokenizer, reward_funcs, rows: list[dict], *, config: ValueModelConfig | None = None,
                    num_generations: int = 4, max_new_tokens: int = 64, temperature: float = 1.0,
                    reward_weights=None, epochs: int = 3, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                    rollouts=None, rewards=None, progress: bool = True, method: str = "ridge",
                    split_by_prompt: bool = True,
                    ridge_layers=(4, 8, 12, 16, 20, 24, 30)):
    """Sample ``num_generations`` reference responses per row, score them with the true reward, fit a value model.

    Pass ``rollouts``/``rewards`` to reuse samples already drawn. Returns (value_model, stats, rollouts, rewards).
    ``method``: "lora" (SGD on adapter + head) or "ridge" (``fit_value_head``: closed-form head on the frozen
    backbone, layer cut from ``ridge_layers`` by cross-validation; ``config`` only gives the adapter name).
    ``split_by_prompt``: held-out samples are whole prompts, so the reported correlation is on prompts the fit
    never saw.
    """
    if method not in ("lora", "ridge"):
        raise ValueError(f"method must be 'lora' or 'ridge', got {method!r}")
    if not rows:
        raise ValueError("no prompts to fit the value model on")
    if rollouts is None:
        backend = HFGenerateBackend(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                    batch_size=8, progress=progress)
        with active_adapter(model, None):
            rollouts = backend.generate([r["prompt"] for r in rows], num_generations, seed)
    if rewards is None:
        rewards = reward_rollouts(reward_funcs, reward_weights, rows, rollouts)
    if method == "ridge":
        vm, stats = fit_value_head(model, rollouts, rewards, layers=ridge_layers, seed=seed,
                                   adapter_name=(config or ValueModelConfig()).adapter_name, progress=progress)
        return vm, stats, rollouts, rewards
    vm = ValueModel(model, config)
    groups = prompt_groups(rollouts) if split_by_prompt else None
    p_ids, p_mask, responses, mask = rollouts.flat()
    targets = rewards.reshape(-1)
    stats = {"reward_mean": float(rewards.nanmean()), "num_samples": len(targets)}
    stats.update(vm.fit(p_ids, p_mask, responses, mask, targets, epochs=epochs, lr=lr, batch_size=batch_size,
                        seed=seed, progress=progress, groups=groups))
    return vm, stats, rollouts, rewards


def prompt_groups(rollouts: Rollouts) -> torch.Tensor:
    """[G * N] group id per sample: samples of the same prompt *text* share a group (repeated prompts included)."""
    g, n, _ = rollouts.shape
    keys: dict[tuple, int] = {}
    ids = []
    for i in range(g):
        key = tuple(rollouts.prompt_ids[i][rollouts.prompt_mask[i].bool()].tolist())
        ids.append(keys.setdefault(key, len(keys)))
    return torch.tensor(ids).repeat_interleave(n)


@torch.no_grad()
def pooled_features(model, prompt_ids, prompt_mask, response_ids, response_mask, layers, *, batch_size: int = 16,
                    progress: bool = False) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, pooling): [B, d]} response states of the reference backbone exactly as ``ValueModel.heads`` pools
    them when cut after ``layer`` blocks with a zero adapter (final norm included), for every layer in one pass."""
    decoder = model.get_decoder()
    layers = sorted(set(layers))
    captured: dict[int, torch.Tensor] = {}

    def hook(layer):
        def save(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
        return save

    handles = [decoder.layers[layer - 1].register_forward_hook(hook(layer)) for layer in layers]
    weight = model.get_input_embeddings().weight
    feats: dict[tuple[int, str], list[torch.Tensor]] = {(la, pool): [] for la in layers for pool in ("mean", "last")}
    try:
        with active_adapter(model, None), first_layers(decoder, layers[-1]):
            starts = range(0, response_ids.shape[0], batch_size)
            for s in tqdm(starts, desc="features", disable=not progress, leave=False):
                sl = slice(s, s + batch_size)
                rmask = response_mask[sl].to(weight.device)
                inputs, mask, positions = join_inputs(weight, prompt_ids[sl], prompt_mask[sl],
                                                      weight[response_ids[sl].to(weight.device)], rmask)
                decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions)
                m = rmask.float()
                last = (m.sum(1).long() - 1).clamp_min(0)
                for la in layers:
                    states = decoder.norm(captured[la])[:, prompt_ids.shape[1]:].float()
                    feats[(la, "mean")].append(((states * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1))
                                               .cpu())
                    feats[(la, "last")].append(states[torch.arange(states.shape[0]), last].cpu())
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).double() for k, v in feats.items()}


def ridge_solve(x, y, lam):
    """Standardised ridge: returns (w, b) in the original feature scale."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    ym = y.mean()
    a = z.T @ z + lam * len(z) * torch.eye(z.shape[1], dtype=z.dtype)
    w = torch.linalg.solve(a, z.T @ (y - ym)) / sd
    return w, ym - (w * mu).sum()


@torch.no_grad()
def _set_head(value_model: ValueModel, w: torch.Tensor, b: torch.Tensor) -> None:
    """Write a solved ridge (weights [d], intercept) into the value model's linear head."""
    value_model.head.weight.copy_(w.float()[None].to(value_model.head.weight))
    value_model.head.bias.fill_(float(b))


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


@torch.no_grad()
def refit_head(value_model: ValueModel, prompt_ids, prompt_mask, response_ids, response_mask, targets: torch.Tensor,
               groups: torch.Tensor, *, lambdas=RIDGE_STRENGTHS, folds: int = 4, seed: int = 0,
               batch_size: int = 16) -> dict | None:
    """Replace ``value_model``'s linear head by a ridge regression of ``targets`` on the states it pools (its own
    trunk and adapter, unchanged), the ridge strength chosen by out-of-fold correlation over folds of whole
    ``groups``. One forward pass and a d x d solve: cheap enough to refit on a long buffer every training step.
    Returns the chosen strength and its out-of-fold correlation, or None (head untouched) when fewer than
    ``2 * folds`` finite targets or fewer than 2 groups exist."""
    y = torch.as_tensor(targets).double()
    keep = torch.isfinite(y)
    groups = torch.as_tensor(groups)[keep]
    if int(keep.sum()) < 2 * folds or len(groups.unique()) < 2:
        return None
    weight = value_model.embedding_weight
    idx = keep.nonzero().squeeze(1)
    x = torch.cat([value_model.pooled_embeds(prompt_ids[sel], prompt_mask[sel], weight[response_ids[sel].to(
                       weight.device)], response_mask[sel].to(weight.device)).double().cpu()
                   for sel in idx.split(batch_size)])
    cv = ridge_cv({"head": x}, y[keep], groups, lambdas=lambdas, folds=min(folds, len(groups.unique())), seed=seed)
    best = cv["best"]
    w, b = ridge_solve(x, y[keep], best["ridge"])
    _set_head(value_model, w, b)
    return {"ridge": best["ridge"], "cv_corr": best["cv_corr"], "num_samples": int(keep.sum())}


def fit_value_head(model, rollouts: Rollouts, rewards: torch.Tensor, *, layers=(4, 8, 12, 16, 20, 24, 30),
                   lambdas=RIDGE_STRENGTHS, folds: int = 4, adapter_name: str = "value",
                   seed: int = 0, batch_size: int = 16, progress: bool = False) -> tuple[ValueModel, dict]:
    """Ridge value model: the reference backbone (zero adapter) cut at the cross-validated layer + a linear head
    solved in closed form on all samples. ``stats["val_corr"]`` is the out-of-fold correlation (split by prompt)
    of the chosen configuration; ``stats["cv"]`` the whole table."""
    n_layers = model.config.num_hidden_layers
    layers = sorted({min(max(1, int(la)), n_layers) for la in layers})
    p_ids, p_mask, ids, mask = rollouts.flat()
    y = rewards.reshape(-1).double()
    keep = torch.isfinite(y)
    if keep.sum() < 2 * folds:
        raise ValueError(f"need at least {2 * folds} finite rewards for a ridge value model, got {int(keep.sum())}")
    feats = pooled_features(model, p_ids[keep], p_mask[keep], ids[keep], mask[keep], layers, batch_size=batch_size,
                            progress=progress)
    groups = prompt_groups(rollouts)[keep]
    cv = ridge_cv(feats, y[keep], groups, lambdas=lambdas, folds=min(folds, len(groups.unique())), seed=seed)
    best = cv["best"]
    w, b = ridge_solve(feats[(best["layer"], best["pooling"])], y[keep], best["ridge"])
    vm = ValueModel(model, ValueModelConfig(num_layers=best["layer"], pooling=best["pooling"],
                                            adapter_name=adapter_name))
    _set_head(vm, w, b)
    stats = dict(method="ridge", val_corr=best["cv_corr"], val_mse=best["cv_mse"], layer=best["layer"],
                 pooling=best["pooling"], ridge=best["ridge"], num_samples=int(keep.sum()),
                 num_prompts=len(groups.unique()), reward_mean=float(y[keep].mean()),
                 reward_var=float(y[keep].var()), cv=cv["table"])
    return vm, stats
