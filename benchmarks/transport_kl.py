"""What a transport buys per nat: the particles' gold reward against the KL from the base of the distribution they
were drawn from, next to best-of-N on the same samples.

A trained policy can at best become the distribution its targets come from, so a transport that spends many nats
for little reward cannot give a good reward-KL frontier however it is distilled. For the particle spaces that move
while the model decodes (``steer_prefix``, ``tilt_prefix``, ``tilt_reward``) the KL is exact along each particle:
the sum over its tokens of KL(the distribution its token was drawn from || the base's, teacher-forced). It runs the
trainer's step (rollouts, proxy rewards, prefix-value refit on the buffer, transport, re-scoring) on ``--steps``
batches of train prompts without updating the policy, as ``edits.py`` does; every configuration sees the same
rollouts (same seed). The best-of-N rows select by the proxy among each prompt's first N samples (analytic KL
log N - (N-1)/N).

    python benchmarks/transport_kl.py --configs steer_prefix:0.2,tilt_prefix:0.3,tilt_reward:1 --steps 8

Writes ``<out_dir>/transport_kl.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arms  # noqa: E402
import frontier  # noqa: E402

ROOT = Path(__file__).resolve().parent
ARM_OF = {"steer_prefix": "vgf_steer_prefix", "tilt_prefix": "vgf_tilt_prefix", "tilt_reward": "vgf_tilt_reward"}


def measure(s: arms.ArmSettings, decoder: str, budget: float, steps: int, layer: int) -> dict:
    """Per step: the particles' proxy and gold before and after transport, and the KL of their distribution."""
    import tempfile

    import torch

    from vgf_llm.distill import completion_logits, token_kl
    from vgf_llm.rewards import gold_helpful, reward_texts
    from vgf_llm.value import active_adapter

    s = frontier.arm_settings(s, ARM_OF[decoder], 0.0, {}, prefix=(layer, budget), tilt_eta=(budget, budget))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = arms.vgf_trainer(s, "vgf", tmp, steps=steps)
        space, model = trainer.sampler.space, trainer.model
        space.keep_logps = True
        moved = {}
        move = trainer.sampler.move

        def recording_move(ro, verify=None):
            ids, mask, disp = move(ro, verify)
            moved.update(ro=ro, ids=ids, mask=mask)
            return ids, mask, disp

        trainer.sampler.move = recording_move
        rows_all = [dict(r) for r in arms.train_dataset(s, s.prompts * steps)]
        for step in range(steps):
            rows = rows_all[s.prompts * step: s.prompts * (step + 1)]
            start = time.perf_counter()
            trainer._step_targets(rows)  # no optimizer step: the policy stays the base
            seconds = time.perf_counter() - start
            c, n, ro = trainer._last_completions, s.generations, moved["ro"]
            g, _, t = moved["ids"].shape
            ids, mask = moved["ids"].reshape(g * n, t), moved["mask"].reshape(g * n, t)
            p_ids, p_mask = ro.prompt_ids.repeat_interleave(n, 0), ro.prompt_mask.repeat_interleave(n, 0)
            with torch.no_grad(), active_adapter(model, None):
                base = torch.cat([torch.log_softmax(completion_logits(
                    model, torch.cat([p_ids[i:i + 16], ids[i:i + 16]], 1), torch.cat([p_mask[i:i + 16],
                                                                                      mask[i:i + 16]], 1),
                    p_ids.shape[1]).float() / s.temperature, -1) for i in range(0, g * n, 16)])
            kl = (token_kl(space.last_logps.reshape(g * n, t, -1), base) * mask).sum(-1)
            flat = [r for r in rows for _ in range(n)]
            gold_before = reward_texts([gold_helpful], None, flat, c["extra"]["original"]).view(g, n)
            gold_after = reward_texts([gold_helpful], None, flat, c["completions"]).view(g, n)
            proxy_before = torch.tensor(c["rewards"]["reward"]).view(g, n)
            proxy_after = torch.tensor(c["rewards"]["after transport"]).view(g, n)
            best_of = {}
            for k in (2, 4, 8):
                if k <= n:
                    pick = proxy_before[:, :k].argmax(-1)
                    best_of[k] = float(gold_before[torch.arange(g), pick].mean())
            out.append({"gold_before": float(gold_before.mean()), "gold_after": float(gold_after.mean()),
                        "proxy_before": float(proxy_before.mean()), "proxy_after": float(proxy_after.mean()),
                        "kl_per_sequence": float(kl.mean()), "kl_max": float(kl.max()),
                        "tokens_changed": float((ids != ro.completion_ids.reshape(g * n, t)).float().sum(-1).mean()),
                        "best_of_gold": best_of, "seconds": seconds})
            print(f"[transport_kl] {decoder}:{budget:g} step {step}: gold {out[-1]['gold_before']:.3f} -> "
                  f"{out[-1]['gold_after']:.3f}, KL/seq {out[-1]['kl_per_sequence']:.3f}, {seconds:.0f} s", flush=True)
    return {"decoder": decoder, "budget": budget, "steps": out}


