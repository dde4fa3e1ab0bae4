"""`vgf-llm train`: recipes from YAML with command-line overrides, clear errors, and the two-process runs (DDP and
DeepSpeed ZeRO-2 over gloo, started by the CLI itself through torchrun)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vgf_llm.cli import main
from vgf_llm.cli.train import launch_command

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(tmp_path, tiny_lm_dir, **overrides) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Write one sentence about a {w}."} for w in ("chair", "river", "garden", "road") * 2]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = dict(model_name_or_path=str(tiny_lm_dir), dataset_name=str(data), train_size=8, eval_size=4,
                  reward_funcs=["vader"], output_dir=str(tmp_path / "out"), max_steps=2,
                  per_device_train_batch_size=2, num_generations=4, max_completion_length=6, transport_steps=1,
                  transport_step_size=1.0, save_steps=2, use_cpu=True, disable_tqdm=True,
                  report_to="none", plot=False)
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_help_lists_vgf_and_trl_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--transport_steps", "--num_generations", "--lora_r", "--task", "--push_to_hub"):
        assert option in out, option


def test_recipe_with_override_trains_and_reports(tmp_path, tiny_lm_dir, capsys):
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, plot=True)
    assert main(["train", "--config", str(recipe), "--max_steps", "1", "--lora_r", "4"]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "eval_results.json").read_text())
    assert {"base_reward", "trained_reward", "per_prompt"} <= set(summary) and len(summary["per_prompt"]) == 4
    history = json.loads((out / "log_history.json").read_text())
    assert max(e.get("step", 0) for e in history) == 1  # the command line beat the file's max_steps: 2
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert (out / "training_curves.png").stat().st_size > 0
    assert "held-out reward on 4 prompts" in capsys.readouterr().out


def test_one_seed_gives_one_adapter_in_fresh_processes(tmp_path, tiny_lm_dir):
    """Two `vgf-llm train` runs with the same seed, each in its own process (no test fixture seeds torch there),
    write the same adapter bit for bit; another seed writes another one."""
    from safetensors.torch import load_file

    def adapter(name: str, seed: int) -> dict:
        recipe = tiny_recipe(tmp_path / name, tiny_lm_dir, max_steps=1, compare_base=False, seed=seed)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "vgf_llm.cli", "train", "--config", str(recipe)], check=True, env=env,
                       capture_output=True, timeout=300)
        return load_file(str(tmp_path / name / "out" / "adapter_model.safetensors"))

    first, again, other = adapter("a", 0), adapter("b", 0), adapter("c", 1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


KILL_DURING_SAVE = """
import os, signal, sys
import torch
original = torch.save
def save_then_die(obj, path, *args, **kwargs):  # the Trainer's part of checkpoint-4 is on disk, VGF's half written
    if "checkpoint-4" in str(path) and str(path).endswith("vgf_state.pt.partial"):
        open(path, "wb").write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(obj, path, *args, **kwargs)
torch.save = save_then_die
from vgf_llm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_training_process_killed_during_a_save_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_lm_dir):
    """A real `vgf-llm train` process gets SIGKILL while writing checkpoint-4; a fresh process resumed with
    `--resume_from_checkpoint true` skips the cut-off checkpoint, restarts from checkpoint-2 and ends on the adapter
    of a run that was never interrupted."""
    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def train(name: str, *extra: str, script: str | None = None) -> subprocess.CompletedProcess:
        recipe = tiny_recipe(tmp_path / name, tiny_lm_dir, max_steps=6, compare_base=False, save_total_limit=1)
        command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "vgf_llm.cli"]
        return subprocess.run([*command, "train", "--config", str(recipe), *extra], env=env, capture_output=True,
                              text=True, timeout=300)

    assert train("straight").returncode == 0
    killed = train("killed", script=KILL_DURING_SAVE)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "killed" / "out"
    assert (out / "checkpoint-2" / "vgf_checkpoint_complete").is_file()  # rotation waited for checkpoint-4
    assert not (out / "checkpoint-4" / "vgf_checkpoint_complete").exists()
    resumed = train("killed", "--resume_from_checkpoint", "true")  # no overwrite: only a resume may run here
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-4" in resumed.stderr and "incomplete" in resumed.stderr  # the skip is said, not silent
    a = load_file(str(tmp_path / "straight" / "out" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("word", ["true", "last"])
def test_resume_true_on_the_command_line_means_the_last_checkpoint(tmp_path, tiny_lm_dir, word):
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, compare_base=False)
    assert main(["train", "--config", str(recipe)]) == 0  # 2 steps, checkpoint-2
    assert main(["train", "--config", str(recipe), "--max_steps", "3", "--resume_from_checkpoint", word]) == 0
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]  # steps 1-2 come from checkpoint-2's state


