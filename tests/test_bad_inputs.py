"""Bad inputs (issue 28) end in one `vgf-llm COMMAND: error: ...` line with exit status 2, or a warning, never a
traceback, a hang or a run that silently trains nothing; the Python API raises the same message. Each test runs the
real CLI in-process on the tiny models of conftest.py."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
import yaml

from vgf_llm.cli import main

SHORT_CONTEXT = 64  # max_position_embeddings of the short-context copy of the tiny model
LONG_PROMPT = "The cat sat on the mat. The dog ran in the park. " * 12  # far more than 64 tokens
ROWS = [{"prompt": f"Write one sentence about a {w}."} for w in ("chair", "river", "garden", "road")]


def length_reward(prompts, completions, **kwargs):
    """A reward that tells the tiny model's completions apart (its VADER score is 0 for nearly all of them)."""
    return [len(c) / 20.0 for c in completions]


def constant_reward(prompts, completions, **kwargs):
    return [0.5] * len(completions)


def infinite_reward(prompts, completions, **kwargs):
    return [float("-inf")] * len(completions)


@pytest.fixture(scope="module")
def short_context_lm_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny model, told it has a context of 64 positions (rotary: the weights are the same)."""
    out = tmp_path_factory.mktemp("short_context_lm")
    shutil.copytree(tiny_lm_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": SHORT_CONTEXT}))
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path, model_dir, dataset, **overrides):
    """A two-step recipe on the tiny model: best-of-N distillation (no value model), no held-out comparison."""
    values = dict(model_name_or_path=str(model_dir), dataset_name=str(dataset), eval_size=1,
                  reward_funcs=["tests.test_bad_inputs:length_reward"],
                  output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, num_generations=2,
                  max_completion_length=4, transport_steps=0, save_strategy="no", use_cpu=True, disable_tqdm=True,
                  report_to="none", plot=False, compare_base=False)
    values.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def error_line(argv, capsys, command: str = "train") -> str:
    """The one error line of `vgf-llm argv` (asserting exit status 2 and no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"vgf-llm {command}: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0].removeprefix(f"vgf-llm {command}: error: ")


def succeeds(argv) -> bool:
    return main([str(a) for a in argv]) == 0


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- 1. a prompt longer than the model's context --------------------------------------------------------------------

def test_a_prompt_longer_than_the_context_is_refused_at_once_in_train(short_context_lm_dir, tokenizer, tmp_path,
                                                                     capsys):
    from datasets import Dataset

    from vgf_llm.config import VGFConfig
    from vgf_llm.trainer import VGFTrainer

    n = token_count(tokenizer, LONG_PROMPT)
    assert n > SHORT_CONTEXT
    rows = [*ROWS[:2], {"prompt": LONG_PROMPT}, *ROWS[2:]]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    start = time.monotonic()
    message = error_line(["train", "--config", recipe(tmp_path, short_context_lm_dir, data)], capsys)
    assert time.monotonic() - start < 60  # refused up front, not after a crawl through generation
    tail = f"row 2: the prompt is {n} tokens, more than the model's context of {SHORT_CONTEXT} tokens"
    assert message.startswith(f"the training rows of {data}, {tail}"), message
    trainer = VGFTrainer(str(short_context_lm_dir), "vader", train_dataset=Dataset.from_list(rows),
                         args=VGFConfig(output_dir=str(tmp_path / "api"), max_steps=1, per_device_train_batch_size=2,
                                        num_generations=2, max_completion_length=4, transport_steps=0, use_cpu=True,
                                        report_to="none"))
    with pytest.raises(ValueError) as api_error:
        trainer.train()
    assert str(api_error.value) == f"the train_dataset, {message.split(', ', 1)[1]}"  # the same words, by the API


def test_a_prompt_longer_than_the_context_is_refused_in_the_held_out_rows(short_context_lm_dir, tokenizer, tmp_path,
                                                                         capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [*ROWS, {"prompt": LONG_PROMPT}])  # the last row is held out
    message = error_line(["train", "--config", recipe(tmp_path, short_context_lm_dir, data, compare_base=True)],
                         capsys)
    assert message.startswith(f"the last 1 rows of {data} (not trained on), row 0: the prompt is "
                              f"{token_count(tokenizer, LONG_PROMPT)} tokens"), message


@pytest.mark.parametrize("command", ["generate", "fit-value"])
def test_a_prompt_longer_than_the_context_is_refused_by_generate_and_fit_value(
        short_context_lm_dir, tiny_reward_model_dir, tmp_path, capsys, command):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [*ROWS, {"prompt": LONG_PROMPT}])
    scorer = ["--reward_model_path", tiny_reward_model_dir] if command == "generate" else []
    message = error_line([command, "--model_name_or_path", short_context_lm_dir, "--prompts", prompts,
                          "--reward_funcs", "vader", "--output", tmp_path / "out", *scorer], capsys, command)
    assert message.startswith(f"{prompts}, row 4: the prompt is ") and f"context of {SHORT_CONTEXT}" in message


