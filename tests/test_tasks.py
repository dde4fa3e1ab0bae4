"""Offline task datasets: TRL prompt-only format, sizes, seeded determinism, disjoint train/test splits."""

import json

import pytest
from trl.data_utils import is_conversational

from vgf_llm.tasks import (
    DEFAULT_INSTRUCTION,
    SENTIMENT_TOPICS,
    helpful_dataset,
    helpful_prompts,
    in_test_split,
    reasoning_gym_dataset,
    sentiment_dataset,
    sentiment_topics,
    task_dataset,
    task_reward_names,
)


def questions(ds):
    return [json.loads(e)["question"] for e in ds["entry"]]


def test_reasoning_gym_columns_and_format():
    ds = reasoning_gym_dataset("chain_sum", size=5, seed=0)
    assert ds.column_names == ["prompt", "task", "entry", "answer"] and len(ds) == 5
    row = ds[0]
    assert is_conversational(row)
    assert [m["role"] for m in row["prompt"]] == ["user"]
    entry = json.loads(row["entry"])
    assert row["prompt"][0]["content"] == f"{entry['question']}\n{DEFAULT_INSTRUCTION}"
    assert row["task"] == "chain_sum" and row["answer"] == entry["answer"]
    # default chain_sum level: two one-digit terms
    for e in map(json.loads, ds["entry"]):
        terms = e["metadata"]["expression"].split()
        assert len(terms) == 3 and all(len(t) == 1 for t in terms[::2])


def test_reasoning_gym_standard_format_system_prompt_and_kwargs():
    ds = reasoning_gym_dataset(
        "chain_sum",
        size=4,
        seed=0,
        conversational=False,
        system_prompt="Be brief.",
        instruction=None,
        max_terms=3,
        min_terms=3,
    )
    assert not is_conversational(ds[0])
    entry = json.loads(ds[0]["entry"])
    assert ds[0]["prompt"] == f"Be brief.\n\n{entry['question']}"
    assert len(entry["metadata"]["expression"].split()) == 5
    chat = reasoning_gym_dataset("chain_sum", size=2, seed=0, system_prompt="Be brief.")
    assert chat[0]["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_reasoning_gym_is_deterministic_by_seed():
    a = reasoning_gym_dataset("chain_sum", size=20, seed=7)
    b = reasoning_gym_dataset("chain_sum", size=20, seed=7)
    c = reasoning_gym_dataset("chain_sum", size=20, seed=8)
    assert a.to_dict() == b.to_dict()
    assert questions(a) != questions(c)


@pytest.mark.parametrize("seed", [0, 1])
def test_reasoning_gym_train_and_test_are_disjoint(seed):
    train = reasoning_gym_dataset("chain_sum", size=400, seed=seed, split="train")
    test = reasoning_gym_dataset("chain_sum", size=30, seed=seed, split="test")
    assert len(train) == 400 and len(test) == 30
    assert set(questions(train)).isdisjoint(questions(test))
    assert len(set(questions(test))) == 30  # test questions are distinct by default
    assert len(set(questions(train))) < 400  # train samples the small space with repeats
    assert all(in_test_split(f"chain_sum\n{q}", 0.2) for q in questions(test))


def test_reasoning_gym_errors():
    with pytest.raises(ValueError, match="split"):
        reasoning_gym_dataset(split="validation")
    with pytest.raises(ValueError, match="size"):
        reasoning_gym_dataset(size=0)
    with pytest.raises(ValueError, match="Unknown reasoning-gym task"):
        reasoning_gym_dataset("no_such_task", size=2)
    with pytest.raises(ValueError, match="Bad config"):
        reasoning_gym_dataset("chain_sum", size=2, no_such_option=1)
    with pytest.raises(ValueError, match="distinct test questions"):
        reasoning_gym_dataset("chain_sum", size=100, split="test")  # only ~45 of the 200 questions are test


def test_sentiment_topics_are_disjoint_and_cover_the_list():
    train, test = sentiment_topics("train"), sentiment_topics("test")
    assert len(SENTIMENT_TOPICS) == len(set(SENTIMENT_TOPICS)) >= 100
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(SENTIMENT_TOPICS)
    assert 10 <= len(test) <= 40


def test_sentiment_dataset():
    train = sentiment_dataset(size=150, seed=0)
    test = sentiment_dataset(size=10, seed=0, split="test")
    assert train.column_names == ["prompt", "topic"] and len(train) == 150 and len(test) == 10
    assert is_conversational(train[0])
    assert train[0]["prompt"] == [{"role": "user", "content": f"Write one sentence about {train[0]['topic']}."}]
    assert set(train["topic"]).isdisjoint(test["topic"])
    n_train = len(sentiment_topics("train"))
    assert len(set(train["topic"][:n_train])) == n_train  # every topic once before any repeats
    assert sentiment_dataset(size=150, seed=0).to_dict() == train.to_dict()
    assert sentiment_dataset(size=150, seed=1)["topic"] != train["topic"]
    plain = sentiment_dataset(size=3, seed=0, conversational=False)
    assert plain["prompt"] == [f"Write one sentence about {t}." for t in plain["topic"]]
    with pytest.raises(ValueError, match="split"):
        sentiment_dataset(split="dev")


def test_helpful_prompts_are_disjoint_between_splits_and_cover_128_held_out_prompts():
    train, test = helpful_prompts("train"), helpful_prompts("test")
    assert not {t for _, t in train} & {t for _, t in test}  # no topic in both splits
    assert len(set(test)) == len(test) >= 128  # frontier.py scores 128 distinct held-out instructions
    data = helpful_dataset(size=len(test), split="test")
    assert len(set(data["topic"])) == len({t for _, t in test})  # one full pass before any repeat
    assert len({json.dumps(p) for p in data["prompt"]}) == len(test)
    assert is_conversational({"prompt": data[0]["prompt"]})
    assert helpful_dataset(size=5, seed=3)["prompt"] == helpful_dataset(size=5, seed=3)["prompt"]
    assert helpful_dataset(size=5, seed=3)["prompt"] != helpful_dataset(size=5, seed=4)["prompt"]
    row = helpful_dataset(size=1, conversational=False)[0]
    assert isinstance(row["prompt"], str) and row["topic"] in row["prompt"]
    assert task_dataset("helpful", 3)["topic"] == helpful_dataset(size=3)["topic"]
    assert task_reward_names("helpful") == ["gold_helpful"]
