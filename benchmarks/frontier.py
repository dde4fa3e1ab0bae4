"""The reward-KL frontier: VGFTrainer vs its own budget 0 (best-of-N distillation) vs TRL GRPO, checkpoints along
each run scored on held-out prompts, several seeds, in one script run.

Tasks:

- ``helpful`` (default): the offline gold/proxy reward-model task (Gao et al. 2022's protocol). Every arm trains on
  the proxy reward model ``smollm2-135m-helpful-rm`` (build it once: ``vgf-llm models prepare
  smollm2-135m-helpful-rm``). Held-out prompts are scored by the *gold* reward (``vgf_llm.rewards.gold_helpful``),
  which no arm ever sees, and by the proxy;
- ``chain_sum`` / ``basic_arithmetic``: reasoning-gym's checker is both the training and the evaluation reward.

Every arm (``arms.py``: ``vgf_steer_prefix``, ``bon``, ``grpo``, ``grpo_kl``, and budget-sweep points such as
``vgf_steer_prefix:0.4``) starts from the same base, trains on the same prompts with the same seed, LoRA and number
of generated completions per step, and saves its adapter at each ``--checkpoints`` step. Each checkpoint is scored
on ``--eval_prompts`` held-out prompts: the gold reward (accuracy) of ``--samples`` temperature-1 samples of the
policy and of its greedy answer, and the exact sequence-level KL(policy || base) along those samples
(``kl_to_base``). The base's own test-time best-of-N (selected by the training reward, analytic KL
``log N - (N-1)/N``) is scored on the same prompts as reference points.

Writes ``<out_dir>/<name>.json`` (after every run, so an interrupted run keeps what finished), ``<name>.md`` and
``<name>.png`` (gold reward vs KL: one curve per arm through its checkpoints, mean over seeds, bars = seed std).

    python benchmarks/frontier.py                                   # helpful task, 3 seeds (hours on 2 CPU cores)
    python benchmarks/frontier.py --task basic_arithmetic --seeds 0,1,2
    python benchmarks/frontier.py --tiny --model PATH --reward_model PATH   # smoke run on tiny models
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arms  # noqa: E402

ROOT = Path(__file__).resolve().parent
COLORS = {"vgf_steer_prefix": "tab:pink", "bon": "tab:orange", "grpo": "tab:green", "grpo_kl": "tab:olive"}


def arm_style(arm: str) -> dict:
    """Plot style: the arm's colour; the points of a budget sweep dashed, with square markers."""
    name, step = arms.split_arm(arm)
    return {"color": COLORS[name], "marker": "o"} | ({} if step is None else {"marker": "s", "ls": "--"})


def eval_rewards(s: arms.ArmSettings) -> dict:
    """``{name: reward_funcs}`` every checkpoint is scored with: gold (never trained on) and the training reward."""
    from vgf_llm.rewards import gold_helpful, reasoning_gym_reward

    if s.task == "helpful":
        return {"gold": [gold_helpful], "proxy": [arms.training_reward(s)]}
    return {"gold": [reasoning_gym_reward]}


def track_transport_gold(trainer, gold_funcs) -> list[dict]:
    """Scores every micro-batch's particles before and after transport with the gold reward (never trained on), so
    the table can say whether the transport's edits, checked by the proxy, also raise the gold reward. Returns the
    list the per-step means are appended to."""
    from vgf_llm.rewards import reward_texts

    steps: list[dict] = []
    original = trainer.step_targets

    def step_targets(rows):
        out = original(rows)
        c = trainer._last_completions
        n = len(c["completions"]) // len(rows)
        flat_rows = [r for r in rows for _ in range(n)]
        before = reward_texts(gold_funcs, None, flat_rows, c["extra"]["original"])
        after = reward_texts(gold_funcs, None, flat_rows, c["completions"])
        steps.append({"gold_before": float(before.nanmean()), "gold_after": float(after.nanmean())})
        return out

    trainer.step_targets = step_targets
    return steps


