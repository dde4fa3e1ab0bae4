"""Best-of-N past a compute_curves run's draw: N = 2 x n_max, from a second independent draw of the same size.

``compute_curves.py`` draws ``n_max`` samples per prompt and seed once. When a VGF arm costs more than
best-of-``n_max``, the best-of-N it must beat at no more wall-clock may be a larger N than was drawn. This script draws
``n_max`` more samples per prompt for every seed of a result file (seed + ``EXTRA_SEED``, cached like the first draw),
takes best-of-2 x n_max over both draws with the run's selector (and with each likelihood-tilted selector the run
has), costs it at the run's own measured seconds per sample, adds those arms to every seed and re-summarises the file
in place (table, reading, plot). The VGF arms are not re-run.

    python benchmarks/extend_best_of_n.py benchmarks/results/compute_curves_helpful_lik.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from compute_curves import (  # noqa: E402
    best_of_n_arm,
    bon_curves,
    bon_peak,
    make_selector,
    markdown,
    mean_logprobs,
    plot,
    selection_curves,
    summarise,
)
from guided_sampling import score_groups, test_rollouts  # noqa: E402

from vgf_llm.models import load_model, load_tokenizer  # noqa: E402
from vgf_llm.rewards import get_reward_func  # noqa: E402
from vgf_llm.tasks import task_dataset, task_reward_names  # noqa: E402

EXTRA_SEED = 10_000  # the second draw's seed offset: independent of every first draw


def extended_arms(run: dict, args, model, tok, reward, test, selector) -> dict:
    """The best-of-2 x n_max arms of one seed (plain and each tilted curve the run has), in the run's units."""
    seed, n_max = run["seed"], args.n_max
    draws = [test_rollouts(args.task, args, model, tok, reward, test, s, args.cache)[:2]
             for s in (seed, seed + EXTRA_SEED)]
    true = torch.cat([t for _, t in draws], 1)
    with torch.no_grad():
        sel = torch.cat([score_groups(selector, ro).float() for ro, _ in draws], 1)
    tokens = torch.cat([ro.completion_mask.sum(-1).float() for ro, _ in draws], 1)
    greedy = torch.tensor(run["arms"]["greedy (base)"]["per_prompt"])
    big = 2 * n_max
    loglik = (torch.cat([mean_logprobs(model, ro)[0] for ro, _ in draws], 1) if args.likelihood_weights
              else None)
    arms = {}
    for suffix, score in selection_curves(sel, loglik, args.likelihood_weights):
        one = run["arms"][f"best-of-1{suffix}"]["seconds"]  # the run's measured cost of one sample on this curve
        arms[f"best-of-{big}{suffix}"] = best_of_n_arm(big, score, sel, true, tokens, greedy, big * one)
        print(f"seed {seed} best-of-{big}{suffix}: {arms[f'best-of-{big}{suffix}']['reward']:.3f}", flush=True)
    return arms


def insert_after(arms: dict, new: dict, n_max: int) -> dict:
    """``arms`` with each new best-of arm placed after the best-of-n_max arm of its curve (table order)."""
    out = {}
    for name, arm in arms.items():
        out[name] = arm
        if name.startswith(f"best-of-{n_max}"):
            suffix = name.removeprefix(f"best-of-{n_max}")
            out.update({k: v for k, v in new.items() if k == f"best-of-{2 * n_max}{suffix}"})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", help="a compute_curves.py result JSON (rewritten in place)")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    path = Path(a.result)
    result = json.loads(path.read_text())
    args = argparse.Namespace(**result["args"])
    if getattr(args, "extended_from", None):
        p.error(f"{path} was already extended (from n_max {args.extended_from})")
    args.cache = Path(args.cache)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    reward = [get_reward_func(name) for name in task_reward_names(args.task)]
    train = list(task_dataset(args.task, args.num_train_prompts, 0, "train"))
    test = list(task_dataset(args.task, args.num_test_prompts, 0, "test"))
    selector = make_selector(args.task, args, model, tok, reward, train)[0]
    for run in result["runs"]:
        run["arms"] = insert_after(run["arms"], extended_arms(run, args, model, tok, reward, test, selector),
                                   args.n_max)
    args.extended_from, args.n_max = args.n_max, 2 * args.n_max
    args.ns = [*args.ns, args.n_max]
    args.argv = [*args.argv, f"(then: python benchmarks/extend_best_of_n.py {path.name})"]
    rows = summarise(result["runs"], args.ns)
    minutes = result["wall_clock_min"] + (time.time() - t0) / 60
    table = markdown(rows, args, minutes)
    reading = " ".join(bon_peak(rows, args.ns, suffix) for suffix, _ in bon_curves(rows))
    result.update(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, summary=rows,
                  bon_peak=reading, table_md=table, wall_clock_min=minutes)
    path.write_text(json.dumps(result, indent=2))
    plot(rows, path.with_suffix(".png"), f"{args.task}: true reward vs compute, seeds {result['seeds_done']}")
    print("\n" + table + "\n" + reading)
    return result


if __name__ == "__main__":
    main()
