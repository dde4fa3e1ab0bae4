"""VGFTrainer on tiny local models: what one step changes, what it logs, data forms, rewards, resume, the Hub."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from vgf_llm.config import VGFConfig
from vgf_llm.distill import distill_weights
from vgf_llm.trainer import POLICY, VGFTrainer

STEP_METRICS = ["reward", "reward_std", "frac_reward_zero_std", "transport/reward_before", "transport/reward_after",
                "transport/tokens_changed", "transport/displacement", "value/cv_corr", "value/corr", "kl",
                "completions/mean_length", "loss"]


def length_reward(prompts, completions, **kwargs):
    """A learnable reward: longer completions score higher (tiny random models emit varied lengths)."""
    return [len(c if isinstance(c, str) else c[0]["content"]) / 20.0 for c in completions]


def config(tmp_path, **overrides) -> VGFConfig:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, num_generations=4,
                  max_completion_length=6, transport_steps=1, transport_step_size=1.0, steer_layer=1,
                  save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-2, disable_tqdm=True)
    values.update(overrides)
    return VGFConfig(**values)


def trainer(tiny_lm_dir, dataset, tmp_path, reward=length_reward, **overrides) -> VGFTrainer:
    return VGFTrainer(str(tiny_lm_dir), reward, args=config(tmp_path, **overrides), train_dataset=dataset)


def logged(tr: VGFTrainer) -> dict:
    """The union of the per-step logs (the last one is the train summary)."""
    out = {}
    for entry in tr.state.log_history:
        out.update(entry)
    return out


def test_per_step_steering_fits_its_prefix_value_to_the_true_rewards(tiny_lm_dir, standard_prompts, tmp_path,
                                                                      monkeypatch):
    """Each step the trainer makes the explicit fit call with the true rewards of its rollouts; the space refits
    its prefix value by ridge on its buffer (cross-validated by prompt), and the particles move."""
    from vgf_llm.spaces import PrefixSteering

    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, max_steps=3, value_buffer_steps=2)
    seen = []
    fit = PrefixSteering.fit
    monkeypatch.setattr(PrefixSteering, "fit", lambda self, ro, targets, **kw: seen.append(targets.clone())
                        or fit(self, ro, targets, **kw))
    rewards = []
    reward_of = tr.reward_funcs[0]
    tr.reward_funcs[0] = lambda prompts, completions, **kw: rewards.append(reward_of(prompts, completions)) \
        or rewards[-1]
    tr.train()
    log = logged(tr)
    assert len(seen) == 3 and all(t.shape == (2, 4) for t in seen)
    originals = [r for r in rewards if len(r) == 8]  # the rollouts' rewards (re-scores of moved ones are fewer)
    assert all(torch.equal(t.reshape(-1), torch.tensor(r)) for t, r in zip(seen, originals, strict=False))
    assert len(tr.space.buffer) == 2 and tr.space.value is not None and math.isfinite(log["value/cv_corr"])
    assert -1 <= log["value/corr"] <= 1  # step 2's fresh rollouts, scored by step 1's prefix value
    assert log["transport/displacement"] > 0 and log["transport/tokens_changed"] > 0


def test_training_changes_only_the_policy_adapter_and_logs_finite_metrics(tiny_lm_dir, standard_prompts, tmp_path):
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    policy = {n for n in before if f"lora_A.{POLICY}." in n or f"lora_B.{POLICY}." in n}
    assert policy and policy <= changed  # every policy LoRA matrix moved (B from zero, A after B did)
    assert all("lora_" in n for n in changed), "base weights must never change"
    log = logged(tr)
    for key in STEP_METRICS + ["train_loss"]:
        assert key in log and math.isfinite(log[key]), key
    assert log["transport/displacement"] > 0


def test_extra_columns_and_trainer_state_reach_the_reward(tiny_lm_dir, standard_prompts, tmp_path):
    seen = []

    def reward(prompts, completions, answer, trainer_state, **kwargs):
        seen.append((list(prompts), list(answer), trainer_state.global_step))
        return [1.0 if a else 0.0 for a in answer]

    trainer(tiny_lm_dir, standard_prompts, tmp_path, reward=reward, max_steps=1).train()
    rows = dict(zip(standard_prompts["prompt"], standard_prompts["answer"], strict=True))
    prompts, answers, step = seen[0]
    assert answers == [rows[p] for p in prompts] and step == 0


def test_none_rewards_are_skipped(tiny_lm_dir, standard_prompts, tmp_path):
    def maths_only(prompts, completions, answer, **kwargs):  # not applicable to the open-ended prompts
        return [float(len(c)) if a else None for c, a in zip(completions, answer, strict=True)]

    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, reward=maths_only, max_steps=2)
    tr.train()
    assert all(math.isfinite(v) for e in tr.state.log_history for k, v in e.items() if k in ("loss", "reward"))


def test_rewards_that_never_apply_stop_training_instead_of_training_nothing(tiny_lm_dir, standard_prompts, tmp_path):
    def never(prompts, completions, **kwargs):
        return [None] * len(completions)

    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, reward=never, max_steps=4, max_unrewarded_batches=1)
    with pytest.raises(ValueError, match=r"at step 1: no reward function scored any completion in 2 micro-batches"):
        tr.train()


def test_conversational_prompts_and_a_reward_model(tiny_lm_dir, tiny_reward_model_dir, conversational_prompts,
                                                    tmp_path):
    tr = VGFTrainer(str(tiny_lm_dir), [length_reward, str(tiny_reward_model_dir)], train_dataset=conversational_prompts,
                    args=config(tmp_path, max_steps=1, reward_weights=[1.0, 0.5]))
    tr.train()
    log = logged(tr)
    assert "rewards/length_reward/mean" in log and f"rewards/{tiny_reward_model_dir.name}/mean" in log


def test_budget_zero_distils_best_of_n_without_moving(tiny_lm_dir, standard_prompts, tmp_path):
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, max_steps=1, transport_steps=0)
    tr.train()
    log = logged(tr)
    assert log["transport/tokens_changed"] == 0 and log["transport/reward_after"] == log["transport/reward_before"]
    assert "value/cv_corr" not in log and "timing/value_fit" not in log  # no value to fit without transport
    assert tr.space is None


def test_saved_adapter_loads_with_peft_and_reproduces_the_policy(tiny_lm_dir, standard_prompts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path)
    tr.train()
    tr.save_model()
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    assert not (out / "model.safetensors").exists()  # adapter only, never the base weights
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), out).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    tr.model.eval()
    with torch.no_grad():
        expected = tr.model(input_ids=ids).logits  # the policy adapter is the active one after training
        base = loaded.get_base_model()
        with loaded.disable_adapter():
            reference = base(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
    assert not torch.allclose(reference, expected, atol=1e-4)  # the adapter does something


@pytest.mark.parametrize("space", [{},  # the resumed run refits the prefix value on the restored buffer
                                   dict(transport_steps=0)])
def test_two_plus_two_steps_with_resume_equal_four_steps(tiny_lm_dir, standard_prompts, tmp_path, space):
    import shutil

    from safetensors.torch import load_file

    straight = trainer(tiny_lm_dir, standard_prompts, tmp_path / "a", max_steps=4, save_strategy="steps",
                       save_steps=2, **space)
    straight.train()
    # an interrupted run: only its first checkpoint exists
    shutil.copytree(tmp_path / "a" / "out" / "checkpoint-2", tmp_path / "b" / "out" / "checkpoint-2")
    resumed = trainer(tiny_lm_dir, standard_prompts, tmp_path / "b", max_steps=4, save_strategy="steps",
                      save_steps=2, **space)
    resumed.train(resume_from_checkpoint=True)
    a = load_file(str(tmp_path / "a" / "out" / "checkpoint-4" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "checkpoint-4" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    if straight.space is not None:
        torch.testing.assert_close(straight.space.value.weight, resumed.space.value.weight)


def test_a_save_cut_off_midway_keeps_the_last_good_checkpoint_and_is_never_resumed(
        tiny_lm_dir, standard_prompts, tmp_path, monkeypatch, caplog):
    from vgf_llm.trainer import CHECKPOINT_COMPLETE, last_complete_checkpoint

    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, **kw)
    saves = []
    save = torch.save

    def save_then_die(obj, path, *args, **kwargs):  # the buffer's save of checkpoint-4 is "killed"
        if str(path).endswith("vgf_state.pt.partial"):
            saves.append(path)
            if len(saves) == 2:
                raise KeyboardInterrupt("killed while saving")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    out = tmp_path / "out"
    # rotation waits for the new checkpoint to be complete: the last good one survives the kill
    assert (out / "checkpoint-2" / CHECKPOINT_COMPLETE).is_file()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / CHECKPOINT_COMPLETE).exists()
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert "checkpoint-4" in caplog.text and "incomplete" in caplog.text
    resumed = trainer(tiny_lm_dir, standard_prompts, tmp_path, **kw)
    with pytest.raises(ValueError, match="incomplete"):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    resumed.train(resume_from_checkpoint=True)  # from checkpoint-2, to step 4; then checkpoint-2 is rotated out
    assert (out / "checkpoint-4" / CHECKPOINT_COMPLETE).is_file() and not (out / "checkpoint-2").exists()
    assert resumed.state.global_step == 4


def test_push_uploads_the_adapter_and_card_only(tiny_lm_dir, standard_prompts, tmp_path, monkeypatch):
    import huggingface_hub

    uploads = []

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(os.listdir(folder_path)), (tmp_path / "card.md").write_text(
            open(os.path.join(folder_path, "README.md")).read())))
        return "https://huggingface.co/fake/commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: repo_id)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, max_steps=1, push_to_hub=True, hub_model_id="me/vgf-tiny")
    tr.train()
    tr.push_to_hub()
    repo, files, _ = uploads[-1]
    assert repo == "me/vgf-tiny"
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (tmp_path / "card.md").read_text()
    for needle in ("vgf-llm", "- vgf", "base_model:", "length_reward", "arXiv:2604.14265", "1 steps x step size"):
        assert needle in card, needle


def test_evaluate_scores_greedy_completions(tiny_lm_dir, standard_prompts, tmp_path):
    tr = VGFTrainer(str(tiny_lm_dir), length_reward, args=config(tmp_path), train_dataset=standard_prompts,
                    eval_dataset=standard_prompts)
    metrics = tr.evaluate()
    assert set(metrics) == {"eval_reward"} and metrics["eval_reward"] > 0


def test_distill_weights_sum_to_one_and_skip_missing():
    rewards = torch.tensor([[0.0, 1.0, float("nan"), 0.5], [2.0, 2.0, 1.0, float("nan")]])
    w = distill_weights(rewards, temperature=0.1)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    assert (w[:, 2][0] == 0) and (w[1, 3] == 0)  # None rewards are never targets
    assert int(w[0].argmax()) == 1  # the best response gets the most weight


# -- bad inputs -------------------------------------------------------------------------------------------------
def test_dataset_without_prompt_column(tiny_lm_dir, tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        trainer(tiny_lm_dir, Dataset.from_dict({"question": ["What is 1 + 1?"]}), tmp_path)


def test_empty_dataset(tiny_lm_dir, tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="is empty"):
        trainer(tiny_lm_dir, Dataset.from_dict({"prompt": []}), tmp_path)


def test_reward_function_that_raises(tiny_lm_dir, standard_prompts, tmp_path):
    def broken(prompts, completions, **kwargs):
        raise KeyError("score")

    from vgf_llm.rewards import RewardFunctionError

    with pytest.raises(RewardFunctionError, match="at step 0: reward function 'broken' raised KeyError: 'score'"):
        trainer(tiny_lm_dir, standard_prompts, tmp_path, reward=broken).train()


def test_nan_rewards(tiny_lm_dir, standard_prompts, tmp_path):
    def nan_reward(prompts, completions, **kwargs):
        return [float("nan")] * len(completions)

    with pytest.raises(ValueError, match="at step 0: .*return None"):
        trainer(tiny_lm_dir, standard_prompts, tmp_path, reward=nan_reward).train()


def test_non_finite_transport_is_skipped_and_logged(tiny_lm_dir, standard_prompts, tmp_path, monkeypatch):
    import vgf_llm.flow as flow

    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, max_steps=1)
    transport = flow.transport

    def poisoned(particles, grad_fn=None, **kwargs):  # every gradient the prefix value gives is NaN
        return transport(particles, grad_fn=lambda z: (None, torch.full_like(z, float("nan"))), **kwargs)

    monkeypatch.setattr("vgf_llm.spaces.prefix_steering.transport", poisoned)
    tr.train()
    log = logged(tr)
    # the poisoned gradients are zeroed and counted; only SVGD's repulsion is left to move the states
    assert log["transport/nonfinite"] > 0 and math.isfinite(log["loss"])
    assert math.isfinite(log["transport/displacement"]) and math.isfinite(log["transport/reward_after"])


def _one_batch(tr: VGFTrainer, rows: list[dict]) -> dict:
    """The distillation batch of one micro-step (rollouts, transport, re-scoring), as ``training_step`` gets it."""
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    return tr._prepare_inputs(rows)


def _adam_steps(tr: VGFTrainer, batch: dict, steps: int, lr: float = 5e-2) -> None:
    """A few Adam steps of the trainer's own loss on one fixed distillation batch."""
    opt = torch.optim.Adam([p for p in tr.model.parameters() if p.requires_grad], lr=lr)
    tr.model.train()
    for _ in range(steps):
        opt.zero_grad()
        tr.compute_loss(tr.model, batch).backward()
        opt.step()


