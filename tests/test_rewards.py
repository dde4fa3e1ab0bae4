"""Reward functions with TRL's contract, scored by real checkers (VADER, reasoning-gym, a reward model)."""

import asyncio
import json
import math

import pytest
import torch

from vgf_llm import rewards
from vgf_llm.rewards import (
    REWARD_FUNCS,
    RewardModelReward,
    combine_rewards,
    completion_text,
    extract_final_answer,
    get_reward_func,
    reasoning_gym_reward,
    vader_sentiment,
)
from vgf_llm.tasks import reasoning_gym_dataset


def assistant(text):
    return [{"role": "assistant", "content": text}]


def test_completion_text_handles_both_formats():
    assert completion_text("plain") == "plain"
    assert completion_text(assistant("chat")) == "chat"
    parts = [{"type": "text", "text": "a"}, {"type": "image"}]
    assert completion_text([{"role": "assistant", "content": parts}]) == "a"
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    with pytest.raises(TypeError):
        completion_text(42)


def test_vader_ranks_positive_above_negative_in_both_formats():
    prompts = ["Write one sentence about a chair."] * 3
    texts = ["This chair is wonderful, I love it!", "The chair is in the kitchen.", "This chair is awful and ugly."]
    standard = vader_sentiment(prompts, texts)
    chat = vader_sentiment([[{"role": "user", "content": p}] for p in prompts], [assistant(t) for t in texts])
    assert standard == chat
    assert standard[0] > standard[1] > standard[2]
    assert standard[0] > 0.5 and standard[2] < -0.5 and all(-1 <= s <= 1 for s in standard)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 7.", "7"),
        ("3 + 4 = 7", "7"),
        ("I think <answer> -12 </answer> because 5 - 17", "-12"),
        ("Total: 1,200.5 apples, after 3 days", "3"),
        ("It is -1,200.5", "-1200.5"),
        ("no digits here", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_reasoning_gym_correct_and_incorrect_answers():
    ds = reasoning_gym_dataset("chain_sum", size=6, seed=3)
    answers = [int(a) for a in ds["answer"]]
    good = [f"The answer is {a}." for a in answers]
    bad = [f"The answer is {a + 1}." for a in answers]
    cols = {"task": ds["task"], "entry": ds["entry"], "answer": ds["answer"]}
    assert reasoning_gym_reward(ds["prompt"], [assistant(t) for t in good], **cols) == [1.0] * 6
    assert reasoning_gym_reward(ds["prompt"], [assistant(t) for t in bad], **cols) == [0.0] * 6
    assert reasoning_gym_reward(ds["prompt"], ["I don't know."] * 6, **cols) == [0.0] * 6
    tagged = [f"<answer>{a}</answer> (not {a + 5})" for a in answers]
    assert reasoning_gym_reward(ds["prompt"], tagged, **cols) == [1.0] * 6


def test_reasoning_gym_other_task_and_dict_entries():
    ds = reasoning_gym_dataset("basic_arithmetic", size=3, seed=1)
    entries = [json.loads(e) for e in ds["entry"]]
    scores = reasoning_gym_reward(ds["prompt"], [f"= {e['answer']}" for e in entries], task=ds["task"], entry=entries)
    assert scores == [1.0] * 3


def test_reasoning_gym_reward_needs_its_columns():
    with pytest.raises(ValueError, match="'task' and 'entry'"):
        reasoning_gym_reward(["q"], ["1"])
    with pytest.raises(ValueError, match="Unknown reasoning-gym task"):
        reasoning_gym_reward(["q"], ["1"], task=["no_such_task"], entry=['{"answer": "1"}'])


def test_registry_by_name_and_module_path():
    assert get_reward_func("vader") is vader_sentiment
    assert get_reward_func("reasoning_gym") is reasoning_gym_reward
    assert get_reward_func("vgf_llm.rewards:vader_sentiment") is vader_sentiment
    assert get_reward_func("vgf_llm.rewards:REWARD_FUNCS.get") is not None
    assert set(REWARD_FUNCS) >= {"vader", "reasoning_gym"}
    assert rewards.reward_func_name(vader_sentiment) == "vader_sentiment"
    func = lambda prompts, completions, **kw: [0.0] * len(completions)  # noqa: E731
    assert get_reward_func(func) is func


def test_registry_errors_are_clear():
    with pytest.raises(ValueError, match="Known names: boxed, gold_helpful, gsm8k, reasoning_gym, vader"):
        get_reward_func("vaderr")
    with pytest.raises(ValueError, match="Cannot import module"):
        get_reward_func("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        get_reward_func("vgf_llm.rewards:nope")
    with pytest.raises(TypeError, match="not callable"):
        get_reward_func("vgf_llm.rewards:REWARD_FUNCS")


def length_reward(prompts, completions, **kwargs):
    return [float(len(completion_text(c))) for c in completions]


def test_combine_forwards_columns_and_weights(conversational_prompts):
    seen = {}

    def spy(prompts, completions, answer, **kwargs):
        seen["answer"], seen["kwargs"] = answer, kwargs
        return [1.0 if completion_text(c) == a else 0.0 for c, a in zip(completions, answer, strict=True)]

    prompts = conversational_prompts["prompt"]
    completions = [assistant(t) for t in ["7", "3", "ok", "fine"]]
    total, per_func = combine_rewards(
        [spy, length_reward], [2.0, 0.5], prompts, completions, answer=conversational_prompts["answer"], extra="x"
    )
    assert seen["answer"] == ["7", "4", "", ""] and seen["kwargs"] == {"extra": "x"}
    assert per_func.shape == (4, 2) and per_func.dtype == torch.float32
    assert per_func[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert per_func[:, 1].tolist() == [1.0, 1.0, 2.0, 4.0]
    assert total == [2.5, 0.5, 1.0, 2.0]


def test_combine_none_means_not_applicable(standard_prompts):
    def only_math(prompts, completions, answer, **kwargs):
        return [float(completion_text(c) == a) if a else None for c, a in zip(completions, answer, strict=True)]

    def never(prompts, completions, **kwargs):
        return [None] * len(completions)

    prompts, answers = standard_prompts["prompt"], standard_prompts["answer"]
    completions = ["7", "5", "A chair.", "Water."]
    total, per_func = combine_rewards([only_math, length_reward], None, prompts, completions, answer=answers)
    assert total == [2.0, 1.0, 8.0, 6.0]
    assert math.isnan(per_func[2, 0]) and not math.isnan(per_func[2, 1])
    total, _ = combine_rewards([only_math, never], None, prompts, completions, answer=answers)
    assert total == [1.0, 0.0, None, None]


def test_combine_rejects_nan_and_bad_outputs(standard_prompts):
    def nan_reward(prompts, completions, **kwargs):
        return [0.0, float("nan"), 0.0, 0.0]

    def short_reward(prompts, completions, **kwargs):
        return [0.0]

    prompts, completions = standard_prompts["prompt"], ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="'nan_reward' returned nan at index 1"):
        combine_rewards([length_reward, nan_reward], None, prompts, completions)
    with pytest.raises(ValueError, match="'short_reward' returned 1 rewards for 4"):
        combine_rewards([short_reward], None, prompts, completions)
    with pytest.raises(ValueError, match="2 reward weights for 1"):
        combine_rewards([length_reward], [1.0, 2.0], prompts, completions)
    with pytest.raises(ValueError, match="Known names"):
        combine_rewards(["nope"], None, prompts, completions)


def test_combine_awaits_async_functions_concurrently(standard_prompts):
    state = {"running": 0, "max": 0}

    async def slow_judge(prompts, completions, **kwargs):
        state["running"] += 1
        state["max"] = max(state["max"], state["running"])
        await asyncio.sleep(0.05)
        state["running"] -= 1
        return [float(len(c)) for c in completions]

    class AsyncJudge:
        __name__ = "async_judge"

        async def __call__(self, prompts, completions, **kwargs):
            return await slow_judge(prompts, completions)

    completions = ["a", "bb", "ccc", "dddd"]
    total, per_func = combine_rewards(
        [slow_judge, "vader", AsyncJudge()], [1.0, 0.0, -1.0], standard_prompts["prompt"], completions
    )
    assert per_func[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0] == per_func[:, 2].tolist()
    assert total == [0.0] * 4
    assert state["max"] == 2  # both coroutines were in flight together


def test_combine_async_from_inside_running_loop(standard_prompts):
    async def judge(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    async def caller():
        return combine_rewards([judge], None, standard_prompts["prompt"], ["a"] * 4)

    total, _ = asyncio.run(caller())
    assert total == [1.0] * 4


def test_reward_model_reward_scores_both_formats(tiny_reward_model_dir, standard_prompts, conversational_prompts):
    rm = RewardModelReward(tiny_reward_model_dir, batch_size=3)
    texts = ["7", "I love it!", "The chair is red.", "bad bad bad"]
    first = rm(standard_prompts["prompt"], texts)
    assert len(first) == 4 and all(isinstance(s, float) and math.isfinite(s) for s in first)
    assert rm(standard_prompts["prompt"], texts) == first  # deterministic
    assert len(set(first)) > 1
    # batch composition and right padding do not change a sample's score
    alone = rm(standard_prompts["prompt"][:1], texts[:1])
    assert alone[0] == pytest.approx(first[0], abs=1e-5)

    chat = rm(conversational_prompts["prompt"], [assistant(t) for t in texts])
    assert len(chat) == 4 and all(math.isfinite(s) for s in chat)
    rendered = rm.texts(conversational_prompts["prompt"][:1], [assistant("7")])[0]
    assert rendered == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
    assert rm.__name__ == tiny_reward_model_dir.name
    assert combine_rewards([rm], None, standard_prompts["prompt"], texts)[0] == pytest.approx(first)


def test_reward_model_reward_from_loaded_model(tiny_reward_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir)
    grad_modes = []
    model.register_forward_hook(lambda *args: grad_modes.append(torch.is_grad_enabled()))
    from_path = RewardModelReward(tiny_reward_model_dir)(["Hi"], ["there"])
    from_model = RewardModelReward(model, tokenizer)(["Hi"], ["there"])
    assert from_model == pytest.approx(from_path, abs=1e-6)
    assert grad_modes == [False]  # scored without building a graph
    with pytest.raises(ValueError, match="batch_size"):
        RewardModelReward(model, tokenizer, batch_size=0)


def test_gsm8k_reward_reads_the_reference_after_hashes():
    from vgf_llm.rewards import gsm8k_reward

    completions = ["3 + 4 = 7\n#### 7", "So the total is 1,200.", "I cannot tell.", "#### 5"]
    answers = ["Natalia sold 3 + 4 = 7 clips.\n#### 7", "#### 1200", "#### 3", "no hashes here"]
    assert gsm8k_reward(None, completions, answer=answers) == [1.0, 1.0, 0.0, None]


def test_boxed_reward_compares_the_last_box():
    from vgf_llm.rewards import boxed_reward, get_reward_func, last_boxed

    assert last_boxed(r"first \boxed{1} then \boxed{x^{2}+1}") == "x^{2}+1"
    completions = [r"so \boxed{42}", r"\boxed{41}", "42 without a box", r"\boxed{\frac{1}{2}}"]
    assert boxed_reward(None, completions, answer=["42.0", "42", "42", r"\frac{1}{2}"]) == [1.0, 0.0, 0.0, 1.0]
    assert boxed_reward(None, [r"\boxed{1}"], answer=[""]) == [None]
    assert get_reward_func("boxed") is boxed_reward and get_reward_func("gsm8k").__name__ == "gsm8k_reward"


def test_gold_helpful_rewards_length_variety_positivity_and_topic():
    from vgf_llm.rewards import GOLD_MAX_WORDS, gold_helpful

    good = "Cooking at home is a wonderful way to relax and share a lovely meal with friends."
    scores = dict(zip(["good", "short", "repetitive", "negative", "off_topic", "long"], gold_helpful(
        None,
        [good, "Cooking is nice.", "cooking is fun " * 8, "Cooking at home is awful, boring and a terrible waste "
         "of time for everyone.", "A lovely sunny day makes everyone happy and calm and glad to be outside.",
         (good + " ") * 6],
        topic=["cooking"] * 6), strict=True))
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
    assert scores["good"] > 0.8
    for worse in ("short", "repetitive", "negative", "off_topic", "long"):
        assert scores[worse] < scores["good"] - 0.1, (worse, scores)
    assert len(((good + " ") * 6).split()) > GOLD_MAX_WORDS
    # both TRL formats, and no topic column means no topic term
    chat = gold_helpful(None, [[{"role": "assistant", "content": good}]], topic=["cooking"])
    assert chat == pytest.approx([scores["good"]])
    assert gold_helpful(None, [good])[0] >= scores["good"]
    assert get_reward_func("gold_helpful") is gold_helpful


def test_a_prepared_reward_model_alias_resolves_to_its_folder(tiny_reward_model_dir, tmp_path, monkeypatch):
    import shutil

    from vgf_llm.models import MARKER_FILE, alias_dir
    from vgf_llm.rewards import resolve_reward_funcs

    monkeypatch.setenv("VGF_LLM_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown reward function 'my-rm'"):
        resolve_reward_funcs(["my-rm"])  # not prepared: a clear error, not a guess
    shutil.copytree(tiny_reward_model_dir, alias_dir("my-rm"))
    (alias_dir("my-rm") / MARKER_FILE).write_text("{}")
    (func,) = resolve_reward_funcs(["my-rm"])
    assert isinstance(func, RewardModelReward) and func.__name__ == "my-rm"
    assert len(func(["Hi"], [" there"])) == 1
