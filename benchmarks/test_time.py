"""Test-time VGF vs best-of-N on held-out prompts, with the true reward as the judge.

SmolLM2-135M-Instruct (offline), two kinds of task: exact-answer math (reasoning-gym chain_sum, 1 digit, 2 terms)
and a smooth preference-style reward (VADER positivity of "Write one sentence about <topic>."). Per task:
1. reference rollouts on train prompts, true rewards, value models fitted to them (plain / decode-consistent /
   ensemble, only those the variants need);
2. per seed: N reference samples per held-out prompt, shared by every arm; arms are a single sample, best-of-N
   with the value-model selector, and VGF variants with the *same* selector (the plain value model).
Prints a table and writes JSON + Markdown (``--write_docs`` puts it in docs/benchmarks.md).

    python benchmarks/test_time.py                       # defaults, ~20 min on 2 CPU cores
    python benchmarks/test_time.py --variants all        # every variant (longer)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vgf_llm.models import load_model, load_tokenizer  # noqa: E402
from vgf_llm.rewards import get_reward_func  # noqa: E402
from vgf_llm.rollout import HFGenerateBackend, Rollouts  # noqa: E402
from vgf_llm.sampler import TransportBudget, VGFSampler  # noqa: E402
from vgf_llm.scorers import ValueModel, ValueModelConfig, active_adapter  # noqa: E402
from vgf_llm.tasks import task_dataset, task_reward_names  # noqa: E402
from vgf_llm.value_fitting import fit_value_model, reward_rollouts, reward_texts  # noqa: E402


@dataclass
class Variant:
    """One VGF arm: which value model gives the gradient, how particles decode, how the result is selected."""

    name: str
    scorer: str = "plain"  # plain | dc (decode-consistent) | ensemble
    budget: TransportBudget = field(default_factory=lambda: TransportBudget(steps=4, step_size=0.02))
    decoder: str = "nearest"
    regenerate: bool = False
    selection: str = "final"
    fluency_weight: float = 0.0
    # reference top-k candidates from one pass over the original response (exact for the first edit, which is
    # all re-generation keeps; an approximation after it otherwise): ~T times cheaper than sequential decoding
    sequential: bool = False
    max_edits: int = 1  # for decoder="reference_gain"


def B(steps, eps):  # noqa: N802 - a budget literal
    return TransportBudget(steps=steps, step_size=eps, alpha=1.0, step_rule="adam")


VARIANTS = {
    v.name: v for v in [
        # the prototype's plain design: nearest-token decoding (small budgets change nothing, large ones garble)
        Variant("plain", budget=B(4, 0.02)),
        Variant("plain-large", budget=B(8, 0.05)),
        # reference top-k decoding keeps edits on the reference's support, so it can use larger budgets
        Variant("ref_topk", decoder="reference_topk", budget=B(8, 0.05)),
        Variant("ref_topk+union", decoder="reference_topk", selection="union", budget=B(8, 0.05)),
        Variant("ref_topk+union-xl", decoder="reference_topk", selection="union", budget=B(8, 0.1)),
        Variant("ref_topk+regen", decoder="reference_topk", regenerate=True, budget=B(8, 0.05)),
        Variant("ref_topk+regen+union", decoder="reference_topk", regenerate=True, selection="union",
                budget=B(8, 0.05)),
        Variant("dc+ref_topk+union", scorer="dc", decoder="reference_topk", selection="union", budget=B(8, 0.05)),
        Variant("ensemble+ref_topk+union", scorer="ensemble", decoder="reference_topk", selection="union",
                budget=B(8, 0.05)),
        Variant("fluency+ref_topk+union", decoder="reference_topk", selection="union", fluency_weight=1.0,
                budget=B(8, 0.05)),
        # first-order value gain of reference top-k swaps along the displacement (HotFlip-style), capped edits
        Variant("gain1+union", decoder="reference_gain", selection="union", budget=B(8, 0.05)),
        Variant("gain3+union", decoder="reference_gain", selection="union", max_edits=3, budget=B(8, 0.05)),
        Variant("dc+nearest", scorer="dc", budget=B(8, 0.05)),
        Variant("ensemble+nearest", scorer="ensemble", budget=B(8, 0.05)),
    ]
}
DEFAULT_VARIANTS = ["plain", "ref_topk+union", "gain1+union", "gain3+union"]



def value_configs(layers: int) -> dict[str, tuple[ValueModelConfig, int]]:
    """Value-model variants: (config, decode-consistent noisy copies)."""
    return {
        "plain": (ValueModelConfig(num_layers=layers, adapter_name="value"), 0),
        "dc": (ValueModelConfig(num_layers=layers, adapter_name="value_dc"), 1),
        "ensemble": (ValueModelConfig(num_layers=layers, num_heads=4, aggregate="min", adapter_name="value_ens"), 0),
    }


def run_task(task: str, args, variants: list[Variant], cache: Path, out: Path) -> dict:
    print(f"\n=== {task} ===", flush=True)
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    reward = [get_reward_func(name) for name in task_reward_names(task)]
    train = list(task_dataset(task, args.num_train_prompts, 0, "train"))
    test = list(task_dataset(task, args.num_test_prompts, 0, "test"))
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)

    # value models (cached by configuration)
    needed = {"plain"} | {v.scorer for v in variants}
    value_models, value_stats, train_ro, train_rewards = {}, {}, None, None
    for key, (cfg, copies) in value_configs(args.value_layers).items():
        if key not in needed:
            continue
        tag = (f"{task}-{key}-L{args.value_layers}-n{args.num_train_prompts}x{args.train_generations}"
               f"-e{args.value_epochs}")
        path = cache / tag
        if (path / "value_model.json").exists():
            value_models[key] = ValueModel.load(model, path)
            value_stats[key] = json.loads((path / "stats.json").read_text())
            print(f"value model {key}: loaded from cache ({value_stats[key].get('val_corr', float('nan')):.3f} corr)")
            continue
        t0 = time.time()
        vm, stats, train_ro, train_rewards = fit_value_model(
            model, tok, reward, train, config=cfg, num_generations=args.train_generations, epochs=args.value_epochs,
            decode_consistent_copies=copies, max_row_shift=args.dc_max_shift, rollouts=train_ro,
            rewards=train_rewards, seed=0, lr=args.value_lr, **gen)
        stats["fit_seconds"] = time.time() - t0
        vm.save(path)
        (path / "stats.json").write_text(json.dumps(stats, indent=2))
        value_models[key], value_stats[key] = vm, stats
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
        print(f"value model {key}: {json.dumps(shown)}", flush=True)
    selector = value_models["plain"]

    arms: dict[str, list[dict]] = {}
    backend = HFGenerateBackend(model, tok, batch_size=args.batch_size, **gen)
    prompts = [r["prompt"] for r in test]
    for seed in args.seeds:
        t0 = time.time()
        n, n2 = args.num_particles, 2 * args.num_particles
        with active_adapter(model, None):
            ro2 = backend.generate(prompts, n2, seed)  # 2N samples: the first N are the particles
        gen_time = (time.time() - t0) / len(prompts) / 2
        true2 = reward_rollouts(reward, None, test, ro2)  # [G, 2N]
        sel2 = torch.stack([
            selector.score_ids(ro2[s:s + 1].prompt_ids.repeat_interleave(n2, 0),
                               ro2[s:s + 1].prompt_mask.repeat_interleave(n2, 0),
                               ro2.completion_ids[s], ro2.completion_mask[s]) for s in range(len(prompts))])
        ro = Rollouts(ro2.prompt_ids, ro2.prompt_mask, ro2.completion_ids[:, :n], ro2.completion_mask[:, :n],
                      [t[:n] for t in ro2.texts])
        true, sel = true2[:, :n], sel2[:, :n]
        bon_time = gen_time
        arms.setdefault("best-of-2N (same selector)", []).append(dict(
            reward=float(true2[torch.arange(len(prompts)), sel2.argmax(1)].nanmean()), seconds=2 * gen_time))
        arms.setdefault("single sample", []).append(dict(reward=float(true[:, 0].nanmean()), seconds=gen_time / 8))
        arms.setdefault("pass@N (oracle)", []).append(dict(reward=float(true.max(1).values.nanmean()),
                                                           seconds=gen_time))
        arms.setdefault("best-of-N", []).append(dict(
            reward=float(true[torch.arange(len(prompts)), sel.argmax(1)].nanmean()), seconds=bon_time))
        for v in variants:
            sampler = VGFSampler(model, tok, value_models[v.scorer], selector=selector,
                                 num_particles=args.num_particles, budget=v.budget, decoder=v.decoder,
                                 regenerate=v.regenerate, selection=v.selection, fluency_weight=v.fluency_weight,
                                 sequential_decoding=v.sequential, max_edits=v.max_edits,
                                 batch_size=args.batch_size, progress=False, **gen)
            t1 = time.time()
            results = []
            for s in range(0, len(prompts), args.batch_size):
                results += sampler.transport_rollouts(prompts[s:s + args.batch_size], ro[s:s + args.batch_size],
                                                      seed=seed)
            vgf_time = (time.time() - t1) / len(prompts) + gen_time
            chosen = reward_texts(reward, None, test, [r.response for r in results])
            moved = reward_texts(reward, None, [row for row in test for _ in range(args.num_particles)],
                                 [p.text_after for r in results for p in r.particles])
            changed = [p.tokens_changed for r in results for p in r.particles]
            arms.setdefault(v.name, []).append(dict(
                reward=float(chosen.nanmean()), seconds=vgf_time,
                moved_particle_reward=float(moved.nanmean()), original_particle_reward=float(true.nanmean()),
                tokens_changed=statistics.mean(changed),
                frac_particles_changed=sum(c > 0 for c in changed) / len(changed),
                frac_chosen_moved=sum(r.chosen_moved for r in results) / len(results),
                displacement=statistics.mean(p.displacement for r in results for p in r.particles)))
            print(f"seed {seed} {v.name:32s} reward {arms[v.name][-1]['reward']:.3f} "
                  f"(best-of-N {arms['best-of-N'][-1]['reward']:.3f}) tokens changed "
                  f"{arms[v.name][-1]['tokens_changed']:.2f} {vgf_time:.1f}s/prompt", flush=True)
        result = dict(task=task, value_models=value_stats, arms=arms, variants={v.name: asdict(v) for v in variants},
                      seeds_done=args.seeds[: args.seeds.index(seed) + 1])
        (out / f"partial_{task}.json").write_text(json.dumps(result, indent=2))  # a stopped run stays usable
    return result


def summarise(result: dict) -> list[dict]:
    rows = []
    for name, runs in result["arms"].items():
        rewards = [r["reward"] for r in runs]
        row = dict(arm=name, mean=statistics.mean(rewards), std=statistics.pstdev(rewards) if len(rewards) > 1 else 0,
                   per_seed=rewards, seconds=statistics.mean(r["seconds"] for r in runs))
        for k in ("tokens_changed", "frac_particles_changed", "moved_particle_reward", "original_particle_reward",
                  "frac_chosen_moved", "displacement"):
            if k in runs[0]:
                row[k] = statistics.mean(r[k] for r in runs)
        rows.append(row)
    return rows


def markdown(results: list[dict], args, seeds=None) -> str:
    lines = [f"Command: `python benchmarks/test_time.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"Model {args.model}, {args.num_test_prompts} held-out prompts x {args.num_particles} particles, seeds "
             f"{seeds or args.seeds}, "
             f"temperature {args.temperature}, max {args.max_new_tokens} new tokens; value model: "
             f"{args.value_layers} layers + LoRA + head, fitted on {args.num_train_prompts} train prompts x "
             f"{args.train_generations} samples. Selector for every arm: the plain value model. "
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}.", ""]
    for res in results:
        vs = res["value_models"]
        lines += [f"### {res['task']}", "", "Value models (held-out correlation with the true reward): " + ", ".join(
            f"{k} {v.get('val_corr', float('nan')):.3f}" for k, v in vs.items()), "",
            "| arm | true reward (mean ± std over seeds) | per seed | tokens changed / particle | particles changed "
            "| reward of moved particles (vs originals) | chosen is moved | s / prompt |",
            "|---|---|---|---|---|---|---|---|"]
        for r in summarise(res):
            moved = (f"{r['moved_particle_reward']:.3f} ({r['original_particle_reward']:.3f})"
                     if "moved_particle_reward" in r else "")
            lines.append(
                f"| {r['arm']} | {r['mean']:.3f} ± {r['std']:.3f} | {', '.join(f'{x:.3f}' for x in r['per_seed'])} | "
                f"{r.get('tokens_changed', 0):.2f} | {r.get('frac_particles_changed', 0):.2f} | {moved} | "
                f"{r.get('frac_chosen_moved', 0):.2f} | {r['seconds']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def write_docs(md: str, heading: str = "## Test-time VGF on SmolLM2 (benchmarks/test_time.py)") -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start = text.find(heading)
    section = f"{heading}\n\n{md}\n"
    if start == -1:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
    doc.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default="chain_sum,sentiment")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list or 'all': {list(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num_train_prompts", type=int, default=64)
    p.add_argument("--train_generations", type=int, default=4)
    p.add_argument("--num_test_prompts", type=int, default=12)
    p.add_argument("--num_particles", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--value_layers", type=int, default=12)
    p.add_argument("--value_epochs", type=int, default=3)
    p.add_argument("--value_lr", type=float, default=1e-3)
    p.add_argument("--dc_max_shift", type=float, default=2.0, help="decode-consistent noise: max row shift")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "test_time"))
    p.add_argument("--write_docs", action="store_true")
    p.add_argument("--render", default="", help="comma list of results/partial JSON files: print their tables, "
                                                "no compute (e.g. for a run stopped after some seeds)")
    args = p.parse_args(argv)
    if args.render:
        results = [json.loads(Path(f).read_text()) for f in args.render.split(",")]
        results = [r for res in results for r in (res["results"] if "results" in res else [res])]
        print(markdown(results, args, seeds=sorted({s for r in results for s in r.get("seeds_done", [])})))
        return
    args.seeds = [int(s) for s in args.seeds.split(",")]
    names = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    variants = [VARIANTS[n] for n in names]
    out = Path(args.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    results = [run_task(t, args, variants, cache, out) for t in args.tasks.split(",")]
    md = markdown(results, args) + f"\nTotal wall-clock: {(time.time() - t0) / 60:.1f} min.\n"
    print("\n" + md)
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), results=results,
                                                      summary={r["task"]: summarise(r) for r in results}), indent=2))
    (out / "results.md").write_text(md)
    if args.write_docs:
        write_docs(md)


if __name__ == "__main__":
    main()
