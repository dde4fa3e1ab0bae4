"""The GPU path of training, proven on the CPU (issue 26, the trainer/model side): placement left to DeepSpeed
under ZeRO-3, float32 adapters over a bfloat16 base, bf16 autocast around the step's own model passes, gradient
checkpointing with PEFT, reward models prepared by the accelerator, uneven evaluation shards, and the GSM8K recipe."""

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

from vgf_llm.config import VGFConfig
from vgf_llm.trainer import POLICY, VGFTrainer

ROOT = Path(__file__).resolve().parents[1]


def length_reward(prompts, completions, **kwargs):
    return [len(c if isinstance(c, str) else c[0]["content"]) / 20.0 for c in completions]


def make_trainer(model, dataset, tmp_path, reward=length_reward, **overrides) -> VGFTrainer:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, num_generations=4,
                  max_completion_length=6, transport_steps=1, transport_step_size=1.0, steer_layer=1,
                  save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-2, disable_tqdm=True, report_to="none")
    values.update(overrides)
    return VGFTrainer(model if isinstance(model, torch.nn.Module) else str(model), reward,
                      args=VGFConfig(**values), train_dataset=dataset)


def policy_lora(tr: VGFTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tr.model.named_parameters() if f".{POLICY}." in n and "lora_" in n}


def test_load_model_under_zero3_leaves_placement_to_deepspeed(tiny_lm_dir, monkeypatch):
    """ZeRO-3 partitions the weights at load (``zero.Init``); a ``.to(device)`` of the placeholders would make every
    later gather land on that device, so under ZeRO-3 ``load_model`` moves nothing (the Trainer/DeepSpeed place it)."""
    import transformers.integrations.deepspeed as hf_deepspeed
    from transformers import PreTrainedModel

    from vgf_llm.models import load_model

    moves = []
    to = PreTrainedModel.to
    monkeypatch.setattr(PreTrainedModel, "to", lambda self, *a, **k: moves.append((a, k)) or to(self, *a, **k))
    load_model(tiny_lm_dir, device="cpu")
    assert moves, "outside ZeRO-3 the model goes to the device asked for"
    moves.clear()
    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    load_model(tiny_lm_dir, device="cpu")
    assert moves == []


