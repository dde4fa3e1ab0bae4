"""The proxy reward model of the offline gold/proxy task (Gao et al. 2022's synthetic RLHF protocol).

The base policy answers the ``helpful`` task's train prompts several times; the gold reward
(``vgf_llm.rewards.gold_helpful``) ranks each prompt's answers into preference pairs; TRL's ``RewardTrainer`` fits a
sequence-classification head on the base model to them. The result shares the policy's vocabulary, so it is both
the training reward of every arm and, for VGF, the gradient source (``scorer: reward_model``). Its pairwise accuracy
on pairs from the *test* prompts is measured and written into the folder's marker, and the gold reward stays for
evaluation only: the gap between the two is what over-optimisation looks like.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from vgf_llm.models import MARKER_FILE, alias_dir, hub_id, installed_version, load_model, load_tokenizer, prepare_model
from vgf_llm.rewards import RewardModelReward, as_completion, combine_rewards, get_reward_func
from vgf_llm.rollout.hf import HFGenerateBackend
from vgf_llm.tasks import task_dataset, task_reward_names

logger = logging.getLogger(__name__)


@dataclass
class ProxyRewardSpec:
    """How a proxy reward model is built. The defaults take about 10 minutes on 2 CPU cores for SmolLM2-135M."""

    base: str = "smollm2-135m-instruct"
    task: str = "helpful"
    train_prompts: int = 320
    test_prompts: int = 64
    samples: int = 4  # answers per prompt, all sampled from the base at temperature 1
    max_new_tokens: int = 48
    min_gap: float = 0.1  # a pair needs this much gold-reward difference (ties teach nothing)
    epochs: int = 1
    learning_rate: float = 5e-5
    batch_size: int = 16  # pairs per optimizer step
    seed: int = 0


PROXY_ALIASES: dict[str, ProxyRewardSpec] = {"smollm2-135m-helpful-rm": ProxyRewardSpec()}


def sample_answers(model, tokenizer, rows: list[dict], samples: int, max_new_tokens: int, seed: int,
                   batch_prompts: int = 16, progress: bool = True) -> list[list[str]]:
    """``samples`` temperature-1 answers of ``model`` per row (its ``prompt`` column)."""
    backend = HFGenerateBackend(model, tokenizer, max_new_tokens=max_new_tokens, temperature=1.0,
                                batch_size=batch_prompts * samples)
    texts: list[list[str]] = []
    for start in tqdm(range(0, len(rows), batch_prompts), desc="Sampling the base model's answers", unit="batch",
                      disable=not progress):
        chunk = rows[start:start + batch_prompts]
        with torch.no_grad():
            texts += backend.generate([r["prompt"] for r in chunk], samples, seed=seed + start).texts
    return texts


def preference_pairs(rows: list[dict], answers: list[list[str]], reward_funcs, min_gap: float) -> Dataset:
    """Every pair of one prompt's answers whose gold rewards differ by at least ``min_gap``, in TRL's explicit-prompt
    preference format (``prompt``, ``chosen``, ``rejected``; conversational when the prompts are), plus the two gold
    rewards."""
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}.")
    flat_rows = [r for r, group in zip(rows, answers, strict=True) for _ in group]
    prompts = [r["prompt"] for r in flat_rows]
    completions = [as_completion(p, t) for p, t in zip(prompts, [t for g in answers for t in g], strict=True)]
    columns = {k: [r[k] for r in flat_rows] for k in flat_rows[0] if k != "prompt"} if flat_rows else {}
    gold, _ = combine_rewards(reward_funcs, None, prompts, completions, **columns)
    out = {"prompt": [], "chosen": [], "rejected": [], "gold_chosen": [], "gold_rejected": []}
    i = 0
    for row, group in zip(rows, answers, strict=True):
        scored = [(gold[i + j], completions[i + j]) for j in range(len(group))]
        i += len(group)
        for a in range(len(scored)):
            for b in range(a + 1, len(scored)):
                (ga, ca), (gb, cb) = sorted([scored[a], scored[b]], key=lambda x: -x[0])
                if ga - gb >= min_gap and ca != cb:
                    out["prompt"].append(row["prompt"])
                    out["chosen"].append(ca)
                    out["rejected"].append(cb)
                    out["gold_chosen"].append(float(ga))
                    out["gold_rejected"].append(float(gb))
    return Dataset.from_dict(out)


def pairwise_accuracy(reward: RewardModelReward, pairs: Dataset) -> float:
    """Share of pairs the reward model ranks as the gold reward does (ties count as wrong)."""
    if len(pairs) == 0:
        raise ValueError("pairwise_accuracy needs at least one pair.")
    chosen = reward(list(pairs["prompt"]), list(pairs["chosen"]))
    rejected = reward(list(pairs["prompt"]), list(pairs["rejected"]))
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def train_proxy_reward_model(base_dir, train_pairs: Dataset, out_dir, spec: ProxyRewardSpec) -> float:
    """Fit a sequence-classification head (and the whole trunk) on ``train_pairs`` with TRL's ``RewardTrainer``;
    save model and tokenizer to ``out_dir``; return the mean training loss."""
    from trl import RewardConfig, RewardTrainer

    tokenizer = load_tokenizer(base_dir, padding_side="right")
    with tempfile.TemporaryDirectory() as scratch:
        args = RewardConfig(
            output_dir=scratch, num_train_epochs=spec.epochs, learning_rate=spec.learning_rate,
            per_device_train_batch_size=spec.batch_size, seed=spec.seed, data_seed=spec.seed, save_strategy="no",
            report_to=[], logging_steps=10, use_cpu=not torch.cuda.is_available(), max_length=512,
            dataloader_num_workers=0, disable_tqdm=False,
        )
        trainer = RewardTrainer(model=str(base_dir), args=args, train_dataset=train_pairs.select_columns(
            ["prompt", "chosen", "rejected"]), processing_class=tokenizer)
        loss = trainer.train().training_loss
        trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (Path(out_dir) / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody needs to load
    return loss


def build_proxy_reward_model(spec: ProxyRewardSpec, out_dir, progress: bool = True) -> dict:
    """The whole preparation into ``out_dir``: sample, label, train, measure. Returns the marker written there."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    base_dir = prepare_model(spec.base)
    torch.manual_seed(spec.seed)
    model = load_model(base_dir).eval()
    tokenizer = load_tokenizer(base_dir)
    funcs = [get_reward_func(n) for n in task_reward_names(spec.task)]
    split_pairs = {}
    for split, size, offset in (("train", spec.train_prompts, 0), ("test", spec.test_prompts, 1_000_000)):
        rows = [dict(r) for r in task_dataset(spec.task, size, seed=spec.seed, split=split)]
        answers = sample_answers(model, tokenizer, rows, spec.samples, spec.max_new_tokens, spec.seed + offset,
                                 progress=progress)
        split_pairs[split] = preference_pairs(rows, answers, funcs, spec.min_gap)
        if len(split_pairs[split]) == 0:
            raise RuntimeError(f"No {split} preference pairs: every prompt's answers scored within {spec.min_gap} "
                               "of each other; lower min_gap or sample more answers.")
    del model
    train_loss = train_proxy_reward_model(base_dir, split_pairs["train"], out_dir, spec)
    reward = RewardModelReward(out_dir)
    marker = {
        "kind": "proxy_reward_model",
        "base": spec.base,
        "hub_id": hub_id(spec.base),
        "gold_reward": task_reward_names(spec.task),
        "spec": asdict(spec),
        "train_pairs": len(split_pairs["train"]),
        "test_pairs": len(split_pairs["test"]),
        "train_pairwise_accuracy": pairwise_accuracy(reward, split_pairs["train"]),
        "test_pairwise_accuracy": pairwise_accuracy(reward, split_pairs["test"]),
        "train_loss": train_loss,
        "versions": {p: installed_version(p) for p in ("vgf-llm", "trl", "transformers", "torch")},
        "seconds": round(time.perf_counter() - start, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def prepare_proxy_reward_model(alias: str, progress: bool = True) -> Path:
    """Build the proxy reward model ``alias`` once into ``alias_dir(alias)`` (atomically: a folder appears only when
    finished) and log its held-out pairwise accuracy; later calls return the cached folder."""
    if alias not in PROXY_ALIASES:
        raise ValueError(f"Unknown proxy reward model {alias!r}; known: {', '.join(sorted(PROXY_ALIASES))}.")
    target = alias_dir(alias)
    if not (target / MARKER_FILE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
        try:
            marker = build_proxy_reward_model(PROXY_ALIASES[alias], tmp, progress=progress)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("Built %s in %.0f s: pairwise accuracy %.3f on %d held-out pairs (%.3f on %d train pairs).",
                       alias, marker["seconds"], marker["test_pairwise_accuracy"], marker["test_pairs"],
                       marker["train_pairwise_accuracy"], marker["train_pairs"])
    return target
