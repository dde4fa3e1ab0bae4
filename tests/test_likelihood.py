"""The likelihood brake (vgf_llm.likelihood, SamplerConfig.likelihood_weight) and the log-probabilities that HF
``generate`` reads while sampling (HFGenerateBackend(return_logprobs=True))."""

import pytest
import torch
from conftest import CHAT_PROMPTS as PROMPTS

from vgf_llm.distill import completion_logps
from vgf_llm.likelihood import LikelihoodTilted, ReferenceLikelihood
from vgf_llm.rollout.hf import HFGenerateBackend
from vgf_llm.sampler import SamplerConfig, VGFSampler
from vgf_llm.value import ValueModel


def teacher_forced(model, ro) -> torch.Tensor:
    p, pm, c, cm = ro.flat()
    with torch.no_grad():
        return completion_logps(model, torch.cat([p, c], 1), torch.cat([pm, cm], 1), p.shape[1]) * cm


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_reads_the_model_log_probabilities_of_the_drawn_tokens(tiny_lm, tokenizer, temperature):
    """The recorder sees the raw logits (before the temperature), so its values are the model's own
    log-probabilities: the same as a teacher-forced pass, at any temperature; 0 at padding; the tokens unchanged."""
    kw = dict(max_new_tokens=9, temperature=temperature, batch_size=2)
    ro = HFGenerateBackend(tiny_lm, tokenizer, return_logprobs=True, **kw).generate(PROMPTS, 3, seed=4)
    plain = HFGenerateBackend(tiny_lm, tokenizer, **kw).generate(PROMPTS, 3, seed=4)
    assert plain.logprobs is None and torch.equal(ro.completion_ids, plain.completion_ids)
    assert ro.logprobs.shape == ro.completion_ids.shape
    assert (ro.logprobs[ro.completion_mask == 0] == 0).all() and (ro.logprobs[ro.completion_mask == 1] < 0).all()
    torch.testing.assert_close(ro.logprobs.reshape(-1, ro.shape[-1]), teacher_forced(tiny_lm, ro),
                               atol=1e-4, rtol=1e-4)


def test_reference_likelihood_is_the_mean_per_token_with_or_without_the_sampled_logprobs(tiny_lm, tokenizer):
    ro = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=8, batch_size=2,
                           return_logprobs=True).generate(PROMPTS, 2, seed=1)
    lik = ReferenceLikelihood(tiny_lm)
    p, pm, c, cm = ro.flat()
    computed = lik.score_ids(p, pm, c, cm)
    given = lik.score_ids(p, pm, c, cm, ro.logprobs.reshape(c.shape))
    expected = teacher_forced(tiny_lm, ro).sum(1) / cm.sum(1)
    torch.testing.assert_close(computed, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(given, expected, atol=1e-4, rtol=1e-4)
    empty = lik.score_ids(p[:1], pm[:1], c[:1], torch.zeros_like(cm[:1]))
    assert empty.tolist() == [0.0]


def test_the_tilt_adds_weight_times_the_likelihood_and_refuses_a_weight_of_zero(tiny_lm, tokenizer):
    vm = ValueModel(tiny_lm)
    with torch.no_grad():
        vm.head.weight.normal_()
    ro = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=8, batch_size=2).generate(PROMPTS, 2, seed=2)
    lik = ReferenceLikelihood(tiny_lm)
    tilted = LikelihoodTilted(vm, lik, 0.5)
    with torch.no_grad():
        expected = vm.score_ids(*ro.flat()).float() + 0.5 * lik.score_ids(*ro.flat())
    torch.testing.assert_close(tilted.score_ids(*ro.flat()), expected)
    with pytest.raises(ValueError, match="likelihood_weight must be > 0"):
        LikelihoodTilted(vm, lik, 0.0)


@pytest.mark.parametrize("bad,message", [
    (dict(likelihood_weight=-1.0), "likelihood_weight must be a finite number >= 0, got -1.0"),
    (dict(likelihood_weight=float("nan")), "likelihood_weight must be a finite number"),
    (dict(likelihood_weight=1.0, decoder="verified"), "likelihood_weight needs decoder='steer_prefix'")])
