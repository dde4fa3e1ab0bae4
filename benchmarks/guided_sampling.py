"""Guided sampling (test-time VGF) vs best-of-N on held-out prompts, with the true reward as the judge.

SmolLM2-135M-Instruct (offline), two kinds of task: exact-answer math (reasoning-gym chain_sum, 1 digit, 2 terms)
and a smooth preference-style reward (VADER positivity of "Write one sentence about <topic>."). Per task:
1. reference rollouts on train prompts with their true rewards (drawn once, cached under ``--cache``), and the
   selector fitted to them: a ridge value model (frozen backbone cut at a cross-validated layer + a closed-form
   linear head; held-out correlation by prompt);
2. per seed: 2N reference samples per held-out prompt (cached; the first N are the particles), shared by every
   arm; arms are a single sample, best-of-n (``--bon_sizes``, default 4, 8, 16) with the selector, VGF variants
   with the *same* selector (it also gives the ``verified`` variants' gradient; the ``steer_prefix`` variants move
   along a prefix value the sampler fits on the train rollouts' true rewards, ``VGFSampler.fit``), and for each VGF
   variant best-of-n at the same wall-clock per prompt (sampling is re-timed in this run, ``--retime_prompts``, so
   both sides are timed under the same load). Each arm also gets its paired per-seed difference to best-of-N.
Every VGF variant selects among the originals and the transported particles (``SamplerConfig.union_margin``).
Prints a table and writes JSON + Markdown (``--render`` merges result files of runs over the same cache, including
runs of variants retired since and runs of this script under its old name ``test_time.py``: it only reads their
JSON).

    python benchmarks/guided_sampling.py --threads 1    # both decoders at the sampler's budgets, both tasks
    # one task at a time, as the recorded runs (docs/benchmarks.md):
    python benchmarks/guided_sampling.py --tasks sentiment --threads 2 --num_train_prompts 128 \
        --num_test_prompts 24 --ridge_layers 4,8,12,16,20,24,30 \
        --variants verified5-top1-c4-b3+union,prefix-L15-b1x0.2+union,prefix-L15-b1x0.2+union-random

Only the two particle spaces the library keeps have variants here; the others (reference-gain, soft-token and
steering-vector decoding, a LoRA value model as selector) were retired with their record (git tags
``retired-2026-12``, ``variants-2026-11``).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vgf_llm.models import load_model, load_tokenizer  # noqa: E402
from vgf_llm.prefix_value import PrefixValue  # noqa: E402
from vgf_llm.rewards import get_reward_func, reward_rollouts, reward_texts  # noqa: E402
from vgf_llm.rollout.hf import HFGenerateBackend, Rollouts  # noqa: E402
from vgf_llm.sampler import SamplerConfig, VGFSampler  # noqa: E402
from vgf_llm.tasks import task_dataset, task_reward_names  # noqa: E402
from vgf_llm.value import ValueModel  # noqa: E402
from vgf_llm.value_fit import fit_value_model  # noqa: E402


@dataclass
class Variant:
    """One VGF arm: the transport budget (``steps`` Adam steps of size ``step_size``), the particle space / decoder
    and how the result is selected."""

    name: str
    steps: int = 8
    step_size: float = 0.05
    decoder: str = "verified"  # verified | steer_prefix (vgf_llm.spaces)
    max_edits: int = 1  # decoder="verified": rounds of checked edits
    verify_candidates: int = 8  # decoder="verified": exact value checks per response and round
    verify_top: int | None = None  # decoder="verified": only the best originals of each prompt are edited
    union_margin: float = 0.0  # a moved particle must beat the best original by this much
    steer_layer: int | None = None  # decoder="steer_prefix": the moved layer
    # control, "random_direction": verified decodes start + a random vector of each row's displacement norm;
    # steer_prefix moves along a random head of the prefix value's norm (does the value's direction matter?)
    control: str = ""
    likelihood_weight: float = 0.0  # decoder="steer_prefix": climb and select by score + w x reference log-lik/token

    def sampler_config(self, args) -> SamplerConfig:
        return SamplerConfig(
            num_generations=args.num_particles, max_completion_length=args.max_new_tokens,
            temperature=args.temperature, generation_batch_size=args.batch_size * args.num_particles,
            transport_steps=self.steps, transport_step_size=self.step_size, transport_alpha=1.0,
            decoder=self.decoder, decoder_topk=8, max_edits=self.max_edits, verify_top=self.verify_top,
            verify_candidates=self.verify_candidates, union_margin=self.union_margin, steer_layer=self.steer_layer,
            likelihood_weight=self.likelihood_weight)


def B(steps, eps):  # noqa: N802 - a budget literal
    return dict(steps=steps, step_size=eps)


# verified edits: the transport proposes reference top-k swaps, exact value passes accept them
VARIANTS = {
    v.name: v for v in [
        Variant("verified3+union", max_edits=3, **B(8, 0.05)),
        Variant("verified3-b2+union", max_edits=3, **B(2, 0.05)),
        Variant("verified3-top3+union", max_edits=3, verify_top=3, **B(2, 0.05)),
        Variant("verified5-top2+union", max_edits=5, verify_top=2, **B(2, 0.05)),
        Variant("verified3-top2-c4-b1+union", max_edits=3, verify_top=2, verify_candidates=4, **B(1, 0.05)),
        Variant("verified5-top1-c4-b1+union", max_edits=5, verify_top=1, verify_candidates=4, **B(1, 0.05)),
        # the same at other transport budgets (steps x Adam step size); b3 is the sampler's measured budget
        Variant("verified5-top1-c4-b3+union", max_edits=5, verify_top=1, verify_candidates=4, **B(3, 0.05)),
        Variant("verified5-top1-c4-b1x0.2+union", max_edits=5, verify_top=1, verify_candidates=4, **B(1, 0.2)),
        Variant("verified5-top1-c4-b1+union-m0.05", max_edits=5, verify_top=1, verify_candidates=4,
                union_margin=0.05, **B(1, 0.05)),
        Variant("verified5-top1-c4-b1+union-random", max_edits=5, verify_top=1, verify_candidates=4,
                control="random_direction", **B(1, 0.05)),
        Variant("verified3-top2-c4-b1+union-m0.05", max_edits=3, verify_top=2, verify_candidates=4,
                union_margin=0.05, **B(1, 0.05)),
        Variant("verified3-b2+union-m0.05", max_edits=3, union_margin=0.05, **B(2, 0.05)),
    ]
}
# per-step steering: every generated token's hidden state at layer L moved along a prefix value (ridge on that
# layer's states of every train prefix, true rewards); S Adam steps of E standard deviations per unit, per token.
# Named prefix-L<L>-b<S>x<E>+union, with -random for the control (a random head of the same norm), and +lik<W> for
# the likelihood brake (SamplerConfig.likelihood_weight W; b0 with it: best-of-N selected by the tilted score).
PREFIX_VARIANT = re.compile(r"prefix-L(\d+)-b(\d+)x([\d.]+)\+union(-random)?(?:\+lik([\d.]+))?")


def variant(name: str) -> Variant | None:
    """The arm called ``name``: one of ``VARIANTS`` or a per-step steering arm (``PREFIX_VARIANT``)."""
    if name in VARIANTS:
        return VARIANTS[name]
    m = PREFIX_VARIANT.fullmatch(name)
    if m is None:
        return None
    return Variant(name, decoder="steer_prefix", steer_layer=int(m[1]), control="random_direction" if m[4] else "",
                   likelihood_weight=float(m[5] or 0), **B(int(m[2]), float(m[3])))


# the sampler's two decoders at their measured budgets (SamplerConfig: steer_prefix 1 x 0.2 at half of SmolLM2's
# 30 layers, verified 3 x 0.05)
DEFAULT_VARIANTS = ["prefix-L15-b1x0.2+union", "verified5-top1-c4-b3+union"]


def random_direction(space, seed: int):
    """Control for ``verified``: its ``decode(rollouts, moved)`` sees each moved row as start + a random vector with
    the displacement's norm (rows that may not move keep a zero displacement)."""
    gen = torch.Generator().manual_seed(seed + 12345)
    decode = type(space).decode  # the space's own, never an earlier seed's wrapper

    def wrapped(rollouts, moved):
        start, mask = space.lift(rollouts)
        delta = (moved - start).cpu()
        noise = torch.randn(delta.shape, generator=gen, dtype=delta.dtype)
        noise = torch.nn.functional.normalize(noise, dim=-1) * delta.norm(dim=-1, keepdim=True)
        noise = noise * mask.cpu().to(noise.dtype)[..., None]
        return decode(space, rollouts, start + noise.to(start.device))

    return wrapped


