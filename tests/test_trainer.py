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
from vgf_llm.value import ValueModel

STEP_METRICS = ["reward", "reward_std", "frac_reward_zero_std", "transport/reward_before", "transport/reward_after",
                "transport/tokens_changed", "transport/displacement", "value/loss", "value/corr", "kl",
                "completions/mean_length", "loss"]


def length_reward(prompts, completions, **kwargs):
    """A learnable reward: longer completions score higher (tiny random models emit varied lengths)."""
    return [len(c if isinstance(c, str) else c[0]["content"]) / 20.0 for c in completions]


def config(tmp_path, **overrides) -> VGFConfig:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, num_generations=4,
                  max_completion_length=6, transport_steps=2, transport_step_size=0.5, save_strategy="no",
                  use_cpu=True, seed=0, learning_rate=1e-2, value_epochs=1, disable_tqdm=True)
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


@pytest.mark.parametrize("decoder,budget", [("verified", {}),  # soft tokens: the budget is in logits (margin 6)
                                            ("soft_topk", dict(transport_steps=8, transport_step_size=1.0)),
                                            ("reference_gain", {}),  # steer: a hidden-state vector, decoded by the LM
                                            ("steer", dict(transport_steps=4, transport_step_size=1.0,
                                                           steer_layer=1)),
                                            ("steer_prefix", dict(transport_steps=1, transport_step_size=1.0,
                                                                  steer_layer=1)),
                                            ("tilt_prefix", dict(transport_steps=1, transport_step_size=20.0,
                                                                 steer_layer=1, decoder_topk=32)),
                                            ("tilt_reward", dict(transport_steps=1, transport_step_size=30.0,
                                                                 decoder_topk=32, scorer="reward_model"))])
def test_every_sampler_decoder_trains(tiny_lm_dir, standard_prompts, tmp_path, decoder, budget,
                                      tiny_reward_model_dir):
    """The trainer takes the sampler's particle spaces by name; each runs inside a training step and edits some
    particles (steering vectors through the model's own re-generation)."""
    if budget.get("scorer") == "reward_model":  # tilt_reward reads the reward model itself
        budget = budget | {"reward_model_path": str(tiny_reward_model_dir)}
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, decoder=decoder, max_steps=1, **budget)
    tr.train()
    log = logged(tr)
    assert math.isfinite(log["train_loss"]) and log["transport/tokens_changed"] > 0


def test_the_online_ridge_value_model_solves_its_head_and_never_trains_its_adapter(tiny_lm_dir, standard_prompts,
                                                                                    tmp_path):
    """value_fit='ridge': every step re-solves the head on the buffer (its strength cross-validated by prompt) and
    leaves the value adapter as created, so the steering space's gradient comes from that head."""
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, decoder="steer", transport_steps=2, transport_step_size=1.0,
                 steer_layer=1, value_fit="ridge", max_steps=2, value_buffer_steps=3)
    adapter = [p.detach().clone() for p in tr.scorer.adapter_parameters()]
    head = tr.scorer.head.weight.detach().clone()
    tr.train()
    log = logged(tr)
    assert math.isfinite(log["value/cv_corr"]) and log["value/ridge"] > 0 and "value/loss" not in log
    assert not torch.equal(tr.scorer.head.weight, head)
    assert all(torch.equal(a, b) for a, b in zip(adapter, tr.scorer.adapter_parameters(), strict=True))
    assert log["transport/displacement"] > 0
    with pytest.raises(ValueError, match="value_fit"):
        config(tmp_path, value_fit="sgd")


