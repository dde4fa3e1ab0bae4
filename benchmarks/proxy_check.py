"""How far a proxy reward model can be trusted on the base model's own samples, and what the base's likelihood adds.

Reads cached compute_curves.py draws (samples with their gold rewards), scores every sample with the proxy and the
base model's mean log-probability per token, and prints per seed: the within-prompt correlations (gold with proxy,
gold with likelihood, proxy with likelihood) and the gold of best-of-N selected by the proxy, by the likelihood and by
proxy + w x likelihood. The check issue 29 asked for before changing the transport.

    python benchmarks/proxy_check.py --scorer smollm2-135m-helpful-rm \
        --draws helpful-test-n16x32-t48-T1.0-b4-s0,helpful-test-n16x32-t48-T1.0-b4-s1,helpful-test-n16x32-t48-T1.0-b4-s2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from compute_curves import mean_logprobs  # noqa: E402
from guided_sampling import cached_rollouts, score_groups  # noqa: E402

from vgf_llm.models import load_model, load_tokenizer  # noqa: E402
from vgf_llm.value import RewardModelScorer  # noqa: E402


def within_prompt_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two [G, N] scores after removing each prompt's mean and scale (what selection sees)."""
    def z(x):
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-6)

    return float(torch.corrcoef(torch.stack([z(a).flatten(), z(b).flatten()]))[0, 1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--scorer", required=True, help="the proxy: a sequence-classification reward model")
    p.add_argument("--draws", required=True, help="comma list of cached draw names (cache/rollouts/NAME.pt)")
    p.add_argument("--weights", default="0.5,1,2,4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "results" / "compute_curves" / "cache"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "proxy_check.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification

    model, tok = load_model(args.model), load_tokenizer(args.model)
    rm = load_model(args.scorer, model_class=AutoModelForSequenceClassification)
    proxy_scorer = RewardModelScorer(rm, load_tokenizer(args.scorer, padding_side="right"), tok)
    weights = [float(w) for w in args.weights.split(",")]
    results = []
    for name in args.draws.split(","):
        ro, gold = cached_rollouts(Path(args.cache) / "rollouts" / f"{name}.pt", None)
        with torch.no_grad():
            proxy = score_groups(proxy_scorer, ro).float()
        loglik = mean_logprobs(model, ro)[0]
        rows, n_max = torch.arange(gold.shape[0]), gold.shape[1]
        ns = [n for n in (2, 4, 8, 16, 32, 64) if n <= n_max]

        def gold_of(score, n, rows=rows, gold=gold):
            return float(gold[rows, score[:, :n].argmax(1)].mean())

        selectors = {"proxy": proxy, "likelihood": loglik, **{f"proxy+{w:g}xlik": proxy + w * loglik for w in weights}}
        r = dict(draw=name, corr_gold_proxy=within_prompt_corr(gold, proxy),
                 corr_gold_likelihood=within_prompt_corr(gold, loglik),
                 corr_proxy_likelihood=within_prompt_corr(proxy, loglik),
                 best_of_n={k: {n: gold_of(s, n) for n in ns} for k, s in selectors.items()})
        results.append(r)
        print(f"{name}: within-prompt corr gold~proxy {r['corr_gold_proxy']:.3f}, gold~likelihood "
              f"{r['corr_gold_likelihood']:.3f}, proxy~likelihood {r['corr_proxy_likelihood']:.3f}")
        print("  gold of best-of-N by " + "; ".join(
            f"{k}: " + ", ".join(f"N={n} {v:.3f}" for n, v in by.items()) for k, by in r["best_of_n"].items()),
            flush=True)
    Path(args.out).write_text(json.dumps(dict(args=vars(args), results=results), indent=2))
    return dict(results=results)


if __name__ == "__main__":
    main()
