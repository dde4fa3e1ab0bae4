"""Fit a value model to the true rewards of reference rollouts, optionally decode-consistently.

Decode-consistent fitting (like noise-aware classifiers for diffusion guidance): besides the clean responses, the
value model sees perturbed embedding rows u + noise labelled with the true reward of *their decoded text*, so its
gradient learns to point where decoding is rewarded rather than off the token manifold.
"""

from __future__ import annotations

import torch

from vgf_llm.particles import NearestTokenDecoder, lift, movable_mask
from vgf_llm.rewards import combine_rewards
from vgf_llm.rollout import HFGenerateBackend, Rollouts
from vgf_llm.scorers import ValueModel, ValueModelConfig, active_adapter


def as_completion(prompt, text: str):
    """TRL's completion form matches the prompt's: a string, or an assistant message list."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def reward_texts(reward_funcs, weights, rows: list[dict], texts: list[str]) -> torch.Tensor:
    """True rewards of ``texts[i]`` for dataset row ``rows[i]`` (other columns forwarded); NaN where None."""
    prompts = [r["prompt"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    total, _ = combine_rewards(reward_funcs, weights, prompts,
                               [as_completion(p, t) for p, t in zip(prompts, texts, strict=True)], **columns)
    return torch.tensor([float("nan") if v is None else v for v in total], dtype=torch.float32)


def reward_rollouts(reward_funcs, weights, rows: list[dict], ro: Rollouts) -> torch.Tensor:
    """[G, N] true rewards of every rollout."""
    g, n, _ = ro.shape
    flat_rows = [rows[i] for i in range(g) for _ in range(n)]
    return reward_texts(reward_funcs, weights, flat_rows, [t for group in ro.texts for t in group]).view(g, n)


def perturbed_examples(ro: Rollouts, rows: list[dict], reward_funcs, weights, weight: torch.Tensor, tokenizer,
                       special: set[int], *, max_row_shift: float, copies: int = 1, seed: int = 0):
    """``copies`` noisy versions of every response: each movable row moves by a random vector of norm
    ~ U(0, max_row_shift) (one scale per response); the label is the true reward of the decoded noisy response.

    Returns (prompt_ids, prompt_mask, rows [B, T, d], mask [B, T], targets [B], tokens_changed_fraction).
    """
    g, n, t = ro.shape
    gen = torch.Generator().manual_seed(seed)
    decoder = NearestTokenDecoder(weight, exclude_ids=special)
    ids, cmask = ro.completion_ids.reshape(g * n, t), ro.completion_mask.reshape(g * n, t)
    movable = movable_mask(ids, cmask, special)
    clean = lift(weight, ids).float()
    out_rows, targets, changed = [], [], []
    for _ in range(copies):
        direction = torch.nn.functional.normalize(torch.randn(clean.shape, generator=gen), dim=-1)
        scale = torch.rand(g * n, 1, 1, generator=gen) * max_row_shift
        noisy = clean + direction * scale * movable[..., None]
        new_ids = decoder.decode(noisy, clean, ids, movable)
        texts = [tokenizer.decode(new_ids[i][cmask[i].bool()], skip_special_tokens=True) for i in range(g * n)]
        flat_rows = [rows[i // n] for i in range(g * n)]
        targets.append(reward_texts(reward_funcs, weights, flat_rows, texts))
        out_rows.append(noisy)
        changed.append(float(((new_ids != ids) & movable.bool()).sum() / movable.sum().clamp_min(1)))
    p_ids, p_mask = ro.prompt_ids.repeat_interleave(n, 0), ro.prompt_mask.repeat_interleave(n, 0)
    return (p_ids.repeat(copies, 1), p_mask.repeat(copies, 1), torch.cat(out_rows), cmask.repeat(copies, 1),
            torch.cat(targets), sum(changed) / len(changed))


def fit_value_model(model, tokenizer, reward_funcs, rows: list[dict], *, config: ValueModelConfig | None = None,
                    num_generations: int = 4, max_new_tokens: int = 64, temperature: float = 1.0,
                    reward_weights=None, decode_consistent_copies: int = 0, max_row_shift: float = 2.0,
                    epochs: int = 3, lr: float = 1e-3, batch_size: int = 16, seed: int = 0, rollouts=None,
                    rewards=None, progress: bool = True):
    """Sample ``num_generations`` reference responses per row, score them with the true reward, fit a value model.

    Pass ``rollouts``/``rewards`` to reuse samples already drawn. Returns (value_model, stats, rollouts, rewards).
    """
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
    vm = ValueModel(model, config)
    g, n, t = rollouts.shape
    p_ids, p_mask = rollouts.prompt_ids.repeat_interleave(n, 0), rollouts.prompt_mask.repeat_interleave(n, 0)
    responses, mask = rollouts.completion_ids.reshape(g * n, t), rollouts.completion_mask.reshape(g * n, t)
    targets = rewards.reshape(-1)
    stats = {"reward_mean": float(rewards.nanmean()), "num_samples": g * n}
    if decode_consistent_copies:
        weight = vm.embedding_weight
        pp, pm, noisy, nm, nt, frac = perturbed_examples(
            rollouts, rows, reward_funcs, reward_weights, weight, tokenizer, special_token_ids(tokenizer),
            max_row_shift=max_row_shift, copies=decode_consistent_copies, seed=seed + 1)
        p_ids, p_mask = torch.cat([p_ids, pp]), torch.cat([p_mask, pm])
        responses = torch.cat([lift(weight, responses).float(), noisy])
        mask, targets = torch.cat([mask, nm]), torch.cat([targets, nt])
        stats.update(perturbed_samples=len(nt), perturbed_tokens_changed=frac,
                     perturbed_reward_mean=float(nt.nanmean()))
    stats.update(vm.fit(p_ids, p_mask, responses, mask, targets, epochs=epochs, lr=lr, batch_size=batch_size,
                        seed=seed, progress=progress))
    return vm, stats, rollouts, rewards