def test_eval_strategy_steps_records_the_policys_held_out_reward_over_training(tmp_path, tiny_lm_dir):
    """What the quickstart shows: the held-out reward of the policy itself at intervals (the rollouts' reward comes
    from the base and stays flat by design), drawn with the base at step 0 in training_curves.png."""
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, eval_strategy="steps", eval_steps=1, plot=True)
    assert main(["train", "--config", str(recipe)]) == 0
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    evals = [(e["step"], e["eval_reward"]) for e in history if "eval_reward" in e]
    assert [s for s, _ in evals] == [1, 2] and all(math.isfinite(r) for _, r in evals)
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 5000


def test_held_out_comparison_also_reports_rewards_it_never_trained_on(tmp_path, tiny_lm_dir, tiny_reward_model_dir,
                                                                     capsys):
    from vgf_llm.recipe import RecipeArguments, extra_eval_rewards

    assert extra_eval_rewards(RecipeArguments(task="helpful", reward_funcs=["my-proxy"])) == ["gold_helpful"]
    assert extra_eval_rewards(RecipeArguments(task="chain_sum")) == []
    assert extra_eval_rewards(RecipeArguments(task="helpful", reward_funcs=["gold_helpful"])) == []
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, reward_funcs=[str(tiny_reward_model_dir)], eval_reward_funcs=["vader"],
                         max_steps=1)
    assert main(["train", "--config", str(recipe)]) == 0
    summary = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert set(summary["base_also"]) == set(summary["trained_also"]) == {"vader_sentiment"}
    assert -1.0 <= summary["trained_also"]["vader_sentiment"] <= 1.0
    assert "vader_sentiment (not trained on): base" in capsys.readouterr().out


def test_unknown_key_in_recipe_fails_clearly(tmp_path, tiny_lm_dir, capsys):
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, transport_stepz=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(recipe)])
    assert exit_info.value.code == 2
    assert "transport_stepz" in capsys.readouterr().err


def test_unknown_command_line_option_fails(tmp_path, tiny_lm_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(tiny_recipe(tmp_path, tiny_lm_dir)), "--no_such_option", "1"])
    assert exit_info.value.code == 2
    assert "no_such_option" in capsys.readouterr().err


def test_missing_local_dataset_says_how_to_provide_it(tmp_path, tiny_lm_dir, capsys):
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, dataset_name="nobody/not-cached-dataset")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(recipe)])
    assert "save_to_disk" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["empty file", "empty saved folder"])