def random_head(pv: PrefixValue, seed: int) -> PrefixValue:
    """Control for ``steer_prefix``: the prefix value with its head replaced by a random one of the same norm in
    the standardised units the states move in (does the fitted direction matter, or only moving the states?)."""
    w_z = torch.randn(pv.weight.shape, generator=torch.Generator().manual_seed(seed + 12345))
    w_z = w_z * (pv.weight * pv.std).norm() / w_z.norm()
    return replace(pv, weight=w_z / pv.std)


def use_control(sampler: VGFSampler, v: Variant, fitted: PrefixValue | None, seed: int) -> None:
    """Apply ``v``'s control for this seed (a fresh random draw each seed; nothing for a plain arm)."""
    if v.control != "random_direction":
        return
    if v.decoder == "steer_prefix":
        sampler.space.value = random_head(fitted, seed)
    else:
        sampler.space.decode = random_direction(sampler.space, seed)


def cached_rollouts(path: Path, make) -> tuple[Rollouts, torch.Tensor]:
    """Rollouts + true rewards, drawn once and kept on disk (train samples for the value models, test samples per
    seed), so value models and variants run in separate processes reuse exactly the same samples."""
    if path.exists():
        d = torch.load(path, weights_only=True)
        return Rollouts(**d["rollouts"]), d["rewards"]
    t0 = time.time()
    ro, rewards = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(rollouts=asdict(ro), rewards=rewards), path)
    print(f"rollouts {path.name}: {ro.shape} in {time.time() - t0:.0f}s, reward mean {float(rewards.nanmean()):.3f}",
          flush=True)
    return ro, rewards


