"""The differentiable scorers (vgf_llm.value) and value-model fitting (vgf_llm.value_fit) on the tiny model."""

import json

import pytest
import torch
from conftest import CHAT_PROMPTS as PROMPTS  # the chat prompts the conftest rollouts fixture samples
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from vgf_llm.rollout.hf import HFGenerateBackend
from vgf_llm.value import RewardModelScorer, ValueModel, ValueModelConfig, active_adapter
from vgf_llm.value_fit import fit_value_head, pooled_features, prompt_groups, refit_head


def _value_data(model, tokenizer, rollouts):
    p_ids, p_mask, ids, mask = rollouts.flat()
    # a learnable synthetic reward: the fraction of response tokens with an even id
    target = ((ids % 2 == 0) & mask.bool()).sum(-1) / mask.sum(-1).clamp_min(1)
    return p_ids, p_mask, ids, mask, target.float()


def test_value_model_fit_lowers_loss_and_leaves_base_weights_untouched(tiny_lm, tokenizer):
    backend = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=10, batch_size=8)
    ro = backend.generate(PROMPTS * 4, num_generations=4, seed=0)
    base = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    stats = vm.fit(*_value_data(tiny_lm, tokenizer, ro), epochs=15, lr=5e-3, batch_size=8, progress=False)
    assert stats["train_loss_last"] < stats["train_loss_first"]
    assert stats["val_loss_after"] < stats["val_loss_before"]
    after = {k.replace(".base_layer.", "."): v for k, v in tiny_lm.state_dict().items()}  # LoRA wraps layers
    for k, v in base.items():
        assert torch.equal(after[k], v), k
    assert any("lora_" in k and ".value." in k for k in after)


def test_value_model_gradients_reach_particles_only(tiny_lm, tokenizer, rollouts):
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4, num_layers=1))
    p_ids, p_mask, ids, mask, _ = _value_data(tiny_lm, tokenizer, rollouts)
    rows = vm.embedding_weight[ids].detach().requires_grad_(True)
    values = vm.score_embeds(p_ids, p_mask, rows, mask)
    assert values.shape == (ids.shape[0],)
    values.sum().backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_lm.parameters())
    torch.testing.assert_close(vm.score_ids(p_ids, p_mask, ids, mask), values.detach())


def test_value_model_save_and_load_round_trip(tiny_lm_dir, tiny_lm, tokenizer, rollouts, tmp_path):
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    p_ids, p_mask, ids, mask, target = _value_data(tiny_lm, tokenizer, rollouts)
    vm.fit(p_ids, p_mask, ids, mask, target, epochs=2, batch_size=4, progress=False)
    vm.save(tmp_path / "vm")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    loaded = ValueModel.load(fresh, tmp_path / "vm")
    torch.testing.assert_close(loaded.score_ids(p_ids, p_mask, ids, mask), vm.score_ids(p_ids, p_mask, ids, mask))


def test_reference_is_the_model_with_adapters_disabled(tiny_lm, tokenizer, rollouts):
    ids = rollouts.prompt_ids
    before = tiny_lm(input_ids=ids, attention_mask=rollouts.prompt_mask).logits
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    with torch.no_grad():
        for p in vm.adapter_parameters():
            p.add_(0.5)  # make the adapter matter
    with active_adapter(tiny_lm, None):
        torch.testing.assert_close(tiny_lm(input_ids=ids, attention_mask=rollouts.prompt_mask).logits, before)
    with active_adapter(tiny_lm, "value"):
        assert not torch.allclose(tiny_lm(input_ids=ids, attention_mask=rollouts.prompt_mask).logits, before)


def test_reward_model_scorer_matches_the_classifier_and_rejects_other_vocabularies(
        tiny_reward_model_dir, other_vocab_reward_model_dir, tokenizer, rollouts):
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir)
    scorer = RewardModelScorer(rm, AutoTokenizer.from_pretrained(tiny_reward_model_dir), tokenizer)
    g, n, t = rollouts.shape
    i = 0  # one particle, unpadded, through the classifier's own pooling
    real = rollouts.completion_mask[0, i].bool()
    seq = torch.cat([rollouts.prompt_ids[0][rollouts.prompt_mask[0].bool()], rollouts.completion_ids[0, i][real]])
    expected = rm(input_ids=seq[None]).logits[0, 0]
    got = scorer.score_ids(rollouts.prompt_ids[:1], rollouts.prompt_mask[:1], rollouts.completion_ids[0, :1],
                           rollouts.completion_mask[0, :1])
    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-4, atol=1e-5)
    other = AutoTokenizer.from_pretrained(other_vocab_reward_model_dir)
    with pytest.raises(ValueError, match="vocabulary differs"):
        RewardModelScorer(AutoModelForSequenceClassification.from_pretrained(other_vocab_reward_model_dir),
                          other, tokenizer)


