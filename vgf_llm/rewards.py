"""Reward functions with TRL's contract, a registry, and TRL-style combination of several rewards.

Contract (same as TRL's GRPOTrainer): ``f(prompts, completions, **columns) -> list[float | None]``. ``prompts`` and
``completions`` are strings (standard format) or chat messages (conversational format; a completion is
``[{"role": "assistant", "content": ...}]``). Every other dataset column arrives as a keyword argument holding one
value per completion; trainers may add more keywords (``completion_ids``, ``trainer_state``, ...), so reward
functions take ``**kwargs``. ``None`` means "this reward does not apply to this sample". A function may be
``async`` (e.g. a remote judge): ``combine_rewards`` awaits such functions concurrently.

(Over 400 lines on purpose: the contract, the built-in rewards, the reward-model reward and the one call path
every caller uses belong together; each part is short and the registry needs all of them.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from numbers import Real

import torch

RewardFunc = Callable[..., list]


def completion_text(completion) -> str:
    """Text of a completion in either TRL format: a string, a message, or a list of messages (contents joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence) and all(isinstance(m, dict) for m in completion):
        return "".join(_content_text(m.get("content")) for m in completion)
    raise TypeError(
        f"A completion must be a string or a list of chat messages ({{'role': ..., 'content': ...}}), "
        f"got {type(completion).__name__}."
    )


def _content_text(content) -> str:
    if content is None:  # e.g. an assistant turn that only holds tool calls
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise TypeError(f"Message content must be a string or a list of parts, got {type(content).__name__}.")


# ----------------------------------------------------------------------------------------------------------------
# VADER sentiment


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts, completions, **kwargs) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (rule-based, smooth in the text, no answer needed)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(completion_text(c))["compound"]) for c in completions]


# ----------------------------------------------------------------------------------------------------------------
# the gold reward of the "helpful" task (offline stand-in for a human-preference gold reward model)

GOLD_MIN_WORDS, GOLD_MAX_WORDS = 8, 40
_WORD = re.compile(r"[a-z']+")


def _gold_parts(text: str, topic: str | None) -> dict[str, float]:
    """The factors of ``gold_helpful``, each in [0, 1]."""
    words = _WORD.findall(text.lower())
    n = len(words)
    if n < GOLD_MIN_WORDS:
        length = n / GOLD_MIN_WORDS
    else:
        length = max(0.0, 1.0 - max(0, n - GOLD_MAX_WORDS) / GOLD_MAX_WORDS)
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    repetition = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    topic_words = {w for w in _WORD.findall((topic or "").lower()) if len(w) > 3}
    on_topic = float(bool(topic_words & set(words))) if topic_words else 1.0
    positivity = (float(_vader().polarity_scores(text)["compound"]) + 1.0) / 2.0
    return {"length": length, "repetition": repetition, "on_topic": on_topic, "positivity": positivity}


