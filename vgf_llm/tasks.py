"""Offline task datasets in TRL's prompt-only format (standard or conversational).

Two families, both generated locally so nothing has to be downloaded:

- ``reasoning_gym_dataset``: procedurally generated problems from reasoning-gym, scored by reasoning-gym's own
  checker (``vgf_llm.rewards.reasoning_gym_reward`` reads the ``task`` and ``entry`` columns written here);
- ``sentiment_dataset``: open-ended "Write one sentence about <topic>." prompts for smooth, text-level rewards
  such as VADER sentiment;
- ``helpful_dataset``: short-answer instructions ("Give one tip for <topic>.", ...) for the gold/proxy reward-model
  task (``vgf_llm.rewards.gold_helpful`` is the gold reward; ``vgf_llm.proxy_reward`` trains the proxy);
- ``gsm8k_dataset``: GSM8K's own splits read from a local ``save_to_disk`` folder (the one dataset here that is not
  generated: it has to be saved once where there is network), scored by ``vgf_llm.rewards.gsm8k_reward``.

Train and test splits never share a question (reasoning-gym) or a topic (sentiment), so held-out numbers are
honest.
"""

from __future__ import annotations

import hashlib
import json
import random

from datasets import Dataset

SPLITS = ("train", "test")

# Short, literal instruction for small chat models: it asks for a short answer (fewer tokens per particle) ending
# in the number that ``vgf_llm.rewards.extract_final_answer`` falls back to (the last number in the text).
# Greedy SmolLM2-135M-Instruct accuracy on 120 distinct chain_sum train questions (2026-11): no instruction 0.41,
# "Answer with just the number." 0.38, "Reply with the result only." 0.33, "Give only the final number." 0.28.
DEFAULT_INSTRUCTION = "Answer with just the number."

# reasoning-gym's chain_sum defaults (2-6 terms, 1-4 digits) are far beyond a 135M model; start at the easiest level.
TASK_DEFAULTS: dict[str, dict] = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    # the harder benchmark task: the same size of numbers, but all four operators, negative numbers, parentheses
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
}

_TEST_SEED_OFFSET = 1_000_003  # reasoning-gym seeds item i with (seed + i): keep the two streams far apart
_MAX_DRAWS_PER_ROW = 200


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")


