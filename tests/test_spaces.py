"""Particle spaces (vgf_llm.spaces): the two kept spaces behind one interface, ``fit`` and ``move``."""

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHAT_PROMPTS as PROMPTS  # the chat prompts the conftest rollouts fixture samples
from conftest import _llama_config

from vgf_llm.rollout.hf import HFGenerateBackend, Rollouts
from vgf_llm.sampler import SamplerConfig
from vgf_llm.spaces import Budget, Moved, PrefixSteering, VerifiedEdits, make_space
from vgf_llm.spaces.reference import ReferenceTokens, movable_mask, special_token_ids
from vgf_llm.spaces.token_edits import value_and_grad
from vgf_llm.value import SCORE_CHUNK_ROWS, ValueModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory_model import PeakMemory  # noqa: E402


class TokenCountScorer:
    """A scorer with a known value: the number of "favourite" tokens in the response (the ``score_ids`` contract of
    ``ValueModel``/``RewardModelScorer``), on the model's own embedding table."""

    def __init__(self, model, favourite: torch.Tensor):
        self.embedding_weight = model.get_input_embeddings().weight
        self.favourite = favourite
        self.calls = []

    def score_ids(self, prompt_ids, prompt_mask, ids, mask):
        self.calls.append(len(ids))
        return (self.favourite[ids] * mask).sum(-1).float()


def test_special_tokens_and_padding_never_move(tokenizer, rollouts):
    special = special_token_ids(tokenizer)
    movable = movable_mask(rollouts.completion_ids, rollouts.completion_mask, special)
    is_special = torch.isin(rollouts.completion_ids, torch.tensor(sorted(special)))
    assert not movable[is_special].any() and not movable[rollouts.completion_mask == 0].any()
    assert movable.sum() > 0


def test_reference_reads_the_table_when_decoding_and_refuses_a_sharded_one(tiny_lm):
    """The trainer builds spaces before DeepSpeed ZeRO-3 gathers the embedding table, so they read it at decode
    time; outside a gather the table is an empty shard (DeepSpeed keeps the real shape in ``ds_shape``)."""
    table = torch.nn.Parameter(torch.zeros(6, 3), requires_grad=False)
    table.ds_shape, table.ds_id = torch.Size([6, 3]), 0  # as a ZeRO-3 parameter
    table.data = torch.empty(0)  # sharded at construction
    reference = ReferenceTokens(tiny_lm, table, exclude_ids=[5], k=2)
    assert reference.allowed.tolist() == [True] * 5 + [False]
    with pytest.raises(RuntimeError, match="sharded"):
        _ = reference.table
    table.data = torch.eye(6, 3) * 2  # inside a gather
    assert torch.equal(reference.table, torch.eye(6, 3) * 2)