def test_a_prompt_plus_completion_past_the_context_is_warned_about_once(short_context_lm_dir, tokenizer, tmp_path,
                                                                       capsys, caplog):
    prompt = "The cat sat on the mat. The dog ran in the park."
    n = token_count(tokenizer, prompt)
    assert n + 50 > SHORT_CONTEXT >= n
    data = write_jsonl(tmp_path / "data.jsonl", [*ROWS, {"prompt": prompt}, *ROWS])
    with caplog.at_level("WARNING"):
        assert succeeds(["train", "--config", recipe(tmp_path, short_context_lm_dir, data, max_steps=1,
                                                     max_completion_length=50)])
    warnings = [r.getMessage() for r in caplog.records if "max_completion_length 50" in r.getMessage()]
    assert warnings == [f"the train_dataset: the longest prompt (row 4, {n} tokens) + max_completion_length 50 = "
                        f"{n + 50} tokens, more than the model's context of {SHORT_CONTEXT} tokens: completions that "
                        "long go past the positions the model was trained on; lower max_completion_length or shorten "
                        "the prompts"]


# -- 2. every completion gets the same reward -----------------------------------------------------------------------

def test_a_constant_reward_warns_and_stops_instead_of_saving_an_untrained_adapter(tiny_lm_dir, standard_prompts,
                                                                                  tmp_path, capsys, caplog):
    from vgf_llm.config import VGFConfig
    from vgf_llm.trainer import VGFTrainer

    data = write_jsonl(tmp_path / "data.jsonl", ROWS * 3)
    config = recipe(tmp_path, tiny_lm_dir, data, max_steps=5, reward_funcs=["tests.test_bad_inputs:constant_reward"])
    with caplog.at_level("WARNING"):
        message = error_line(["train", "--config", config], capsys)
    assert message.startswith("at step 2: every completion got the same reward (0.5) in 3 micro-batches in a row")
    assert "constant_reward" in message and "max_unrewarded_batches" in message
    assert sum("every completion so far got the same reward (0.5)" in r.getMessage() for r in caplog.records) == 3
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    # ties after a reward that told completions apart are ordinary (all wrong, or all right, for a while)
    trainer = VGFTrainer(str(tiny_lm_dir), constant_reward, train_dataset=standard_prompts,
                         args=VGFConfig(output_dir=str(tmp_path / "api"), max_unrewarded_batches=1, use_cpu=True,
                                        report_to="none"))
    trainer._check_rewarded(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    for _ in range(4):
        trainer._check_rewarded(torch.zeros(2, 2))
    trainer._check_rewarded(torch.full((2, 2), float("nan")))  # all None counts as before
    with pytest.raises(ValueError, match="all returned None"):
        trainer._check_rewarded(torch.full((2, 2), float("nan")))


# -- 3. an empty prompt ---------------------------------------------------------------------------------------------

def test_an_empty_prompt_is_refused_naming_its_row(tiny_lm_dir, standard_prompts, tmp_path, capsys):
    from datasets import Dataset

    from vgf_llm.config import VGFConfig
    from vgf_llm.trainer import VGFTrainer

    data = write_jsonl(tmp_path / "data.jsonl", [*ROWS[:2], {"prompt": "   "}, *ROWS])
    message = error_line(["train", "--config", recipe(tmp_path, tiny_lm_dir, data)], capsys)
    assert message.startswith(f"{data}:3: the prompt is empty"), message
    saved = tmp_path / "saved"
    Dataset.from_list([*ROWS, {"prompt": ""}, *ROWS]).save_to_disk(str(saved))
    message = error_line(["train", "--config", recipe(tmp_path, tiny_lm_dir, saved)], capsys)
    assert message.startswith(f"the training rows of {saved}, row 4: the prompt is empty"), message
    with pytest.raises(ValueError, match="the train_dataset, row 1: the prompt is empty"):
        VGFTrainer(str(tiny_lm_dir), "vader", train_dataset=Dataset.from_list([ROWS[0], {"prompt": ""}]),
                   args=VGFConfig(output_dir=str(tmp_path / "api"), use_cpu=True, report_to="none"))


# -- 4. malformed YAML in --config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "generate"])
def test_malformed_yaml_in_config_is_named_with_its_line_and_column(tmp_path, capsys, command):
    config = tmp_path / "recipe.yaml"
    config.write_text("max_steps: 2\nreward_funcs: [vader\noutput_dir: out\n")
    message = error_line([command, "--config", config], capsys, command)
    assert message.startswith(f"{config}:3:11: not valid YAML"), message


# -- 5. one bad JSON line in a dataset file -------------------------------------------------------------------------

def test_a_bad_json_line_in_a_training_dataset_is_named_as_file_and_line(tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"prompt": "unterminated\n'
                    + json.dumps(ROWS[0]) + "\n")
    message = error_line(["train", "--config", recipe(tmp_path, tiny_lm_dir, data)], capsys)
    assert message.startswith(f"{data}:5: not valid JSON"), message


# -- 6. a dataset smaller than one batch ----------------------------------------------------------------------------

def test_a_dataset_smaller_than_one_batch_trains_on_every_row(tiny_lm_dir, tmp_path):
    """As the Trainer's dataloader does (dataloader_drop_last false): each step is the one short batch of all the
    rows. eval_size 0 holds out nothing."""
    data = write_jsonl(tmp_path / "data.jsonl", ROWS[:2])
    assert succeeds(["train", "--config", recipe(tmp_path, tiny_lm_dir, data, eval_size=0,
                                                 per_device_train_batch_size=4, max_steps=2, compare_base=True)])
    summary = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert summary["held_out_prompts"] == 0 and [e["step"] for e in history if "loss" in e] == [1, 2]
    assert all(e["epoch"] == e["step"] for e in history if "loss" in e)  # one step is the whole dataset


# -- 7. a damaged checkpoint ----------------------------------------------------------------------------------------

def test_a_damaged_checkpoint_is_named_and_true_falls_back_to_the_one_before(tiny_lm_dir, tmp_path, capsys, caplog):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "data.jsonl", ROWS * 2)
    config = recipe(tmp_path, tiny_lm_dir, data, max_steps=4, save_strategy="steps", save_steps=2)
    out = tmp_path / "out"
    assert succeeds(["train", "--config", config])
    straight = load_file(str(out / "adapter_model.safetensors"))
    damaged = out / "checkpoint-4" / "adapter_model.safetensors"
    damaged.write_bytes(b"\x00" * 7)
    message = error_line(["train", "--config", config, "--resume_from_checkpoint", out / "checkpoint-4"], capsys)
    assert message.startswith(f"cannot resume from {out / 'checkpoint-4'}: {damaged} is damaged"), message
    with caplog.at_level("WARNING"):
        assert succeeds(["train", "--config", config, "--resume_from_checkpoint", "true"])
    assert f"skipping {out / 'checkpoint-4'}: {damaged} is damaged" in caplog.text
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()  # nothing was deleted
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in straight:  # checkpoint-2 resumed to step 4 gives the uninterrupted run's adapter
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)


