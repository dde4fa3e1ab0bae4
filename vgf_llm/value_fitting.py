"""Fit a value model to the true rewards of reference rollouts, optionally decode-consistently.

Two ways to fit: ``method="lora"`` trains the value adapter and head by SGD (``ValueModel.fit``);
``method="ridge"`` keeps the adapter at zero (the frozen reference backbone) and solves a ridge regression of the
rewards on pooled response states, choosing the layer cut, the pooling and the ridge strength by K-fold
cross-validation *by prompt*. Ridge needs one forward pass over the samples, so it affords many more samples than
SGD on this machine, and its held-out correlation is an out-of-fold figure over every sample.

Decode-consistent fitting (like noise-aware classifiers for diffusion guidance): besides the clean responses, the
value model sees perturbed embedding rows (moved part of the way towards reference top-k tokens) labelled with the
true reward of *their decoded text*, so its gradient learns to point where decoding is rewarded rather than off the
token manifold.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vgf_llm.decoding import ReferenceTopKDecoder
from vgf_llm.particles import lift, movable_mask
from vgf_llm.rewards import combine_rewards
from vgf_llm.rollout import HFGenerateBackend, Rollouts
from vgf_llm.scorers import ValueModel, ValueModelConfig, active_adapter, first_layers, join_inputs, pearson


def as_completion(prompt, text: str):
    """TRL's completion form matches the prompt's: a string, or an assistant message list."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def reward_texts_and_parts(reward_funcs, weights, rows: list[dict], texts: list[str],
                           **extra) -> tuple[torch.Tensor, torch.Tensor]:
    """True rewards of ``texts[i]`` for dataset row ``rows[i]`` (other columns and ``extra`` keywords such as
    ``trainer_state`` forwarded, as TRL does): the total (NaN where None) and each function's [B, F] part."""
    prompts = [r["prompt"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    total, per_func = combine_rewards(reward_funcs, weights, prompts,
                                      [as_completion(p, t) for p, t in zip(prompts, texts, strict=True)],
                                      **columns, **extra)
    return torch.tensor([float("nan") if v is None else v for v in total], dtype=torch.float32), per_func


def reward_texts(reward_funcs, weights, rows: list[dict], texts: list[str]) -> torch.Tensor:
    """True rewards of ``texts[i]`` for dataset row ``rows[i]`` (other columns forwarded); NaN where None."""
    return reward_texts_and_parts(reward_funcs, weights, rows, texts)[0]


def reward_rollouts(reward_funcs, weights, rows: list[dict], ro: Rollouts) -> torch.Tensor:
    """[G, N] true rewards of every rollout."""
    g, n, _ = ro.shape
    flat_rows = [rows[i] for i in range(g) for _ in range(n)]
    return reward_texts(reward_funcs, weights, flat_rows, [t for group in ro.texts for t in group]).view(g, n)


def perturbed_examples(ro: Rollouts, rows: list[dict], reward_funcs, weights, model, weight: torch.Tensor,
                       tokenizer, special: set[int], *, edit_fraction: float = 0.2, k: int = 8, copies: int = 1,
                       seed: int = 0):
    """``copies`` perturbed versions of every response, shaped like the moves the transport proposes: in each
    response a fraction ~ U(0, ``edit_fraction``) of the movable rows moves towards one of the reference's top-k
    tokens at that position (a random one), by a random share U(0, 1) of the way. The label is the true reward of
    the nearest-token decoding of the perturbed rows, so rows moved more than about half way decode to the other
    token and the value model sees what such edits are worth. (Isotropic noise of a fixed norm, the first version,
    flipped 0% of SmolLM2's tokens: rows sit far apart.)

    Returns (prompt_ids, prompt_mask, rows [B, T, d], mask [B, T], targets [B], tokens_changed_fraction).
    """
    if not 0 < edit_fraction <= 1:
        raise ValueError(f"edit_fraction must be in (0, 1], got {edit_fraction}")
    g, n, t = ro.shape
    gen = torch.Generator().manual_seed(seed)
    reference = ReferenceTopKDecoder(model, k=k, exclude_ids=special, embedding_weight=weight)
    candidates = reference.candidates(ro.completion_ids, ro.prompt_ids, ro.prompt_mask).reshape(g * n, t, -1)
    decoder = reference.nearest
    table = decoder.weight.float()
    ids, cmask = ro.completion_ids.reshape(g * n, t), ro.completion_mask.reshape(g * n, t)
    movable = movable_mask(ids, cmask, special).bool()
    clean = lift(weight, ids).float()
    out_rows, targets, changed = [], [], []
    for _ in range(copies):
        share = torch.rand(g * n, 1, generator=gen) * edit_fraction
        moving = movable & (torch.rand(g * n, t, generator=gen) < share)
        pick = torch.randint(1, candidates.shape[-1], (g * n, t, 1), generator=gen)
        towards = table[candidates.gather(-1, pick).squeeze(-1)]
        amount = torch.rand(g * n, t, 1, generator=gen) * moving[..., None]
        noisy = clean + amount * (towards - clean)
        new_ids = decoder.decode(noisy, clean, ids, moving.float())
        texts = [tokenizer.decode(new_ids[i][cmask[i].bool()], skip_special_tokens=True) for i in range(g * n)]
        flat_rows = [rows[i // n] for i in range(g * n)]
        targets.append(reward_texts(reward_funcs, weights, flat_rows, texts))
        out_rows.append(noisy)
        changed.append(float(((new_ids != ids) & movable).sum() / movable.sum().clamp_min(1)))
    p_ids, p_mask = ro.prompt_ids.repeat_interleave(n, 0), ro.prompt_mask.repeat_interleave(n, 0)
    return (p_ids.repeat(copies, 1), p_mask.repeat(copies, 1), torch.cat(out_rows), cmask.repeat(copies, 1),
            torch.cat(targets), sum(changed) / len(changed))


def fit_value_model(model, tokenizer, reward_funcs, rows: list[dict], *, config: ValueModelConfig | None = None,
                    num_generations: int = 4, max_new_tokens: int = 64, temperature: float = 1.0,
                    reward_weights=None, decode_consistent_copies: int = 0, edit_fraction: float = 0.2,
                    epochs: int = 3, lr: float = 1e-3, batch_size: int = 16, seed: int = 0, rollouts=None,
                    rewards=None, progress: bool = True, method: str = "lora", split_by_prompt: bool = True,
                    ridge_layers=(4, 8, 12, 16, 20, 24, 30)):
    """Sample ``num_generations`` reference responses per row, score them with the true reward, fit a value model.

    Pass ``rollouts``/``rewards`` to reuse samples already drawn. Returns (value_model, stats, rollouts, rewards).
    ``method``: "lora" (SGD on adapter + head) or "ridge" (``fit_value_head``: closed-form head on the frozen
    backbone, layer cut from ``ridge_layers`` by cross-validation; ``config`` only gives the adapter name).
    ``split_by_prompt``: held-out samples are whole prompts (with their noisy copies), so the reported
    correlation is on prompts the fit never saw.
    """
    if method not in ("lora", "ridge"):
        raise ValueError(f"method must be 'lora' or 'ridge', got {method!r}")
    from vgf_llm.sampler import special_token_ids

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
        if decode_consistent_copies:
            raise ValueError("decode-consistent copies need method='lora'")
        vm, stats = fit_value_head(model, rollouts, rewards, layers=ridge_layers, seed=seed,
                                   adapter_name=(config or ValueModelConfig()).adapter_name, progress=progress)
        return vm, stats, rollouts, rewards
    vm = ValueModel(model, config)
    g, n, t = rollouts.shape
    groups = prompt_groups(rollouts) if split_by_prompt else None
    p_ids, p_mask = rollouts.prompt_ids.repeat_interleave(n, 0), rollouts.prompt_mask.repeat_interleave(n, 0)
    responses, mask = rollouts.completion_ids.reshape(g * n, t), rollouts.completion_mask.reshape(g * n, t)
    targets = rewards.reshape(-1)
    stats = {"reward_mean": float(rewards.nanmean()), "num_samples": g * n}
    if decode_consistent_copies:
        weight = vm.embedding_weight
        pp, pm, noisy, nm, nt, frac = perturbed_examples(
            rollouts, rows, reward_funcs, reward_weights, model, weight, tokenizer, special_token_ids(tokenizer),
            edit_fraction=edit_fraction, copies=decode_consistent_copies, seed=seed + 1)
        p_ids, p_mask = torch.cat([p_ids, pp]), torch.cat([p_mask, pm])
        responses = torch.cat([lift(weight, responses).float(), noisy])
        mask, targets = torch.cat([mask, nm]), torch.cat([targets, nt])
        if groups is not None:  # a noisy copy belongs to its clean response's prompt
            groups = torch.cat([groups] + [groups] * decode_consistent_copies)
        stats.update(perturbed_samples=len(nt), perturbed_tokens_changed=frac,
                     perturbed_reward_mean=float(nt.nanmean()))
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


def _ridge(x, y, lam):
    """Standardised ridge: returns (w, b) in the original feature scale."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    ym = y.mean()
    a = z.T @ z + lam * len(z) * torch.eye(z.shape[1], dtype=z.dtype)
    w = torch.linalg.solve(a, z.T @ (y - ym)) / sd
    return w, ym - (w * mu).sum()


def ridge_cv(features: dict, targets: torch.Tensor, groups: torch.Tensor, *, lambdas=(1e-2, 0.1, 0.3, 1.0, 3.0, 10.0),
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
                w, b = _ridge(x[tr], y[tr], lam)
                oof[va] = x[va] @ w + b
            table.append(dict(layer=key[0], pooling=key[1], ridge=lam, cv_corr=pearson(oof, y),
                              cv_mse=float(((oof - y) ** 2).mean())))
    best = max(table, key=lambda r: (r["cv_corr"] if r["cv_corr"] == r["cv_corr"] else -2))
    return dict(table=table, best=best)


def fit_value_head(model, rollouts: Rollouts, rewards: torch.Tensor, *, layers=(4, 8, 12, 16, 20, 24, 30),
                   lambdas=(1e-2, 0.1, 0.3, 1.0, 3.0, 10.0), folds: int = 4, adapter_name: str = "value",
                   seed: int = 0, batch_size: int = 16, progress: bool = False) -> tuple[ValueModel, dict]:
    """Ridge value model: the reference backbone (zero adapter) cut at the cross-validated layer + a linear head
    solved in closed form on all samples. ``stats["val_corr"]`` is the out-of-fold correlation (split by prompt)
    of the chosen configuration; ``stats["cv"]`` the whole table."""
    g, n, t = rollouts.shape
    n_layers = model.config.num_hidden_layers
    layers = sorted({min(max(1, int(la)), n_layers) for la in layers})
    p_ids, p_mask = rollouts.prompt_ids.repeat_interleave(n, 0), rollouts.prompt_mask.repeat_interleave(n, 0)
    ids, mask = rollouts.completion_ids.reshape(g * n, t), rollouts.completion_mask.reshape(g * n, t)
    y = rewards.reshape(-1).double()
    keep = torch.isfinite(y)
    if keep.sum() < 2 * folds:
        raise ValueError(f"need at least {2 * folds} finite rewards for a ridge value model, got {int(keep.sum())}")
    feats = pooled_features(model, p_ids[keep], p_mask[keep], ids[keep], mask[keep], layers, batch_size=batch_size,
                            progress=progress)
    groups = prompt_groups(rollouts)[keep]
    cv = ridge_cv(feats, y[keep], groups, lambdas=lambdas, folds=min(folds, len(groups.unique())), seed=seed)
    best = cv["best"]
    w, b = _ridge(feats[(best["layer"], best["pooling"])], y[keep], best["ridge"])
    vm = ValueModel(model, ValueModelConfig(num_layers=best["layer"], pooling=best["pooling"],
                                            adapter_name=adapter_name))
    with torch.no_grad():
        vm.head.weight.copy_(w.float()[None].to(vm.head.weight))
        vm.head.bias.fill_(float(b))
    stats = dict(method="ridge", val_corr=best["cv_corr"], val_mse=best["cv_mse"], layer=best["layer"],
                 pooling=best["pooling"], ridge=best["ridge"], num_samples=int(keep.sum()),
                 num_prompts=len(groups.unique()), reward_mean=float(y[keep].mean()),
                 reward_var=float(y[keep].var()), cv=cv["table"])
    return vm, stats
