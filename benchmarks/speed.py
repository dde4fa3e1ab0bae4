"""Speed of one training step: VGF (split into its phases) next to TRL's GRPO on the same batch, plus rollout tokens/s.

Every arm runs in its own spawned process (its own peak memory), one after the other, in one script run:

- ``vgf_steer_prefix`` / ``bon``: ``VGFTrainer`` with its defaults (per-step steering) / with ``transport_steps=0``;
  the phases come from the trainer's own ``timing/rollout|reward|value_fit|transport|distill`` logs (seconds per
  optimizer step); ``other`` is the rest of the step (the backward pass of the distillation loss, the optimizer,
  logging);
- ``grpo`` / ``grpo_kl``: TRL ``GRPOTrainer`` + the same LoRA, ``per_device_train_batch_size = prompts x generations``
  (TRL counts completions), timed by wrapping its ``_generate`` (rollout), ``_calculate_rewards`` (reward),
  the rest of ``_generate_and_score_completions`` (log-probabilities, advantages) and ``compute_loss`` (forward);
  TRL's own ``step_time`` log is recorded too;
- ``rollout``: ``HFGenerateBackend`` (what both trainers' rollouts amount to) on the base model, tokens/s.

The first ``--warmup`` steps of each arm are dropped; the table shows the mean of the next ``--steps``.

    python benchmarks/speed.py                       # SmolLM2-135M, chain_sum, 4 prompts x 8 completions x 32 tokens
    python benchmarks/speed.py --tiny --model PATH   # smoke run (1+1 steps, tiny batch)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arms  # noqa: E402

VGF_PHASES = ("rollout", "reward", "value_fit", "transport", "distill")
GRPO_PHASES = ("rollout", "reward", "logps/advantages", "loss forward")
ROOT = Path(__file__).resolve().parent


def time_vgf(s: arms.ArmSettings, arm: str, warmup: int, threads: int) -> dict:
    arms.set_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = arms.trainer(s, arm, out)
        clock = arms.StepClock()
        trainer.add_callback(clock)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "timing/rollout" in h]
    kept = logs[warmup:]
    phases = {p: arms.mean([h.get(f"timing/{p}", 0.0) for h in kept]) for p in VGF_PHASES}
    total = arms.mean(clock.steps[warmup:])
    phases["other"] = total - sum(phases.values())
    return {"arm": arm, "step_seconds": total, "phases": phases, "all_step_seconds": clock.steps,
            "completion_mean_length": arms.mean([h.get("completions/mean_length", float("nan")) for h in kept]),
            "tokens_changed": arms.mean([h.get("transport/tokens_changed", 0.0) for h in kept]),
            "peak_rss_mb": arms.peak_rss_mb(), "gpu_peak_mb": arms.gpu_peak_mb(), "log_history": logs}


def time_grpo(s: arms.ArmSettings, arm: str, warmup: int, threads: int) -> dict:
    from transformers import TrainerCallback

    arms.set_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = arms.trainer(s, arm, out)
        timer = arms.MethodTimer(trainer, {"_generate": "rollout", "_calculate_rewards": "reward",
                                           "_generate_and_score_completions": "prepare",
                                           "compute_loss": "loss forward"})
        clock = arms.StepClock()

        class Snapshot(TrainerCallback):  # closes the timer's step
            def on_step_end(self, args, state, control, **kwargs):
                timer.snapshot()

        trainer.add_callback(clock)
        trainer.add_callback(Snapshot())
        trainer.train()
    kept = timer.records[warmup:]
    phases = {
        "rollout": arms.mean([r["rollout"] for r in kept]),
        "reward": arms.mean([r["reward"] for r in kept]),
        "logps/advantages": arms.mean([r["prepare"] - r["rollout"] - r["reward"] for r in kept]),
        "loss forward": arms.mean([r["loss forward"] for r in kept]),
    }
    total = arms.mean(clock.steps[warmup:])
    phases["other"] = total - sum(phases.values())
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"arm": arm, "step_seconds": total, "phases": phases, "all_step_seconds": clock.steps,
            "trl_step_time": arms.mean([h.get("step_time", float("nan")) for h in logs[warmup:]]),
            "completion_mean_length": arms.mean(h.get("completions/mean_length") for h in logs[warmup:]),
            "peak_rss_mb": arms.peak_rss_mb(), "gpu_peak_mb": arms.gpu_peak_mb(), "log_history": logs}


def time_rollout(s: arms.ArmSettings, repeats: int, threads: int) -> dict:
    """Tokens/s of ``HFGenerateBackend`` on the base model: prompts x generations per call, like one step."""
    arms.set_threads(threads)
    from vgf_llm.rollout.hf import HFGenerateBackend

    model, tok = arms.base_model(s)
    model.eval()
    rows = list(arms.train_dataset(s, size=s.prompts * (repeats + 1)))
    backend = HFGenerateBackend(model, tok, max_new_tokens=s.max_completion_length, temperature=s.temperature,
                                batch_size=s.prompts)
    runs = []
    for i in range(repeats + 1):  # the first call is a warm-up
        prompts = [r["prompt"] for r in rows[i * s.prompts:(i + 1) * s.prompts]]
        start = time.perf_counter()
        ro = backend.generate(prompts, s.generations, seed=s.seed + i)
        seconds = time.perf_counter() - start
        generated = int(ro.completion_mask.sum())
        runs.append({"seconds": seconds, "generated_tokens": generated,
                     "padded_tokens": int(ro.completion_ids.numel()), "tokens_per_s": generated / seconds})
    kept = runs[1:]
    return {"sequences_per_call": s.prompts * s.generations, "runs": runs,
            "tokens_per_s": sum(r["generated_tokens"] for r in kept) / sum(r["seconds"] for r in kept),
            "padded_tokens_per_s": sum(r["padded_tokens"] for r in kept) / sum(r["seconds"] for r in kept)}


def table(results: dict) -> str:
    arm_rows = list(results["arms"].values())
    grpo = results["arms"].get("grpo")
    header = " | ".join(f"{p} s" for p in (*VGF_PHASES, "other"))
    lines = [f"| arm | step s | {header} | vs GRPO step | peak RSS MB |",
             "|---|---|" + "---|" * (len(VGF_PHASES) + 1) + "---|---|"]
    for r in arm_rows:
        ph = r["phases"]
        if arms.kind(r["arm"]) == "grpo":  # map GRPO's phases onto the VGF columns where they mean the same
            cells = [ph["rollout"], ph["reward"], None, None, ph["loss forward"], ph["other"] + ph["logps/advantages"]]
        else:
            cells = [ph[p] for p in VGF_PHASES] + [ph["other"]]
        ratio = r["step_seconds"] / grpo["step_seconds"] if grpo else float("nan")
        lines.append(f"| {arms.arm_label(r['arm'])} | {r['step_seconds']:.1f} | "
                     + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
                     + f" | {ratio:.2f}x | {r['peak_rss_mb']:.0f} |")
    ro = results.get("rollout")
    if ro:
        lines.append("")
        lines.append(f"Rollout (HF generate, {ro['sequences_per_call']} sequences per call): "
                     f"{ro['tokens_per_s']:.1f} generated tokens/s ({ro['padded_tokens_per_s']:.1f} incl. padding).")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arms.add_shared_arguments(p, arms.ArmSettings())
    p.add_argument("--warmup", type=int, default=1, help="Steps dropped per arm.")
    p.add_argument("--steps", type=int, default=2, help="Timed steps per arm, after the warm-up.")
    p.add_argument("--rollout_repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inline", action="store_true", help="Run the arms in this process (no spawn; the peak memory "
                                                         "figures are then cumulative).")
    p.add_argument("--tiny", action="store_true", help="Smoke run: 2 prompts x 2 completions x 8 tokens, 1+1 steps.")
    p.add_argument("--out", default=str(ROOT / "results" / "speed.json"))
    a = p.parse_args(argv)
    if a.tiny:
        a.prompts, a.generations, a.max_completion_length, a.warmup, a.steps, a.rollout_repeats = 2, 2, 8, 1, 1, 1
    arms.offline()
    arms.set_threads(a.threads)
    s = arms.settings_from(a, seed=a.seed, steps=a.warmup + a.steps)
    chosen = arms.chosen_arms(p, a.arms)
    results = {"settings": s.as_dict(), "warmup": a.warmup, "timed_steps": a.steps, "arms": {}}
    results |= arms.provenance("speed.py", argv)
    run = arms.in_subprocess if not a.inline else (lambda f, *args, **kw: f(*args, **kw))
    start = time.time()
    for arm in chosen:
        print(f"[speed] {arm} ...", flush=True)
        timer = time_grpo if arms.kind(arm) == "grpo" else time_vgf
        results["arms"][arm] = run(timer, s, arm, a.warmup, a.threads)
        print(f"[speed] {arm}: {results['arms'][arm]['step_seconds']:.2f} s/step", flush=True)
    print("[speed] rollout ...", flush=True)
    results["rollout"] = run(time_rollout, s, a.rollout_repeats, a.threads)
    results["wall_seconds"] = time.time() - start
    results["machine"]["loadavg_end"] = os.getloadavg()
    grpo = results["arms"].get("grpo")
    if grpo:
        results["ratios_vs_grpo"] = {k: v["step_seconds"] / grpo["step_seconds"] for k, v in results["arms"].items()}
    results["table_md"] = table(results)
    print(results["table_md"])
    arms.write_json(a.out, results)
    print(f"[speed] wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