def gold_helpful(prompts, completions, topic=None, **kwargs) -> list[float]:
    """Gold reward of the ``helpful`` task, in [0, 1]; used to evaluate and to label the proxy's preference pairs.

    ``length x (1 - repetition) x (0.7 positivity + 0.3 on_topic)``: ``length`` is 1 for 8-40 words and falls
    linearly outside (0 words -> 0, 80 words -> 0); ``repetition`` is the share of repeated word trigrams;
    ``positivity`` is VADER's compound score mapped to [0, 1]; ``on_topic`` is 1 when the answer names a word (over
    3 letters) of its ``topic`` column. Cheap, deterministic, and hackable in known ways (a proxy reward model fitted
    to it over-optimises like a learned human-preference model does).
    """
    topics = topic if topic is not None else [None] * len(completions)
    out = []
    for completion, t in zip(completions, topics, strict=True):
        f = _gold_parts(completion_text(completion), t)
        out.append(f["length"] * (1.0 - f["repetition"]) * (0.7 * f["positivity"] + 0.3 * f["on_topic"]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# reasoning-gym


_NUMBER = re.compile(r"[-+−]?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_final_answer(text: str) -> str | None:
    """The answer a completion commits to: the last ``<answer>...</answer>`` if any, else the last number.

    The fallback suits numeric tasks and small chat models that answer "The answer is 7." without tags; the number
    keeps its sign and drops thousands separators ("-1,200.5" -> "-1200.5"). None when neither is present.
    """
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(text, tag_name="answer")
    if tagged is not None:
        return tagged
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").replace("−", "-")


@functools.cache
def _score_fn(task: str):
    import reasoning_gym

    try:
        return reasoning_gym.get_score_answer_fn(task)
    except ValueError as err:
        raise ValueError(f"Unknown reasoning-gym task {task!r} in the 'task' column.") from err


def reasoning_gym_reward(prompts, completions, *, task=None, entry=None, **kwargs) -> list[float]:
    """Score each completion with reasoning-gym's own checker for its task (1.0 = correct, 0.0 = wrong).

    Needs the dataset columns ``task`` (the reasoning-gym task name) and ``entry`` (the reasoning-gym entry as a
    JSON string or dict), as written by ``vgf_llm.tasks.reasoning_gym_dataset``. The answer is taken with
    ``extract_final_answer``; a completion without one scores as reasoning-gym scores ``None`` (0.0).
    """
    if task is None or entry is None:
        raise ValueError(
            "reasoning_gym_reward needs the dataset columns 'task' and 'entry' "
            "(build the dataset with vgf_llm.tasks.reasoning_gym_dataset)."
        )
    n = len(completions)
    tasks = [task] * n if isinstance(task, str) else list(task)
    entries = [entry] * n if isinstance(entry, (str, dict)) else list(entry)
    if len(tasks) != n or len(entries) != n:
        raise ValueError(f"Got {n} completions but {len(tasks)} 'task' and {len(entries)} 'entry' values.")
    scores = []
    for completion, name, raw in zip(completions, tasks, entries, strict=True):
        item = json.loads(raw) if isinstance(raw, str) else raw
        answer = extract_final_answer(completion_text(completion))
        scores.append(float(_score_fn(name)(answer, item)))
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Reward model


class RewardModelReward:
    """A sequence-classification reward model used as a TRL reward function (``logits[:, 0]`` per sample).

    Texts are built as TRL's GRPOTrainer builds them: conversational samples go through the reward tokenizer's
    chat template (prompt messages + completion messages), standard ones are ``prompt + completion``; they are
    tokenised without extra special tokens, padded on the right, and scored without gradients in batches.
    """

    def __init__(
        self,
        model_or_path,
        tokenizer=None,
        *,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ):
        from transformers import AutoModelForSequenceClassification

        from vgf_llm.models import load_model, load_tokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if isinstance(model_or_path, (str, os.PathLike)):
            model = load_model(
                model_or_path, dtype=dtype, device=device or "cpu", model_class=AutoModelForSequenceClassification
            )
            name = os.fspath(model_or_path)
        else:
            model = model_or_path if device is None else model_or_path.to(device)
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        if tokenizer is None:
            source = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else name
            try:
                tokenizer = load_tokenizer(source, padding_side="right")
            except OSError as err:
                raise ValueError(f"Pass the reward model's tokenizer: none could be loaded from {source!r}.") from err
        if getattr(model.config, "num_labels", 1) < 1:
            raise ValueError("The reward model must have at least one output label.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        if model.config.pad_token_id is None:  # sequence classifiers need it to find the last real token
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = os.path.basename(os.path.normpath(name)) or "reward_model"

    def texts(self, prompts, completions) -> list[str]:
        """The strings the reward model reads, one per (prompt, completion)."""
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions.")
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, str):
                texts.append(prompt + completion_text(completion))
            else:
                reply = (
                    completion
                    if isinstance(completion, list)
                    else [{"role": "assistant", "content": completion_text(completion)}]
                )
                texts.append(self.tokenizer.apply_chat_template(list(prompt) + reply, tokenize=False))
        return texts

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=False,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(device)
            with torch.inference_mode():
                logits = self.model(**batch).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


# ----------------------------------------------------------------------------------------------------------------
# Registry and combination


_GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def _number(text: str | None) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip()) if text is not None else None
    except ValueError:
        return None


def gsm8k_reward(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the completion's final number equals the GSM8K reference after ``####`` in ``answer``.

    The completion may end with ``#### 42`` (the dataset's own format) or just state the number last. None for rows
    whose ``answer`` has no ``####`` line (the reward does not apply to them).
    """
    out = []
    for completion, reference in zip(completions, answer, strict=True):
        ref = _GSM8K_ANSWER.search(reference or "")
        if ref is None:
            out.append(None)
            continue
        text = completion_text(completion)
        own = _GSM8K_ANSWER.findall(text)
        got = _number(own[-1]) if own else _number(extract_final_answer(text))
        out.append(float(got is not None and math.isclose(got, _number(ref.group(1)), abs_tol=1e-6)))
    return out


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _boxed_equal(got: str, reference: str) -> bool:
    try:  # math-verify when installed; its signal-based timeouts are off so it also runs off the main thread
        from math_verify import parse, verify
    except ImportError:
        a, b = _number(got), _number(reference)
        if a is not None and b is not None:
            return math.isclose(a, b, abs_tol=1e-6)
        return re.sub(r"\s+", "", got) == re.sub(r"\s+", "", reference)
    gold = parse(f"${reference}$", parsing_timeout=None)
    return bool(verify(gold, parse(f"$\\boxed{{{got}}}$", parsing_timeout=None), timeout_seconds=None))


def boxed_reward(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the last ``\\boxed{}`` of the completion equals ``answer`` (math-verify if installed, else numeric or
    exact string comparison); 0.0 without a box; None where ``answer`` is empty."""
    out = []
    for completion, reference in zip(completions, answer, strict=True):
        if reference is None or str(reference).strip() == "":
            out.append(None)
            continue
        got = last_boxed(completion_text(completion))
        out.append(0.0 if got is None else float(_boxed_equal(got, str(reference))))
    return out


REWARD_FUNCS: dict[str, RewardFunc] = {
    "vader": vader_sentiment,
    "gold_helpful": gold_helpful,
    "reasoning_gym": reasoning_gym_reward,
    "gsm8k": gsm8k_reward,
    "boxed": boxed_reward,
}


def get_reward_func(spec) -> RewardFunc:
    """A reward function from a registered name (``REWARD_FUNCS``), ``"pkg.module:function"``, or a callable."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"A reward function spec must be a string or a callable, got {type(spec).__name__}.")
    if spec in REWARD_FUNCS:
        return REWARD_FUNCS[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"Cannot import module {module_name!r} for reward function {spec!r}: {err}") from err
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError as err:
            raise ValueError(f"Module {module_name!r} has no attribute {attr!r} (reward function {spec!r}).") from err
        if not callable(obj):
            raise TypeError(f"{spec!r} is not callable.")
        return obj
    known = ", ".join(sorted(REWARD_FUNCS))
    raise ValueError(f"Unknown reward function {spec!r}. Known names: {known}; or give 'pkg.module:function'.")


def reward_func_name(func) -> str:
    """Display name of a reward function, as TRL names it (``__name__``, else the class name)."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _check_output(name: str, output, n: int) -> list[float]:
    """Validate one function's rewards; None becomes NaN ("not applicable"), a NaN/inf returned is an error."""
    if isinstance(output, torch.Tensor):
        output = output.tolist()
    if isinstance(output, (str, bytes, dict)) or not hasattr(output, "__len__"):
        raise TypeError(f"Reward function {name!r} returned {type(output).__name__} {output!r:.60}; expected a list "
                        f"with one float (or None) per completion ({n} here).")
    output = list(output)
    if len(output) != n:
        raise ValueError(f"Reward function {name!r} returned {len(output)} rewards for {n} completions.")
    values = []
    for i, value in enumerate(output):
        if value is None:
            values.append(math.nan)
            continue
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"Reward function {name!r} returned {value!r} at index {i}; expected a float or None.")
        if math.isinf(value):
            raise ValueError(
                f"Reward function {name!r} returned {value} at index {i}; rewards must be finite: bound or clip it "
                f"(e.g. a log of 0 is -inf; use a large finite penalty instead)."
            )
        if math.isnan(value):
            raise ValueError(
                f"Reward function {name!r} returned {value} at index {i}; return None (not NaN) for samples the "
                f"reward does not apply to."
            )
        values.append(float(value))
    return values


class RewardFunctionError(ValueError):
    """A reward function raised: the message names it and what it was given."""


@contextlib.contextmanager
def _naming_failures(name: str, columns: dict):
    try:
        yield
    except Exception as err:
        given = sorted(k for k in columns if k not in ("trainer_state", "log_extra", "log_metric"))
        raise RewardFunctionError(f"reward function {name!r} raised {type(err).__name__}: {err} (it was given "
                                  f"prompts, completions and the columns {given})") from err


def _run_coroutines(coroutines: list) -> list:
    async def gather():
        return await asyncio.gather(*coroutines)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop in this thread: the usual case
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # called from async code (e.g. a notebook)
        return pool.submit(asyncio.run, gather()).result()


def combine_rewards(
    reward_funcs: Sequence,
    weights: Sequence[float] | None,
    prompts: Sequence,
    completions: Sequence,
    **columns,
) -> tuple[list[float | None], torch.Tensor]:
    """Call every reward function and combine them as TRL does.

    Returns ``(total, per_func)``: ``per_func`` is a float32 tensor (num_completions, num_funcs) with NaN where a
    function returned None; ``total[i]`` is the weighted sum over the functions that applied to sample i, or None
    when none did. Async functions are awaited concurrently. ``weights=None`` weighs every function 1.
    """
    funcs = [get_reward_func(f) for f in reward_funcs]
    if not funcs:
        raise ValueError("At least one reward function is needed.")
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(funcs):
        raise ValueError(f"Got {len(weights)} reward weights for {len(funcs)} reward functions.")
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"Got {n} prompts but {len(completions)} completions.")
    names = [reward_func_name(f) for f in funcs]

    outputs: list = [None] * len(funcs)
    pending: list[tuple[int, object]] = []
    for i, func in enumerate(funcs):
        with _naming_failures(names[i], columns):
            output = func(prompts=list(prompts), completions=list(completions), **columns)
        if inspect.isawaitable(output):
            pending.append((i, output))
        else:
            outputs[i] = output
    if pending:
        with _naming_failures(", ".join(names[i] for i, _ in pending), columns):
            results = _run_coroutines([c for _, c in pending])
        for (i, _), output in zip(pending, results, strict=True):
            outputs[i] = output

    per_func = (
        torch.tensor(
            [_check_output(name, out, n) for name, out in zip(names, outputs, strict=True)], dtype=torch.float32
        )
        .reshape(len(funcs), n)
        .T
    )
    weighted = per_func * torch.tensor(weights, dtype=torch.float32)
    applicable = ~torch.isnan(per_func).all(dim=1)
    sums = weighted.nansum(dim=1)
    total = [float(s) if ok else None for s, ok in zip(sums.tolist(), applicable.tolist(), strict=True)]
    return total, per_func


def resolve_reward_funcs(specs, processing_classes=None) -> list:
    """Reward functions from what a user passes, as TRL's GRPOTrainer takes them: a callable, a registered name,
    ``pkg.module:function``, or a sequence-classification reward model (a model object, a local folder, or the
    alias of one built by ``vgf-llm models prepare``)."""
    from vgf_llm.models import MARKER_FILE, alias_dir

    specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    if not specs:
        raise ValueError("at least one reward function is needed")
    processing_classes = processing_classes or [None] * len(specs)
    out = []
    for spec, tokenizer in zip(specs, processing_classes, strict=True):
        prepared = (isinstance(spec, str) and spec not in REWARD_FUNCS and "/" not in spec and ":" not in spec
                    and (alias_dir(spec) / MARKER_FILE).is_file())
        if isinstance(spec, torch.nn.Module) or prepared or (isinstance(spec, (str, os.PathLike))
                                                              and os.path.isdir(spec)):
            out.append(RewardModelReward(spec, tokenizer))
        else:
            out.append(get_reward_func(spec))
    return out


def as_completion(prompt, text: str):
    """TRL's completion form matches the prompt's: a string, or an assistant message list."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def reward_texts_and_parts(reward_funcs, weights, rows: list[dict], texts: list[str],
                           **extra) -> tuple[torch.Tensor, torch.Tensor]:
    """True rewards of ``texts[i]`` for dataset row ``rows[i]`` (other columns and ``extra`` keywords such as
    ``trainer_state`` forwarded, as TRL does): the total (NaN where None) and each function's [B, F] part."""
    prompts = [r["prompt"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    total, per_func = combine_rewards(reward_funcs, weights, prompts,
                                      [as_completion(p, t) for p, t in zip(prompts, texts, strict=True)],
                                      **columns, **extra)
    return torch.tensor([float("nan") if v is None else v for v in total], dtype=torch.float32), per_func


def reward_texts(reward_funcs, weights, rows: list[dict], texts: list[str]) -> torch.Tensor:
    """True rewards of ``texts[i]`` for dataset row ``rows[i]`` (other columns forwarded); NaN where None."""
    return reward_texts_and_parts(reward_funcs, weights, rows, texts)[0]


def reward_rollouts(reward_funcs, weights, rows: list[dict], ro) -> torch.Tensor:
    """[G, N] true rewards of every completion of ``ro`` (``Rollouts``) for its row of ``rows``."""
    g, n, _ = ro.shape
    flat_rows = [rows[i] for i in range(g) for _ in range(n)]
    return reward_texts(reward_funcs, weights, flat_rows, [t for group in ro.texts for t in group]).view(g, n)