def train_with_checkpoints(s: arms.ArmSettings, arm: str, folder: str, checkpoints: list[int], threads: int) -> dict:
    """Train one arm for ``max(checkpoints)`` steps, saving the adapter at each checkpoint step to
    ``folder/step-K``; the training log, wall-clock and the transport's reward before/after (VGF)."""
    from transformers import TrainerCallback

    arms.set_threads(threads)

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in checkpoints:
                model.save_pretrained(str(Path(folder) / f"step-{state.global_step}"))

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer = arms.trainer(s, arm, out, callbacks=[SaveAt()])
        vgf = arms.kind(arm) == "vgf"
        transport_gold = track_transport_gold(trainer, eval_rewards(s)["gold"]) if vgf and s.task == "helpful" else []
        built = time.perf_counter()
        trainer.train()
        trained = time.perf_counter()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    before = [h["transport/reward_before"] for h in logs if "transport/reward_before" in h]
    after = [h["transport/reward_after"] for h in logs if "transport/reward_after" in h]
    return {"arm": arm, "seed": s.seed, "train_seconds": trained - built, "wall_seconds": trained - start,
            "seconds_per_step": (trained - built) / max(1, len(logs)), "steps": len(logs),
            "completions_generated": len(logs) * s.prompts * s.generations,
            "train_reward_mean": arms.mean(h["reward"] for h in logs),
            "transport_reward_before": arms.mean(before) if before else None,
            "transport_reward_after": arms.mean(after) if after else None,
            "transport_raised_steps": sum(a > b for a, b in zip(after, before, strict=True)) if before else None,
            "transport_gold_before": arms.mean(t["gold_before"] for t in transport_gold) if transport_gold else None,
            "transport_gold_after": arms.mean(t["gold_after"] for t in transport_gold) if transport_gold else None,
            "transport_gold_raised_steps": sum(t["gold_after"] > t["gold_before"] for t in transport_gold)
            if transport_gold else None,
            "log_history": trainer.state.log_history}


def kl_to_base(model, tok, rows, adapter: str | None, samples: int, max_new_tokens: int, seed: int,
               reward_sets: dict, batch_size: int = 8) -> dict:
    """Sampled completions of the policy (adapter ``adapter``) on ``rows``; their rewards under every set of
    ``reward_sets`` (``{name: reward_funcs}``, reported as ``sampled_<name>``) and the exact per-position
    KL(policy || base) along them."""
    import torch

    from vgf_llm.adapters import active_adapter
    from vgf_llm.rewards import reward_texts
    from vgf_llm.rollout.hf import HFGenerateBackend

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
    out = {"kl_per_token": sum(kl_tokens) / max(1.0, sum(token_counts)), "kl_per_sequence": arms.mean(kl_sums),
           "kl_per_sequence_sem": arms.std(kl_sums) / math.sqrt(max(1, len(kl_sums))),
           "sampled_n": len(kl_sums), "mean_sampled_length": arms.mean(token_counts)}
    for name, values in rewards.items():
        out[f"sampled_{name}"] = arms.mean(values)
    return out