@pytest.mark.parametrize("bad", [dict(num_generations=1), dict(max_unrewarded_batches=-1),
                                 dict(max_completion_length=0),
                                 dict(transport_steps=-1), dict(transport_step_size=-1.0), dict(value_buffer_steps=0),
                                 dict(distill_temperature=0.0), dict(vllm_mode="remote"),
                                 dict(temperature=0.0)])
def test_config_rejects_bad_values(tmp_path, bad):
    with pytest.raises(ValueError):
        config(tmp_path, **bad)


def test_batch_semantics(tmp_path):
    args = config(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2)
    assert args.prompts_per_step == 6


def test_completion_logps_match_a_full_forward(tiny_lm):
    from vgf_llm.distill import completion_logps

    ids = torch.randint(5, 300, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = tiny_lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 5:-1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 6:, None]).squeeze(-1)
        torch.testing.assert_close(completion_logps(tiny_lm, ids, mask, 6), expected)


def test_chunked_distillation_gives_the_loss_and_gradients_of_one_full_projection(tiny_lm):
    """The vocabulary projection runs a few rows at a time (recomputed in backward): the same log-probabilities and
    gradients as one projection of every row, and no projection ever sees more rows than its chunk."""
    from vgf_llm.distill import completion_logps

    ids = torch.randint(5, 300, (7, 12))
    mask = torch.ones_like(ids)
    weights = torch.rand(7)
    head = tiny_lm.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[:2])))

    def loss_and_grads(chunk_rows):
        tiny_lm.zero_grad()
        seen.clear()
        loss = (weights * completion_logps(tiny_lm, ids, mask, 6, chunk_rows=chunk_rows).sum(-1)).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny_lm.named_parameters() if p.grad is not None}

    try:
        full_loss, full_grads = loss_and_grads(7)
        chunked_loss, chunked_grads = loss_and_grads(2)
    finally:
        handle.remove()
    torch.testing.assert_close(chunked_loss, full_loss)
    assert full_grads.keys() == chunked_grads.keys() and full_grads
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-4, atol=1e-6)
    projected = [rows for rows, positions in seen if positions > 1]  # the model's own call keeps 1 position
    assert max(projected) == 2 and len(projected) == 8  # 4 chunks, and their recomputation in backward


