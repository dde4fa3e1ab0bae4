"""The most gold reward a target built from the base's own samples can buy per nat of KL, on the held-out prompts.

Every arm of the frontier distils targets drawn near the base, so no trained policy can sit above the best
distribution those targets can form at the same KL. Three such distributions over each prompt's ``--samples``
base samples, all on the same samples:

- best-of-N by the proxy (VGF budget 0's target);
- the exponential tilt of the base by the proxy, q ∝ mu exp(proxy / beta): the KL-optimal distribution for the proxy
  at every KL, i.e. what a perfect transport of the particles along the proxy's value (VGF's target exp(R / alpha)
  with a transport that reaches it) or a perfectly solved KL-regularised RL objective would give;
- the tilt by the gold reward itself (the oracle: the ceiling of any method that never sees the gold).

Each distribution lives on the prompt's n samples (the empirical base, uniform), so its KL from that empirical base
is exact, sum_i q_i log(n q_i), and so is its expected gold; best-of-k's probabilities on n ranked samples are
(j / n)^k - ((j - 1) / n)^k. The gold at a matched KL interpolates each curve linearly (for best-of-N between
consecutive k, which under-states it slightly: a mixture costs less KL than the line says); the margins carry a
bootstrap over prompts (paired: the same resampled prompts for both curves).

    python benchmarks/kl_ceiling.py --eval_prompts 128 --samples 32

Writes ``<out_dir>/kl_ceiling.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arms  # noqa: E402
import frontier  # noqa: E402

ROOT = Path(__file__).resolve().parent


def sample_and_score(s: arms.ArmSettings, eval_prompts: int, samples: int, threads: int, batch_prompts: int = 4):
    """([P, n] gold, [P, n] proxy) of ``samples`` temperature-1 base samples of each held-out prompt."""
    import torch

    from vgf_llm.rewards import reward_texts
    from vgf_llm.rollout.hf import HFGenerateBackend
    from vgf_llm.tasks import task_dataset

    arms.set_threads(threads)
    model, tok = arms.base_model(s)
    model.eval()
    rows = [dict(r) for r in task_dataset(s.task, eval_prompts, seed=0, split="test")]
    sets = frontier.eval_rewards(s)
    backend = HFGenerateBackend(model, tok, max_new_tokens=s.max_completion_length, temperature=1.0,
                                batch_size=batch_prompts * samples)
    gold, proxy = [], []
    for start in range(0, len(rows), batch_prompts):
        chunk = rows[start:start + batch_prompts]
        with torch.no_grad():
            ro = backend.generate([r["prompt"] for r in chunk], samples, seed=101 + start)
        flat_rows = [r for r in chunk for _ in range(samples)]
        texts = [t for g in ro.texts for t in g]
        gold.append(reward_texts(sets["gold"], None, flat_rows, texts).view(len(chunk), samples))
        proxy.append(reward_texts(sets["proxy"], None, flat_rows, texts).view(len(chunk), samples))
        print(f"[kl_ceiling] {start + len(chunk)}/{len(rows)} prompts", flush=True)
    return torch.cat(gold), torch.cat(proxy)


def kl_from_uniform(q):
    """[P] KL(q || uniform) of [P, n] distributions."""
    import torch

    n = q.shape[-1]
    return torch.where(q > 0, q * torch.log(q * n), torch.zeros_like(q)).sum(-1)


def best_of_k(select, k: int):
    """[P, n] the probability that best-of-k (with replacement, by ``select``) returns each sample."""
    import torch

    n = select.shape[-1]
    j = torch.arange(1, n + 1, dtype=torch.float64)
    by_rank = (j / n) ** k - ((j - 1) / n) ** k
    ranks = select.argsort(-1).argsort(-1)  # 0 = lowest
    return by_rank[ranks]


def tilt(select, beta: float):
    import torch

    return torch.softmax(select.double() / beta, -1)


def curves(gold, proxy, ks, betas) -> dict:
    """``{name: [(kl, gold, proxy), ...]}`` (means over prompts) of every distribution, sorted by KL."""
    out = {"best_of_n": [best_of_k(proxy, k) for k in ks], "tilt_proxy": [tilt(proxy, b) for b in betas],
           "tilt_gold": [tilt(gold, b) for b in betas]}
    return {name: sorted((float(kl_from_uniform(q).mean()), float((q * gold).sum(-1).mean()),
                          float((q * proxy).sum(-1).mean())) for q in qs)
            for name, qs in out.items()}


def at_kl(curve, kl: float, column: int = 1) -> float | None:
    """``column`` (1 = gold, 2 = proxy) of a curve at ``kl``, interpolated as the frontier's matched-KL table
    interpolates a trained arm's curve (None beyond its largest KL)."""
    return frontier.gold_at_kl([(point[0], point[column]) for point in curve], kl)