def train_rollouts(task, args, model, tok, reward, train, cache: Path):
    tag = f"{task}-train-n{args.num_train_prompts}x{args.train_generations}-t{args.max_new_tokens}"

    def make():
        backend = HFGenerateBackend(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    batch_size=8)
        ro = backend.generate([r["prompt"] for r in train], args.train_generations, 0)
        return ro, reward_rollouts(reward, None, train, ro)

    return cached_rollouts(cache / "rollouts" / f"{tag}.pt", make)


def test_rollouts(task, args, model, tok, reward, test, seed: int, cache: Path):
    """2N reference samples per held-out prompt (the first N are the particles)."""
    n2 = 2 * args.num_particles
    tag = (f"{task}-test-n{args.num_test_prompts}x{n2}-t{args.max_new_tokens}-T{args.temperature}"
           f"-b{args.batch_size}-s{seed}")

    def make():
        backend = HFGenerateBackend(model, tok, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, return_logprobs=True)
        t0 = time.time()
        ro = backend.generate([r["prompt"] for r in test], n2, seed)
        rewards = reward_rollouts(reward, None, test, ro)
        meta = cache / "rollouts" / f"{tag}.seconds"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(str(time.time() - t0))
        return ro, rewards

    ro, rewards = cached_rollouts(cache / "rollouts" / f"{tag}.pt", make)
    seconds_file = cache / "rollouts" / f"{tag}.seconds"
    seconds = float(seconds_file.read_text()) if seconds_file.exists() else float("nan")
    return ro, rewards, seconds