def test_per_step_steering_fits_its_prefix_value_to_the_true_rewards_not_the_value_model(tiny_lm_dir,
                                                                                         standard_prompts, tmp_path,
                                                                                         monkeypatch):
    """decoder='steer_prefix': each step the space's prefix value is re-fitted by ridge on the buffer's true
    rewards (cross-validated by prompt), the value model is never trained, and the particles move. The buffer's
    prefix states are read once per response and kept: the last fit equals one on states read afresh."""
    import vgf_llm.trainer as trainer_module
    from vgf_llm.distill import pad_cat
    from vgf_llm.prefix_value import fit_prefix_value

    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, decoder="steer_prefix", transport_steps=1,
                 transport_step_size=1.0, steer_layer=1, max_steps=3, value_buffer_steps=2)
    value_head = tr.scorer.head.weight.detach().clone()
    fitted = []
    fit = trainer_module.fit_prefix_value_on_states
    monkeypatch.setattr(trainer_module, "fit_prefix_value_on_states",
                        lambda *a, **k: fitted.append(a[3].clone()) or fit(*a, **k))
    tr.train()
    log = logged(tr)
    assert [len(t) for t in fitted] == [8, 16, 16]  # the buffer: one step's 2 prompts x 4, then the last two steps'
    pv = tr.sampler.space.prefix_value
    assert pv is not None and math.isfinite(log["value/cv_corr"])
    parts = list(zip(*tr.value_buffer, strict=True))
    pad = tr.processing_class.pad_token_id
    fresh = fit_prefix_value(tr.model, 1, pad_cat(list(parts[0]), pad, left=True),
                             pad_cat(list(parts[1]), 0, left=True), pad_cat(list(parts[2]), pad),
                             pad_cat(list(parts[3]), 0), torch.cat(parts[4]), torch.arange(16) // 4,
                             seed=tr.args.seed + 2)
    assert torch.equal(fitted[-1], torch.cat(parts[4])) and fresh.ridge == pv.ridge
    torch.testing.assert_close(fresh.weight, pv.weight, rtol=1e-4, atol=1e-6)
    assert -1 <= log["value/corr"] <= 1  # step 2's fresh rollouts, scored by step 1's prefix value
    assert "value/loss" not in log and torch.equal(tr.scorer.head.weight, value_head)
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


def test_reward_model_as_scorer(tiny_lm_dir, tiny_reward_model_dir, standard_prompts, tmp_path):
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, max_steps=1, scorer="reward_model",
                 reward_model_path=str(tiny_reward_model_dir))
    tr.train()
    assert "value/loss" not in logged(tr) and math.isfinite(logged(tr)["loss"])


def test_budget_zero_distils_best_of_n_without_moving(tiny_lm_dir, standard_prompts, tmp_path):
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, max_steps=1, transport_steps=0)
    tr.train()
    log = logged(tr)
    assert log["transport/tokens_changed"] == 0 and log["transport/reward_after"] == log["transport/reward_before"]
    assert "value/loss" not in log and "timing/value_fit" not in log  # no value model to fit without transport


def test_policy_particles(tiny_lm_dir, standard_prompts, tmp_path):
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, particle_source="policy")
    assert tr.sampler.space.reference.adapter == POLICY  # its particles are moved and decoded by the policy
    tr.train()
    assert math.isfinite(logged(tr)["loss"])
    assert trainer(tiny_lm_dir, standard_prompts, tmp_path / "ref").sampler.space.reference.adapter is None


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


@pytest.mark.parametrize("space", [{},  # steer_prefix: the resumed run re-reads the restored buffer's prefix states
                                   dict(decoder="steer_prefix", transport_steps=1, steer_layer=1)])
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
    va = load_file(str(tmp_path / "a" / "out" / "checkpoint-4" / "value_model" / "value_model.safetensors"))
    vb = load_file(str(tmp_path / "b" / "out" / "checkpoint-4" / "value_model" / "value_model.safetensors"))
    for k in va:
        torch.testing.assert_close(va[k], vb[k], rtol=1e-5, atol=1e-6)


