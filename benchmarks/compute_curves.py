"""Gold vs compute: best-of-N at N = 1..32 against VGF decoders at a few budgets, true reward vs wall-clock per prompt.

Issue 27's curves. Per seed, ``--n_max`` reference samples per held-out prompt are drawn once (cached, timed); best-of-N
takes the first N of them with the selector, so every N shares one draw; the VGF arms transport the first
``--vgf_n`` of the same samples (``VGFSampler.transport_rollouts``) and select among originals and moved particles.
x = seconds per prompt: best-of-N is N x (sampling + scoring one sample), measured on this draw; a VGF arm is
``vgf_n`` samples' sampling + its measured transport, decode, re-scoring and selection. Also generated tokens per
prompt (a steer_prefix arm re-generates its particles under steering; verified edits generate none). y = the true
reward, which the method never sees on the helpful task (``--scorer`` a proxy reward model, gold held out); on
sentiment the selector is a ridge value model fitted on the train prompts' true (VADER) rewards, as in
guided_sampling.py. Each arm's win rate against the base model's greedy answer, judged by the true reward (ties
half), is the paper's metric. Each VGF arm is also compared per seed with best-of-N's curve at its own wall-clock
(linear between the two neighbouring N; capped at ``--n_max``).

    python benchmarks/compute_curves.py --task sentiment --threads 2 --num_train_prompts 128 \
        --num_test_prompts 24 --ridge_layers 4,8,12,16,20,24,30
    python benchmarks/compute_curves.py --task helpful --scorer smollm2-135m-helpful-rm --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from guided_sampling import (  # noqa: E402
    DEFAULT_VARIANTS,
    first_samples,
    ridge_selector,
    score_groups,
    test_rollouts,
    train_rollouts,
    variant,
)

from vgf_llm.likelihood import ReferenceLikelihood  # noqa: E402
from vgf_llm.models import load_model, load_tokenizer  # noqa: E402
from vgf_llm.rewards import get_reward_func, reward_texts  # noqa: E402
from vgf_llm.rollout.hf import HFGenerateBackend, Rollouts  # noqa: E402
from vgf_llm.sampler import VGFSampler  # noqa: E402
from vgf_llm.tasks import task_dataset, task_reward_names  # noqa: E402

# the sampler's two decoders at their default budgets, and steer_prefix at half its step (run 7's best on sentiment)
CURVE_VARIANTS = [*DEFAULT_VARIANTS, "prefix-L15-b1x0.1+union"]


def win_rate(rewards: torch.Tensor, greedy: torch.Tensor) -> float:
    """Share of prompts where the arm's answer beats the greedy answer under the true reward (ties count half)."""
    return float(((rewards > greedy).float() + 0.5 * (rewards == greedy).float()).mean())


def make_selector(task, args, model, tok, reward, train):
    """The selector and the targets the steer_prefix value is fitted on: a ridge value model on true rewards, or a
    reward model (``--scorer``) whose own scores of the train samples are the targets (the true reward stays held
    out)."""
    train_ro, train_rewards = train_rollouts(task, args, model, tok, reward, train, args.cache)
    if args.scorer == "ridge":
        selector, stats = ridge_selector(task, args, model, tok, reward, train, train_ro, train_rewards, args.cache)
        return selector, train_ro, train_rewards, dict(ridge=stats)
    from transformers import AutoModelForSequenceClassification

    from vgf_llm.value import RewardModelScorer

    rm = load_model(args.scorer, model_class=AutoModelForSequenceClassification)
    selector = RewardModelScorer(rm, load_tokenizer(args.scorer, padding_side="right"), tok)
    with torch.no_grad():
        proxy = score_groups(selector, train_ro).float()
    corr = float(torch.corrcoef(torch.stack([proxy.flatten(), train_rewards.flatten().float()]))[0, 1])
    return selector, train_ro, proxy, dict(scorer=args.scorer, train_corr_with_true=corr)


def proxy_of_responses(selector, tok, ro: Rollouts, texts: list[str]) -> torch.Tensor:
    """The selector's raw score of one chosen response per prompt (re-tokenised; for the gold-vs-proxy picture, not
    timed)."""
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        return selector.score_ids(ro.prompt_ids, ro.prompt_mask, enc.input_ids, enc.attention_mask).float().cpu()