def score_groups(scorer, ro: Rollouts) -> torch.Tensor:
    """The scorer's value of every sample [G, N], one prompt's samples at a time (bounded memory)."""
    return torch.stack([scorer.score_ids(*ro[g:g + 1].flat()) for g in range(ro.completion_ids.shape[0])])


def first_samples(ro: Rollouts, k: int) -> Rollouts:
    """The first k samples of every prompt (arms with fewer particles share one larger draw)."""
    return Rollouts(ro.prompt_ids, ro.prompt_mask, ro.completion_ids[:, :k], ro.completion_mask[:, :k],
                    [t[:k] for t in ro.texts])


def time_generation(args, model, tok, test) -> float:
    """Seconds per reference sample of one prompt, measured in this process (so best-of-n and VGF arms are timed
    under the same machine load): N samples for the first few held-out prompts."""
    prompts = [r["prompt"] for r in test[: args.retime_prompts]]
    backend = HFGenerateBackend(model, tok, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature)
    t0 = time.time()
    backend.generate(prompts, args.num_particles, 999)
    return (time.time() - t0) / len(prompts) / args.num_particles


def prepare_task(task: str, args, cache: Path) -> None:
    """Only draw (and cache) the train and test rollouts of a task."""
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    reward = [get_reward_func(name) for name in task_reward_names(task)]
    train = list(task_dataset(task, args.num_train_prompts, 0, "train"))
    test = list(task_dataset(task, args.num_test_prompts, 0, "test"))
    train_rollouts(task, args, model, tok, reward, train, cache)
    for seed in args.seeds:
        test_rollouts(task, args, model, tok, reward, test, seed, cache)


def ridge_selector(task, args, model, tok, reward, train, train_ro, train_rewards, cache: Path):
    """The selector: a ridge value model fitted on the train rollouts' true rewards, cached by configuration (so
    runs and benchmarks over the same cache share it)."""
    path = cache / (f"{task}-ridge-Lcv{args.ridge_layers.replace(',', '-')}-n{args.num_train_prompts}x"
                    f"{args.train_generations}")
    if (path / "value_model.json").exists():
        selector = ValueModel.load(model, path)
        stats = json.loads((path / "stats.json").read_text())
        print(f"value model: loaded from cache ({stats.get('val_corr', float('nan')):.3f} corr)")
    else:
        t0 = time.time()
        selector, stats, _, _ = fit_value_model(
            model, tok, reward, train, num_generations=args.train_generations, rollouts=train_ro,
            rewards=train_rewards, seed=0, progress=False, ridge_layers=[int(x) for x in args.ridge_layers.split(",")])
        stats["fit_seconds"] = time.time() - t0
        selector.save(path)
        (path / "stats.json").write_text(json.dumps(stats, indent=2))
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items() if k != "cv"}
        print(f"value model: {json.dumps(shown)}", flush=True)
    return selector, stats