def test_an_empty_dataset_is_named_in_one_line(tmp_path, tiny_lm_dir, capsys, kind):
    from datasets import Dataset

    if kind == "empty file":
        data = tmp_path / "empty.jsonl"
        data.write_text("")
    else:
        data = tmp_path / "empty_dataset"
        Dataset.from_dict({"prompt": []}).save_to_disk(str(data))
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, dataset_name=str(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(recipe)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{data} is empty" in err and "Traceback" not in err


def test_launch_command_on_cpu_uses_torchrun_and_deepspeed_json():
    cmd = launch_command(["--config", "r.yaml"], "zero2", 2, cuda=False)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert cmd[cmd.index("--deepspeed") + 1].endswith("vgf_llm/launch/deepspeed/zero2.json")
    assert Path(cmd[cmd.index("--deepspeed") + 1]).exists()
    gpu = launch_command(["--config", "r.yaml"], "zero3", 8, cuda=True)
    assert "accelerate.commands.launch" in gpu and gpu[gpu.index("--config_file") + 1].endswith("zero3.yaml")


def _run_two_processes(tmp_path, tiny_lm_dir, accelerate_config: str, command: list[str] | None = None,
                       extra: tuple[str, ...] = ()) -> dict:
    """``vgf-llm train --accelerate_config NAME --num_processes 2`` (or ``command`` + the recipe, then ``extra``
    options) on the tiny model."""
    recipe = tiny_recipe(tmp_path, tiny_lm_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    command = command or [sys.executable, "-m", "vgf_llm.cli", "train", "--accelerate_config", accelerate_config,
                          "--num_processes", "2"]
    proc = subprocess.Popen([*command, "--config", str(recipe), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:  # a hang (e.g. mismatched collectives): kill torchrun and its workers
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("the two-process run hung for 10 minutes:\n" + out[-5000:])
    assert proc.returncode == 0, out[-6000:]
    return json.loads((tmp_path / "out" / "eval_results.json").read_text())


def test_two_process_ddp(tmp_path, tiny_lm_dir):
    """DDP: every process fits the prefix value on every process's rollouts (gathered), and trains."""
    summary = _run_two_processes(tmp_path, tiny_lm_dir, "multi_gpu")
    assert summary["world_size"] == 2 and summary["prompts_per_step"] == 4
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert any(math.isfinite(h.get("value/cv_corr", math.nan)) for h in history)


def test_two_process_deepspeed_zero2(tmp_path, tiny_lm_dir):
    pytest.importorskip("deepspeed")
    summary = _run_two_processes(tmp_path, tiny_lm_dir, "zero2")
    assert summary["world_size"] == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_two_process_deepspeed_zero3(tmp_path, tiny_lm_dir):
    """ZeRO-3 shards the base weights: rollouts, the prefix-value fit and the transport run inside a gather.

    The command is the one ``--accelerate_config zero3`` runs on CPU, with the recipe's ZeRO-3 config changed only
    so that DeepSpeed keeps no small parameter whole between uses (it would keep all of the tiny model's), so every
    step starts from shards; a decoder reading the embedding table outside a gather fails the run."""
    pytest.importorskip("deepspeed")
    ds_config = json.loads((ROOT / "recipes" / "deepspeed" / "zero3.json").read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds_config))
    command = launch_command([], "zero3", 2, cuda=False)
    command[command.index("--deepspeed") + 1] = str(tmp_path / "zero3.json")
    summary = _run_two_processes(tmp_path, tiny_lm_dir, "zero3", command=command)
    assert summary["world_size"] == 2 and math.isfinite(summary["trained_reward"])
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    steps = [h for h in history if "transport/tokens_changed" in h]
    assert len(steps) == 2 and all(math.isfinite(h["value/cv_corr"]) for h in steps)
    adapter = tmp_path / "out" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    weights = load_file(str(adapter))
    assert weights and all(t.numel() > 0 for t in weights.values())  # whole LoRA matrices, not empty shards
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # the policy adapter trained
    buffer = torch.load(tmp_path / "out" / "checkpoint-2" / "vgf_state.pt", weights_only=False)["value_buffer"]
    assert len(buffer) == 2 and all(targets.shape == (4, 4) for _, targets in buffer)  # 2 x 2 prompts gathered
    # resume from the step-2 checkpoint (DeepSpeed's own states + the prefix value's buffer) and go on to step 4
    first_save = (tmp_path / "out" / "checkpoint-2" / "vgf_state.pt").stat().st_mtime_ns
    _run_two_processes(tmp_path, tiny_lm_dir, "zero3", command=command,
                       extra=("--max_steps", "4", "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-2")))
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    # steps 1-2 come back with the checkpoint's trainer state (not re-run: checkpoint-2 is not written again)
    assert [h["step"] for h in history if "transport/tokens_changed" in h] == [1, 2, 3, 4]
    assert (tmp_path / "out" / "checkpoint-2" / "vgf_state.pt").stat().st_mtime_ns == first_save
    resumed = torch.load(tmp_path / "out" / "checkpoint-4" / "vgf_state.pt", weights_only=False)["value_buffer"]
    assert len(resumed) == 4 and torch.equal(resumed[1][1], buffer[1][1])  # the restored buffer, then steps 3-4


def test_two_process_zero3_with_a_reward_model_gradient_checkpointing_and_uneven_evaluation(tmp_path, tiny_lm_dir,
                                                                                             tiny_reward_model_dir):
    """ZeRO-3 shards a reward-model folder too (TRL's prepare_deepspeed): each of its forwards is a collective, so
    every process scores every particle again after the transport, and evaluate() splits 3 held-out rows into equal
    padded shards; gradient checkpointing (reentrant under ZeRO-3, as TRL) still trains the adapter."""
    pytest.importorskip("deepspeed")
    command = launch_command([], "zero3", 2, cuda=False)
    _run_two_processes(tmp_path, tiny_lm_dir, "zero3", command=command, extra=(
        "--reward_funcs", str(tiny_reward_model_dir), "--eval_size", "3", "--eval_strategy", "steps", "--eval_steps",
        "1", "--gradient_checkpointing", "true", "--compare_base", "false"))
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_reward" in h] == [1, 2]
    assert all(math.isfinite(h["eval_reward"]) for h in history if "eval_reward" in h)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)


@pytest.mark.slow
def test_quickstart_recipe_on_smollm2(tmp_path, smollm2_dir):
    """The README's main job, shrunk to two steps: real SmolLM2, real chain_sum checker, base vs trained."""
    args = ["train", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "2", "--train_size", "8", "--eval_size", "4", "--per_device_train_batch_size", "2",
            "--num_generations", "4", "--max_completion_length", "16", "--disable_tqdm", "true"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert 0.0 <= summary["base_reward"] <= 1.0 and 0.0 <= summary["trained_reward"] <= 1.0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "training_curves.png").exists()


def test_a_local_file_is_split_so_the_held_out_rows_are_never_trained_on(tmp_path, tiny_lm_dir):
    from vgf_llm.recipe import RecipeArguments, load_datasets

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Write about item {i}."}) for i in range(12)))
    train, held, what = load_datasets(RecipeArguments(dataset_name=str(data), train_size=100, eval_size=4), seed=0)
    assert [r["prompt"] for r in held] == [f"Write about item {i}." for i in range(8, 12)]
    assert len(train) == 8 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert "last 4 rows" in what and "not trained on" in what
    with pytest.raises(ValueError, match="too few"):
        load_datasets(RecipeArguments(dataset_name=str(data), eval_size=12), seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_datasets(RecipeArguments(dataset_name=str(empty)), seed=0)


def test_eval_results_are_strict_json_when_no_reward_applies(tmp_path, tiny_lm_dir):
    """A reward that returns None for everything: the held-out means are NaN, written as null (bare NaN is not
    JSON)."""
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, max_steps=1, reward_funcs=["tests.test_train_cli:no_reward"])
    assert main(["train", "--config", str(recipe)]) == 0
    text = (tmp_path / "out" / "eval_results.json").read_text()
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in eval_results.json"))
    assert summary["base_reward"] is None and summary["trained_reward"] is None


def no_reward(prompts, completions, **kwargs):
    return [None] * len(completions)


def test_model_config_options_load_the_model_as_asked_or_are_refused(tmp_path, tiny_lm_dir, capsys):
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, max_steps=1, compare_base=False)
    assert main(["train", "--config", str(recipe), "--dtype", "bfloat16", "--attn_implementation", "eager"]) == 0
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["dtype"] == "bfloat16"
    for bad, message in ((["--load_in_4bit", "true"], "not supported"), (["--use_peft", "false"], "LoRA"),
                         (["--lora_task_type", "SEQ_CLS"], "CAUSAL_LM")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--config", str(recipe), *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, bad


def test_lora_options_reach_the_adapter_with_the_default_target_modules():
    from vgf_llm.recipe import VGFModelConfig, model_init_kwargs, peft_config_from
    from vgf_llm.trainer import default_lora_config

    cfg = peft_config_from(VGFModelConfig(lora_r=4, use_rslora=True, use_dora=True, lora_modules_to_save=["score"]))
    assert (cfg.r, cfg.use_rslora, cfg.use_dora, cfg.modules_to_save) == (4, True, True, ["score"])
    assert set(cfg.target_modules) == set(default_lora_config().target_modules)
    assert peft_config_from(VGFModelConfig(lora_target_modules=["q_proj"])).target_modules in ("q_proj", {"q_proj"})
    kwargs = model_init_kwargs(VGFModelConfig(dtype="bfloat16", model_revision="v2", attn_implementation="sdpa"))
    assert kwargs == {"dtype": "bfloat16", "revision": "v2", "attn_implementation": "sdpa"}


def raises_key_error(prompts, completions, **kwargs):
    raise KeyError("answer")


def returns_a_scalar(prompts, completions, **kwargs):
    return 1.0


def returns_strings(prompts, completions, **kwargs):
    return ["good"] * len(completions)


def returns_nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def returns_one_too_few(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def never_applies(prompts, completions, **kwargs):
    return [None] * len(completions)


@pytest.mark.parametrize("reward, message", [
    ("raises_key_error", "reward function 'raises_key_error' raised KeyError"),
    ("returns_a_scalar", "expected a list with one float"),
    ("returns_strings", "returned 'good' at index 0; expected a float or None"),
    ("returns_nan", "return None (not NaN)"),
    ("returns_one_too_few", "returned 3 rewards for 4 completions"),  # first met in the base comparison
    ("never_applies", "no reward function scored any completion in 3 micro-batches in a row"),
])
def test_a_bad_reward_function_ends_in_one_clear_line(tmp_path, tiny_lm_dir, capsys, reward, message):
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, max_steps=4, reward_funcs=[f"tests.test_train_cli:{reward}"])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(recipe)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_one_run_per_output_dir(tmp_path, tiny_lm_dir, capsys):
    from filelock import FileLock

    recipe = tiny_recipe(tmp_path, tiny_lm_dir, max_steps=1, compare_base=False)
    assert main(["train", "--config", str(recipe)]) == 0
    with pytest.raises(SystemExit) as exit_info:  # a second run would overwrite the first one's results
        main(["train", "--config", str(recipe)])
    assert exit_info.value.code == 2 and "--overwrite_output_dir true" in capsys.readouterr().err
    with FileLock(str(tmp_path / "out" / ".vgf_llm.lock")):  # another run is writing there right now
        with pytest.raises(SystemExit):
            main(["train", "--config", str(recipe), "--overwrite_output_dir", "true"])
        assert "another vgf-llm run is writing" in capsys.readouterr().err
    assert main(["train", "--config", str(recipe), "--overwrite_output_dir", "true"]) == 0


def test_an_output_dir_that_cannot_be_written_is_named_in_one_line(tmp_path, tiny_lm_dir, capsys):
    """A file where a folder of output_dir should be (the OS refuses it even to root, unlike a read-only mode)."""
    (tmp_path / "a_file").write_text("not a folder")
    recipe = tiny_recipe(tmp_path, tiny_lm_dir, max_steps=1, compare_base=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(recipe), "--output_dir", str(tmp_path / "a_file" / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot write to output_dir" in err and "a_file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("tracker", ["trackio", "tensorboard"])
def test_report_to_a_local_tracker_records_the_vgf_metrics(tmp_path, tiny_lm_dir, tracker):
    """TRL's recommended tracker (trackio, local-first) and TensorBoard, offline, from a fresh process."""
    import glob
    import sqlite3

    recipe = tiny_recipe(tmp_path, tiny_lm_dir, max_steps=2, compare_base=False, report_to=tracker,
                         project="vgf-test")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRACKIO_DIR": str(tmp_path / "trackio")}
    subprocess.run([sys.executable, "-m", "vgf_llm.cli", "train", "--config", str(recipe)], check=True, env=env,
                   capture_output=True, timeout=300)
    if tracker == "trackio":
        rows = sqlite3.connect(tmp_path / "trackio" / "vgf-test.db").execute("select metrics from metrics").fetchall()
        keys = set().union(*(json.loads(r[0]) for r in rows))
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(glob.glob(str(tmp_path / "out" / "runs" / "*"))[0])
        events.Reload()
        keys = set(events.Tags()["scalars"])
    for metric in ("train/loss", "train/reward", "train/kl", "train/transport/reward_after", "train/value/cv_corr"):
        assert metric in keys, (tracker, metric, sorted(keys))


def test_the_wheel_ships_the_launch_configs_and_the_plotting_dependency(tmp_path):
    """`--accelerate_config zero2` and the default `plot: true` work from a plain `pip install vgf-llm`."""
    import zipfile
    from email.parser import Parser

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("vgf_llm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = Parser().parsestr(archive.read(next(n for n in names if n.endswith("METADATA"))).decode())
    for name in ("multi_gpu.yaml", "zero2.yaml", "zero3.yaml"):
        assert f"vgf_llm/launch/accelerate/{name}" in names
    assert {"vgf_llm/launch/deepspeed/zero2.json", "vgf_llm/launch/deepspeed/zero3.json"} <= names
    required = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert any(r.startswith("matplotlib") for r in required)