def test_a_save_cut_off_midway_keeps_the_last_good_checkpoint_and_is_never_resumed(
        tiny_lm_dir, standard_prompts, tmp_path, monkeypatch, caplog):
    from vgf_llm.trainer import CHECKPOINT_COMPLETE, last_complete_checkpoint

    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, **kw)
    saves = []

    def save_then_die(path):  # the value model's save of checkpoint-4 is "killed"
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt("killed while saving")
        return ValueModel.save(tr.scorer, path)

    monkeypatch.setattr(tr.scorer, "save", save_then_die)
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
    for needle in ("vgf-llm", "- vgf", "base_model:", "length_reward", "arXiv:2604.14265", "2 steps x step size"):
        assert needle in card, needle


def test_evaluate_scores_greedy_completions(tiny_lm_dir, standard_prompts, tmp_path):
    tr = VGFTrainer(str(tiny_lm_dir), length_reward, args=config(tmp_path), train_dataset=standard_prompts,
                    eval_dataset=standard_prompts)
    metrics = tr.evaluate()
    assert set(metrics) == {"eval_reward"} and metrics["eval_reward"] > 0


@pytest.mark.parametrize("weighting", ["softmax", "best", "advantage"])
def test_distill_weights_sum_to_one_and_skip_missing(weighting):
    rewards = torch.tensor([[0.0, 1.0, float("nan"), 0.5], [2.0, 2.0, 1.0, float("nan")]])
    w = distill_weights(rewards, weighting, temperature=0.1)
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


def test_reward_model_scorer_with_another_vocabulary(tiny_lm_dir, other_vocab_reward_model_dir, standard_prompts,
                                                     tmp_path):
    with pytest.raises(ValueError, match="vocabulary differs"):
        trainer(tiny_lm_dir, standard_prompts, tmp_path, scorer="reward_model",
                reward_model_path=str(other_vocab_reward_model_dir))


def test_non_finite_transport_is_skipped_and_logged(tiny_lm_dir, standard_prompts, tmp_path, monkeypatch):
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, max_steps=1)
    grad = tr.sampler.space.grad

    def poisoned(particles, u):
        values, g = grad(particles, u)
        return values, torch.full_like(g, float("nan"))

    monkeypatch.setattr(tr.sampler.space, "grad", poisoned)
    tr.train()
    log = logged(tr)
    assert log["transport/nonfinite"] > 0 and log["transport/tokens_changed"] == 0 and math.isfinite(log["loss"])


def test_the_true_reward_checks_the_verified_edits_in_training(tiny_lm_dir, standard_prompts, tmp_path):
    """transport_verifier='reward' (the default): a proposed swap is kept only if the true reward rises, so no
    particle ends below where it started and the transport raises the step's mean reward; 'scorer' checks with the
    value model instead (as at test time) and calls the reward only to re-score."""
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path / "r", decoder="verified", max_steps=2, transport_steps=2,
                 transport_step_size=0.5)
    tr.train()
    steps = [h for h in tr.state.log_history if "transport/reward_after" in h]
    assert len(steps) == 2 and all(h["transport/reward_checks"] > 0 for h in steps)
    assert all(h["transport/reward_after"] >= h["transport/reward_before"] for h in steps)
    assert any(h["transport/reward_after"] > h["transport/reward_before"] for h in steps)
    rewards = tr._last_completions["rewards"]  # every particle of the last micro-batch, before and after
    assert all(a >= b for a, b in zip(rewards["after transport"], rewards["reward"], strict=True))
    assert sum(a > b for a, b in zip(rewards["after transport"], rewards["reward"], strict=True)) >= 1

    by_scorer = trainer(tiny_lm_dir, standard_prompts, tmp_path / "s", decoder="verified", max_steps=1,
                        transport_steps=2, transport_step_size=0.5, transport_verifier="scorer")
    by_scorer.train()
    assert "transport/reward_checks" not in logged(by_scorer)


