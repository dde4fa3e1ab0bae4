"""The `vgf-llm` command line, run in-process on the tiny offline models: help, env, models, fit-value, generate,
demo, and the one-line errors (exit status 2) for bad inputs."""

import contextlib
import dataclasses
import io
import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from vgf_llm.cli import COMMANDS, main
from vgf_llm.cli.common import VLLM_FIELDS
from vgf_llm.cli.generate import GenerateArguments
from vgf_llm.rewards import REWARD_FUNCS, completion_text
from vgf_llm.sampler import SamplerConfig
from vgf_llm.value import ValueModel

PROMPT_ROWS = [
    {"prompt": "Write one sentence about a chair.", "answer": "chair"},
    {"prompt": [{"role": "user", "content": "What is 3 + 4?"}], "answer": "7"},
    {"prompt": "Write one sentence about a river.", "answer": "river"},
    {"prompt": [{"role": "user", "content": "What is 9 - 5?"}], "answer": "4"},
]
SEEN_COLUMNS: list[set] = []


def length_reward(prompts, completions, **columns):
    """A test reward: response length in characters / 10; records which dataset columns it was given."""
    SEEN_COLUMNS.append(set(columns))
    return [len(completion_text(c)) / 10 for c in completions]


@pytest.fixture
def registered_reward(monkeypatch):
    monkeypatch.setitem(REWARD_FUNCS, "cli_test_length", length_reward)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr); ``argv`` is one string of arguments (or a list)."""
    try:
        code = main(argv.split() if isinstance(argv, str) else [str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(argv, capsys, *fragments):
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", PROMPT_ROWS)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_lm_dir, prompts_file):
    """`fit-value` once for the module: (value model folder, stdout, columns the reward saw)."""
    out_dir = tmp_path_factory.mktemp("value_model")
    SEEN_COLUMNS.clear()
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setitem(REWARD_FUNCS, "cli_test_length", length_reward)
        code = main(
            f"fit-value --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --reward_funcs "
            f"cli_test_length --ridge_layers 1 2 --num_generations 4 "
            f"--max_completion_length 8 --output {out_dir}".split()
        )
    assert code == 0
    return out_dir, stdout.getvalue(), list(SEEN_COLUMNS)


# ---------------------------------------------------------------------------------------------------------------
# help and defaults


def test_main_help_lists_every_command(capsys):
    code, out, _ = run_cli("--help", capsys)
    assert code == 0
    for command in COMMANDS:
        assert command in out
    expect_error("no-such-command", capsys, "unknown command")


GENERATE_OPTIONS = [
    "--model_name_or_path",
    "--prompts",
    "--task",
    "--split",
    "--num_prompts",
    "--output",
    "--value_model_path",
    "--reward_model_path",
    "--reward_funcs",
    "--reward_weights",
    "--seed",
    "--device",
    "--config",
    *[f"--{name}" for name in VLLM_FIELDS],
    *[f"--{f.name}" for f in dataclasses.fields(SamplerConfig)],
]


@pytest.mark.parametrize(
    "argv, options",
    [
        ("models --help", ["prepare", "list"]),
        ("models prepare --help", ["ALIAS_OR_PATH"]),
        (
            "fit-value --help",
            [
                "--model_name_or_path",
                "--task",
                "--prompts",
                "--reward_funcs",
                "--num_prompts",
                "--num_generations",
                "--ridge_layers",
                "--max_completion_length",
                "--seed",
                "--output",
                "--config",
            ],
        ),
        ("generate --help", GENERATE_OPTIONS),
        ("env --help", ["versions", "CUDA"]),
    ],
)
def test_subcommand_help(argv, options, capsys):
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    for option in options:
        assert option in out, option


def test_generate_lists_only_its_own_options_named_as_in_vgfconfig(capsys):
    _, out, _ = run_cli("generate --help", capsys)
    listed = set(re.findall(r"^  (--\w+)", out, flags=re.M)) - {"--help"}
    assert listed == (set(GENERATE_OPTIONS) - {"--config"}) | {"--no_repulsion"}  # --config: in the description
    for retired in ("--num_particles", "--step_size", "--regenerate", "--fluency_weight", "--selection", "--metric"):
        assert retired not in out


def test_generate_defaults_are_the_samplers_and_a_yaml_config_sets_them(tiny_lm_dir, tmp_path):
    from vgf_llm.cli.common import parse

    base = "--model_name_or_path m --prompts p --output o --value_model_path v".split()
    args, config = parse((GenerateArguments, SamplerConfig), base, "test", "")
    assert config == SamplerConfig()
    (tmp_path / "g.yaml").write_text(
        "transport_steps: 0\ndecoder: verified\nrepulsion: false\nmodel_name_or_path: x\n"
    )
    args, config = parse(
        (GenerateArguments, SamplerConfig),
        ["--config", str(tmp_path / "g.yaml"), *base[2:], "--max_edits", "2"],
        "test",
        "",
    )
    assert (config.transport_steps, config.decoder, config.repulsion, config.max_edits) == (0, "verified", False, 2)
    assert config.transport_step_size == 0.05  # the verified decoder's measured step, unless given
    assert args.model_name_or_path == "x"


# ---------------------------------------------------------------------------------------------------------------
# env, models, demo


def test_env_prints_versions_for_bug_reports(capsys):
    code, out, _ = run_cli("env", capsys)
    assert code == 0
    assert f"torch: {torch.__version__}" in out
    for key in (
        "python:",
        "vgf_llm:",
        "transformers:",
        "peft:",
        "trl:",
        "accelerate:",
        "datasets:",
        "deepspeed:",
        "vllm:",
        "cuda available:",
        "cpu count:",
    ):
        assert key in out


def test_models_list_says_whether_each_alias_is_prepared(tmp_path, monkeypatch, capsys):
    from vgf_llm.models import MARKER_FILE, MODEL_ALIASES, alias_dir

    monkeypatch.setenv("VGF_LLM_HOME", str(tmp_path))
    code, out, _ = run_cli("models list", capsys)
    assert code == 0
    for alias in MODEL_ALIASES:
        line = next(li for li in out.splitlines() if li.startswith(alias))
        assert ("not prepared" in line or "unavailable" in line) and str(alias_dir(alias)) not in line
    alias = sorted(MODEL_ALIASES)[0]
    alias_dir(alias).mkdir(parents=True)
    (alias_dir(alias) / MARKER_FILE).write_text("{}")
    _, out, _ = run_cli("models list", capsys)
    line = next(li for li in out.splitlines() if li.startswith(alias))
    assert "prepared" in line and "not prepared" not in line and str(alias_dir(alias)) in line


def test_models_prepare_prints_the_folder_or_fails_clearly(tiny_lm_dir, tmp_path, capsys):
    code, out, _ = run_cli(f"models prepare {tiny_lm_dir}", capsys)
    assert code == 0 and out.strip() == str(tiny_lm_dir)
    expect_error(f"models prepare {tmp_path / 'no-such-model'}", capsys, "no model folder at")
    expect_error(
        "models prepare no-such-org/no-such-model", capsys, "not available offline", "hf download"
    )


def test_demo_runs_the_toy_example_with_forwarded_arguments(tmp_path, capsys):
    code, out, _ = run_cli(f"demo --steps 0 --num_prompts 4 --no_plot --out {tmp_path}", capsys)
    assert code == 0 and "best_of_n" in out
    figures = json.loads((tmp_path / "toy_bandit.json").read_text())
    assert figures["config"]["steps"] == 0 and figures["config"]["num_prompts"] == 4
    assert figures["reward_vgf_selected"] == pytest.approx(figures["reward_best_of_n"])  # L = 0 is best-of-N


def test_demo_without_the_example_file_fails_clearly(tmp_path, monkeypatch, capsys):
    import vgf_llm.cli.demo

    monkeypatch.setattr(vgf_llm.cli.demo, "toy_example_path", lambda: tmp_path / "examples" / "toy_bandit.py")
    expect_error("demo", capsys, "source checkout")


def test_unknown_arguments_are_rejected(capsys):
    expect_error("env --bogus", capsys, "--bogus")


# ---------------------------------------------------------------------------------------------------------------
# fit-value and generate end to end


def test_fit_value_saves_the_model_and_stats(fitted):
    out_dir, stdout, seen = fitted
    assert (out_dir / "value_model.safetensors").is_file() and (out_dir / "value_model.json").is_file()
    stats = json.loads((out_dir / "stats.json").read_text())
    assert json.loads((out_dir / "value_model.json").read_text())["num_layers"] == stats["layer"] in (1, 2)
    assert stats["num_samples"] == len(PROMPT_ROWS) * 4 and stats["num_prompts"] == len(PROMPT_ROWS)
    assert stats["reward_funcs"] == ["cli_test_length"]
    assert math.isfinite(stats["reward_mean"]) and math.isfinite(stats["val_mse"])
    assert "val_corr" in stats
    assert "held-out correlation" in stdout and str(out_dir) in stdout
    assert seen and all(cols == {"answer"} for cols in seen)  # extra JSONL fields reach the reward as columns


def test_fit_value_defaults_to_the_ridge_value_model(tiny_lm_dir, prompts_file, tmp_path, capsys):
    out_dir = tmp_path / "ridge"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(REWARD_FUNCS, "cli_test_length", length_reward)
        code = main(
            (
                f"fit-value --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --reward_funcs "
                "cli_test_length --ridge_layers 1 2 --num_generations 4 --max_completion_length 8 "
                f"--output {out_dir}"
            ).split()
        )
    assert code == 0
    stats = json.loads((out_dir / "stats.json").read_text())
    assert stats["method"] == "ridge" and stats["ridge_layers"] == [1, 2]
    assert stats["layer"] in (1, 2) and math.isfinite(stats["val_corr"])
    assert json.loads((out_dir / "value_model.json").read_text())["num_layers"] == stats["layer"]
    assert f"layer {stats['layer']}" in capsys.readouterr().out
    # the saved model scores like the fitted one (it is what `generate --value_model` loads)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert ValueModel.load(model, out_dir).config.num_layers == stats["layer"]


def check_result_lines(lines, prompts, num_particles):
    assert [line["prompt"] for line in lines] == prompts
    for line in lines:
        assert {"prompt", "response", "chosen", "chosen_moved", "particles"} <= set(line)
        assert 0 <= line["chosen"] < num_particles and len(line["particles"]) == num_particles
        for particle in line["particles"]:
            assert set(particle) == {
                "text_before",
                "text_after",
                "score_before",
                "score_after",
                "tokens_changed",
                "displacement",
            }
            assert math.isfinite(particle["score_before"]) and math.isfinite(particle["score_after"])
            assert math.isfinite(particle["displacement"]) and particle["tokens_changed"] >= 0
        chosen = line["particles"][line["chosen"]]
        assert line["response"] == (chosen["text_after"] if line["chosen_moved"] else chosen["text_before"])


def test_generate_with_the_fitted_value_model(fitted, tiny_lm_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out" / "vgf.jsonl"
    code, stdout, _ = run_cli(
        f"generate --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --num_prompts 2 "
        f"--value_model_path {fitted[0]} --num_generations 4 --transport_steps 2 "
        f"--max_completion_length 8 --generation_batch_size 8 --output {out}",
        capsys,
    )
    assert code == 0 and "wrote 2 lines" in stdout
    lines = read_jsonl(out)
    check_result_lines(lines, [r["prompt"] for r in PROMPT_ROWS[:2]], 4)
    assert [line["columns"] for line in lines] == [{"answer": r["answer"]} for r in PROMPT_ROWS[:2]]
    assert "true_reward" not in lines[0]  # no --task and no --reward_funcs: no true reward


def test_generate_with_zero_steps_is_best_of_n(fitted, tiny_lm_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "bon.jsonl"
    code, _, _ = run_cli(
        f"generate --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --num_prompts 2 "
        f"--value_model_path {fitted[0]} --num_generations 4 --transport_steps 0 "
        f"--max_completion_length 8 --output {out}",
        capsys,
    )
    assert code == 0
    for line in read_jsonl(out):
        assert line["chosen_moved"] is False
        scores = [p["score_before"] for p in line["particles"]]
        assert line["chosen"] == scores.index(max(scores))
        assert all(p["text_after"] == p["text_before"] and p["tokens_changed"] == 0 for p in line["particles"])


@pytest.mark.parametrize("decoder,budget", [
    ("steer_prefix", "--transport_steps 1 --transport_step_size 1.0 --steer_layer 1"),
    ("verified", "--transport_steps 2 --transport_step_size 2.0 --verify_top 4")])
def test_generate_moves_particles_with_each_kept_decoder(fitted, tiny_lm_dir, prompts_file, tmp_path, capsys,
                                                         decoder, budget):
    """The hidden state moved at every token along a prefix value that generate fits to the value model's scores
    of each batch (steer_prefix), or checked token edits (verified); per-step steering refuses top-k sampling."""
    out = tmp_path / f"{decoder}.jsonl"
    code, stdout, _ = run_cli(
        f"generate --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --num_prompts 3 --decoder {decoder} "
        f"--value_model_path {fitted[0]} --num_generations 4 {budget} --max_completion_length 8 --output {out}",
        capsys,
    )
    assert code == 0, stdout
    lines = read_jsonl(out)
    check_result_lines(lines, [row["prompt"] for row in PROMPT_ROWS[:3]], 4)
    assert all(p["displacement"] > 0 for line in lines for p in line["particles"])
    assert sum(p["tokens_changed"] for line in lines for p in line["particles"]) > 0
    if decoder == "steer_prefix":
        expect_error(f"generate --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --decoder {decoder} "
                     f"--value_model_path {fitted[0]} --top_k 5 --output {out}", capsys, "top_k=0")


def test_generate_with_a_reward_model_on_a_task_reports_the_true_reward(
    tiny_lm_dir, tiny_reward_model_dir, tmp_path, capsys
):
    out = tmp_path / "task.jsonl"
    code, stdout, _ = run_cli(
        f"generate --model_name_or_path {tiny_lm_dir} --task sentiment --num_prompts 2 "
        f"--reward_model_path {tiny_reward_model_dir} --num_generations 4 --transport_steps 2 "
        f"--max_completion_length 8 --output {out}",
        capsys,
    )
    assert code == 0
    lines = read_jsonl(out)
    check_result_lines(lines, [line["prompt"] for line in lines], 4)
    assert len(lines) == 2 and all(line["prompt"][-1]["content"].startswith("Write one sentence") for line in lines)
    assert all(-1.0 <= line["true_reward"] <= 1.0 for line in lines)  # VADER compound, the task's true reward
    mean = sum(line["true_reward"] for line in lines) / 2
    assert f"mean true reward of the chosen responses (vader, 2 prompts): {mean:.4f}" in stdout


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: one clear line on stderr, exit status 2


def test_reward_model_with_another_vocabulary_fails_clearly(
    tiny_lm_dir, other_vocab_reward_model_dir, prompts_file, tmp_path, capsys
):
    expect_error(
        f"generate --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --reward_model_path "
        f"{other_vocab_reward_model_dir} --output {tmp_path / 'o.jsonl'}",
        capsys,
        "vocabulary",
    )
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_needs_exactly_one_scorer(tiny_lm_dir, tiny_reward_model_dir, prompts_file, tmp_path, capsys):
    base = [
        "generate",
        "--model_name_or_path",
        tiny_lm_dir,
        "--prompts",
        prompts_file,
        "--output",
        tmp_path / "o.jsonl",
    ]
    expect_error(base, capsys, "exactly one scorer")
    expect_error(
        base + ["--value_model_path", tmp_path, "--reward_model_path", tiny_reward_model_dir],
        capsys,
        "exactly one scorer",
    )


def test_a_folder_without_a_value_model_fails_clearly(tiny_lm_dir, prompts_file, tmp_path, capsys):
    expect_error(
        f"generate --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --value_model_path "
        f"{tmp_path} --output {tmp_path / 'o.jsonl'}",
        capsys,
        "value_model.json",
    )


def test_a_value_model_of_another_base_model_fails_clearly(fitted, tokenizer, prompts_file, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "narrow")
    tokenizer.save_pretrained(tmp_path / "narrow")
    expect_error(
        f"generate --model_name_or_path {tmp_path / 'narrow'} --prompts {prompts_file} "
        f"--value_model_path {fitted[0]} --output {tmp_path / 'o.jsonl'}",
        capsys,
        "does not fit --model",
        "its head does not fit",
    )


def test_missing_prompts_file_fails_clearly(tiny_lm_dir, tiny_reward_model_dir, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    expect_error(
        f"generate --model_name_or_path {tiny_lm_dir} --prompts {missing} --reward_model_path "
        f"{tiny_reward_model_dir} --output {tmp_path / 'o.jsonl'}",
        capsys,
        "prompts file not found",
        str(missing),
    )


@pytest.mark.parametrize(
    "second_line, message",
    [
        ('{"prompt": "unterminated', "not valid JSON"),
        ('{"text": "no prompt field", "answer": "1"}', '"prompt" field'),
        ('{"prompt": 42, "answer": "1"}', "non-empty string or a list"),
        ('{"prompt": "fine", "other": "1"}', "differ from the first row"),
    ],
)
def test_bad_jsonl_line_is_reported_with_its_line_number(second_line, message, tiny_lm_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + second_line + "\n")
    expect_error(
        f"fit-value --model_name_or_path {tiny_lm_dir} --prompts {bad} --reward_funcs vader --output {tmp_path / 'vm'}",
        capsys,
        f"{bad}:2:",
        message,
    )


def test_unknown_reward_name_fails_clearly(tiny_lm_dir, prompts_file, tmp_path, capsys):
    expect_error(
        f"fit-value --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --reward_funcs "
        f"no_such_reward --output {tmp_path / 'vm'}",
        capsys,
        "Unknown reward function 'no_such_reward'",
    )


def test_fit_value_needs_a_reward_for_a_prompts_file(tiny_lm_dir, prompts_file, tmp_path, capsys):
    expect_error(
        f"fit-value --model_name_or_path {tiny_lm_dir} --prompts {prompts_file} --output {tmp_path / 'vm'}",
        capsys,
        "--reward_funcs",
    )


def test_unknown_task_fails_clearly(tiny_lm_dir, tmp_path, capsys):
    expect_error(
        f"fit-value --model_name_or_path {tiny_lm_dir} --task no_such_task --output {tmp_path / 'vm'}",
        capsys,
        "no_such_task",
    )


def test_unavailable_model_fails_clearly(prompts_file, tmp_path, registered_reward, capsys):
    expect_error(
        f"fit-value --model_name_or_path {tmp_path / 'missing-model'} --prompts {prompts_file} "
        f"--reward_funcs cli_test_length --output {tmp_path / 'vm'}",
        capsys,
        "no model folder at",
    )


def test_parsing_leaves_the_dataclasses_field_types_as_declared():
    """TRL's parser rewrites `int | None` field types in place; a later pydantic check of SamplerConfig (the
    server's request validation) would then refuse None. ``parse`` puts the declared types back."""
    import dataclasses

    from pydantic import TypeAdapter

    from vgf_llm.cli.common import parse

    before = {f.name: f.type for f in dataclasses.fields(SamplerConfig)}
    parse((GenerateArguments, SamplerConfig), "--model_name_or_path m --prompts p --output o --value_model_path v"
          .split(), "test", "")
    assert {f.name: f.type for f in dataclasses.fields(SamplerConfig)} == before
    assert TypeAdapter(SamplerConfig).validate_python({"generation_batch_size": None}).generation_batch_size is None