def bootstrap_margins(gold, proxy, ks, betas, levels, draws: int, seed: int = 0) -> dict:
    """Per KL level: the 5th and 95th percentiles of tilt_proxy - best_of_n gold over prompt resamples."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    p = gold.shape[0]
    margins = {kl: [] for kl in levels}
    for _ in range(draws):
        idx = torch.randint(p, (p,), generator=gen)
        c = curves(gold[idx], proxy[idx], ks, betas)
        for kl in levels:
            a, b = at_kl(c["tilt_proxy"], kl), at_kl(c["best_of_n"], kl)
            if a is not None and b is not None:
                margins[kl].append(a - b)
    out = {}
    for kl, m in margins.items():
        if m:
            m = sorted(m)
            out[kl] = (m[int(0.05 * (len(m) - 1))], m[int(0.95 * (len(m) - 1))])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval_prompts", type=int, default=128)
    p.add_argument("--samples", type=int, default=32, help="Base samples per prompt (the empirical base).")
    p.add_argument("--levels", default="0.1,0.2,0.3,0.5,1.0", help="KL levels (nats per sequence) of the table.")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--max_completion_length", type=int, default=24, help="As the frontier's run 3.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=arms.ArmSettings.model)
    p.add_argument("--reward_model", default=arms.PROXY_REWARD_MODEL)
    p.add_argument("--out_dir", default=str(ROOT / "results"))
    a = p.parse_args(argv)
    if a.samples < 2:
        p.error("--samples must be >= 2: a distribution over one sample has no KL to spend")
    levels = [float(x) for x in a.levels.split(",") if x.strip()]
    arms.offline()
    s = arms.ArmSettings(task="helpful", model=a.model, max_completion_length=a.max_completion_length,
                         reward_model=a.reward_model)
    start = time.time()
    gold, proxy = sample_and_score(s, a.eval_prompts, a.samples, a.threads)
    ks = list(range(1, a.samples + 1))
    betas = [math.exp(x / 8) for x in range(-40, 41)]  # e^-5 .. e^5: from nearly the argmax to nearly the base
    c = curves(gold, proxy, ks, betas)
    ci = bootstrap_margins(gold, proxy, ks, betas, levels, a.bootstrap)
    table = []
    for kl in levels:
        row = {"kl": kl} | {name: at_kl(curve, kl) for name, curve in c.items()}
        row |= {f"{name}_proxy": at_kl(curve, kl, 2) for name, curve in c.items()}
        if row["tilt_proxy"] is not None and row["best_of_n"] is not None:
            row["margin"] = row["tilt_proxy"] - row["best_of_n"]
            row["margin_90ci"] = ci.get(kl)
        table.append(row)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\n{gold.shape[0]} held-out prompts x {a.samples} base samples; base gold {float(gold.mean()):.3f}, "
          f"proxy {float(proxy.mean()):.3f}")
    print("| KL/sequence | best-of-N by proxy | proxy tilt (KL-optimal) | tilt - best-of-N (90% CI) | "
          "gold tilt (oracle) | proxy: best-of-N / tilt |")
    print("|---|---|---|---|---|---|")
    for r in table:
        margin = "-" if "margin" not in r else (f"{r['margin']:+.3f}" + ("" if not r.get("margin_90ci") else
                                                f" ({r['margin_90ci'][0]:+.3f}, {r['margin_90ci'][1]:+.3f})"))
        print(f"| {r['kl']:g} | {fmt(r['best_of_n'])} | {fmt(r['tilt_proxy'])} | {margin} | {fmt(r['tilt_gold'])} | "
              f"{fmt(r['best_of_n_proxy'])} / {fmt(r['tilt_proxy_proxy'])} |")
    analytic = {k: math.log(k) - (k - 1) / k for k in (2, 4, 8)}
    empirical = {k: c["best_of_n"][k - 1][0] for k in (2, 4, 8) if k <= a.samples}
    print("best-of-k KL, empirical (on the samples) vs analytic: "
          + ", ".join(f"k={k}: {empirical[k]:.3f} / {analytic[k]:.3f}" for k in empirical))
    result = {"eval_prompts": gold.shape[0], "samples": a.samples, "settings": s.as_dict(),
              "base_gold": float(gold.mean()), "base_proxy": float(proxy.mean()), "table": table, "curves": c,
              "best_of_k_kl": {"empirical": empirical, "analytic": analytic}, "seconds": time.time() - start}
    path = arms.write_json(Path(a.out_dir) / "kl_ceiling.json", result | arms.provenance("kl_ceiling.py", argv))
    print(f"[kl_ceiling] -> {path}")
    return result


if __name__ == "__main__":
    main()