def test_grouped_validation_holds_out_whole_prompts(tiny_lm, tokenizer):
    backend = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=8, batch_size=8)
    ro = backend.generate(PROMPTS * 4, num_generations=4, seed=0)  # every prompt text appears 4 times
    groups = prompt_groups(ro)
    assert len(groups.unique()) == 3 and groups.shape == (48,)
    assert torch.equal(groups[:16].unique(), torch.tensor([0, 1, 2]))  # repeats of a text share its group
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    stats = vm.fit(*_value_data(tiny_lm, tokenizer, ro), epochs=1, batch_size=8, progress=False, groups=groups)
    assert stats["num_val"] == 16 and stats["num_train"] == 32  # one whole prompt text held out


def test_ridge_value_head_reproduces_its_regression_and_picks_the_informative_layer(tiny_lm, tokenizer):
    backend = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=10, batch_size=8)
    ro = backend.generate(PROMPTS * 8, num_generations=4, seed=0)
    g, n, _ = ro.shape
    args = ro.flat()
    feats = pooled_features(tiny_lm, *args, layers=[1, 2])
    w0 = torch.randn(feats[(1, "mean")].shape[1], generator=torch.Generator().manual_seed(0)).double()
    reward = (feats[(1, "mean")] @ w0).float().view(g, n)  # a reward linear in layer-1 mean-pooled states
    vm, stats = fit_value_head(tiny_lm, ro, reward, layers=[1, 2], lambdas=(1e-6, 1.0), folds=3)
    assert (stats["layer"], stats["pooling"]) == (1, "mean") and stats["val_corr"] > 0.95
    assert stats["num_prompts"] == 3
    # the fitted ValueModel scores token ids through its own (cut, adapter-on) forward pass exactly like the fit
    torch.testing.assert_close(vm.score_ids(*args), reward.reshape(-1), rtol=1e-3, atol=1e-3 * reward.abs().max())
    # a reward of noise has no out-of-fold correlation
    _, noise = fit_value_head(tiny_lm, ro, torch.randn(g, n), layers=[1], folds=3, adapter_name="noise")
    assert noise["val_corr"] < 0.5


def test_refit_head_solves_the_value_models_own_head_by_ridge(tiny_lm, tokenizer):
    """The trainer's online ridge: the head of an existing value model (its trunk and adapter untouched) is solved
    on the states it pools itself, so its scores reproduce a reward linear in them; too few rewards leave it."""
    backend = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=10, batch_size=8)
    ro = backend.generate(PROMPTS * 8, num_generations=4, seed=0)
    g, n, _ = ro.shape
    args = ro.flat()
    vm = ValueModel(tiny_lm, ValueModelConfig(num_layers=1, lora_r=4, adapter_name="online"))
    adapter = [p.detach().clone() for p in vm.adapter_parameters()]
    with torch.no_grad():
        x = vm.pooled_embeds(args[0], args[1], vm.embedding_weight[args[2]], args[3]).double()
    reward = (x @ torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0)).double()).float()
    groups = torch.arange(g * n) // n
    stats = refit_head(vm, *args, reward, groups, lambdas=(1e-6, 1.0), folds=3)
    assert stats["ridge"] == 1e-6 and stats["cv_corr"] > 0.95 and stats["num_samples"] == g * n
    torch.testing.assert_close(vm.score_ids(*args), reward, rtol=1e-3, atol=1e-3 * reward.abs().max())
    assert all(torch.equal(a, b) for a, b in zip(adapter, vm.adapter_parameters(), strict=True))
    head = vm.head.weight.detach().clone()
    few = torch.full((g * n,), float("nan"))
    few[:5] = 1.0
    assert refit_head(vm, *args, few, groups, folds=3) is None and torch.equal(vm.head.weight, head)


def test_an_ensemble_value_model_saved_by_an_older_version_is_refused(tiny_lm, tokenizer, tmp_path):
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    vm.save(tmp_path / "vm")
    config = json.loads((tmp_path / "vm" / "value_model.json").read_text())
    (tmp_path / "vm" / "value_model.json").write_text(json.dumps({**config, "num_heads": 3, "aggregate": "min"}))
    with pytest.raises(ValueError, match="ensemble"):
        ValueModel.load(tiny_lm, tmp_path / "vm")


def test_a_value_model_refuses_a_base_with_the_same_shapes_but_other_weights(tiny_lm_dir, tiny_lm, tmp_path):
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    vm.save(tmp_path / "vm")
    same = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ValueModel.load(same, tmp_path / "vm")  # the base it was fitted on: fine (also loaded again from disk)
    ValueModel.load(AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.bfloat16), tmp_path / "vm")
    other = AutoModelForCausalLM.from_config(same.config)  # same shapes, other weights
    with pytest.raises(ValueError, match="another base model"):
        ValueModel.load(other, tmp_path / "vm")