def mean_logprobs(model, ro: Rollouts) -> tuple[torch.Tensor, float]:
    """[G, N] reference log-likelihood per token of every sample, and the seconds it cost: nothing when the draw
    kept its tokens' log-probabilities (read while sampling), else one forward pass per prompt's samples."""
    t0 = time.time()
    lik = ReferenceLikelihood(model)
    g, n, t = ro.shape
    out = torch.stack([lik.score_ids(*ro[i:i + 1].flat(), None if ro.logprobs is None else
                                     ro.logprobs[i].reshape(n, t)).cpu() for i in range(g)])
    return out, time.time() - t0


def selection_curves(sel: torch.Tensor, loglik: torch.Tensor | None, weights: list[float]):
    """(suffix, score [G, N]) of each best-of-N curve: the selector's, then each likelihood-tilted one."""
    return [("", sel)] + [(f"+lik{w:g}", sel + w * loglik) for w in (weights if loglik is not None else [])]


def best_of_n_arm(n: int, score, sel, true, tokens, greedy, seconds: float) -> dict:
    """Best-of-``n`` over the first n samples of each prompt picked by ``score``: its true reward, the selector's
    (proxy's) score of the pick, cost, tokens and win rate against the greedy answer."""
    rows = torch.arange(true.shape[0])
    idx = score[:, :n].argmax(1)
    pick = true[rows, idx]
    return dict(n=n, reward=float(pick.mean()), proxy=float(sel[rows, idx].mean()), seconds=seconds,
                tokens=float(tokens[:, :n].sum(1).mean()), win_rate=win_rate(pick, greedy), per_prompt=pick.tolist())


def run_seed(seed, args, model, tok, reward, test, selector, samplers, greedy, greedy_proxy) -> dict:
    """Every arm on one seed's draw: {arm: dict(reward, proxy, seconds, tokens, win_rate, ...)}."""
    ro, true, gen_seconds = test_rollouts(args.task, args, model, tok, reward, test, seed, args.cache)
    g, n_max = true.shape
    t0 = time.time()
    with torch.no_grad():
        sel = score_groups(selector, ro).float()
    per_sample = (gen_seconds + time.time() - t0) / g / n_max  # sampling + scoring one sample of one prompt
    tokens = ro.completion_mask.sum(-1).float()  # [G, n_max]
    arms = {}
    loglik, lik_per_sample = None, 0.0
    if args.likelihood_weights:
        loglik, lik_seconds = mean_logprobs(model, ro)
        lik_per_sample = lik_seconds / g / n_max
    for suffix, score in selection_curves(sel, loglik, args.likelihood_weights):
        for n in args.ns:
            arms[f"best-of-{n}{suffix}"] = best_of_n_arm(
                n, score, sel, true, tokens, greedy, n * (per_sample + (lik_per_sample if suffix else 0.0)))
    arms["greedy (base)"] = dict(reward=float(greedy.mean()), proxy=greedy_proxy, seconds=float("nan"),
                                 tokens=float("nan"),
                                 win_rate=0.5, per_prompt=greedy.tolist())
    k = args.vgf_n
    prompts = [r["prompt"] for r in test]
    for name, sampler in samplers.items():
        t1, results, regenerated = time.time(), [], 0.0
        for s in range(0, g, args.batch_size):
            chunk = first_samples(ro[s:s + args.batch_size], k)
            results += sampler.transport_rollouts(prompts[s:s + args.batch_size], chunk)
            if sampler.config.decoder == "steer_prefix":  # particles re-generated under steering
                regenerated += float(sampler.last_moved.mask.sum())
        seconds = k * per_sample + (time.time() - t1) / g
        responses = [r.response for r in results]
        got = reward_texts(reward, None, test, responses)
        arms[name] = dict(n=k, reward=float(got.mean()), proxy=float(proxy_of_responses(selector, tok, ro,
                                                                                         responses).mean()),
                          seconds=seconds,
                          tokens=float(tokens[:, :k].sum(1).mean()) + regenerated / g, win_rate=win_rate(got, greedy),
                          frac_chosen_moved=sum(r.chosen_moved for r in results) / g, per_prompt=got.tolist())
        print(f"seed {seed} {name:30s} reward {arms[name]['reward']:.3f} (best-of-{k} "
              f"{arms[f'best-of-{k}']['reward']:.3f}) {arms[name]['seconds']:.2f}s/prompt", flush=True)
    return dict(seed=seed, seconds_per_sample=per_sample, arms=arms)


def bon_within(seconds: float, run: dict, ns: list[int], suffix: str = "") -> float:
    """Issue 29's comparator: the best true reward of best-of-N, N >= 4 (every N of a smaller draw), that takes no
    more than ``seconds`` (the smallest such N when none is that cheap)."""
    arms = [run["arms"][f"best-of-{n}{suffix}"] for n in ([n for n in ns if n >= 4] or ns)]
    fits = [a["reward"] for a in arms if a["seconds"] <= seconds] or [arms[0]["reward"]]
    return max(fits)