def test_bad_likelihood_weights_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**bad)


def test_tilted_best_of_n_picks_the_argmax_of_score_plus_weight_times_likelihood(tiny_lm, tokenizer):
    """With transport_steps=0 the brake is best-of-N under the tilted score: the pick is argmax(V + w * loglik),
    computed here without the sampler; with the weight large it differs from plain best-of-N somewhere."""
    vm = ValueModel(tiny_lm)
    with torch.no_grad():
        vm.head.weight.normal_(std=0.01)  # a weak scorer, so the likelihood decides somewhere
    kw = dict(num_generations=4, transport_steps=0, max_completion_length=10, generation_batch_size=8)
    sampler = VGFSampler(tiny_lm, tokenizer, vm, SamplerConfig(likelihood_weight=5.0, **kw), progress=False)
    assert sampler.backend.return_logprobs  # the originals' likelihood is read while sampling
    got = sampler.sample(PROMPTS, seed=3)
    plain = VGFSampler(tiny_lm, tokenizer, vm, SamplerConfig(**kw), progress=False).sample(PROMPTS, seed=3)
    backend = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=10, batch_size=2)
    ro = backend.generate(PROMPTS, 4, seed=3 * 1_000_003)
    with torch.no_grad():
        score = vm.score_ids(*ro.flat()).float() + 5.0 * ReferenceLikelihood(tiny_lm).score_ids(*ro.flat())
    assert [r.chosen for r in got] == score.reshape(len(PROMPTS), 4).argmax(1).tolist()
    assert [r.chosen for r in got] != [r.chosen for r in plain]


def test_labels_given_to_fit_are_tilted_like_every_score_the_sampler_reads(tiny_lm, tokenizer):
    vm = ValueModel(tiny_lm)
    sampler = VGFSampler(tiny_lm, tokenizer, vm, SamplerConfig(
        num_generations=4, max_completion_length=8, generation_batch_size=8, likelihood_weight=2.0), progress=False)
    ro = sampler.rollout(PROMPTS, seed=0)
    g = len(PROMPTS)
    labels = torch.arange(g * 4.0).reshape(g, 4)
    sampler.fit(ro, labels)
    (_, fitted), = sampler.space.buffer
    expected = labels + 2.0 * ReferenceLikelihood(tiny_lm).score_ids(*ro.flat()).reshape(g, 4)
    torch.testing.assert_close(fitted, expected, atol=1e-4, rtol=1e-4)
    moved = sampler.sample(PROMPTS, seed=0)  # and the brake's transport runs end to end
    assert len(moved) == g and all(len(r.particles) == 4 for r in moved)


def test_the_brake_is_on_by_default_for_a_reward_model_and_off_for_a_value_model(tiny_lm, tokenizer,
                                                                                tiny_reward_model_dir):
    """A learned reward model is a proxy: by default the sampler tilts it (weight 1, measured in
    docs/benchmarks.md); a value model fitted to the caller's own reward is what is judged, so it is left alone;
    an explicit weight always wins, and the checked edits (no likelihood gradient) are never tilted by default."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from vgf_llm.sampler import REWARD_MODEL_LIKELIHOOD_WEIGHT
    from vgf_llm.value import RewardModelScorer

    rm = RewardModelScorer(AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir),
                           AutoTokenizer.from_pretrained(tiny_reward_model_dir), tokenizer)
    vm = ValueModel(tiny_lm)

    def weight(scorer, **kw):
        sampler = VGFSampler(tiny_lm, tokenizer, scorer, SamplerConfig(num_generations=2, **kw), progress=False)
        assert isinstance(sampler.scorer, LikelihoodTilted) == bool(sampler.likelihood_weight)
        return sampler.likelihood_weight

    assert weight(rm) == REWARD_MODEL_LIKELIHOOD_WEIGHT == 1.0
    assert weight(vm) == 0.0
    assert weight(rm, likelihood_weight=0.0) == 0.0 and weight(vm, likelihood_weight=0.5) == 0.5
    assert weight(rm, decoder="verified") == 0.0