def test_async_trl_reward_functions_work_unchanged(tiny_lm_dir, standard_prompts, tmp_path):
    calls = []

    async def remote_judge(prompts, completions, **kwargs):  # e.g. an HTTP judge, as TRL allows
        calls.append(len(completions))
        return [0.1 * len(c) for c in completions]

    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, reward=[remote_judge, length_reward], max_steps=1)
    tr.train()
    assert calls and calls[0] == 2 * 4  # 2 prompts x 4 particles in the first call
    assert "rewards/remote_judge/mean" in logged(tr)


def test_trl_reward_functions_run_unchanged_with_trls_keywords(tiny_lm_dir, conversational_prompts, tmp_path,
                                                                capsys, monkeypatch):
    """trl.rewards' own functions (which need ``completion_ids``, ``solution`` and ``log_extra``) and a custom one
    using ``log_metric``, through VGFTrainer unchanged; log_completions prints TRL's completions table."""
    from trl.rewards import accuracy_reward, get_repetition_penalty_reward, get_soft_overlong_punishment

    seen = {}

    def logs_a_metric(prompts, completions, completion_ids, log_metric, trainer_state, **kwargs):
        seen["ids"] = completion_ids
        log_metric("custom/mean_tokens", sum(len(c) for c in completion_ids) / len(completion_ids))
        return [0.0] * len(completions)

    monkeypatch.setenv("COLUMNS", "400")  # rich sizes the completions table to the terminal
    data = conversational_prompts.map(lambda row: {"solution": row["answer"] or "1"})
    rewards = [get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=2),
               get_repetition_penalty_reward(ngram_size=2), accuracy_reward, logs_a_metric]
    tr = VGFTrainer(str(tiny_lm_dir), rewards, args=config(tmp_path, max_steps=1, log_completions=True),
                    train_dataset=data)
    tr.train()
    log = logged(tr)
    assert math.isfinite(log["train_loss"]) and "custom/mean_tokens" in log
    assert 0 < log["custom/mean_tokens"] <= 6
    assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in seen["ids"])
    for name in ("soft_overlong_punishment_reward", "repetition_penalty_reward"):
        assert any(k.startswith(f"rewards/{name}") for k in log), name
    out = capsys.readouterr().out
    assert "after transport" in out and "original" in out  # TRL's table, with the transport's before/after