def test_the_tilted_target_keeps_only_edits_that_pay_for_their_likelihood(tiny_lm_dir, standard_prompts, tmp_path):
    """transport_target='tilted': a kept edit raises reward + distill_temperature x log mu(y | x), not only the
    reward, and the distillation counts a transported particle at that value minus its original's likelihood term
    (its reward + tau x its log-likelihood change), i.e. importance-corrected for having been moved."""
    tau = 0.05
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, transport_target="tilted", distill_temperature=tau,
                 transport_steps=2, transport_step_size=0.5)
    seen = {}
    original_targets = tr._targets

    def capture(ro, moved, rewards, moved_values, changed, teacher=None):
        seen.update(ro=ro, moved=moved, rewards=rewards, moved_values=moved_values, changed=changed)
        return original_targets(ro, moved, rewards, moved_values, changed, teacher)

    tr._targets = capture
    _one_batch(tr, [dict(r) for r in standard_prompts.select(range(2))])
    ro, moved, changed = seen["ro"], seen["moved"], seen["changed"].reshape(-1) > 0
    assert changed.any()
    p_ids, p_mask, ids, mask = ro.flat()
    _, _, new_ids, new_mask = moved.flat()
    rewards = seen["rewards"].reshape(-1)
    after = torch.tensor(tr._last_completions["rewards"]["after transport"])
    logmu_before = tr._base_logmu(p_ids, p_mask, ids, mask)
    logmu_after = tr._base_logmu(p_ids, p_mask, new_ids, new_mask)
    gain = (after + tau * logmu_after) - (rewards + tau * logmu_before)
    assert bool((gain[changed] > 0).all())  # every kept edit pays for its likelihood
    expected = after + tau * (logmu_after - logmu_before)
    assert torch.allclose(seen["moved_values"].reshape(-1)[changed], expected[changed], atol=1e-4)
    assert "transport/logmu_change" in tr._metrics


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


def test_edit_pairs_are_transported_particles_that_raised_the_reward_and_their_originals(
        tiny_lm_dir, standard_prompts, tmp_path):
    """With edit_pair_weight > 0 the batch holds, besides the weighted targets, every (transported, original) pair
    whose edit raised the true reward; the pair rows differ only where the transport edited; off, no pair rows."""
    rows = [dict(r) for r in standard_prompts.select(range(2))]
    on = trainer(tiny_lm_dir, standard_prompts, tmp_path / "on", edit_pair_weight=1.0, transport_steps=2,
                 transport_step_size=0.5)
    batch = _one_batch(on, rows)
    pairs = batch["pairs"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    groups = {tuple(ids[r, :batch["completion_start"]].tolist()) for r in pairs[:, 0].tolist()}  # by prompt
    assert len(pairs) >= 1 and abs(float(batch["pair_weights"].sum()) - len(groups)) < 1e-5  # 1 per group
    for moved, original in pairs.tolist():
        differ = (ids[moved] != ids[original]) & mask[moved].bool() & mask[original].bool()
        assert 1 <= int(differ.sum()) <= on.args.max_edits  # a minimal pair: the edited tokens only
        rewards = length_reward(None, [on.processing_class.decode(ids[r][mask[r].bool()]) for r in (moved, original)])
        assert rewards[0] > rewards[1]  # the transported one is the better
    off = trainer(tiny_lm_dir, standard_prompts, tmp_path / "off", transport_steps=2, transport_step_size=0.5)
    plain = _one_batch(off, rows)
    assert len(plain["pairs"]) == 0 and bool((plain["weights"] > 0).all())


def test_the_pair_loss_raises_the_transported_particle_over_its_original(tiny_lm_dir, standard_prompts, tmp_path):
    """A few optimizer steps on the pair loss alone move the policy's log-ratio margins of the pairs from 0 (the
    policy starts as the base) to positive on average and for most pairs (they share the adapter's parameters, so
    not every one need rise): the pairs are oriented (better = transported) and the loss reaches the adapter. A
    swapped orientation would drive the margins negative."""
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, edit_pair_weight=1.0, edit_pair_beta=1.0,
                 transport_steps=2, transport_step_size=0.5, learning_rate=5e-2)
    batch = _one_batch(tr, [dict(r) for r in standard_prompts.select(range(2))])
    assert len(batch["pairs"]) >= 1
    batch["weights"] = torch.zeros_like(batch["weights"])  # the pair term alone

    ids, mask = batch["input_ids"], batch["attention_mask"]
    reward = length_reward(None, [tr.processing_class.decode(ids[r][mask[r].bool()]) for r in range(len(ids))])
    better, worse = zip(*[(a, b) if reward[a] > reward[b] else (b, a) for a, b in batch["pairs"].tolist()],
                        strict=True)  # by the true reward, not by the batch's own order

    def margins():
        from vgf_llm.distill import completion_logps

        with torch.no_grad():
            logps = completion_logps(tr.model, ids, mask, batch["completion_start"])
        ratio = ((logps - batch["ref_logps"]) * batch["completion_mask"]).sum(-1)
        return ratio[list(better)] - ratio[list(worse)]

    assert torch.allclose(margins(), torch.zeros(len(batch["pairs"])), atol=1e-4)
    _adam_steps(tr, batch, 5)
    after = margins()
    assert float(after.mean()) > 0.1 and float((after > 0).float().mean()) >= 0.75, after
    assert "distill/pair_loss" in tr._metrics and "distill/pair_margin" in tr._metrics