def test_reference_top_k_are_the_references_most_likely_allowed_tokens(tiny_lm, tokenizer, rollouts):
    special = special_token_ids(tokenizer)
    reference = ReferenceTokens(tiny_lm, tiny_lm.get_input_embeddings().weight, exclude_ids=special, k=5)
    p_ids, p_mask, ids, _ = rollouts.flat()
    top = reference.topk(ids, p_ids, p_mask)
    assert top.shape == (*ids.shape, 5) and not torch.isin(top, torch.tensor(sorted(special))).any()
    full = torch.cat([rollouts.prompt_ids[0], ids[0]])[None]
    mask = torch.cat([rollouts.prompt_mask[0], torch.ones_like(ids[0])])[None]
    logits = tiny_lm(input_ids=full, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[0, rollouts.prompt_ids.shape[1] - 1]
    logits[sorted(special)] = -float("inf")
    assert set(top[0, 0].tolist()) == set(logits.topk(5).indices.tolist())


def wide_model_and_rollouts(tokenizer, vocab: int, rows: int, tokens: int):
    """A random tiny model whose vocabulary (``vocab``) dwarfs its width, and ``rows`` random responses of
    ``tokens`` tokens (2 prompts): the vocabulary-sized tensors dominate what a lift allocates."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(tokenizer, vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                           num_attention_heads=2, num_key_value_heads=2)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (2, rows // 2, tokens), generator=gen)  # no special tokens: nothing ends early
    p_ids = torch.randint(4, 300, (2, 6), generator=gen)
    ro = Rollouts(p_ids, torch.ones_like(p_ids), ids, torch.ones_like(ids), [[""] * (rows // 2)] * 2)
    return model, ro


def test_reference_top_k_runs_in_row_chunks_and_only_indices_leave_the_device(tokenizer):
    """Only [B, T, k] indices come out of the top-k: no pass sees more than ``REFERENCE_CHUNK_ROWS`` rows, and
    its memory grows with the vocabulary by less than one rows x tokens x vocabulary float32 tensor."""
    from vgf_llm.spaces.reference import REFERENCE_CHUNK_ROWS

    rows, tokens, peaks = 8 * REFERENCE_CHUNK_ROWS, 16, []
    for vocab in (1000, 2000):
        model, ro = wide_model_and_rollouts(tokenizer, vocab, rows, tokens)
        seen = []
        model.get_decoder().register_forward_pre_hook(lambda _m, _a, kw, seen=seen: seen.append(len(kw["input_ids"])),
                                                      with_kwargs=True)
        reference = ReferenceTokens(model, model.get_input_embeddings().weight, k=4)
        p_ids, p_mask, ids, _ = ro.flat()
        with PeakMemory() as memory:
            top = reference.topk(ids, p_ids, p_mask)
        assert top.shape == (rows, tokens, 4) and top.device.type == "cpu"
        assert max(seen) <= REFERENCE_CHUNK_ROWS, seen
        peaks.append(memory.peak)
    assert peaks[1] - peaks[0] < rows * tokens * 1000 * 4, peaks


def test_make_space_builds_every_kept_space_from_a_config(tiny_lm, tokenizer):
    vm = ValueModel(tiny_lm)
    verified = make_space("verified", tiny_lm, tokenizer, vm, SamplerConfig(decoder="verified", decoder_topk=3,
                                                                            max_edits=2, verify_candidates=5))
    assert isinstance(verified, VerifiedEdits) and verified.reference.k == 3 and verified.max_edits == 2
    assert verified.candidates == 5 and verified.verifier is vm
    steer = make_space("steer_prefix", tiny_lm, tokenizer, vm, SamplerConfig(steer_layer=1))
    assert isinstance(steer, PrefixSteering) and steer.steer_layer == 1
    with pytest.raises(ValueError, match="choose one of"):
        make_space("soft_topk", tiny_lm, tokenizer, vm, SamplerConfig())  # retired


def test_budget_names_the_wrong_value():
    for bad, name in ((dict(steps=-1, step_size=0.1), "transport_steps=-1"),
                      (dict(steps=1, step_size=-0.5), "transport_step_size=-0.5"),
                      (dict(steps=1, step_size=0.1, alpha=0), "transport_alpha=0")):
        with pytest.raises(ValueError, match=name):
            Budget(**bad)
    assert Budget(2, 0.1).flow_kwargs() == dict(steps=2, step_size=0.1, alpha=1.0, step_rule="adam", radius=None,
                                                repulsion=True)


# -- verified: embedding rows moved by a scorer, decoded by checked token edits --------------------------------------


def test_embedding_rows_lift_to_the_scorers_rows_and_take_its_gradient(tiny_lm, tokenizer, rollouts):
    vm = ValueModel(tiny_lm)
    space = VerifiedEdits(tiny_lm, tokenizer, vm)
    start, mask = space.lift(rollouts)
    weight = tiny_lm.get_input_embeddings().weight.detach()
    assert torch.equal(start, weight[rollouts.completion_ids]) and mask.shape == rollouts.shape
    values, grad = value_and_grad(vm, rollouts, start)
    p_ids, p_mask, ids, cmask = rollouts.flat()
    torch.testing.assert_close(values.reshape(-1), vm.score_ids(p_ids, p_mask, ids, cmask))
    assert grad.shape == start.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_value_gradient_runs_in_chunks_of_rows(tiny_lm, tokenizer, rollouts):
    """No ``score_embeds`` call of the transport's value-gradient pass (nor of the scoring) sees more than
    ``SCORE_CHUNK_ROWS`` rows; the chunks give the values and gradients of one pass over all rows."""
    vm = ValueModel(tiny_lm)
    rows = rollouts.shape[0] * rollouts.shape[1]
    assert rows > SCORE_CHUNK_ROWS
    start, _ = VerifiedEdits(tiny_lm, tokenizer, vm).lift(rollouts)
    p_ids, p_mask, _, cmask = rollouts.flat()
    leaf = start.clone().requires_grad_(True)
    whole = vm.score_embeds(p_ids, p_mask, leaf.reshape(rows, *start.shape[2:]), cmask)
    (whole_grad,) = torch.autograd.grad(whole.sum(), leaf)
    seen, score_embeds = [], vm.score_embeds

    def spy(prompt_ids, *args):
        seen.append(len(prompt_ids))
        return score_embeds(prompt_ids, *args)

    vm.score_embeds = spy
    values, grad = value_and_grad(vm, rollouts, start)
    vm.score_ids(*rollouts.flat())
    assert max(seen) <= SCORE_CHUNK_ROWS and sum(seen) == 2 * rows, seen
    torch.testing.assert_close(values.reshape(-1), whole.detach())
    torch.testing.assert_close(grad, whole_grad)


def test_verified_edits_only_keep_swaps_that_really_raise_the_value(tiny_lm, tokenizer, rollouts):
    vocab = tiny_lm.get_input_embeddings().weight.shape[0]
    favourite = torch.zeros(vocab)
    favourite[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:150]] = 1.0
    scorer = TokenCountScorer(tiny_lm, favourite)

    def space(**kw):
        return VerifiedEdits(tiny_lm, tokenizer, scorer, **{"topk": 8, "max_edits": 3, "candidates": 6, "top": None,
                                                            **kw})

    start, movable = space().lift(rollouts)
    ids, cmask = rollouts.completion_ids, rollouts.completion_mask
    noisy = start + 3 * torch.randn_like(start) * movable[..., None]
    new, stats = space().decode(rollouts, noisy)
    before = scorer.score_ids(None, None, ids.flatten(0, 1), cmask.flatten(0, 1))
    after = scorer.score_ids(None, None, new.flatten(0, 1), cmask.flatten(0, 1))
    assert (after >= before).all() and (after > before).any()  # never worse, sometimes better
    changed = (new != ids).sum(-1).flatten()
    assert (changed <= 3).all() and ((after - before) == changed).all()  # every kept swap gained exactly one
    assert torch.equal(new[movable == 0], ids[movable == 0])
    assert stats["evaluated"] <= 6 * 3 * ids.shape[0] * ids.shape[1]
    torch.testing.assert_close(stats["value_after"].flatten(), after)
    # a margin no swap can clear, or no movement at all: nothing changes
    assert torch.equal(space(margin=1.5).decode(rollouts, noisy)[0], ids)
    assert torch.equal(space().decode(rollouts, start)[0], ids)
    # top=1: only the best original of each prompt may be edited
    new1, _ = space(top=1).decode(rollouts, noisy)
    assert ((new1 != ids).any(-1).sum(-1) <= 1).all()


def test_the_verifier_given_at_construction_checks_the_edits_not_the_scorer(tiny_lm, tokenizer, rollouts):
    """The gradient comes from the scorer; whether a proposed swap is kept is the verifier's call: a verifier that
    values the opposite tokens keeps none of the swaps the scorer would keep, and the figures are the verifier's."""
    vocab = tiny_lm.get_input_embeddings().weight.shape[0]
    favourite = torch.zeros(vocab)
    favourite[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:150]] = 1.0
    scorer, verifier = TokenCountScorer(tiny_lm, favourite), TokenCountScorer(tiny_lm, 1.0 - favourite)
    space = VerifiedEdits(tiny_lm, tokenizer, scorer, verifier=verifier, max_edits=3, candidates=6, top=None)
    start, movable = space.lift(rollouts)
    new, stats = space.decode(rollouts, start + 3 * torch.randn_like(start) * movable[..., None])
    ids, cmask = rollouts.completion_ids.flatten(0, 1), rollouts.completion_mask.flatten(0, 1)
    assert verifier.calls and not scorer.calls  # only the verifier checked
    after = verifier.score_ids(None, None, new.flatten(0, 1), cmask)
    assert (after >= verifier.score_ids(None, None, ids, cmask)).all()
    torch.testing.assert_close(stats["value_after"].flatten(), after)