def in_test_split(key: str, test_fraction: float) -> bool:
    """Deterministic hash partition: ``key`` is a test item iff its SHA-256 lands in the first ``test_fraction``."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < test_fraction


def _format_prompt(text: str, system_prompt: str | None, conversational: bool):
    if conversational:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return messages + [{"role": "user", "content": text}]
    return f"{system_prompt}\n\n{text}" if system_prompt else text


def _with_instruction(question: str, instruction: str | None) -> str:
    return f"{question}\n{instruction}" if instruction else question


def reasoning_gym_dataset(
    task: str = "chain_sum",
    size: int = 256,
    seed: int = 0,
    split: str = "train",
    conversational: bool = True,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    test_fraction: float = 0.2,
    unique: bool | None = None,
    **task_kwargs,
) -> Dataset:
    """Prompt-only dataset of ``size`` reasoning-gym problems.

    Columns: ``prompt`` (messages, or a string when ``conversational=False``), ``task``, ``entry`` (the
    reasoning-gym entry as a JSON string, what its checker needs) and ``answer`` (the reference answer).

    The user message is the reasoning-gym question followed by ``instruction`` on a new line (None to omit; the
    default suits numeric tasks). ``system_prompt`` adds a system message (None keeps the chat template's default).
    ``task_kwargs`` go to the task's reasoning-gym config, on top of ``TASK_DEFAULTS`` (chain_sum: 2 terms, 1 digit).

    Train/test disjointness: a question belongs to the test split iff ``in_test_split(task + question,
    test_fraction)``; the train split only keeps the other questions, so no test question can ever appear in
    train, whatever the sizes or seeds. The two splits are also drawn from different seed streams.

    ``unique`` (default: True for test, False for train) keeps each question once and raises if the split has
    fewer than ``size`` distinct questions; without it, small question spaces repeat questions as sampling from
    the task would. The default chain_sum config has 200 questions: about 45 test and 155 train.
    """
    import reasoning_gym

    _check_split(split)
    _check_size(size)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    config = {**TASK_DEFAULTS.get(task, {}), **task_kwargs}
    base_seed = seed + (_TEST_SEED_OFFSET if split == "test" else 0)
    want_test = split == "test"
    if unique is None:
        unique = want_test

    rows: list[dict] = []
    seen: set[str] = set()
    draws = min(max(64, 4 * size), _MAX_DRAWS_PER_ROW * size)
    while True:
        try:
            source = reasoning_gym.create_dataset(task, seed=base_seed, size=draws, **config)
        except ValueError as err:
            if "not registered" in str(err):
                raise ValueError(f"Unknown reasoning-gym task {task!r}.") from err
            raise
        except TypeError as err:
            raise ValueError(f"Bad config for reasoning-gym task {task!r}: {err}") from err
        rows.clear()
        seen.clear()
        for entry in source:
            question = entry["question"]
            if in_test_split(f"{task}\n{question}", test_fraction) != want_test:
                continue
            if unique and question in seen:
                continue
            seen.add(question)
            rows.append(entry)
            if len(rows) == size:
                break
        if len(rows) == size or draws >= _MAX_DRAWS_PER_ROW * size:
            break
        draws = min(draws * 4, _MAX_DRAWS_PER_ROW * size)
    if len(rows) < size:
        raise ValueError(
            f"Only {len(rows)} {'distinct ' if unique else ''}{split} questions of {task!r} found in {draws} draws; "
            f"ask for fewer rows, use unique=False, change test_fraction, or widen the task config ({config})."
        )

    return Dataset.from_dict(
        {
            "prompt": [_format_prompt(_with_instruction(e["question"], instruction), system_prompt, conversational)
                       for e in rows],
            "task": [task] * size,
            "entry": [_entry_json(task, e) for e in rows],
            "answer": [str(e["answer"]) for e in rows],
        }
    )


def _entry_json(task: str, entry: dict) -> str:
    try:
        return json.dumps(entry, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"reasoning-gym task {task!r} produced an entry that is not JSON-serialisable: {err}") from err


# ~120 neutral, everyday topics (objects, places, activities): nothing in them leans positive or negative, so the
# sentiment of a completion comes from the model, not from the prompt.
SENTIMENT_TOPICS = [
    "a chair",
    "a table",
    "a window",
    "a door",
    "a lamp",
    "a pencil",
    "a notebook",
    "a backpack",
    "a bicycle",
    "a bus",
    "a train",
    "a car",
    "a bridge",
    "a road",
    "a river",
    "a lake",
    "a mountain",
    "a forest",
    "a field",
    "a garden",
    "a park",
    "a beach",
    "a city",
    "a village",
    "a street",
    "a market",
    "a library",
    "a museum",
    "a school",
    "a kitchen",
    "a bedroom",
    "a bathroom",
    "an office",
    "a hospital",
    "a post office",
    "a train station",
    "an airport",
    "a harbour",
    "a farm",
    "a bakery",
    "a shop",
    "a restaurant",
    "a cafe",
    "a hotel",
    "a stadium",
    "a cinema",
    "a theatre",
    "a church",
    "a castle",
    "a tower",
    "a clock",
    "a watch",
    "a phone",
    "a computer",
    "a keyboard",
    "a television",
    "a radio",
    "a camera",
    "a newspaper",
    "a magazine",
    "a letter",
    "an envelope",
    "a map",
    "a calendar",
    "a cup",
    "a plate",
    "a spoon",
    "a fork",
    "a knife",
    "a bottle",
    "a bowl",
    "a kettle",
    "a fridge",
    "an oven",
    "a washing machine",
    "a towel",
    "a blanket",
    "a pillow",
    "a mirror",
    "a carpet",
    "a staircase",
    "an elevator",
    "a fence",
    "a mailbox",
    "a bench",
    "a tree",
    "a flower",
    "a stone",
    "a cloud",
    "the rain",
    "the wind",
    "the snow",
    "the sun",
    "the moon",
    "a cat",
    "a dog",
    "a horse",
    "a cow",
    "a bird",
    "a fish",
    "an umbrella",
    "a hat",
    "a coat",
    "a pair of shoes",
    "a shirt",
    "a button",
    "a box",
    "a basket",
    "a ladder",
    "a hammer",
    "a rope",
    "a candle",
    "a bucket",
    "a coin",
    "a key",
    "a lock",
    "walking",
    "cooking",
    "cleaning",
    "reading",
    "writing",
    "shopping",
    "swimming",
    "gardening",
    "painting",
    "driving",
    "cycling",
    "sleeping",
    "waiting in line",
    "doing laundry",
    "taking the bus",
    "making tea",
]
SENTIMENT_TEMPLATE = "Write one sentence about {topic}."


def _seeded_passes(pool: list, size: int, rng: random.Random) -> list:
    """``size`` items: shuffled passes through ``pool``, so every item appears before any repeats."""
    chosen: list = []
    while len(chosen) < size:
        order = list(pool)
        rng.shuffle(order)
        chosen.extend(order[: size - len(chosen)])
    return chosen


def sentiment_topics(split: str, test_fraction: float = 0.2) -> list[str]:
    """The topics of one split; a topic is a test topic iff ``in_test_split(topic, test_fraction)``."""
    _check_split(split)
    return [t for t in SENTIMENT_TOPICS if in_test_split(t, test_fraction) == (split == "test")]


def sentiment_dataset(
    size: int = 256,
    seed: int = 0,
    split: str = "train",
    conversational: bool = True,
    system_prompt: str | None = None,
    test_fraction: float = 0.2,
) -> Dataset:
    """Prompt-only dataset of open-ended "Write one sentence about <topic>." prompts (columns ``prompt``, ``topic``).

    Topics of the train and test splits are disjoint (see ``sentiment_topics``). Rows walk through the split's
    topics in a seeded random order and start a new shuffled pass when they run out, so every topic appears
    before any repeats.
    """
    _check_split(split)
    _check_size(size)
    topics = sentiment_topics(split, test_fraction)
    if not topics:
        raise ValueError(f"test_fraction={test_fraction} leaves no {split} topics.")
    chosen = _seeded_passes(topics, size, random.Random(seed * 2 + (split == "test")))
    return Dataset.from_dict(
        {
            "prompt": [
                _format_prompt(SENTIMENT_TEMPLATE.format(topic=t), system_prompt, conversational) for t in chosen
            ],
            "topic": chosen,
        }
    )


# Instructions that call for a short, helpful answer (Gao et al. 2022's synthetic RLHF protocol, made offline): the
# gold reward (``vgf_llm.rewards.gold_helpful``) judges the answer, never the prompt. Topics split as for sentiment.
HELPFUL_TEMPLATES = [
    "Give one practical tip for {topic}.",
    "In one or two sentences, explain why {topic} can be worth it.",
    "Describe {topic} to a friend in one or two sentences.",
    "What is one good thing about {topic}? Answer briefly.",
    "Suggest a simple way to enjoy {topic}.",
    "Write a short, friendly note recommending {topic}.",
    "Share one interesting idea about {topic}.",
    "How could someone make {topic} more pleasant? Answer in a sentence or two.",
]


def helpful_prompts(split: str, test_fraction: float = 0.2) -> list[tuple[str, str]]:
    """Every distinct ``(instruction, topic)`` of one split: each template times the split's topics."""
    return [(t.format(topic=topic), topic) for topic in sentiment_topics(split, test_fraction)
            for t in HELPFUL_TEMPLATES]


def helpful_dataset(
    size: int = 256,
    seed: int = 0,
    split: str = "train",
    conversational: bool = True,
    system_prompt: str | None = None,
    test_fraction: float = 0.2,
) -> Dataset:
    """Prompt-only dataset of short-answer instructions (columns ``prompt``, ``topic``).

    Train and test topics are disjoint (``sentiment_topics``). Rows walk through the split's distinct instructions in
    a seeded random order before any repeats (the test split has 168 distinct ones).
    """
    _check_split(split)
    _check_size(size)
    pool = helpful_prompts(split, test_fraction)
    if not pool:
        raise ValueError(f"test_fraction={test_fraction} leaves no {split} topics.")
    chosen = _seeded_passes(pool, size, random.Random(seed * 2 + (split == "test") + 17))
    return Dataset.from_dict({
        "prompt": [_format_prompt(text, system_prompt, conversational) for text, _ in chosen],
        "topic": [topic for _, topic in chosen],
    })


GSM8K_DIR = "data/gsm8k"
GSM8K_INSTRUCTION = "Solve it step by step, then write the final answer as a number on the last line after ####."


def gsm8k_dataset(
    size: int = 256,
    seed: int = 0,
    split: str = "train",
    path: str = GSM8K_DIR,
    conversational: bool = True,
    system_prompt: str | None = None,
    instruction: str | None = GSM8K_INSTRUCTION,
) -> Dataset:
    """The first ``size`` rows of GSM8K's ``split`` as a prompt-only dataset: ``prompt`` (GSM8K's ``question`` and
    ``instruction``) and ``answer`` (the reference, ending in ``#### <number>``, what the ``gsm8k`` reward reads).

    ``path`` is a ``save_to_disk`` folder of ``openai/gsm8k`` (config ``main``); the Hub is not reachable here. GSM8K's
    own train/test splits are disjoint, and their order is kept (``seed`` is unused: the Trainer shuffles)."""
    import datasets

    _check_split(split)
    _check_size(size)
    try:
        data = datasets.load_from_disk(path)[split]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no GSM8K folder at {path}: where there is network run python -c \"import datasets; "
            f"datasets.load_dataset('openai/gsm8k', 'main').save_to_disk('{path}')\", copy the folder here, or "
            "point task_config's path at it") from None
    rows = data.select(range(min(size, len(data))))
    return Dataset.from_dict({
        "prompt": [_format_prompt(_with_instruction(q, instruction), system_prompt, conversational)
                   for q in rows["question"]],
        "answer": list(rows["answer"]),
    })


TEXT_TASKS = {"sentiment": (sentiment_dataset, ["vader"]), "helpful": (helpful_dataset, ["gold_helpful"]),
              "gsm8k": (gsm8k_dataset, ["gsm8k"])}


def task_reward_names(task: str) -> list[str]:
    """The registered true reward(s) of a task (names for ``vgf_llm.rewards.get_reward_func``)."""
    return list(TEXT_TASKS[task][1]) if task in TEXT_TASKS else ["reasoning_gym"]


def task_dataset(task: str, size: int, seed: int = 0, split: str = "train", **kwargs):
    """``sentiment``, ``helpful``, ``gsm8k`` or any reasoning-gym task name, as a prompt-only dataset."""
    if task in TEXT_TASKS:
        return TEXT_TASKS[task][0](size=size, seed=seed, split=split, **kwargs)
    return reasoning_gym_dataset(task, size=size, seed=seed, split=split, **kwargs)
