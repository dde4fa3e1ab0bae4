"""Test-time VGF (vgf_llm.sampler): budget 0 is best-of-N, transport moves and reports, its own defaults."""


import pytest
import torch
from conftest import CHAT_PROMPTS as PROMPTS  # the chat prompts the conftest rollouts fixture samples

from vgf_llm.adapters import active_adapter
from vgf_llm.config import VGFConfig
from vgf_llm.rollout.hf import HFGenerateBackend
from vgf_llm.sampler import SamplerConfig, VGFSampler
from vgf_llm.spaces import DECODERS
from vgf_llm.value import ValueModel


@pytest.fixture
def value_sampler_parts(tiny_lm, tokenizer):
    vm = ValueModel(tiny_lm)
    with torch.no_grad():
        vm.head.weight.normal_()
    return tiny_lm, tokenizer, vm


def best_of_n(model, tokenizer, selector, prompts, *, n, seed, batch_size, max_new_tokens):
    """Plain best-of-N written without the sampler: sample N with the sampler's seeds, keep the selector's argmax."""
    backend = HFGenerateBackend(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)
    picks = []
    for c, s in enumerate(range(0, len(prompts), batch_size)):
        with active_adapter(model, None):
            ro = backend.generate(prompts[s:s + batch_size], n, seed * 1_000_003 + c)
        best = selector.score_ids(*ro.flat()).reshape(ro.shape[:2]).argmax(-1)
        picks.extend((ro.texts[i][int(best[i])], int(best[i])) for i in range(ro.shape[0]))
    return picks


def test_budget_zero_equals_best_of_n(value_sampler_parts):
    model, tok, vm = value_sampler_parts
    config = SamplerConfig(num_generations=4, transport_steps=0, max_completion_length=10, generation_batch_size=8)
    got = VGFSampler(model, tok, vm, config, progress=False).sample(PROMPTS, seed=5)
    expected = best_of_n(model, tok, vm, PROMPTS, n=4, seed=5, batch_size=2, max_new_tokens=10)
    assert [(r.response, r.chosen) for r in got] == expected
    assert all(p.tokens_changed == 0 and p.text_before == p.text_after and not r.chosen_moved
               for r in got for p in r.particles)


@pytest.mark.parametrize("decoder", DECODERS)
def test_sampler_moves_particles_and_reports_every_field(value_sampler_parts, decoder):
    model, tok, vm = value_sampler_parts
    config = SamplerConfig(num_generations=4, max_completion_length=10, generation_batch_size=8, transport_steps=3,
                           transport_step_size=2.0, transport_alpha=0.01, decoder=decoder, verify_top=None)
    sampler = VGFSampler(model, tok, vm, config, progress=False)
    results = sampler.sample(PROMPTS, seed=1)
    steps = sampler.last_moved.trace.values.shape[0]  # per-step steering: 3 transport steps at every token
    assert len(results) == len(PROMPTS) and (steps % 3 == 0 < steps - 3 if decoder == "steer_prefix" else steps == 3)
    for r in results:
        assert len(r.particles) == 4 and 0 <= r.chosen < 4
        scores = [p.score_after for p in r.particles] + [p.score_before for p in r.particles]
        assert all(torch.isfinite(torch.tensor(scores)))
        chosen = r.particles[r.chosen]
        assert r.response == (chosen.text_after if r.chosen_moved else chosen.text_before)
        best = max(max(p.score_after for p in r.particles), max(p.score_before for p in r.particles))
        assert (chosen.score_after if r.chosen_moved else chosen.score_before) == pytest.approx(best)
    assert sum(p.tokens_changed for r in results for p in r.particles) > 0
    assert all(p.displacement > 0 for r in results for p in r.particles)


def test_union_margin_keeps_the_best_original_unless_a_moved_particle_clearly_wins(value_sampler_parts):
    model, tok, vm = value_sampler_parts
    kw = dict(num_generations=4, max_completion_length=10, generation_batch_size=8, transport_steps=2,
              transport_step_size=2.0, transport_alpha=0.01, decoder="verified", max_edits=2, verify_candidates=4,
              verify_top=None)
    plain = VGFSampler(model, tok, vm, SamplerConfig(**kw), progress=False).sample(PROMPTS, seed=1)
    assert any(r.chosen_moved for r in plain)  # verified edits raise the value, so the union picks them
    for r in plain:
        assert all(p.score_after >= p.score_before - 1e-4 for p in r.particles)
    strict = VGFSampler(model, tok, vm, SamplerConfig(union_margin=1e6, **kw), progress=False).sample(PROMPTS, seed=1)
    for r in strict:
        best = max(range(4), key=lambda i: r.particles[i].score_before)
        assert not r.chosen_moved and r.chosen == best and r.response == r.particles[best].text_before


def test_each_product_has_its_own_measured_defaults():
    """Test time: per-step steering at the budget that won (docs/benchmarks.md, run 7's confirmation); the checked
    edits get their own measured budget when chosen. Training: its own transport group (frontier run 3), never
    inherited from the sampler, so a test-time winner cannot become a training default by accident."""
    sampler = SamplerConfig()
    assert (sampler.decoder, sampler.transport_steps, sampler.transport_step_size, sampler.steer_layer) == (
        "steer_prefix", 1, 0.2, None)
    verified = SamplerConfig(decoder="verified")
    assert (verified.transport_steps, verified.transport_step_size, verified.max_edits, verified.verify_top,
            verified.verify_candidates) == (3, 0.05, 5, 1, 4)
    assert SamplerConfig(decoder="verified", transport_steps=1).transport_steps == 1  # an explicit value wins
    trainer = VGFConfig(output_dir="unused")
    assert not isinstance(trainer, SamplerConfig) and not hasattr(trainer, "decoder")
    assert (trainer.transport_steps, trainer.transport_step_size, trainer.value_buffer_steps) == (1, 0.2, 8)
    assert sampler.union_margin == 0.0 and not hasattr(trainer, "union_margin")
    # generation_batch_size counts completions, as in TRL's GRPOConfig
    assert SamplerConfig(num_generations=8, generation_batch_size=32).prompts_per_generation == 4
    assert SamplerConfig(num_generations=6).prompts_per_generation == 4


@pytest.mark.parametrize("bad,message", [
    (dict(decoder="soft_topk"), "choose one of"), (dict(transport_steps=-1), "transport_steps=-1"),
    (dict(transport_step_size=-0.1), "transport_step_size=-0.1"), (dict(transport_alpha=0), "transport_alpha=0"),
    (dict(num_generations=0), "num_generations"), (dict(num_generations=8, generation_batch_size=12), "multiple"),
    (dict(temperature=0.0, num_generations=4), "temperature=0")])
def test_bad_sampler_settings_are_refused_naming_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**bad)
    shared = {k: v for k, v in bad.items() if k not in ("decoder", "transport_alpha")}  # the trainer has no such
    if shared:
        with pytest.raises(ValueError, match=message):
            VGFConfig(output_dir="unused", **shared)


def test_one_greedy_sample_is_allowed():
    assert SamplerConfig(temperature=0.0, num_generations=1, transport_steps=0).num_generations == 1