def bon_at(seconds: float, run: dict, ns: list[int], suffix: str = "") -> tuple[float, bool]:
    """Best-of-N's true reward at ``seconds`` per prompt on one seed (linear between neighbouring N; capped);
    ``suffix`` picks the curve (``+lik1``: selected by the likelihood-tilted score)."""
    pts = [(run["arms"][f"best-of-{n}{suffix}"]["seconds"], run["arms"][f"best-of-{n}{suffix}"]["reward"])
           for n in ns]
    if seconds >= pts[-1][0]:
        return pts[-1][1], seconds > pts[-1][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if seconds <= x1:
            return y0 + (y1 - y0) * max(0.0, seconds - x0) / (x1 - x0), False
    raise AssertionError("unreachable")


def summarise(runs: list[dict], ns: list[int]) -> list[dict]:
    """One row per arm: means and seed spreads, and for VGF arms the paired difference to best-of-N's curve at equal
    wall-clock (``above``: every seed above and the mean difference beyond its seed spread)."""
    rows = []
    for name in runs[0]["arms"]:
        per = [r["arms"][name] for r in runs]

        def ms(key, per=per):
            xs = [p[key] for p in per]
            if any(math.isnan(x) for x in xs):  # the greedy answer has no cost of its own here
                return math.nan, math.nan
            return statistics.mean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0

        row = dict(arm=name, reward=ms("reward"), proxy=ms("proxy"), seconds=ms("seconds"), tokens=ms("tokens"),
                   win_rate=ms("win_rate"), per_seed=[p["reward"] for p in per], n=per[0].get("n"))
        if not name.startswith(("best-of-", "greedy")):
            at = [bon_at(p["seconds"], r, ns) for p, r in zip(per, runs, strict=True)]
            diffs = [p["reward"] - b for p, (b, _) in zip(per, at, strict=True)]
            row.update(bon_equal_clock=statistics.mean(b for b, _ in at), capped=any(c for _, c in at),
                       **paired("", diffs))
            within = [p["reward"] - bon_within(p["seconds"], r, ns) for p, r in zip(per, runs, strict=True)]
            row.update(paired("within_", within))
            suffix = tilt_suffix(name)
            if suffix and f"best-of-{ns[0]}{suffix}" in runs[0]["arms"]:  # against best-of-N tilted the same way
                tilted = [p["reward"] - bon_at(p["seconds"], r, ns, suffix)[0] for p, r in zip(per, runs, strict=True)]
                row.update(paired("tilted_", tilted))
        rows.append(row)
    return rows


def paired(prefix: str, diffs: list[float]) -> dict:
    """Per-seed differences to a control, their mean ± spread, and ``above``: every seed above and the mean
    difference beyond its seed spread."""
    d_std = statistics.pstdev(diffs) if len(diffs) > 1 else 0.0
    return {f"{prefix}diff_per_seed": diffs, f"{prefix}diff": (statistics.mean(diffs), d_std),
            f"{prefix}above": all(d > 0 for d in diffs) and statistics.mean(diffs) > d_std}


def tilt_suffix(arm: str) -> str:
    """``+lik<W>`` of an arm that selects by the likelihood-tilted score ('' for the others)."""
    return arm[arm.index("+lik"):] if "+lik" in arm else ""


def bon_peak(rows: list[dict], ns: list[int], suffix: str = "") -> str:
    """How best-of-N's mean true reward moves with each doubling of N, against the seed spread: where it falls, and
    the last doubling that still gains more than the spread."""
    by = {n: by_arm["reward"] for n in ns for by_arm in rows if by_arm["arm"] == f"best-of-{n}{suffix}"}
    steps = [(a, b, by[b][0] - by[a][0], max(by[a][1], by[b][1])) for a, b in zip(ns, ns[1:], strict=False)]
    text = "; ".join(f"{a}->{b}: {d:+.3f} (spread {sp:.3f})" for a, b, d, sp in steps)
    falls = [f"{a}->{b}" for a, b, d, _ in steps if d < 0]
    beyond = [b for _, b, d, sp in steps if d > sp]
    fall = f"Falls at {', '.join(falls)}. " if falls else "Never falls. "
    last = f"Last gain beyond the seed spread: up to N = {beyond[-1]}." if beyond else "No gain beyond the spread."
    return f"best-of-N{suffix} per doubling of N: {text}. {fall}{last}"


def markdown(rows: list[dict], args, minutes: float) -> str:
    def pm(x):
        return f"{x[0]:.3f} ± {x[1]:.3f}"

    lines = [f"Command: `python benchmarks/compute_curves.py {' '.join(args.argv)}`".rstrip(), "",
             f"{args.model}, task {args.task}, {args.num_test_prompts} held-out prompts, seeds {args.seeds_done}, "
             f"{args.n_max} samples per prompt (temperature {args.temperature}, max {args.max_new_tokens} new tokens), "
             f"VGF on the first {args.vgf_n}; selector {args.scorer}"
             + (f" (fitted on {args.num_train_prompts} train prompts x {args.train_generations})"
                if args.scorer == "ridge" else "") + f". Machine: {platform.machine()}, "
             f"{torch.get_num_threads()} torch threads; run wall-clock {minutes:.1f} min.", "",
             "| arm | true reward | per seed | proxy of the chosen | s / prompt | tokens / prompt | win rate vs greedy "
             "| minus best-of-N at equal s (per seed) | minus the best best-of-N (N >= 4) within its s | minus "
             "best-of-N tilted the same way, at equal s |", "|---|---|---|---|---|---|---|---|---|---|"]

    def vs(r, prefix):
        if f"{prefix}diff" not in r:
            return ""
        d = r[f"{prefix}diff"]
        return (f"{d[0]:+.3f} ± {d[1]:.3f} ({', '.join(f'{x:+.3f}' for x in r[f'{prefix}diff_per_seed'])}) "
                + ("**above**" if r[f"{prefix}above"] else "not above")
                + (", capped at N max" if prefix == "" and r["capped"] else ""))

    for r in rows:
        cost = f"{r['seconds'][0]:.2f} | {r['tokens'][0]:.0f}".replace("nan", "–")  # greedy: not costed
        proxy = pm(r["proxy"]) if not math.isnan(r["proxy"][0]) else "–"
        lines.append(f"| {r['arm']} | {pm(r['reward'])} | {', '.join(f'{x:.3f}' for x in r['per_seed'])} | "
                     f"{proxy} | {cost} | {pm(r['win_rate'])} | {vs(r, '')} | {vs(r, 'within_')} | "
                     f"{vs(r, 'tilted_')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """True reward vs seconds per prompt and vs generated tokens; error bars are the seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    vgf = [r for r in rows if "diff" in r]
    axes_keys = ((axes[0], "seconds", "wall-clock s / prompt"), (axes[1], "tokens", "tokens / prompt"),
                 (axes[2], "proxy", "selector's score of the chosen answer (the proxy)"))
    for ax, key, label in axes_keys:
        for suffix, colour in bon_curves(rows):
            bon = [r for r in rows if r["arm"].startswith("best-of-") and tilt_suffix(r["arm"]) == suffix]
            ax.errorbar([r[key][0] for r in bon], [r["reward"][0] for r in bon], yerr=[r["reward"][1] for r in bon],
                        fmt="-o", color=colour, label=f"best-of-N{suffix} (N = 1..{bon[-1]['n']})", capsize=3)
            for r in bon:
                ax.annotate(str(r["n"]), (r[key][0], r["reward"][0]), fontsize=7, color=colour,
                            textcoords="offset points", xytext=(3, -9))
        for r in vgf:
            ax.errorbar(r[key][0], r["reward"][0], xerr=r[key][1], yerr=r["reward"][1], fmt="s", capsize=3,
                        label=r["arm"])
        greedy = next(r for r in rows if r["arm"].startswith("greedy"))["reward"][0]
        ax.axhline(greedy, color="grey", ls=":", label="greedy (base)")
        if key != "proxy":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short range
        ax.set_xlabel(label)
        ax.set_ylabel("true reward")
    axes[0].legend(fontsize=7)
    axes[2].set_title("over-optimisation: gold against proxy", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bon_curves(rows: list[dict]) -> list[tuple[str, str]]:
    """(suffix, colour) of each best-of-N curve present: plain, then each likelihood-tilted one."""
    suffixes = sorted({tilt_suffix(r["arm"]) for r in rows if r["arm"].startswith("best-of-")})
    return [(sfx, "k" if not sfx else colour) for sfx, colour in zip(suffixes, ["k", "tab:brown", "tab:olive"],
                                                                       strict=False)]


DRAW_SETTINGS = ("model", "task", "scorer", "num_test_prompts", "n_max", "vgf_n", "max_new_tokens", "temperature",
                 "batch_size", "num_train_prompts", "train_generations", "likelihood_weights")


def resumed_runs(out: Path, args, variants: list[str]) -> list[dict]:
    """The finished seeds of an earlier run into ``out`` with the same draw settings, keeping only the best-of-N,
    greedy and ``variants`` arms (so a long run can go on with fewer arms after a stop)."""
    if not out.exists():
        return []
    old = json.loads(out.read_text())
    differ = [k for k in DRAW_SETTINGS if old["args"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--resume: {out} was run with other settings ({', '.join(differ)})")
    runs = [r for r in old["runs"] if r["seed"] in args.seeds]
    for r in runs:
        r["arms"] = {k: v for k, v in r["arms"].items() if (
            k.startswith(("best-of-", "greedy")) or k in variants)}
        missing = [v for v in variants if v not in r["arms"]]
        if missing:
            raise SystemExit(f"--resume: seed {r['seed']} in {out} has no arm {missing}")
    print(f"resumed seeds {[r['seed'] for r in runs]} from {out}", flush=True)
    return runs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="sentiment")
    p.add_argument("--scorer", default="ridge", help="'ridge' (value model on true rewards) or a reward model")
    p.add_argument("--variants", default=",".join(CURVE_VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num_train_prompts", type=int, default=128)
    p.add_argument("--train_generations", type=int, default=8)
    p.add_argument("--num_test_prompts", type=int, default=24)
    p.add_argument("--n_max", type=int, default=32, help="samples per prompt; best-of-N for N = 1, 2, 4, .. n_max")
    p.add_argument("--vgf_n", type=int, default=8, help="particles of the VGF arms (the first samples of the draw)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=4, help="prompts per generate / transport call")
    p.add_argument("--ridge_layers", default="4,8,12,16,20,24,30")
    p.add_argument("--likelihood_weights", default="",
                   help="comma list W: best-of-N curves also selected by score + W x reference log-lik per token")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/compute_curves_<task>.json)")
    p.add_argument("--resume", action="store_true",
                   help="keep the seeds already in --out (same draw settings) and run the others; arms not in "
                        "--variants are dropped from the kept seeds")
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "results" / "compute_curves" / "cache"))
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.likelihood_weights = [float(w) for w in args.likelihood_weights.split(",") if w]
    args.ns = [1 << i for i in range(args.n_max.bit_length()) if 1 << i <= args.n_max]
    args.num_particles = args.n_max // 2  # guided_sampling.test_rollouts draws 2 x num_particles per prompt
    args.cache = Path(args.cache)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"compute_curves_{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    reward = [get_reward_func(name) for name in task_reward_names(args.task)]
    train = list(task_dataset(args.task, args.num_train_prompts, 0, "train"))
    test = list(task_dataset(args.task, args.num_test_prompts, 0, "test"))
    selector, train_ro, targets, selector_stats = make_selector(args.task, args, model, tok, reward, train)
    samplers = {}
    for name in args.variants.split(","):
        v = variant(name)
        if v is None or v.control:
            p.error(f"{name}: not a VGF arm here (controls are guided_sampling.py's)")
        samplers[name] = VGFSampler(model, tok, selector, v.sampler_config(
            argparse.Namespace(**{**vars(args), "num_particles": args.vgf_n})), progress=False)
        samplers[name].fit(train_ro, targets)
    greedy_ro = HFGenerateBackend(model, tok, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                  batch_size=8).generate([r["prompt"] for r in test], 1, 0)
    greedy = reward_texts(reward, None, test, [t[0] for t in greedy_ro.texts])
    with torch.no_grad():
        greedy_proxy = float(score_groups(selector, greedy_ro).mean())
    runs = resumed_runs(out, args, list(samplers)) if args.resume else []
    for seed in [s for s in args.seeds if s not in {r["seed"] for r in runs}]:
        runs.append(run_seed(seed, args, model, tok, reward, test, selector, samplers, greedy, greedy_proxy))
        rows = summarise(runs, args.ns)
        minutes = (time.time() - t0) / 60
        args.seeds_done = [r["seed"] for r in runs]
        table = markdown(rows, args, minutes)
        reading = " ".join(bon_peak(rows, args.ns, suffix) for suffix, _ in bon_curves(rows))
        result = dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                      selector=selector_stats, runs=runs, summary=rows, bon_peak=reading, table_md=table,
                      wall_clock_min=minutes, seeds_done=args.seeds_done)
        out.write_text(json.dumps(result, indent=2))  # after every seed: a stopped run keeps what it did
        plot(rows, out.with_suffix(".png"), f"{args.task}: true reward vs compute, seeds {result['seeds_done']}")
    print("\n" + table + "\n" + reading)
    return result


if __name__ == "__main__":
    main()