def summary(run: dict, skip: int) -> dict:
    """Means over the steps after the first ``skip`` (the first prefix value is fitted on one batch only)."""
    steps = run["steps"][skip:]
    mean = lambda key: sum(st[key] for st in steps) / len(steps)  # noqa: E731
    gain = mean("gold_after") - mean("gold_before")
    kl = mean("kl_per_sequence")
    return {"gold_before": mean("gold_before"), "gold_after": mean("gold_after"), "gold_gain": gain,
            "proxy_gain": mean("proxy_after") - mean("proxy_before"), "kl_per_sequence": kl,
            "gold_gain_per_nat": gain / kl if kl > 0 else math.nan, "tokens_changed": mean("tokens_changed"),
            "seconds_per_step": mean("seconds")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="steer_prefix:0.2,tilt_prefix:1,tilt_prefix:3",
                   help="Comma list of <decoder>:<budget> (steer_prefix: step per token; tilt_*: eta).")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--skip", type=int, default=1, help="Leading steps left out of the summary (prefix value warm-up).")
    p.add_argument("--layer", type=int, default=15, help="The prefix value's decoder layer.")
    p.add_argument("--seed", type=int, default=0)
    arms.add_probe_arguments(p, ROOT / "results")
    a = p.parse_args(argv)
    configs = []
    for item in a.configs.split(","):
        name, _, budget = item.partition(":")
        if name not in ARM_OF or not budget:
            p.error(f"--configs: {item!r} is not <decoder>:<budget> with a decoder in {sorted(ARM_OF)}")
        configs.append((name, float(budget)))
    if a.skip >= a.steps:
        p.error("--skip must leave at least one step")
    arms.offline()
    arms.set_threads(a.threads)
    s = arms.ArmSettings(task="helpful", model=a.model, max_completion_length=a.max_completion_length, seed=a.seed,
                         extra={"scorer": "reward_model", "reward_model_path": a.reward_model, "edit_pair_weight": 0.0,
                                "transport_target": "reward"})
    s = replace(s, generations=8, prompts=4)
    runs = [measure(s, name, budget, a.steps, a.layer) for name, budget in configs]
    for run in runs:
        run["summary"] = summary(run, a.skip)
    best = {k: sum(st["best_of_gold"][k] for st in runs[0]["steps"][a.skip:]) / (a.steps - a.skip)
            for k in runs[0]["steps"][0]["best_of_gold"]}
    base_gold = runs[0]["summary"]["gold_before"]
    print(f"\nsteps {a.skip}..{a.steps - 1}, {s.prompts} prompts x {s.generations} samples each, the same samples for "
          f"every row; base samples' gold {base_gold:.3f}")
    print("| transport | KL/sequence | gold | gold gain | gain per nat | proxy gain | tokens changed | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for k, gold in best.items():
        kl = math.log(k) - (k - 1) / k
        print(f"| best-of-{k} (by proxy) | {kl:.3f} | {gold:.3f} | {gold - base_gold:+.3f} | "
              f"{(gold - base_gold) / kl:+.3f} | - | - | - |")
    for run in runs:
        sm = run["summary"]
        print(f"| {run['decoder']} {run['budget']:g} | {sm['kl_per_sequence']:.3f} | {sm['gold_after']:.3f} | "
              f"{sm['gold_gain']:+.3f} | {sm['gold_gain_per_nat']:+.3f} | {sm['proxy_gain']:+.3f} | "
              f"{sm['tokens_changed']:.1f} | {sm['seconds_per_step']:.0f} |")
    result = {"settings": s.as_dict(), "steps": a.steps, "skip": a.skip, "layer": a.layer, "best_of_gold": best,
              "runs": runs} | arms.provenance("transport_kl.py", argv)
    path = arms.write_json(Path(a.out_dir) / "transport_kl.json", result)
    print(f"[transport_kl] -> {path}")
    return result


if __name__ == "__main__":
    main()
