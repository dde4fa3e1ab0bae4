"""The differentiable scorers (vgf_llm.value) and value-model fitting (vgf_llm.value_fit) on the tiny model."""

import json

import pytest
import torch
from conftest import CHAT_PROMPTS as PROMPTS  # the chat prompts the conftest rollouts fixture samples
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from vgf_llm.rollout.hf import HFGenerateBackend
from vgf_llm.value import RewardModelScorer, ValueModel, ValueModelConfig
from vgf_llm.value_fit import fit_value_head, pooled_features, prompt_groups


def test_value_model_gradients_reach_particles_only(tiny_lm, tokenizer, rollouts):
    vm = ValueModel(tiny_lm, ValueModelConfig(num_layers=1))
    p_ids, p_mask, ids, mask = rollouts.flat()
    rows = vm.embedding_weight[ids].detach().requires_grad_(True)
    values = vm.score_embeds(p_ids, p_mask, rows, mask)
    assert values.shape == (ids.shape[0],)
    values.sum().backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_lm.parameters())
    torch.testing.assert_close(vm.score_ids(p_ids, p_mask, ids, mask), values.detach())


def test_the_value_head_follows_the_model_to_its_device(tiny_lm, monkeypatch):
    """The head is not part of the HF model, so a Trainer that moves the model never moves it: it must follow the
    trunk's states to their device at use (on a GPU the first value call would otherwise mix devices). The trunk's
    forward is replaced by states on the meta device (a stand-in for CUDA that this machine has)."""
    vm = ValueModel(tiny_lm)
    states = torch.zeros(2, tiny_lm.config.hidden_size, device="meta", dtype=torch.bfloat16)
    monkeypatch.setattr(vm, "pooled_embeds", lambda *args: states)
    values = vm.score_embeds(None, None, None, None)
    assert values.device.type == "meta" and values.dtype == torch.float32
    assert vm.head.weight.device.type == "meta" and vm.head.weight.dtype == torch.float32


def test_value_model_save_and_load_round_trip(tiny_lm_dir, tiny_lm, rollouts, tmp_path):
    vm = ValueModel(tiny_lm, ValueModelConfig(num_layers=1, pooling="last"))
    vm.save(tmp_path / "vm")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    loaded = ValueModel.load(fresh, tmp_path / "vm")
    assert loaded.config == vm.config
    args = rollouts.flat()
    torch.testing.assert_close(loaded.score_ids(*args), vm.score_ids(*args))


def test_the_value_model_reads_the_reference_even_when_the_model_carries_an_adapter(tiny_lm, rollouts):
    from peft import LoraConfig

    args = rollouts.flat()
    vm = ValueModel(tiny_lm)
    before = vm.score_ids(*args)
    tiny_lm.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "default")
    tiny_lm.set_adapter("default")
    torch.testing.assert_close(vm.score_ids(*args), before)


def test_reward_model_scorer_matches_the_classifier_and_rejects_other_vocabularies(
        tiny_reward_model_dir, other_vocab_reward_model_dir, tokenizer, rollouts):
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir)
    scorer = RewardModelScorer(rm, AutoTokenizer.from_pretrained(tiny_reward_model_dir), tokenizer)
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


def test_prompt_groups_follow_the_prompt_text(tiny_lm, tokenizer):
    backend = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=8, batch_size=8)
    ro = backend.generate(PROMPTS * 4, num_generations=4, seed=0)  # every prompt text appears 4 times
    groups = prompt_groups(ro)
    assert len(groups.unique()) == 3 and groups.shape == (48,)
    assert torch.equal(groups[:16].unique(), torch.tensor([0, 1, 2]))  # repeats of a text share its group


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
    # the fitted ValueModel scores token ids through its own (cut) forward pass exactly like the fit
    torch.testing.assert_close(vm.score_ids(*args), reward.reshape(-1), rtol=1e-3, atol=1e-3 * reward.abs().max())
    # a reward of noise has no out-of-fold correlation
    _, noise = fit_value_head(tiny_lm, ro, torch.randn(g, n), layers=[1], folds=3)
    assert noise["val_corr"] < 0.5


@pytest.mark.parametrize("kind", ["ensemble", "lora"])
def test_a_value_model_of_a_retired_kind_is_refused(tiny_lm, tmp_path, kind):
    from safetensors.torch import load_file, save_file

    vm = ValueModel(tiny_lm)
    vm.save(tmp_path / "vm")
    if kind == "ensemble":
        config = json.loads((tmp_path / "vm" / "value_model.json").read_text())
        (tmp_path / "vm" / "value_model.json").write_text(json.dumps({**config, "num_heads": 3}))
    else:  # a LoRA value adapter fitted by SGD, as older versions saved it
        state = load_file(str(tmp_path / "vm" / "value_model.safetensors"))
        state["model.layers.0.self_attn.q_proj.lora_A.value.weight"] = torch.zeros(4, 64)
        save_file(state, str(tmp_path / "vm" / "value_model.safetensors"))
    with pytest.raises(ValueError, match="retired kind"):
        ValueModel.load(tiny_lm, tmp_path / "vm")


def test_a_value_model_refuses_a_base_with_the_same_shapes_but_other_weights(tiny_lm_dir, tiny_lm, tmp_path):
    vm = ValueModel(tiny_lm)
    vm.save(tmp_path / "vm")
    same = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ValueModel.load(same, tmp_path / "vm")  # the base it was fitted on: fine (also loaded again from disk)
    ValueModel.load(AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.bfloat16), tmp_path / "vm")
    other = AutoModelForCausalLM.from_config(same.config)  # same shapes, other weights
    with pytest.raises(ValueError, match="another base model"):
        ValueModel.load(other, tmp_path / "vm")
