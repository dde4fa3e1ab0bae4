"""What the trainer's transport does to the text: every edit it keeps, with the reward before and after.

Runs the VGF trainer's step (rollouts, rewards, value fit, transport, decoding, re-scoring) on ``--steps`` batches of
train prompts without updating the policy, and records each particle whose transport raised its training reward:
the original, the transported text, both rewards and the change of the base's log-likelihood. For the ``helpful``
task it also scores both with the gold reward. Reading these tells a real correction from a reward hack (on math,
an edit of the last number of a rambling answer, which the answer extractor falls back to).

    python benchmarks/edits.py --task basic_arithmetic --steps 6
    python benchmarks/edits.py --task helpful --steps 3 --max_completion_length 24

Writes ``<out_dir>/edits_<task>.json`` and prints the edits.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arms  # noqa: E402

ROOT = Path(__file__).resolve().parent


def collect(s: arms.ArmSettings, steps: int) -> dict:
    """Transport ``steps`` batches of ``s.prompts`` train prompts; the kept edits and per-step means."""
    import tempfile

    import torch

    from vgf_llm.rewards import gold_helpful, reward_texts

    with tempfile.TemporaryDirectory() as tmp:
        trainer = arms.vgf_trainer(s, "vgf", tmp, steps=steps)
        rows_all = [dict(r) for r in arms.train_dataset(s, s.prompts * steps)]
        edits, per_step = [], []
        for step in range(steps):
            rows = rows_all[s.prompts * step: s.prompts * (step + 1)]
            logged = len(trainer._metrics.get("transport/logmu_change", []))
            trainer._step_targets(rows)  # the step's targets; no optimizer step: the policy stays the base
            c, n = trainer._last_completions, s.generations
            before, after = c["rewards"]["reward"], c["rewards"]["after transport"]
            flat = [r for r in rows for _ in range(n)]
            gold = None
            if s.task == "helpful":
                gold = (reward_texts([gold_helpful], None, flat, c["extra"]["original"]).tolist(),
                        reward_texts([gold_helpful], None, flat, c["completions"]).tolist())
            logmu = trainer._metrics.get("transport/logmu_change", [])[logged:] or [None]  # None: nothing edited
            per_step.append({"reward_before": float(torch.tensor(before).nanmean()),
                             "reward_after": float(torch.tensor(after).nanmean()),
                             "logmu_change_of_edited": logmu[-1]})
            for i, (b, a) in enumerate(zip(before, after, strict=True)):
                if a > b:
                    edit = {"step": step, "answer": flat[i].get("answer"), "original": c["extra"]["original"][i],
                            "transported": c["completions"][i], "reward_before": b, "reward_after": a}
                    if gold is not None:
                        edit.update(gold_before=gold[0][i], gold_after=gold[1][i])
                    edits.append(edit)
    return {"settings": s.as_dict(), "steps": per_step, "edits": edits}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = arms.ArmSettings(task="basic_arithmetic", decoder="verified", transport_steps=3, max_edits=5, verify_top=1,
                         verify_candidates=4, max_completion_length=32)
    p.add_argument("--task", default=d.task)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max_completion_length", type=int, default=d.max_completion_length)
    p.add_argument("--transport_target", default="reward", choices=["reward", "tilted"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=d.model)
    p.add_argument("--reward_model", default=arms.PROXY_REWARD_MODEL, help="Proxy reward model (helpful task).")
    p.add_argument("--out_dir", default=str(ROOT / "results"))
    a = p.parse_args(argv)
    arms.offline()
    arms.set_threads(a.threads)
    extra = {"transport_target": a.transport_target, "edit_pair_weight": 0.0}
    if a.task == "helpful":
        extra |= {"scorer": "reward_model", "reward_model_path": a.reward_model}
    s = replace(d, task=a.task, model=a.model, max_completion_length=a.max_completion_length, seed=a.seed,
                extra=extra)
    out = collect(s, a.steps)
    for e in out["edits"]:
        gold = f"  gold {e['gold_before']:.3f} -> {e['gold_after']:.3f}" if "gold_before" in e else ""
        print(f"[step {e['step']}] reward {e['reward_before']:.3f} -> {e['reward_after']:.3f}{gold}  (answer "
              f"{e['answer']!r})\n    {e['original']!r}\n -> {e['transported']!r}")
    for i, st in enumerate(out["steps"]):
        change = st["logmu_change_of_edited"]
        print(f"step {i}: reward {st['reward_before']:.3f} -> {st['reward_after']:.3f}, log mu change of the edited "
              + ("-" if change is None else f"{change:.2f}"))
    path = arms.write_json(Path(a.out_dir) / f"edits_{a.task}.json", out)
    print(f"[edits] {len(out['edits'])} edits that raised the reward -> {path}")
    return out


if __name__ == "__main__":
    main()
