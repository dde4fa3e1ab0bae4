"""Why transported particles decode to the same tokens: row shift vs value-model score on one held-out prompt.

Needs a value model fitted by benchmarks/test_time.py (its cache) or `vgf-llm fit-value`:

    python benchmarks/transport_diagnosis.py --value_model \
        benchmarks/results/test_time_sentiment/cache/sentiment-plain-L12-n96x4-e3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vgf_llm.flow import transport  # noqa: E402
from vgf_llm.models import load_model, load_tokenizer  # noqa: E402
from vgf_llm.particles import NearestTokenDecoder, lift, movable_mask  # noqa: E402
from vgf_llm.rollout import HFGenerateBackend  # noqa: E402
from vgf_llm.sampler import VGFSampler, special_token_ids  # noqa: E402
from vgf_llm.scorers import ValueModel  # noqa: E402
from vgf_llm.tasks import task_dataset  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--value_model", required=True)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    vm = ValueModel.load(model, args.value_model)
    rows = task_dataset(args.task, 1, split="test").to_list()
    ro = HFGenerateBackend(model, tok, max_new_tokens=24).generate([r["prompt"] for r in rows], 8, 0)
    special = special_token_ids(tok)
    movable = movable_mask(ro.completion_ids, ro.completion_mask, special)
    start = lift(vm.embedding_weight, ro.completion_ids).float()
    grad_fn = VGFSampler(model, tok, vm, num_particles=8, progress=False)._grad_fn(
        ro.prompt_ids, ro.prompt_mask, ro.completion_mask)
    decoder = NearestTokenDecoder(vm.embedding_weight, exclude_ids=special)
    print("| rule | median row shift | value-model score, first -> last step | tokens changed (nearest) |")
    print("|---|---|---|---|")
    for rule, eps, repulsion in (("adam", 0.05, True), ("adam", 0.05, False), ("sgd", 50.0, True)):
        moved, trace = transport(start, grad_fn=grad_fn, steps=args.steps, step_size=eps, step_rule=rule,
                                 mask=movable, repulsion=repulsion)
        shift = (moved - start).norm(dim=-1)[movable.bool()].median()
        changed = (decoder.decode(moved, start, ro.completion_ids, movable) != ro.completion_ids).sum()
        values = trace.values.mean((1, 2))
        print(f"| {rule} {eps}{'' if repulsion else ', no repulsion'} | {shift:.2f} | "
              f"{values[0]:.2f} -> {values[-1]:.2f} | {int(changed)} of {int(movable.sum())} |")


if __name__ == "__main__":
    main()