# -- 8. messages that named nothing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "fit-value"])
def test_non_utf8_bytes_in_a_jsonl_are_named_with_file_and_line(tiny_lm_dir, tmp_path, capsys, command):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS) + b'{"prompt": "caf\xe9"}\n')
    argv = (["train", "--config", recipe(tmp_path, tiny_lm_dir, data)] if command == "train" else
            [command, "--model_name_or_path", tiny_lm_dir, "--prompts", data, "--reward_funcs", "vader", "--output",
             tmp_path / "vm"])
    message = error_line(argv, capsys, command)
    assert message == f"{data}:5: not UTF-8 text (byte 0xe9 at column 16): save the file as UTF-8"


def test_chat_messages_without_a_role_name_the_missing_key_and_the_row(tiny_lm_dir, tmp_path, capsys):
    from datasets import Dataset

    from vgf_llm.config import VGFConfig
    from vgf_llm.trainer import VGFTrainer

    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in ROWS]
    data = write_jsonl(tmp_path / "data.jsonl", [*chat, {"prompt": [{"content": "Hello!"}]}, *chat])
    message = error_line(["train", "--config", recipe(tmp_path, tiny_lm_dir, data)], capsys)
    assert message.startswith(f"{data}:5: chat message 0 of the prompt has no 'role' key"), message
    rows = [*chat[:1], {"prompt": [{"content": "Hello!"}]}]
    with pytest.raises(ValueError, match="the train_dataset, row 1: chat message 0 of the prompt has no 'role' key"):
        VGFTrainer(str(tiny_lm_dir), "vader", train_dataset=Dataset.from_list(rows),
                   args=VGFConfig(output_dir=str(tmp_path / "api"), use_cpu=True, report_to="none"))


def test_a_prompt_of_the_wrong_type_names_its_row_and_file(tiny_lm_dir, tmp_path, capsys):
    from datasets import Dataset

    saved = tmp_path / "saved"
    Dataset.from_dict({"prompt": [1, 2, 3, 4, 5]}).save_to_disk(str(saved))
    message = error_line(["train", "--config", recipe(tmp_path, tiny_lm_dir, saved)], capsys)
    assert message.startswith(f"the training rows of {saved}, row 0: \"prompt\" must be a non-empty string or a "
                              "list of"), message
    assert message.endswith("got int")


def test_an_infinite_reward_gets_its_own_hint(tiny_lm_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS * 2)
    message = error_line(["train", "--config", recipe(tmp_path, tiny_lm_dir, data,
                                                      reward_funcs=["tests.test_bad_inputs:infinite_reward"])], capsys)
    assert "returned -inf at index 0; rewards must be finite" in message and "NaN" not in message