def score_checkpoints(s: arms.ArmSettings, adapters: dict[str, str], eval_prompts: int, samples: int,
                      threads: int, best_of: list[int] | None = None) -> dict:
    """Held-out scores of every adapter (``{key: folder}``; ``None`` = the base), in one process on one base model;
    with ``best_of`` also the base's test-time best-of-N for each N."""
    import torch

    from vgf_llm.evaluation import policy_rewards
    from vgf_llm.rewards import reward_texts
    from vgf_llm.tasks import task_dataset

    arms.set_threads(threads)
    model, tok = arms.base_model(s)
    model.eval()
    rows = [dict(r) for r in task_dataset(s.task, eval_prompts, seed=0, split="test")]
    sets = eval_rewards(s)
    out = {"n": len(rows), "unique_prompts": len({json.dumps(r["prompt"]) for r in rows}), "scores": {}}
    for key, folder in adapters.items():
        start = time.perf_counter()
        name = None
        if folder is not None:
            # transformers reports every parameter whose name contains the adapter's name as a missing adapter
            # weight: a bare step number ("4") matches "layers.4." and floods the log with false MISSING rows
            name = "checkpoint_" + key.replace(".", "_")
            model.load_adapter(folder, adapter_name=name)
        gold, texts = policy_rewards(model, tok, rows, sets["gold"], adapter=name,
                                     max_new_tokens=s.max_completion_length, batch_size=16, progress=False)
        res = {"greedy_gold": arms.mean(gold), "examples": texts[:3]}
        res.update(kl_to_base(model, tok, rows, name, samples, s.max_completion_length, 7, sets,
                                    batch_size=16))
        res["eval_seconds"] = time.perf_counter() - start
        out["scores"][key] = res
        if name is not None:
            model.delete_adapter(name)
    if best_of:
        from vgf_llm.rollout.hf import HFGenerateBackend

        n_max = max(best_of)
        backend = HFGenerateBackend(model, tok, max_new_tokens=s.max_completion_length, temperature=1.0,
                                    batch_size=16 * n_max)
        select = sets.get("proxy", sets["gold"])
        gold_all, sel_all = [], []
        for start in range(0, len(rows), 16):
            chunk = rows[start:start + 16]
            with torch.no_grad():
                ro = backend.generate([r["prompt"] for r in chunk], n_max, seed=11 + start)
            flat_rows = [r for r in chunk for _ in range(n_max)]
            texts = [t for g in ro.texts for t in g]
            gold_all.append(reward_texts(sets["gold"], None, flat_rows, texts).view(len(chunk), n_max))
            sel_all.append(reward_texts(select, None, flat_rows, texts).view(len(chunk), n_max))
        gold_t, sel_t = torch.cat(gold_all), torch.cat(sel_all)
        out["best_of_n"] = {}
        for n in sorted(best_of):
            pick = sel_t[:, :n].nan_to_num(-math.inf).argmax(1)
            chosen = gold_t[:, :n].gather(1, pick[:, None]).squeeze(1)
            out["best_of_n"][n] = {"gold": float(chosen.nanmean()), "kl_per_sequence": math.log(n) - (n - 1) / n,
                                   "selected_by": "proxy" if "proxy" in sets else "gold"}
    return out


def summarise(results: dict) -> dict:
    """Mean and seed std of every score per (arm, checkpoint step)."""
    summary = {}
    for arm, runs in results["runs"].items():
        by_step: dict[int, list[dict]] = {}
        for r in runs:
            for step, sc in r.get("checkpoints", {}).items():
                by_step.setdefault(int(step), []).append(sc)
        summary[arm] = {}
        for step, scores in sorted(by_step.items()):
            row = {"seeds": len(scores)}
            for key in ("sampled_gold", "greedy_gold", "sampled_proxy", "kl_per_sequence", "kl_per_token"):
                values = [sc.get(key) for sc in scores if sc.get(key) is not None]
                if values:
                    row[key], row[key + "_std"] = arms.mean(values), arms.std(values)
            summary[arm][step] = row
    return summary


def gold_at_kl(points: list[tuple[float, float]], kl: float) -> float | None:
    """Gold reward at ``kl`` on one run's curve (the base at KL 0, then its checkpoints in order of KL), linearly
    interpolated between neighbouring points; None beyond the run's largest KL (no extrapolation)."""
    pts = sorted(points)
    if kl > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= kl <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return pts[0][1]


def matched_kl(results: dict, levels: list[float]) -> dict:
    """``{arm: {kl: (mean, std, seeds)}}``: every seed's gold at each KL level (``gold_at_kl``), mean and seed std
    over the seeds that reach it; the base's test-time best-of-N curve as the row ``best_of_n``."""
    base = results["base"]["sampled_gold"]
    out = {}
    for arm, runs in results["runs"].items():
        out[arm] = {}
        for kl in levels:
            values = [v for r in runs if (v := gold_at_kl([(0.0, base)] + [
                (sc["kl_per_sequence"], sc["sampled_gold"]) for sc in r.get("checkpoints", {}).values()], kl))
                is not None]
            out[arm][kl] = (arms.mean(values), arms.std(values), len(values)) if values else None
    bon = results.get("best_of_n", {})
    if bon:
        curve = [(0.0, base)] + [(b["kl_per_sequence"], b["gold"]) for b in bon.values()]
        out["best_of_n"] = {kl: (v, 0.0, 1) if (v := gold_at_kl(curve, kl)) is not None else None for kl in levels}
    return out