def test_verified_move_returns_the_moved_particles_through_the_one_interface(tiny_lm, tokenizer, rollouts):
    vm = ValueModel(tiny_lm)
    space = VerifiedEdits(tiny_lm, tokenizer, vm, top=None)
    assert space.fit(rollouts, torch.zeros(rollouts.shape[:2])) == {}  # reads its scorer: nothing to fit
    moved = space.move(rollouts, Budget(2, 0.5))
    assert isinstance(moved, Moved) and moved.ids.shape == rollouts.shape
    assert moved.trace.values.shape[0] == 2 and (moved.displacement > 0).any()
    assert moved.stats["rounds"] >= 0 and torch.equal(moved.mask, rollouts.completion_mask)
    p_ids, p_mask, _, cmask = rollouts.flat()
    assert (vm.score_ids(p_ids, p_mask, moved.ids.flatten(0, 1), cmask)
            >= vm.score_ids(p_ids, p_mask, rollouts.completion_ids.flatten(0, 1), cmask) - 1e-5).all()
    still = space.move(rollouts, Budget(0, 0.5))
    assert torch.equal(still.ids, rollouts.completion_ids) and not still.displacement.any()


# -- the regeneration machinery ------------------------------------------------------------------------------------


def test_posterior_gumbel_noise_re_creates_the_observed_token():
    from vgf_llm.spaces.regenerate import posterior_gumbel

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 30, generator=gen) * 3
    logits[:, 7] = -float("inf")  # an impossible token stays impossible
    observed = torch.distributions.Categorical(logits=logits).sample()
    noise = posterior_gumbel(logits, observed, gen)
    assert torch.equal((logits + noise).argmax(-1), observed)
    assert torch.isfinite(noise).all() and (noise[:, 7] == 0).all()
    # under other logits the same noise is a fresh Gumbel-max sample: a large shift towards token 3 makes it win
    shifted = logits.clone()
    shifted[:, 3] += 50
    assert ((shifted + noise).argmax(-1) == 3).all()