def test_a_pushed_adapter_names_the_hub_id_of_its_base_and_loads_from_it(tiny_lm_dir, standard_prompts, tmp_path,
                                                                          monkeypatch):
    """A base converted from an alias records its Hub repository; the adapter's config names that id (not the local
    folder), and PEFT resolves the base from it (here from a Hugging Face cache folder, offline)."""
    import shutil

    from peft import AutoPeftModelForCausalLM

    from vgf_llm.models import MARKER_FILE

    base = tmp_path / "converted"
    shutil.copytree(tiny_lm_dir, base)
    (base / MARKER_FILE).write_text(json.dumps({"alias": "tiny", "hub_id": "vgf-test-org/tiny-base"}))
    tr = trainer(base, standard_prompts, tmp_path, max_steps=1)
    tr.train()
    tr.save_model()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "vgf-test-org/tiny-base" == tr.base_model_name
    # the Hub cache layout, offline: models--org--name/snapshots/<rev>/ and refs/main
    cache = tmp_path / "hub"
    snapshot = cache / "models--vgf-test-org--tiny-base" / "snapshots" / "0"
    shutil.copytree(tiny_lm_dir, snapshot)
    (cache / "models--vgf-test-org--tiny-base" / "refs").mkdir()
    (cache / "models--vgf-test-org--tiny-base" / "refs" / "main").write_text("0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"), cache_dir=str(cache))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, tr.model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_every_vllm_option_of_the_config_reaches_the_backend(tiny_lm_dir, standard_prompts, tmp_path, monkeypatch):
    import vgf_llm.trainer as trainer_module
    from vgf_llm.rollout.hf import HFGenerateBackend

    seen = {}

    def fake_backend(model, tokenizer, **kwargs):
        seen.update(kwargs)
        return HFGenerateBackend(model, tokenizer)

    monkeypatch.setattr(trainer_module, "make_rollout_backend", fake_backend)
    trainer(tiny_lm_dir, standard_prompts, tmp_path, use_vllm=True, vllm_mode="server",
            vllm_server_base_url="http://127.0.0.1:8001", vllm_tensor_parallel_size=2, vllm_max_model_length=1024,
            vllm_gpu_memory_utilization=0.5)
    assert seen["use_vllm"] and seen["vllm_mode"] == "server"
    assert (seen["server_base_url"], seen["tensor_parallel_size"], seen["max_model_length"],
            seen["gpu_memory_utilization"]) == ("http://127.0.0.1:8001", 2, 1024, 0.5)
    # one generate call per micro-batch (its prompts x num_generations size vLLM's engine), completion length
    assert (seen["batch_size"], seen["num_generations"], seen["max_new_tokens"]) == (2, 4, 6)