def run_task(task: str, args, variants: list[Variant], cache: Path, out: Path) -> dict:
    print(f"\n=== {task} ===", flush=True)
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    reward = [get_reward_func(name) for name in task_reward_names(task)]
    train = list(task_dataset(task, args.num_train_prompts, 0, "train"))
    test = list(task_dataset(task, args.num_test_prompts, 0, "test"))

    train_ro, train_rewards = train_rollouts(task, args, model, tok, reward, train, cache)
    selector, stats = ridge_selector(task, args, model, tok, reward, train, train_ro, train_rewards, cache)
    value_stats = {"ridge": stats}
    samplers, fitted = {}, {}  # one sampler per variant, fitted once on the train rollouts' true rewards
    for v in variants:
        samplers[v.name] = sampler = VGFSampler(model, tok, selector, v.sampler_config(args), progress=False)
        t0 = time.time()
        fit = sampler.fit(train_ro, train_rewards)
        if v.decoder == "steer_prefix":
            fitted[v.name] = sampler.space.value
            value_stats[f"prefix value, layer {v.steer_layer}"] = dict(
                method="prefix ridge", val_corr=fit.get("cv_corr", float("nan")), ridge=fit.get("ridge"),
                layer=v.steer_layer, fit_seconds=time.time() - t0)
            print(f"prefix value at layer {v.steer_layer}: {fit} (out-of-fold corr per prefix), "
                  f"{time.time() - t0:.0f}s", flush=True)

    arms: dict[str, list[dict]] = {}
    prompts = [r["prompt"] for r in test]
    n, n2 = args.num_particles, 2 * args.num_particles
    bon_sizes = sorted({int(x) for x in args.bon_sizes.split(",")} | {n})
    if max(bon_sizes) > n2:
        raise SystemExit(f"--bon_sizes go up to {max(bon_sizes)}, but only 2N = {n2} samples per prompt are drawn")
    sample_seconds = time_generation(args, model, tok, test) if args.retime_prompts else None
    seconds_per_sample = []  # per seed: generating and scoring one sample of one prompt
    for seed in args.seeds:
        ro2, true2, gen_seconds = test_rollouts(task, args, model, tok, reward, test, seed, cache)
        if sample_seconds is not None:
            gen_time = sample_seconds * n  # seconds per prompt for N samples, timed in this run
        else:
            gen_time = gen_seconds / len(prompts) / 2  # as timed when the cached samples were drawn

        t0 = time.time()
        sel2 = score_groups(selector, ro2)
        score_time = (time.time() - t0) / len(prompts) / 2
        ro = first_samples(ro2, n)
        true = true2[:, :n]
        rows = torch.arange(len(prompts))
        bon_time = gen_time + score_time
        per_sample = bon_time / n  # one more sample for best-of-n: generate it and score it
        seconds_per_sample.append(per_sample)

        def best_of(k: int, true2=true2, sel2=sel2, rows=rows, per_sample=per_sample) -> dict:
            """Best of the first k samples of each prompt, with the selector."""
            pick = true2[rows, sel2[:, :k].argmax(1)]
            return dict(reward=float(pick.nanmean()), seconds=k * per_sample, per_prompt=pick.tolist(), n=k)

        arms.setdefault("single sample", []).append(dict(reward=float(true[:, 0].nanmean()), seconds=gen_time / n,
                                                         per_prompt=true[:, 0].tolist()))
        arms.setdefault(f"pass@{n} (oracle)", []).append(dict(
            reward=float(true.max(1).values.nanmean()), seconds=gen_time, per_prompt=true.max(1).values.tolist()))
        for k in bon_sizes:
            arms.setdefault(f"best-of-{k}", []).append(best_of(k))
        for v in variants:
            sampler = samplers[v.name]
            use_control(sampler, v, fitted.get(v.name), seed)
            t1 = time.time()
            results = []
            for s in range(0, len(prompts), args.batch_size):
                results += sampler.transport_rollouts(prompts[s:s + args.batch_size], ro[s:s + args.batch_size])
            vgf_time = (time.time() - t1) / len(prompts) + gen_time  # transport, decode, re-score and select
            chosen = reward_texts(reward, None, test, [r.response for r in results])
            moved = reward_texts(reward, None, [row for row in test for _ in range(args.num_particles)],
                                 [p.text_after for r in results for p in r.particles])
            changed = [p.tokens_changed for r in results for p in r.particles]
            arms.setdefault(v.name, []).append(dict(
                reward=float(chosen.nanmean()), seconds=vgf_time, per_prompt=chosen.tolist(),
                moved_particle_reward=float(moved.nanmean()), original_particle_reward=float(true.nanmean()),
                tokens_changed=statistics.mean(changed),
                frac_particles_changed=sum(c > 0 for c in changed) / len(changed),
                frac_chosen_moved=sum(r.chosen_moved for r in results) / len(results),
                displacement=statistics.mean(p.displacement for r in results for p in r.particles)))
            # best-of-n given the same seconds per prompt as this VGF arm (n capped by the samples drawn)
            k = int(vgf_time // per_sample)
            arms.setdefault(f"best-of-n at {v.name}'s wall-clock", []).append(
                dict(best_of(max(1, min(k, n2))), capped=k > n2))
            for m in [float(x) for x in args.extra_margins.split(",") if x]:  # the same particles, other margins
                picks = []
                for r in results:
                    best_b = max(range(len(r.particles)), key=lambda i, r=r: r.particles[i].score_before)
                    best_a = max(range(len(r.particles)), key=lambda i, r=r: r.particles[i].score_after)
                    take = r.particles[best_a].score_after > r.particles[best_b].score_before + m
                    picks.append(r.particles[best_a].text_after if take else r.particles[best_b].text_before)
                got = reward_texts(reward, None, test, picks)
                arms.setdefault(f"{v.name} (union margin {m:g})", []).append(dict(
                    reward=float(got.nanmean()), seconds=vgf_time, per_prompt=got.tolist()))
            print(f"seed {seed} {v.name:32s} reward {arms[v.name][-1]['reward']:.3f} "
                  f"(best-of-{n} {arms[f'best-of-{n}'][-1]['reward']:.3f}) tokens changed "
                  f"{arms[v.name][-1]['tokens_changed']:.2f} {vgf_time:.1f}s/prompt", flush=True)
        result = dict(task=task, selector="ridge", baseline=f"best-of-{n}",
                      seconds_per_sample=seconds_per_sample, generation_timed_in_run=sample_seconds is not None,
                      value_models={k: {a: b for a, b in v.items() if a != "cv"} for k, v in value_stats.items()},
                      arms=arms, variants={v.name: asdict(v) for v in variants},
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
        baseline = result.get("baseline", "best-of-N")
        base = result["arms"].get(baseline)
        if "n" in runs[0] and name.startswith("best-of-n at"):  # equal wall-clock: which n each seed got
            row["arm"] = f"{name} (n = {', '.join(str(r['n']) for r in runs)}" + (
                ", capped" if any(r.get("capped") for r in runs) else "") + ")"
        if base and name != baseline and len(base) == len(runs):
            diffs = [r["reward"] - b["reward"] for r, b in zip(runs, base, strict=True)]
            row["diff_per_seed"] = diffs
            row["diff_mean"] = statistics.mean(diffs)
            row["diff_std"] = statistics.pstdev(diffs) if len(diffs) > 1 else 0.0
        rows.append(row)
    return rows


def merge_results(results: list[dict]) -> list[dict]:
    """One result per task: arms of several runs on the same cached samples (same seeds) are put together; an arm
    present in several runs keeps its first copy (baselines are identical across runs on the same cache)."""
    merged: dict[str, dict] = {}
    for res in results:
        task = res["task"]
        if task not in merged:
            merged[task] = json.loads(json.dumps(res))
            continue
        m = merged[task]
        for name, runs in res["arms"].items():
            m["arms"].setdefault(name, runs)
        m.setdefault("variants", {}).update(res.get("variants", {}))
        m["value_models"].update(res.get("value_models", {}))
    return list(merged.values())


def markdown(results: list[dict], args, seeds=None) -> str:
    lines = [f"Command: `python benchmarks/guided_sampling.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"Model {args.model}, {args.num_test_prompts} held-out prompts x {args.num_particles} particles, seeds "
             f"{seeds or args.seeds}, "
             f"temperature {args.temperature}, max {args.max_new_tokens} new tokens; value models fitted on "
             f"{args.num_train_prompts} train prompts x {args.train_generations} samples (ridge: frozen backbone "
             "cut at the cross-validated layer + closed-form linear head on pooled response states). Selector for "
             "every arm and gradient of the verified arms: that value model; the steer_prefix arms move along a "
             "prefix value fitted on the same samples. "
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}.", ""]
    for res in results:
        vs = res["value_models"]
        lines += [f"### {res['task']}", "", "Value models (held-out correlation with the true reward, split by "
                  "prompt): " + ", ".join(
            f"{k} {v.get('val_corr', float('nan')):.3f}"
            + (f" (layer {v['layer']}, {v['pooling']} pooling, ridge {v['ridge']}, {v['num_samples']} samples)"
               if v.get("method") == "ridge" else "") for k, v in vs.items()), "",
            f"| arm | true reward (mean ± std over seeds) | per seed | minus {res.get('baseline', 'best-of-N')}: "
            "per seed | mean ± std "
            "| tokens changed / particle | particles changed "
            "| reward of moved particles (vs originals) | chosen is moved | s / prompt |",
            "|---|---|---|---|---|---|---|---|---|---|"]
        for r in summarise(res):
            moved = (f"{r['moved_particle_reward']:.3f} ({r['original_particle_reward']:.3f})"
                     if "moved_particle_reward" in r else "")
            lines.append(
                f"| {r['arm']} | {r['mean']:.3f} ± {r['std']:.3f} | {', '.join(f'{x:.3f}' for x in r['per_seed'])} | "
                f"{', '.join(f'{x:+.3f}' for x in r.get('diff_per_seed', []))} | "
                + (f"{r['diff_mean']:+.3f} ± {r['diff_std']:.3f}" if "diff_mean" in r else "") + " | "
                f"{r.get('tokens_changed', 0):.2f} | {r.get('frac_particles_changed', 0):.2f} | {moved} | "
                f"{r.get('frac_chosen_moved', 0):.2f} | {r['seconds']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default="chain_sum,sentiment")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list or 'all': {list(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num_train_prompts", type=int, default=64)
    p.add_argument("--train_generations", type=int, default=8)
    p.add_argument("--num_test_prompts", type=int, default=16)
    p.add_argument("--num_particles", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--bon_sizes", default="4,8,16", help="best-of-n arms (n <= 2N; N is always one of them)")
    p.add_argument("--retime_prompts", type=int, default=8,
                   help="time reference sampling in this run on this many prompts (0: use the seconds recorded when "
                        "the cached samples were drawn, which may be from another machine load)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guided_sampling"))
    p.add_argument("--ridge_layers", default="4,8,12",
                   help="layer cuts the ridge value model's cross-validation chooses from (deeper: slower features)")
    p.add_argument("--extra_margins", default="0.05",
                   help="comma list: also report every union variant's selection with these union margins")
    p.add_argument("--prepare_only", action="store_true", help="only draw and cache train/test rollouts")
    p.add_argument("--cache", default="", help="cache folder (rollouts, value models); default OUT/cache")
    p.add_argument("--render", default="", help="comma list of results/partial JSON files: print their tables, "
                                                "no compute (e.g. for a run stopped after some seeds)")
    args = p.parse_args(argv)
    if args.render:
        results = [json.loads(Path(f).read_text()) for f in args.render.split(",")]
        results = merge_results([r for res in results for r in (res["results"] if "results" in res else [res])])
        print(markdown(results, args, seeds=sorted({s for r in results for s in r.get("seeds_done", [])})))
        return
    args.seeds = [int(s) for s in args.seeds.split(",")]
    names = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    unknown = [n for n in names if variant(n) is None]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)} and {PREFIX_VARIANT.pattern}")
    variants = [variant(n) for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    if args.prepare_only:
        for t in args.tasks.split(","):
            prepare_task(t, args, cache)
        return
    results = [run_task(t, args, variants, cache, out) for t in args.tasks.split(",")]
    md = markdown(results, args) + f"\nTotal wall-clock: {(time.time() - t0) / 60:.1f} min.\n"
    print("\n" + md)
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), results=results,
                                                      summary={r["task"]: summarise(r) for r in results}), indent=2))
    (out / "results.md").write_text(md)


if __name__ == "__main__":
    main()
