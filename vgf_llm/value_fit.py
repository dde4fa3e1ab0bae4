"""Fit a value model to the true rewards of reference rollouts: the frozen backbone (adapters off) and a ridge
regression of the rewards on its pooled response states, with the layer cut, the pooling and the ridge strength
chosen by K-fold cross-validation *by prompt*. One forward pass over the samples, and its held-out correlation is
an out-of-fold figure over every sample."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vgf_llm.adapters import active_adapter, first_layers
from vgf_llm.rewards import reward_rollouts
from vgf_llm.ridge import RIDGE_STRENGTHS, ridge_cv, ridge_solve
from vgf_llm.rollout.hf import HFGenerateBackend, Rollouts
from vgf_llm.value import ValueModel, ValueModelConfig, join_inputs


def fit_value_model(model, tokenizer, reward_funcs, rows: list[dict], *, num_generations: int = 4,
                    max_new_tokens: int = 64, temperature: float = 1.0, reward_weights=None, seed: int = 0,
                    rollouts=None, rewards=None, progress: bool = True, ridge_layers=(4, 8, 12, 16, 20, 24, 30)):
    """Sample ``num_generations`` reference responses per row, score them with the true reward, fit a ridge value
    model (``fit_value_head``: layer cut from ``ridge_layers`` by cross-validation by prompt).

    Pass ``rollouts``/``rewards`` to reuse samples already drawn. Returns (value_model, stats, rollouts, rewards).
    """
    if not rows:
        raise ValueError("no prompts to fit the value model on")
    if rollouts is None:
        backend = HFGenerateBackend(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                    batch_size=8, progress=progress)
        with active_adapter(model, None):
            rollouts = backend.generate([r["prompt"] for r in rows], num_generations, seed)
    if rewards is None:
        rewards = reward_rollouts(reward_funcs, reward_weights, rows, rollouts)
    vm, stats = fit_value_head(model, rollouts, rewards, layers=ridge_layers, seed=seed, progress=progress)
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
    """{(layer, pooling): [B, d]} response states of the reference backbone exactly as ``ValueModel`` pools them
    when cut after ``layer`` blocks (final norm included), for every layer in one pass."""
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


def fit_value_head(model, rollouts: Rollouts, rewards: torch.Tensor, *, layers=(4, 8, 12, 16, 20, 24, 30),
                   lambdas=RIDGE_STRENGTHS, folds: int = 4, seed: int = 0, batch_size: int = 16,
                   progress: bool = False) -> tuple[ValueModel, dict]:
    """Ridge value model: the reference backbone cut at the cross-validated layer + a linear head solved in closed
    form on all samples. ``stats["val_corr"]`` is the out-of-fold correlation (split by prompt) of the chosen
    configuration; ``stats["cv"]`` the whole table."""
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
    vm = ValueModel(model, ValueModelConfig(num_layers=best["layer"], pooling=best["pooling"]))
    vm.set_head(w, float(b))
    stats = dict(method="ridge", val_corr=best["cv_corr"], val_mse=best["cv_mse"], layer=best["layer"],
                 pooling=best["pooling"], ridge=best["ridge"], num_samples=int(keep.sum()),
                 num_prompts=len(groups.unique()), reward_mean=float(y[keep].mean()),
                 reward_var=float(y[keep].var()), cv=cv["table"])
    return vm, stats