def test_a_bf16_base_trains_float32_adapters(tiny_lm_dir, standard_prompts, tmp_path):
    """AdamW on bf16 LoRA weights rounds small updates away: over a bf16 base every trainable parameter is float32
    (PEFT's ``autocast_adapter_dtype``), the base stays bf16 and frozen, and a step moves the adapter."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.bfloat16)
    tr = make_trainer(base, standard_prompts, tmp_path, bf16=True)
    trainable = {n: p.dtype for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    assert {p.dtype for p in tr.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    before = policy_lora(tr)
    tr.train()
    after = policy_lora(tr)
    assert any(not torch.equal(after[n], before[n]) for n in before if "lora_B" in n)


def test_the_steps_own_model_passes_run_under_bf16_autocast(tiny_lm_dir, standard_prompts, tmp_path):
    """``model.forward`` gets accelerate's autocast from the Trainer; the step's own passes (rollouts, prefix states,
    the steering regeneration, the reference log-probabilities) call the decoder directly and run under the same
    autocast when the run is bf16: a linear inside them computes in bfloat16."""
    tr = make_trainer(tiny_lm_dir, standard_prompts, tmp_path, bf16=True)
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    seen = []
    proj = tr.model.get_decoder().layers[0].mlp.down_proj
    handle = proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        tr.step_targets([dict(r) for r in standard_prompts.select(range(2))])
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert tr._metrics["transport/tokens_changed"]  # the steering regeneration ran (and under autocast)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_trains_the_policy_adapter(tiny_lm_dir, standard_prompts, tmp_path, use_reentrant):
    """With gradient checkpointing (either checkpoint implementation) the frozen embeddings still pass a gradient to
    the adapter (``enable_input_require_grads``), so a step moves it."""
    tr = make_trainer(tiny_lm_dir, standard_prompts, tmp_path, gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    before = policy_lora(tr)
    tr.train()
    assert tr.model.is_gradient_checkpointing
    after = policy_lora(tr)
    assert any(not torch.equal(after[n], before[n]) for n in before if "lora_B" in n)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_the_zero3_gather_turns_checkpointing_back_on_with_the_runs_kwargs(tiny_lm_dir, standard_prompts, tmp_path,
                                                                           monkeypatch, use_reentrant):
    """Under ZeRO-3 the step's gather (TRL's ``unwrap_model_for_generation``) turns checkpointing off for generation
    and back on afterwards: with the run's kwargs, not transformers' defaults."""
    import vgf_llm.trainer as trainer_module

    tr = make_trainer(tiny_lm_dir, standard_prompts, tmp_path, gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    tr.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=tr.args.gradient_checkpointing_kwargs)
    calls = []
    enable = tr.model.gradient_checkpointing_enable
    monkeypatch.setattr(tr.model, "gradient_checkpointing_enable", lambda **kw: calls.append(kw) or enable(**kw))
    monkeypatch.setattr(trainer_module, "is_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setattr(tr, "deepspeed", tr.model, raising=False)  # as once the engine exists
    with tr.gathered_model():
        assert not tr.model.is_gradient_checkpointing  # off for generation
    assert tr.model.is_gradient_checkpointing
    assert [kw["gradient_checkpointing_kwargs"] for kw in calls] == [{"use_reentrant": use_reentrant}]


def test_checkpointing_kwargs_follow_trl(monkeypatch):
    """Non-reentrant unless asked; reentrant under ZeRO-3, where LoRA needs it (TRL forces it there too)."""
    import vgf_llm.trainer as trainer_module

    assert trainer_module.checkpointing_kwargs(None) == {"use_reentrant": False}
    assert trainer_module.checkpointing_kwargs({"use_reentrant": True}) == {"use_reentrant": True}
    monkeypatch.setattr(trainer_module, "is_deepspeed_zero3_enabled", lambda: True)
    assert trainer_module.checkpointing_kwargs(None) == {"use_reentrant": True}
    assert trainer_module.checkpointing_kwargs({"use_reentrant": False, "offload": True}) == \
        {"use_reentrant": True, "offload": True}


def test_a_reward_model_given_as_a_path_is_prepared_on_the_accelerator(tiny_lm_dir, tiny_reward_model_dir,
                                                                      standard_prompts, tmp_path, monkeypatch):
    """A reward-model folder is placed on ``accelerator.device`` and runs under the run's autocast (accelerate's
    ``prepare_model``), its inputs on the same device; under DeepSpeed it goes to TRL's ``prepare_deepspeed``."""
    from transformers import BatchEncoding

    from vgf_llm.rewards import RewardModelReward

    tr = make_trainer(tiny_lm_dir, standard_prompts, tmp_path, reward=str(tiny_reward_model_dir), bf16=True)
    (func,) = tr.reward_funcs
    assert isinstance(func, RewardModelReward)
    device = tr.accelerator.device
    assert {p.device for p in func.model.parameters()} == {device}
    moved, dtypes = [], []
    to = BatchEncoding.to
    monkeypatch.setattr(BatchEncoding, "to", lambda self, d, **kw: moved.append(torch.device(d)) or to(self, d, **kw))
    handle = func.model.score.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    try:
        scores = func(["a chair", "a river"], [" stands.", " flows."])  # outside any autocast of the step
    finally:
        handle.remove()
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    assert moved and set(moved) == {device} and dtypes == [torch.bfloat16]

    import trl.models

    prepared = []
    monkeypatch.setattr(trl.models, "prepare_deepspeed", lambda model, acc: prepared.append((model, acc)) or model)
    monkeypatch.setattr(tr, "is_deepspeed_enabled", True)
    model = func.model
    tr._prepare_reward_models()
    assert prepared == [(model, tr.accelerator)]


def test_a_zero3_reward_model_scores_every_row_on_every_process(tiny_lm_dir, tiny_reward_model_dir,
                                                               standard_prompts, tmp_path, monkeypatch):
    """Each forward of a ZeRO-3 reward model is a collective, so the re-scoring after the transport cannot skip the
    particles that did not change on one process only: every process scores all its rows."""
    import vgf_llm.trainer as trainer_module

    tr = make_trainer(tiny_lm_dir, standard_prompts, tmp_path, reward=str(tiny_reward_model_dir))
    (func,) = tr.reward_funcs
    sizes = []
    call = type(func).__call__
    monkeypatch.setattr(type(func), "__call__", lambda self, prompts, completions, **kw:
                        sizes.append(len(completions)) or call(self, prompts, completions, **kw))
    monkeypatch.setattr(trainer_module, "is_deepspeed_zero3_enabled", lambda: True)
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    tr.step_targets([dict(r) for r in standard_prompts.select(range(2))])
    assert sizes == [8, 8]  # the rollouts, then every particle again (not only the changed ones)


