"""Training quality: VGF vs VGF with budget 0 (best-of-N distillation) vs TRL GRPO, all with LoRA, in one run.

Every arm starts from the same base model, trains on the same prompts (one epoch of ``steps x prompts``; the order
differs between the libraries) with the same seed, the same LoRA rank and the same number of generated completions
per optimizer step (``prompts x generations``; TRL's ``per_device_train_batch_size`` counts completions, so it is set
to ``prompts x generations``). Each arm trains in its own spawned process (its own peak memory figure), then one more
process scores it on held-out prompts (the base is scored first, the same way):

- accuracy: the true reward (reasoning-gym's checker) of one greedy completion per held-out prompt;
- sampled accuracy: the mean true reward of ``--kl_samples`` temperature-1 completions per prompt;
- KL to the base: along those sampled completions of the trained policy, the exact KL between the policy's and the
  base model's next-token distributions at every completion position (summed over the vocabulary), reported per
  token and per sequence (a sample estimate of KL(policy || base) on held-out prompts).

Writes ``<out_dir>/<name>.json``, ``<name>.md`` (the table) and ``<name>.png`` (held-out accuracy vs KL, and the
training reward per step).

    python benchmarks/train.py                              # SmolLM2-135M, chain_sum, 6 steps x 4 prompts x 8
    python benchmarks/train.py --steps 32 --seeds 0,1,2     # bigger
    python benchmarks/train.py --tiny --model PATH          # smoke run on a tiny model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arms  # noqa: E402

ROOT = Path(__file__).resolve().parent


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else float("nan")


def _std(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def train_arm(s: arms.ArmSettings, arm: str, adapter_dir: str, threads: int, inline: bool = False) -> dict:
    """Train one arm, save its adapter to ``adapter_dir``; wall-clock, peak memory and the training logs."""
    arms.set_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer = arms.grpo_trainer(s, out) if arm == "grpo" else arms.vgf_trainer(s, arm, out)
        built = time.perf_counter()
        with arms.rss_sampler() as rss:
            trainer.train()
        trained = time.perf_counter()
        trainer.save_model(adapter_dir)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"arm": arm, "seed": s.seed, "wall_seconds": trained - start, "train_seconds": trained - built,
            "seconds_per_step": (trained - built) / max(1, len(logs)), "steps": len(logs),
            "peak_rss_mb": rss["peak_mb"] if inline else arms.peak_rss_mb(), "gpu_peak_mb": arms.gpu_peak_mb(),
            "completions_generated": len(logs) * s.prompts * s.generations,
            "train_reward_first": logs[0]["reward"] if logs else float("nan"),
            "train_reward_mean": _mean(h["reward"] for h in logs),
            "train_kl_last": logs[-1].get("kl", float("nan")) if logs else float("nan"),
            "log_history": trainer.state.log_history}


def kl_to_base(model, tok, rows, adapter: str | None, samples: int, max_new_tokens: int, seed: int,
               reward_sets: dict, batch_size: int = 8) -> dict:
    """Sampled completions of the policy (adapter ``adapter``) on ``rows``; their rewards under every set of
    ``reward_sets`` (``{name: reward_funcs}``, reported as ``sampled_<name>``) and the exact per-position
    KL(policy || base) along them."""
    import torch

    from vgf_llm.rewards import reward_texts
    from vgf_llm.rollout.hf import HFGenerateBackend
    from vgf_llm.value import active_adapter

    backend = HFGenerateBackend(model, tok, max_new_tokens=max_new_tokens, temperature=1.0, batch_size=batch_size)
    model.eval()
    kl_tokens, kl_sums, token_counts = [], [], []
    rewards: dict[str, list[float]] = {name: [] for name in reward_sets}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [r["prompt"] for r in chunk]
        with torch.no_grad(), active_adapter(model, adapter):
            ro = backend.generate(prompts, samples, seed=seed + start)
        n = ro.shape[1]
        p_ids, p_mask, c_ids, c_mask = ro.flat()
        input_ids = torch.cat([p_ids, c_ids], 1)
        mask = torch.cat([p_mask, c_mask], 1)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        p = ro.prompt_ids.shape[1]
        dev = model.device
        kwargs = {"input_ids": input_ids.to(dev), "attention_mask": mask.to(dev), "position_ids": positions.to(dev)}
        with torch.no_grad():
            with active_adapter(model, adapter):
                lp = torch.log_softmax(model(**kwargs).logits[:, p - 1:-1].float(), -1)
            with active_adapter(model, None):
                lb = torch.log_softmax(model(**kwargs).logits[:, p - 1:-1].float(), -1)
        per_pos = (lp.exp() * (lp - lb)).sum(-1).cpu()  # [B, T] exact KL of the next-token distributions
        cmask = c_mask.float()
        per_seq = (per_pos * cmask).sum(-1)
        kl_sums += per_seq.tolist()
        token_counts += cmask.sum(-1).tolist()
        kl_tokens.append(float((per_pos * cmask).sum()))
        flat_rows = [r for r in chunk for _ in range(n)]
        texts = [x for group in ro.texts for x in group]
        for name, funcs in reward_sets.items():
            rewards[name] += reward_texts(funcs, None, flat_rows, texts).tolist()
    out = {"kl_per_token": sum(kl_tokens) / max(1.0, sum(token_counts)), "kl_per_sequence": _mean(kl_sums),
           "kl_per_sequence_sem": _std(kl_sums) / math.sqrt(max(1, len(kl_sums))),
           "sampled_n": len(kl_sums), "mean_sampled_length": _mean(token_counts)}
    for name, values in rewards.items():
        out[f"sampled_{name}"] = _mean(values)
    return out


def evaluate(s: arms.ArmSettings, adapters: dict[str, str], eval_prompts: int, kl_samples: int, threads: int,
             eval_seed: int = 0, with_base: bool = True) -> dict:
    """Held-out scores of the base and of every adapter (``{key: folder}``), in one process, one base model."""
    arms.set_threads(threads)
    from vgf_llm.evaluation import policy_rewards
    from vgf_llm.rewards import reasoning_gym_reward
    from vgf_llm.tasks import task_dataset

    model, tok = arms.base_model(s)
    model.eval()
    rows = [dict(r) for r in task_dataset(s.task, eval_prompts, seed=eval_seed, split="test")]
    unique = len({json.dumps(r["prompt"]) for r in rows})
    funcs = [reasoning_gym_reward]
    out = {"n": len(rows), "unique_prompts": unique}

    def score(adapter):
        start = time.perf_counter()
        acc, texts = policy_rewards(model, tok, rows, funcs, adapter=adapter, max_new_tokens=s.max_completion_length,
                                    batch_size=8, progress=False)
        res = {"accuracy": _mean(acc), "n": len(acc), "examples": texts[:3]}
        if kl_samples:
            res.update(kl_to_base(model, tok, rows, adapter, kl_samples, s.max_completion_length, eval_seed + 7,
                                  {"accuracy": funcs}))
        res["eval_seconds"] = time.perf_counter() - start
        return res

    if with_base:
        out["base"] = score(None)
    out["adapters"] = {}
    for key, folder in adapters.items():
        model.load_adapter(folder, adapter_name=key)
        out["adapters"][key] = score(key)
        model.delete_adapter(key)
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    base = results["base"]
    seeds = results["seeds"]
    lines = [
        f"Held-out: {base['n']} `{s['task']}` test prompts ({base['unique_prompts']} unique), greedy accuracy; sampled "
        f"accuracy and KL over {results['kl_samples']} temperature-1 completions per prompt. Training: {s['steps']} "
        f"steps x {s['prompts']} prompts x {s['generations']} completions (max {s['max_completion_length']} tokens), "
        f"LoRA r={s['lora_r']}, lr {s['learning_rate']}, seeds {seeds}.",
        "",
        "| arm | held-out acc (greedy) | sampled acc | KL/token to base | KL/sequence | train reward (rollouts, mean "
        "over steps) | train wall-clock s | s/step | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base (no training) | {base['accuracy']:.3f} | {base.get('sampled_accuracy', float('nan')):.3f} | 0 | 0 "
        "| - | - | - | - |",
    ]
    for arm, r in results["arms"].items():
        pm = "" if len(seeds) == 1 else " ± {:.3f}"

        def cell(key, fmt=".3f", r=r, pm=pm):
            return f"{r[key]:{fmt}}" + (pm.format(r[key + '_std']) if pm and key + "_std" in r else "")

        lines.append(f"| {arms.ARM_LABELS[arm]} | {cell('accuracy')} | {cell('sampled_accuracy')} | "
                     f"{cell('kl_per_token', '.4f')} | {cell('kl_per_sequence', '.3f')} | {cell('train_reward_mean')} "
                     f"| {r['train_seconds']:.0f} | {r['seconds_per_step']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"vgf": "tab:blue", "bon": "tab:orange", "grpo": "tab:green"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = results["base"]
    ax.scatter([0], [base["accuracy"]], marker="*", s=160, color="black", label="base", zorder=3)
    for arm in results["arms"]:
        per_seed = results["per_seed"][arm]
        xs = [r["kl_per_token"] for r in per_seed]
        ys = [r["accuracy"] for r in per_seed]
        ax.scatter(xs, ys, color=colors.get(arm), alpha=0.45, s=30)
        m = results["arms"][arm]
        ax.scatter([m["kl_per_token"]], [m["accuracy"]], color=colors.get(arm), s=90, label=arms.ARM_LABELS[arm],
                   edgecolor="black", zorder=3)
        for r in per_seed:
            steps = [h["step"] for h in r["log_history"] if "reward" in h]
            rewards = [h["reward"] for h in r["log_history"] if "reward" in h]
            ax2.plot(steps, rewards, color=colors.get(arm), alpha=0.8,
                     label=arms.ARM_LABELS[arm] if r is per_seed[0] else None)
    ax.set_xlabel("KL(policy || base) per token, held-out prompts")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title("reward vs KL")
    ax.legend(fontsize=8)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("mean true reward of the step's rollouts")
    ax2.set_title("training reward (VGF rolls out from the base)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = arms.ArmSettings()
    arms.add_shared_arguments(p, d)
    p.add_argument("--steps", type=int, default=d.steps, help="Optimizer steps per arm.")
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--grpo_beta", type=float, default=d.grpo_beta)
    p.add_argument("--eval_prompts", type=int, default=32)
    p.add_argument("--kl_samples", type=int, default=2, help="Sampled completions per held-out prompt for the KL.")
    p.add_argument("--seeds", default="0", help="Comma list; every arm runs every seed.")
    p.add_argument("--inline", action="store_true", help="Run the arms in this process (no spawn; peak memory is "
                                                         "then RSS sampled during training only).")
    p.add_argument("--tiny", action="store_true", help="Smoke run: 2 steps x 2 prompts x 2 completions x 8 tokens.")
    p.add_argument("--out_dir", default=str(ROOT / "results"))
    p.add_argument("--name", default="train", help="Output file stem.")
    p.add_argument("--keep_adapters", default=None, help="Folder to keep the trained adapters in.")
    a = p.parse_args(argv)
    if a.tiny:
        a.steps, a.prompts, a.generations, a.max_completion_length = 2, 2, 2, 8
        a.eval_prompts, a.kl_samples, a.transport_steps, a.value_num_layers = 4, 1, 1, None
    arms.offline()
    arms.set_threads(a.threads)
    chosen = arms.chosen_arms(p, a.arms)
    seeds = [int(x) for x in a.seeds.split(",")]
    settings = {seed: arms.settings_from(a, steps=a.steps, learning_rate=a.learning_rate, seed=seed,
                                         grpo_beta=a.grpo_beta) for seed in seeds}
    run = arms.in_subprocess if not a.inline else (lambda f, *args, **kw: f(*args, **kw))
    adapter_root = Path(a.keep_adapters) if a.keep_adapters else Path(tempfile.mkdtemp(prefix="vgf_bench_"))
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"settings": settings[seeds[0]].as_dict(), "seeds": seeds, "kl_samples": a.kl_samples,
               "eval_prompts": a.eval_prompts, "per_seed": {arm: [] for arm in chosen}}
    results |= arms.provenance("train.py", argv)
    start = time.time()
    try:
        print("[train] held-out evaluation of the base ...", flush=True)
        ev = run(evaluate, settings[seeds[0]], {}, a.eval_prompts, a.kl_samples, a.threads)
        results["base"] = ev["base"] | {"n": ev["n"], "unique_prompts": ev["unique_prompts"]}
        for seed in seeds:
            for arm in chosen:  # train, then score on held-out prompts, then save what finished
                folder = adapter_root / f"{arm}-seed{seed}"
                print(f"[train] {arm} seed {seed} ...", flush=True)
                r = run(train_arm, settings[seed], arm, str(folder), a.threads, a.inline)
                print(f"[train] {arm} seed {seed}: {r['train_seconds']:.0f} s, peak {r['peak_rss_mb']:.0f} MB, "
                      f"train reward {r['train_reward_mean']:.3f}; held-out evaluation ...", flush=True)
                key = f"{arm}-seed{seed}"
                r.update(run(evaluate, settings[seed], {key: str(folder)}, a.eval_prompts, a.kl_samples,
                             a.threads, with_base=False)["adapters"][key])
                print(f"[train] {arm} seed {seed}: held-out accuracy {r['accuracy']:.3f}, KL/token "
                      f"{r.get('kl_per_token', float('nan')):.4f}", flush=True)
                results["per_seed"][arm].append(r)
                finalize(results, chosen, out_dir, a.name, start, partial=True)
    finally:
        if not a.keep_adapters:
            shutil.rmtree(adapter_root, ignore_errors=True)
    results = finalize(results, chosen, out_dir, a.name, start, partial=False)
    print(results["table_md"])
    print(f"[train] wrote {out_dir / a.name}.json/.md/.png in {results['wall_seconds']:.0f} s")
    return results


def finalize(results: dict, chosen: list[str], out_dir: Path, name: str, start: float, partial: bool) -> dict:
    """Summaries over seeds, then the JSON, the Markdown table and the plot; after every arm too (``partial``), so
    that an interrupted run still leaves what finished."""
    results["arms"] = {}
    for arm in chosen:
        per = [r for r in results["per_seed"][arm] if "accuracy" in r]
        if not per:
            continue
        summary = {}
        for key in ("accuracy", "sampled_accuracy", "kl_per_token", "kl_per_sequence", "train_reward_mean",
                    "train_seconds", "seconds_per_step", "peak_rss_mb", "wall_seconds"):
            summary[key] = _mean(r.get(key) for r in per)
            summary[key + "_std"] = _std(r.get(key) for r in per)
        results["arms"][arm] = summary
    results["partial"] = partial
    results["wall_seconds"] = time.time() - start
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["table_md"] = markdown(results)
    arms.write_json(out_dir / f"{name}.json", results)
    (out_dir / f"{name}.md").write_text(results["table_md"] + "\n")
    plot(results, out_dir / f"{name}.png")
    return results


if __name__ == "__main__":
    main()