def test_the_sample_baseline_makes_each_group_zero_sum_and_pushes_the_targets_above_the_samples(
        tiny_lm_dir, standard_prompts, tmp_path):
    """distill_baseline: every sampled response of a distilled group becomes a row, each group's weights sum to 0,
    the group's worst sample weighs -1/N; a few steps on the loss raise the positively weighted rows' log-ratio to
    the base above the negatively weighted rows'. Off, every weight is positive and each group's sum is 1."""
    rows = [dict(r) for r in standard_prompts.select(range(2))]
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, distill_baseline=True, learning_rate=5e-2)
    batch = _one_batch(tr, rows)
    ids, mask, start, w = batch["input_ids"], batch["attention_mask"], batch["completion_start"], batch["weights"]
    groups: dict[tuple, list[int]] = {}
    for r in range(len(ids)):
        groups.setdefault(tuple(ids[r, :start].tolist()), []).append(r)
    assert len(groups) == 2
    n = tr.args.num_generations
    for members in groups.values():
        assert abs(float(w[members].sum())) < 1e-5 and len(members) >= n
        texts = [tr.processing_class.decode(ids[r, start:][batch["completion_mask"][r].bool()]) for r in members]
        worst = members[min(range(len(members)), key=lambda i: length_reward(None, [texts[i]])[0])]
        assert float(w[worst]) <= -1 / n + 1e-3
    off = _one_batch(trainer(tiny_lm_dir, standard_prompts, tmp_path / "off"), rows)
    assert bool((off["weights"] > 0).all()) and abs(float(off["weights"].sum()) - 2) < 1e-5

    from vgf_llm.distill import completion_logps

    def gap():
        with torch.no_grad():
            ratio = ((completion_logps(tr.model, ids, mask, start) - batch["ref_logps"]) * batch["completion_mask"])
        ratio = ratio.sum(-1)
        return float(ratio[w > 0].mean() - ratio[w < 0].mean())

    assert abs(gap()) < 1e-4  # the policy starts as the base
    _adam_steps(tr, batch, 3)
    assert gap() > 0.5