EVALUATE_ON_TWO_PROCESSES = """
import json, sys
import datasets
from vgf_llm.config import VGFConfig
from vgf_llm.trainer import VGFTrainer

def value(prompts, completions, value, **kwargs):
    return value

model_dir, out = sys.argv[1], sys.argv[2]
held_out = datasets.Dataset.from_dict({"prompt": ["a chair", "a river", "a road"], "value": [1.0, 2.0, 6.0]})
args = VGFConfig(output_dir=out, use_cpu=True, ddp_backend="gloo", num_generations=2, max_completion_length=4,
                 transport_steps=0, report_to="none", disable_tqdm=True)
trainer = VGFTrainer(model_dir, value, args=args, eval_dataset=held_out)
metrics = trainer.evaluate()
with open(f"{out}/rank{trainer.accelerator.process_index}.json", "w") as f:
    json.dump(metrics, f)
"""


def test_evaluate_on_two_processes_gathers_every_row_of_a_set_that_does_not_divide(tiny_lm_dir, tmp_path):
    """3 held-out rows on 2 processes: shards of 2 and 1 rows (padded to 2 and 2), gathered as objects, so every
    process reports the mean of exactly the 3 rewards (1, 2, 6), not a collective over tensors of unequal size."""
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE_ON_TWO_PROCESSES)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + os.getpid() % 1000 + 7))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                             str(tiny_lm_dir), str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a collective over unequal tensors can hang: kill torchrun and its workers
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("evaluate() on two processes hung:\n" + out[-3000:])
    assert proc.returncode == 0, out[-4000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["eval_reward"] == pytest.approx(3.0)


def fake_gsm8k(folder: Path) -> None:
    """A 3-row stand-in for ``load_dataset('openai/gsm8k', 'main').save_to_disk(folder)``: its splits and columns."""
    import datasets

    rows = {"question": ["Tom has 3 apples and buys 4 more. How many apples does he have?",
                         "A box holds 6 eggs. How many eggs are in 2 boxes?",
                         "Sara had 10 pens and gave away 4. How many pens are left?"],
            "answer": ["3 + 4 = 7\n#### 7", "6 * 2 = 12\n#### 12", "10 - 4 = 6\n#### 6"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))


def test_the_gsm8k_recipe_starts_from_the_folder_its_comment_saves(tiny_lm_dir, tmp_path, monkeypatch):
    """recipes/gsm8k_qwen.yaml as shipped (bf16 weights, bf16 autocast, sdpa, gradient checkpointing), with only what
    a CPU and a 3-row GSM8K need overridden and the tiny model for Qwen: the gsm8k task reads GSM8K's ``question``
    from ``data/gsm8k`` (the folder the recipe's comment saves) and one step trains."""
    from vgf_llm.cli.common import parse
    from vgf_llm.config import VGFConfig
    from vgf_llm.recipe import RecipeArguments, VGFModelConfig, load_datasets, run

    recipe_file = ROOT / "recipes" / "gsm8k_qwen.yaml"
    assert "save_to_disk('data/gsm8k')" in recipe_file.read_text()
    monkeypatch.chdir(tmp_path)
    fake_gsm8k(tmp_path / "data" / "gsm8k")
    recipe, args, model_args = parse((RecipeArguments, VGFConfig, VGFModelConfig), [
        "--config", str(recipe_file), "--use_cpu", "true", "--tf32", "false", "--use_vllm", "false",
        "--model_name_or_path", str(tiny_lm_dir), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--num_generations", "2",
        "--generation_batch_size", "4", "--max_completion_length", "6", "--report_to", "none", "--plot", "false",
        "--disable_tqdm", "true"], "test", "")
    assert (args.bf16, args.gradient_checkpointing, model_args.dtype, model_args.attn_implementation) == \
        (True, True, "bfloat16", "sdpa")
    train, held_out, _ = load_datasets(recipe, args.seed)
    assert len(train) == len(held_out) == 3
    assert train[0]["prompt"][-1]["content"].startswith("Tom has 3 apples") and train[0]["answer"].endswith("#### 7")
    summary = run(recipe, args, model_args)
    assert summary["dtype"] == "bfloat16" and summary["held_out_prompts"] == 3
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