@pytest.fixture
def sharp_lm(tiny_lm_dir):
    """The tiny model with its (tied) embedding table scaled 20x: its next-token distributions are peaked like a
    trained model's, so a steer of a few units moves the logits by more than the sampling noise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20)
    return model


# -- per-step steering with a prefix value: the model's hidden state moved at every generated token -----------------


def favourite_prefix_value(model, favourite: int, layer: int = 1, sign: float = 1.0):
    """A prefix value whose weight is the (tied) output embedding of token ``favourite``: moving a state along it
    raises that token's logit at the next step."""
    from vgf_llm.prefix_value import PrefixValue

    d = model.config.hidden_size
    w = model.get_input_embeddings().weight[favourite].detach().float().clone()
    return PrefixValue(layer=layer, weight=sign * w, bias=0.0, mean=torch.zeros(d), std=torch.ones(d))


def test_prefix_value_fits_a_learnable_synthetic_reward(tiny_lm, tokenizer):
    """A final reward spread over the tokens (the mean of a fixed linear read-out of each token's embedding): the
    ridge on the prefixes' states recovers it out of fold, labels shuffled across responses leave nothing to
    recover, and the prefixes' values averaged over a response track its reward."""
    from vgf_llm.prefix_value import fit_prefix_value, prefix_states, response_means

    prompts = [[{"role": "user", "content": f"Say something about {w}."}] for w in
               ("a cat", "the sea", "a tree", "bread", "rain", "music", "a road", "snow")]
    ro = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=12, batch_size=4).generate(prompts, 6, seed=0)
    p_ids, p_mask, ids, mask = ro.flat()
    readout = tiny_lm.get_input_embeddings().weight.detach() @ torch.randn(
        tiny_lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    reward = (readout[ids] * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    groups = torch.arange(len(prompts)).repeat_interleave(6)
    states, rows = prefix_states(tiny_lm, 1, p_ids, p_mask, ids, mask)
    assert len(states) == int(mask.sum()) and torch.equal(rows.bincount(minlength=len(ids)), mask.sum(-1))
    pv = fit_prefix_value(1, states, rows, reward, groups)
    assert pv.layer == 1 and pv.weight.shape == (tiny_lm.config.hidden_size,)
    shuffled = fit_prefix_value(1, states, rows,
                                reward[torch.randperm(len(reward), generator=torch.Generator().manual_seed(1))], groups)
    assert pv.cv_corr > 0.15 and pv.cv_corr > shuffled.cv_corr + 0.2, (pv.cv_corr, shuffled.cv_corr)
    per_response = response_means(pv(states), rows, len(ids))
    by_hand = torch.zeros(len(ids)).index_add_(0, rows, pv(states.float())) / mask.sum(-1)
    torch.testing.assert_close(per_response, by_hand)
    assert torch.corrcoef(torch.stack([per_response, reward.float()]))[0, 1] > 0.7
    few = rows < 3
    assert fit_prefix_value(1, states[few], rows[few], reward, groups) is None
    six = rows < 6  # one prompt: folds of single responses then
    one_prompt = fit_prefix_value(1, states[six], rows[six], reward, groups)
    assert one_prompt is not None and math.isfinite(one_prompt.cv_corr)


def test_prefix_steering_fits_on_a_buffer_of_recent_batches_and_restores_it(tiny_lm, tokenizer):
    """``fit`` is the explicit call: it keeps the last ``buffer_steps`` batches, refits on all of them, reports the
    previous value's correlation with targets it never saw, and a restored buffer gives back the same value."""
    prompts = [[{"role": "user", "content": f"Say something about {w}."}] for w in ("a cat", "the sea", "a tree")]
    backend = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=10, batch_size=3)
    readout = tiny_lm.get_input_embeddings().weight.detach() @ torch.randn(
        tiny_lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    batches = [backend.generate(prompts, 4, seed=s) for s in range(3)]

    def reward(ro):
        return (readout[ro.completion_ids] * ro.completion_mask).sum(-1) / ro.completion_mask.sum(-1).clamp_min(1)

    space = PrefixSteering(tiny_lm, tokenizer, steer_layer=1, buffer_steps=2)
    first = space.fit(batches[0], reward(batches[0]))
    assert "corr" not in first and math.isfinite(first["cv_corr"]) and space.value is not None
    second = space.fit(batches[1], reward(batches[1]))
    assert math.isfinite(second["corr"]) and len(space.buffer) == 2
    space.fit(batches[2], reward(batches[2]))
    assert len(space.buffer) == 2 and space.buffer[0][0] is batches[1]  # the oldest batch left
    again = PrefixSteering(tiny_lm, tokenizer, steer_layer=1, buffer_steps=2)
    again.restore([space.buffer[0]])  # a checkpoint saved after batch 1: the next fit sees batches 1 and 2
    assert again.value is None  # nothing is read or fitted until then
    again.fit(batches[2], reward(batches[2]))
    torch.testing.assert_close(again.value.weight, space.value.weight)
    assert [ro for ro, _ in again.buffer] == [ro for ro, _ in space.buffer]


def test_prefix_steering_at_zero_step_reproduces_the_reference_samples(tiny_lm, tokenizer, rollouts):
    space = PrefixSteering(tiny_lm, tokenizer, steer_layer=1)
    with pytest.raises(ValueError, match="fit"):
        space.move(rollouts, Budget(1, 0.1))
    space.value = favourite_prefix_value(tiny_lm, 20)
    moved = space.move(rollouts, Budget(2, 0.0))  # every state goes through the hook, unmoved
    assert torch.equal(moved.mask, rollouts.completion_mask) and torch.equal(moved.ids, rollouts.completion_ids)
    assert not moved.displacement.any()
    assert moved.trace.values.shape[1:] == rollouts.shape[:2] and moved.trace.values.shape[0] > 2


def test_the_steering_noise_is_drawn_per_step_not_stored_for_every_token_of_the_vocabulary(tokenizer):
    """The posterior Gumbel noise of a move is drawn one generated position at a time ([rows, vocabulary]), never
    held as [rows, tokens, vocabulary]: the move's memory grows with the vocabulary by less than one such float32
    tensor (the old lift held several), and an unchanged model still re-creates its samples (tests above)."""
    rows, tokens, peaks = 8, 32, []
    for vocab in (1000, 2000):
        model, ro = wide_model_and_rollouts(tokenizer, vocab, rows, tokens)
        space = PrefixSteering(model, tokenizer, steer_layer=1)
        space.value = favourite_prefix_value(model, 20)
        with PeakMemory() as memory:
            space.move(ro, Budget(1, 0.0))
        peaks.append(memory.peak)
    assert peaks[1] - peaks[0] < rows * tokens * 1000 * 4, peaks


def test_prefix_steering_moves_the_decoded_tokens_towards_the_preferred_token(sharp_lm, tokenizer):
    rollouts = HFGenerateBackend(sharp_lm, tokenizer, max_new_tokens=12, batch_size=2).generate(PROMPTS, 4, seed=3)
    favourite = 20
    space = PrefixSteering(sharp_lm, tokenizer, steer_layer=1)

    def count(sign: float, step_size: float) -> int:
        space.value = favourite_prefix_value(sharp_lm, favourite, sign=sign)
        moved = space.move(rollouts, Budget(1, step_size))
        assert torch.isfinite(moved.trace.values).all() and not moved.trace.nonfinite.any()
        assert step_size == 0 or (moved.displacement > 0).all()
        return int(((moved.ids == favourite) & moved.mask.bool()).sum())

    original = int(((rollouts.completion_ids == favourite) & rollouts.completion_mask.bool()).sum())
    assert count(1.0, 0.0) == original
    up = [count(1.0, s) for s in (0.5, 2.0)]
    assert original <= up[0] <= up[1] and up[1] > original + 10, (original, up)
    assert count(-1.0, 2.0) <= original  # against the value: the token gets rarer


def test_the_sampler_fits_the_prefix_value_to_the_scorer_unless_given_labels(tiny_lm, tokenizer):
    """Without labels the sampler fits the prefix value to the scorer's values of each batch (an explicit call in
    the sampler, not a side effect of the space); with ``fit`` it keeps the labelled fit; budget 0 is best-of-N."""
    from vgf_llm.sampler import VGFSampler

    vm = ValueModel(tiny_lm)
    with torch.no_grad():
        vm.head.weight.copy_(tiny_lm.get_input_embeddings().weight[20][None])
    kw = dict(num_generations=4, max_completion_length=10, generation_batch_size=12, steer_layer=1)
    zero = VGFSampler(tiny_lm, tokenizer, vm, SamplerConfig(transport_steps=0, **kw), progress=False)
    moved = VGFSampler(tiny_lm, tokenizer, vm, SamplerConfig(transport_steps=1, transport_step_size=1.0, **kw),
                       progress=False)
    base, steered = zero.sample(PROMPTS, seed=2), moved.sample(PROMPTS, seed=2)
    assert zero.space.value is None  # budget 0 fits nothing
    assert moved.space.value is not None and moved.space.value.layer == 1
    assert [p.text_before for r in base for p in r.particles] == [p.text_before for r in steered for p in r.particles]
    assert sum(p.tokens_changed for r in steered for p in r.particles) > 0
    assert all(p.displacement > 0 for r in steered for p in r.particles)
    before = sum(p.score_before for r in steered for p in r.particles)
    after = sum(p.score_after for r in steered for p in r.particles)
    assert after > before  # the scorer prefers token 20; its distilled prefix value moves the text towards it
    labelled = moved.space.value
    ro = moved.rollout(PROMPTS, seed=5)
    moved.fit(ro, torch.randn(ro.shape[:2], generator=torch.Generator().manual_seed(0)))
    fitted = moved.space.value
    assert fitted is not labelled
    moved.transport_rollouts(PROMPTS, ro)
    assert moved.space.value is fitted  # labels given: batches no longer refit it


def test_prefix_steering_refuses_what_it_cannot_do(tiny_lm, tokenizer):
    with pytest.raises(ValueError, match="top_k=0"):
        PrefixSteering(tiny_lm, tokenizer, top_k=5)
    with pytest.raises(ValueError, match="steer_layer"):
        PrefixSteering(tiny_lm, tokenizer, steer_layer=tiny_lm.config.num_hidden_layers + 1)
    with pytest.raises(ValueError, match="value_buffer_steps"):
        PrefixSteering(tiny_lm, tokenizer, buffer_steps=0)


@pytest.mark.slow
def test_per_step_steering_on_smollm2_reproduces_at_zero_and_follows_its_prefix_value(smollm2_dir):
    """The real model: every state goes through the per-step transport unmoved at step size 0 and the samples come
    back token for token; a prefix value fitted on the samples' own "response mentions a digit" reward, followed
    with a real budget, changes tokens and never produces non-finite values."""
    from vgf_llm.models import load_model, load_tokenizer

    model, tok = load_model(str(smollm2_dir)).eval(), load_tokenizer(str(smollm2_dir))
    prompts = [[{"role": "user", "content": "Write one sentence about a river."}],
               [{"role": "user", "content": "What is 3 + 4?"}]]
    ro = HFGenerateBackend(model, tok, max_new_tokens=12, batch_size=2).generate(prompts, 4, seed=0)
    space = PrefixSteering(model, tok, steer_layer=8)
    digit = torch.tensor([float(any(ch.isdigit() for ch in t)) for group in ro.texts for t in group])
    digit[0] = 1 - digit[0]  # two classes whatever the samples say
    assert "cv_corr" in space.fit(ro, digit.view(2, 4))
    still = space.move(ro, Budget(1, 0.0))
    assert torch.equal(still.ids, ro.completion_ids) and torch.equal(still.mask, ro.completion_mask)
    moved = space.move(ro, Budget(1, 0.5))
    assert (moved.ids != ro.completion_ids).any() and (moved.displacement > 0).all()
    assert torch.isfinite(moved.trace.values).all()