def test_distilling_the_steered_distributions_teaches_the_transports_tilt_at_every_token(
        tiny_lm_dir, standard_prompts, tmp_path):
    """distill_target='distribution' (steer_prefix): every transported particle is a row (changed or not) whose
    targets are the distributions the steered model drew it from, every original the base's own distributions; the
    loss at the start (policy = base) is the weighted KL of those targets from the base, the logged teacher KL is the
    transported rows' per-sequence KL from the base, and a few steps on the loss bring the policy towards them."""
    from vgf_llm.distill import completion_logits, token_kl
    from vgf_llm.value import active_adapter

    rows = [dict(r) for r in standard_prompts.select(range(2))]
    tr = trainer(tiny_lm_dir, standard_prompts, tmp_path, decoder="steer_prefix", transport_steps=1,
                 transport_step_size=4.0, steer_layer=1, distill_target="distribution", distill_temperature=100.0)
    batch = _one_batch(tr, rows)
    ids, mask, start = batch["input_ids"], batch["attention_mask"], batch["completion_start"]
    cm, teacher = batch["completion_mask"], batch["teacher_logps"]
    assert teacher.shape[:2] == cm.shape
    assert torch.allclose(teacher.float().exp().sum(-1)[cm.bool()], torch.ones(1), atol=2e-2)
    with torch.no_grad(), active_adapter(tr.model, None):
        base = torch.log_softmax(completion_logits(tr.model, ids, mask, start).float(), -1)
    per_row = (token_kl(teacher, base) * cm).sum(-1)
    n = tr.args.num_generations
    assert len(cm) == 2 * 2 * n  # near-uniform weights: each group's originals, then its transported particles
    steered = torch.arange(len(cm)) % (2 * n) >= n
    assert float(per_row[steered].min()) > 10 * float(per_row[~steered].abs().max())  # originals: the base itself
    torch.testing.assert_close(tr._metrics["distill/teacher_kl"][-1], float(per_row[steered].mean()), rtol=1e-3,
                               atol=1e-3)
    expected = float((batch["weights"] * per_row / cm.sum(-1)).sum() / 2)
    with torch.no_grad():
        start_loss = float(tr.compute_loss(tr.model, batch))
    assert abs(start_loss - expected) < 1e-3 * max(1.0, expected) and start_loss > 0
    _adam_steps(tr, batch, 10, lr=2e-3)  # a small loss: Adam's step does not shrink with it
    with torch.no_grad():
        assert float(tr.compute_loss(tr.model, batch)) < 0.75 * start_loss
    with pytest.raises(ValueError, match="steer_prefix"):
        config(tmp_path, distill_target="distribution")  # the default decoder draws no distributions to distil


@pytest.mark.parametrize("bad", [dict(num_generations=1), dict(particle_source="nope"), dict(scorer="reward_model"),
                                 dict(transport_verifier="gold"), dict(max_unrewarded_batches=-1),
                                 dict(max_completion_length=0),
                                 dict(transport_alpha=0.0), dict(distill_weighting="mean"),
                                 dict(edit_pair_weight=-1.0), dict(edit_pair_beta=0.0),
                                 dict(transport_target="kl"), dict(distill_target="logits"),
                                 dict(transport_target="tilted", transport_verifier="scorer")])
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


def test_policy_rollouts_on_a_vllm_backend_sync_the_policy_after_every_step(tiny_lm_dir, standard_prompts, tmp_path,
                                                                            tokenizer):
    from test_vllm import fake_backend  # the engine contract with seeded tokens; the real engine: tests/test_vllm.py

    backend = fake_backend(tokenizer, max_new_tokens=6)
    tr = VGFTrainer(str(tiny_lm_dir), length_reward, args=config(tmp_path, particle_source="policy", max_steps=2),
                    train_dataset=standard_prompts, rollout_backend=backend)
    tr.train()
    sent = backend.engine.updates
    assert len(sent) == 3  # at the start, then after each of the 2 optimizer steps
    assert not any("lora" in k for k in sent[-1])  # merged weights, not adapters
    lora_b = [p for n, p in tr.model.named_parameters() if f"lora_B.{POLICY}." in n]
    assert any(p.abs().sum() > 0 for p in lora_b)
    first, last = sent[0], sent[-1]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the trained policy reached the engine
    assert "lm_head.weight" in last  # tied embeddings: the output head is sent too


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
    assert seen["batch_size"] == 4 and seen["max_new_tokens"] == 6  # prompts per generate call, completion length