def matched_markdown(results: dict) -> str:
    levels = results.get("matched_kl_levels", [])
    if not levels:
        return ""
    table = matched_kl(results, levels)
    head = "| arm | " + " | ".join(f"gold at KL {kl:g}" for kl in levels) + " |"
    lines = ["", "Gold reward (samples, T=1) at matched KL(policy || base) per sequence: each seed's curve (base, then "
             "its checkpoints) interpolated linearly at the level, mean ± std over the seeds that reach it "
             "(n = seeds; '-': not reached, no extrapolation).", "", head, "|" + "---|" * (len(levels) + 1)]
    for arm, row in table.items():
        label = "base best-of-N (test time)" if arm == "best_of_n" else arms.arm_label(arm)
        cells = ["-" if v is None else (f"{v[0]:.3f}" if arm == "best_of_n" else f"{v[0]:.3f} ± {v[1]:.3f} (n={v[2]})")
                 for v in row.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    s, base = results["settings"], results["base"]
    proxy = "sampled_proxy" in base
    head = ("| arm | step | seeds | gold (samples, T=1) | gold (greedy) | " + ("proxy (samples) | " if proxy else "")
            + "KL/sequence | transport reward before -> after (raised steps) |")
    lines = [
        f"Task `{s['task']}`, {results['eval_prompts']} held-out prompts ({base['unique_prompts']} unique), "
        f"{results['samples']} temperature-1 samples per prompt for the gold reward and the KL; training: "
        f"{s['prompts']} prompts x {s['generations']} completions per step (max {s['max_completion_length']} tokens), "
        f"LoRA r={s['lora_r']}, lr {s['learning_rate']}, seeds {results['seeds']}; "
        f"{results['wall_seconds'] / 60:.0f} min in all.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
        f"| base | 0 | - | {base['sampled_gold']:.3f} | {base['greedy_gold']:.3f} | "
        + (f"{base['sampled_proxy']:.3f} | " if proxy else "") + "0 | - |",
    ]
    for n, b in results.get("best_of_n", {}).items():
        lines.append(f"| base best-of-{n} (test time, by {b['selected_by']}) | - | - | {b['gold']:.3f} | - | "
                     + ("- | " if proxy else "") + f"{b['kl_per_sequence']:.3f} (analytic) | - |")
    for arm, steps in results["summary"].items():
        runs = results["runs"][arm]
        before = [r["transport_reward_before"] for r in runs if r.get("transport_reward_before") is not None]
        after = [r["transport_reward_after"] for r in runs if r.get("transport_reward_after") is not None]
        raised = sum(r["transport_raised_steps"] for r in runs if r.get("transport_raised_steps") is not None)
        total = sum(r["steps"] for r in runs if r.get("transport_raised_steps") is not None)
        transport = f"{arms.mean(before):.3f} -> {arms.mean(after):.3f} ({raised}/{total})" if before else "-"
        gold_before = [r["transport_gold_before"] for r in runs if r.get("transport_gold_before") is not None]
        if gold_before:
            gold_after = [r["transport_gold_after"] for r in runs if r.get("transport_gold_after") is not None]
            gold_raised = sum(r["transport_gold_raised_steps"] for r in runs
                              if r.get("transport_gold_raised_steps") is not None)
            transport += (f"; gold {arms.mean(gold_before):.3f} -> {arms.mean(gold_after):.3f} "
                          f"({gold_raised}/{total})")
        for step, row in steps.items():
            def cell(key, fmt=".3f", row=row):
                return (f"{row[key]:{fmt}} ± {row[key + '_std']:{fmt}}" if key in row else "-")

            proxy_cell = f"{cell('sampled_proxy')} | " if proxy else ""
            lines.append(f"| {arms.arm_label(arm)} | {step} | {row['seeds']} | {cell('sampled_gold')} | "
                         f"{cell('greedy_gold')} | {proxy_cell}{cell('kl_per_sequence')} | "
                         f"{transport if step == max(steps) else ''} |")
    return "\n".join(lines) + matched_markdown(results)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    base = results["base"]
    ax.scatter([0], [base["sampled_gold"]], marker="*", s=180, color="black", label="base", zorder=4)
    bon = results.get("best_of_n", {})
    if bon:
        ns = sorted(bon, key=int)
        ax.plot([bon[n]["kl_per_sequence"] for n in ns], [bon[n]["gold"] for n in ns], "k--", marker="s", ms=4,
                label="base best-of-N (test time)")
    for arm, steps in results["summary"].items():
        pts = [(0.0, base["sampled_gold"], 0.0, 0.0)] + [
            (r["kl_per_sequence"], r["sampled_gold"], r.get("kl_per_sequence_std", 0.0), r.get("sampled_gold_std", 0.0))
            for r in steps.values() if "sampled_gold" in r]
        xs, ys, xe, ye = zip(*pts, strict=True)
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, ms=5, capsize=3, label=arms.arm_label(arm), **arm_style(arm))
    ax.set_xlabel("KL(policy || base) per sequence, held-out samples")
    ax.set_ylabel("gold reward of samples (T=1)" if results["settings"]["task"] == "helpful" else
                  "accuracy of samples (T=1)")
    ax.set_title(f"reward-KL frontier, {results['settings']['task']} ({len(results['seeds'])} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path, name: str, start: float, partial: bool) -> dict:
    from vgf_llm.evaluation import json_safe

    results["summary"] = summarise(results)
    results["partial"] = partial
    results["wall_seconds"] = time.time() - start
    results["table_md"] = markdown(results)
    arms.write_json(out_dir / f"{name}.json", json_safe(results))
    (out_dir / f"{name}.md").write_text(results["table_md"] + "\n")
    plot(results, out_dir / f"{name}.png")
    return results


def resume_from(results: dict, path: Path, best_of: list[int], error) -> float:
    """Fill ``results`` with the base scores and finished runs of the earlier run saved at ``path``; return its wall
    seconds. Refuses (via ``error``) when the settings that decide the numbers differ."""
    from vgf_llm.evaluation import json_safe

    if not path.is_file():
        error(f"--resume: no earlier run at {path}")
    prev = json.loads(path.read_text())
    now = json.loads(json.dumps(json_safe(results), default=str))
    for key in ("settings", "checkpoints", "eval_prompts", "samples"):
        if prev.get(key) != now[key]:
            error(f"--resume: {path} was run with other {key} ({prev.get(key)} vs {now[key]}); use another --name")
    if sorted(prev.get("best_of_n", {}), key=int) != [str(n) for n in sorted(best_of)]:
        error(f"--resume: {path} scored the base's best-of-{sorted(prev.get('best_of_n', {}))}, not {best_of}")
    results["base"], results["best_of_n"] = prev["base"], prev["best_of_n"]
    for arm in results["runs"]:
        results["runs"][arm] = [r for r in prev["runs"].get(arm, []) if r["seed"] in results["seeds"]]
    for arm, runs in prev["runs"].items():  # arms not named this time stay in the table as they were
        if runs:
            results["runs"].setdefault(arm, runs)
    done = {arm: [r["seed"] for r in runs] for arm, runs in results["runs"].items()}
    print(f"[frontier] resuming {path}: kept the base scores and runs {done}", flush=True)
    return float(prev.get("wall_seconds", 0.0))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = arms.ArmSettings(task="helpful", max_completion_length=40, generations=8)
    arms.add_shared_arguments(p, d)
    p.add_argument("--checkpoints", default="4,8", help="Comma list of optimizer steps to save and score.")
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--matched_kl", default="0.5,1.0", help="KL levels (per sequence) of the matched-KL table.")
    p.add_argument("--reward_model", default=arms.PROXY_REWARD_MODEL, help="Proxy reward model (helpful task).")
    p.add_argument("--eval_prompts", type=int, default=128)
    p.add_argument("--samples", type=int, default=1, help="Temperature-1 samples per held-out prompt.")
    p.add_argument("--best_of", default="2,4,8", help="Test-time best-of-N of the base, N list ('' = none).")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tiny", action="store_true", help="Smoke run: 2 steps x 2 prompts x 2 completions x 8 tokens.")
    p.add_argument("--inline", action="store_true", help="Run every phase in this process (no spawn).")
    p.add_argument("--out_dir", default=str(ROOT / "results"))
    p.add_argument("--name", default=None, help="Output file stem (default frontier_<task>).")
    p.add_argument("--resume", action="store_true",
                   help="Keep the base scores and the finished (arm, seed) runs of an earlier run with the same name "
                        "and settings (its JSON is written after every arm; arms not in --arms are kept as they "
                        "were); run only the rest.")
    a = p.parse_args(argv)
    if a.tiny:
        a.checkpoints, a.prompts, a.generations, a.max_completion_length = "1,2", 2, 2, 8
        a.eval_prompts, a.samples, a.best_of = 4, 1, "2"
    arms.offline()
    arms.set_threads(a.threads)
    from vgf_llm.tasks import task_dataset

    try:  # before hours of training: the held-out set must exist (1-digit chain_sum has only ~45 test questions)
        task_dataset(a.task, a.eval_prompts, seed=0, split="test")
    except ValueError as err:
        p.error(f"--eval_prompts {a.eval_prompts} held-out prompts of {a.task!r}: {err} (basic_arithmetic has enough)")
    checkpoints = sorted({int(x) for x in a.checkpoints.split(",")})
    chosen = arms.chosen_arms(p, a.arms)
    seeds = [int(x) for x in a.seeds.split(",")]
    best_of = [int(x) for x in a.best_of.split(",") if x.strip()]
    name = a.name or f"frontier_{a.task}"
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_settings = arms.settings_from(a, steps=max(checkpoints), learning_rate=a.learning_rate, seed=seeds[0],
                                       reward_model=a.reward_model)
    results = {"settings": base_settings.as_dict(), "arms": chosen, "seeds": seeds, "checkpoints": checkpoints,
               "eval_prompts": a.eval_prompts, "samples": a.samples,
               "matched_kl_levels": [float(x) for x in a.matched_kl.split(",") if x.strip()],
               "runs": {arm: [] for arm in chosen}} | arms.provenance("frontier.py", argv)
    run = arms.in_subprocess if not a.inline else (lambda f, *args, **kw: f(*args, **kw))
    start = time.time()
    if a.resume:
        start -= resume_from(results, out_dir / f"{name}.json", best_of, p.error)
    else:
        print(f"[frontier] scoring the base on {a.eval_prompts} held-out prompts (+ best-of-{best_of}) ...",
              flush=True)
        ev = run(score_checkpoints, base_settings, {"base": None}, a.eval_prompts, a.samples, a.threads, best_of)
        results["base"] = ev["scores"]["base"] | {"n": ev["n"], "unique_prompts": ev["unique_prompts"]}
        results["best_of_n"] = ev.get("best_of_n", {})
        write(results, out_dir, name, start, partial=True)
    root = Path(tempfile.mkdtemp(prefix="vgf_frontier_"))
    try:
        for seed in seeds:
            for arm in chosen:
                if any(r["seed"] == seed for r in results["runs"][arm]):
                    print(f"[frontier] {arm} seed {seed}: kept from the earlier run", flush=True)
                    continue
                s = replace(base_settings, seed=seed)
                folder = root / f"{arm}-seed{seed}"
                print(f"[frontier] {arm} seed {seed}: training {max(checkpoints)} steps ...", flush=True)
                r = run(train_with_checkpoints, s, arm, str(folder), checkpoints, a.threads)
                adapters = {str(k): str(folder / f"step-{k}") for k in checkpoints if (folder / f"step-{k}").is_dir()}
                print(f"[frontier] {arm} seed {seed}: {r['train_seconds']:.0f} s; scoring {len(adapters)} "
                      "checkpoints ...", flush=True)
                ev = run(score_checkpoints, s, adapters, a.eval_prompts, a.samples, a.threads)
                r["checkpoints"] = ev["scores"]
                for k, sc in ev["scores"].items():
                    print(f"[frontier] {arm} seed {seed} step {k}: gold {sc['sampled_gold']:.3f} (greedy "
                          f"{sc['greedy_gold']:.3f}), KL/seq {sc['kl_per_sequence']:.3f}", flush=True)
                results["runs"][arm].append(r)
                write(results, out_dir, name, start, partial=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = write(results, out_dir, name, start, partial=False)
    print(results["table_md"])
    print(f"[frontier] wrote {out_dir / name}.json/.md/.png in {results['wall_seconds'] / 60:.0f} min")
    return results


if __name__ == "__main__":
    main()
