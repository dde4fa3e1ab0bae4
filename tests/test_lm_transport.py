"""Embedding particles, decoders, scorers and the sampler on the tiny offline model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

from vgf_llm.decoding import (
    ReferenceGainDecoder,
    ReferenceTopKDecoder,
    SoftTokenDecoder,
    VerifiedGainDecoder,
    regenerate_after_first_change,
)
from vgf_llm.particles import NearestTokenDecoder, lift, movable_mask
from vgf_llm.rollout import HFGenerateBackend, eos_token_ids, tokens_changed
from vgf_llm.sampler import TransportBudget, VGFSampler, best_of_n, special_token_ids
from vgf_llm.scorers import RewardModelScorer, ValueModel, ValueModelConfig, active_adapter
from vgf_llm.value_fitting import fit_value_head, pooled_features, prompt_groups

PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Say something nice."}],
           [{"role": "user", "content": "What is 2 + 2?"}]]


@pytest.fixture
def rollouts(tiny_lm, tokenizer):
    backend = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=12, batch_size=2)
    return backend.generate(PROMPTS, num_generations=4, seed=3)


def test_rollouts_have_the_documented_shape_and_are_seeded(tiny_lm, tokenizer, rollouts):
    g, n, t = rollouts.shape
    assert (g, n) == (3, 4) and t <= 12
    assert rollouts.prompt_ids.shape[0] == 3 and rollouts.prompt_mask[:, -1].all()  # left-padded
    eos = eos_token_ids(tiny_lm, tokenizer)
    for gi in range(g):
        for ni in range(n):
            m = rollouts.completion_mask[gi, ni].bool()
            assert m[: int(m.sum())].all()  # the mask is a prefix
            real = rollouts.completion_ids[gi, ni][m]
            assert not any(int(x) in eos for x in real[:-1])  # EOS only at the end
            assert rollouts.texts[gi][ni] == tokenizer.decode(real, skip_special_tokens=True)
    again = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=12, batch_size=2).generate(PROMPTS, 4, seed=3)
    assert torch.equal(again.completion_ids, rollouts.completion_ids)
    other = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=12, batch_size=2).generate(PROMPTS, 4, seed=4)
    assert not torch.equal(other.completion_ids, rollouts.completion_ids)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_sends_no_flag_transformers_calls_invalid(tiny_lm, tokenizer, temperature, caplog):
    """Greedy generation with sampling knobs set (top_k=0 by default) used to make transformers warn on every call."""
    transformers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            ro = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=4, temperature=temperature).generate(PROMPTS, 2)
    finally:
        transformers_logging.disable_propagation()
    assert ro.shape[:2] == (3, 2)
    assert not [r for r in caplog.records if "not valid" in r.getMessage()]


def test_tokens_changed_counts_swaps_and_length_differences():
    old = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    old_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    new = torch.tensor([[5, 9, 7, 4, 4, 0], [5, 6, 0, 0, 0, 0]])  # wider; a pad id equal to a real one is not real
    new_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    assert tokens_changed(old, old_mask, new, new_mask).tolist() == [1 + 2, 2]
    assert tokens_changed(old, old_mask, old, old_mask).tolist() == [0, 0]


def test_lift_then_decode_without_movement_returns_the_original_tokens(tiny_lm, tokenizer, rollouts):
    weight = tiny_lm.get_input_embeddings().weight
    special = special_token_ids(tokenizer)
    movable = movable_mask(rollouts.completion_ids, rollouts.completion_mask, special)
    rows = lift(weight, rollouts.completion_ids)
    decoder = NearestTokenDecoder(weight, exclude_ids=special)
    assert torch.equal(decoder.decode(rows, rows, rollouts.completion_ids, movable), rollouts.completion_ids)
    # also when every row is decoded (no shortcut for unmoved rows): exact rows are their own nearest token
    real = movable.bool()
    assert torch.equal(decoder.nearest(rows[real]), rollouts.completion_ids[real])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_decoding_picks_the_true_nearest_rows_in_chunks(metric):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 16, generator=gen)
    rows = torch.randn(37, 16, generator=gen)
    excluded = {0, 5, 17}
    got = NearestTokenDecoder(table, exclude_ids=excluded, metric=metric, vocab_chunk=64, row_chunk=10).nearest(rows)
    if metric == "l2":
        dist = torch.cdist(rows, table)
    else:
        dist = -torch.nn.functional.normalize(rows, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    dist[:, sorted(excluded)] = float("inf")
    assert torch.equal(got, dist.argmin(-1))


def test_nearest_decoder_reads_the_table_when_decoding_and_refuses_a_sharded_one():
    """The trainer builds decoders before DeepSpeed ZeRO-3 gathers the embedding table, so they must read it at
    decode time; outside a gather the table is an empty shard (DeepSpeed keeps the real shape in ``ds_shape``)."""
    table = torch.nn.Parameter(torch.zeros(6, 3), requires_grad=False)
    table.ds_shape, table.ds_id = torch.Size([6, 3]), 0  # as a ZeRO-3 parameter
    full = torch.eye(6, 3) * 2
    table.data = torch.empty(0)  # sharded at construction
    decoder = NearestTokenDecoder(table, exclude_ids=[5])
    with pytest.raises(RuntimeError, match="sharded"):
        decoder.nearest(torch.zeros(1, 3))
    table.data = full.clone()  # inside a gather
    assert decoder.nearest(full[:3] + 0.1).tolist() == [0, 1, 2]
    table.data = torch.empty(0)  # released again: the decoder kept its own copy of the search table
    assert decoder.nearest(full[1:2]).tolist() == [1]


def test_special_tokens_and_padding_never_move(tokenizer, rollouts):
    special = special_token_ids(tokenizer)
    movable = movable_mask(rollouts.completion_ids, rollouts.completion_mask, special)
    is_special = torch.isin(rollouts.completion_ids, torch.tensor(sorted(special)))
    assert not movable[is_special].any() and not movable[rollouts.completion_mask == 0].any()
    assert movable.sum() > 0


def _value_data(model, tokenizer, rollouts):
    g, n, t = rollouts.shape
    ids = rollouts.completion_ids.reshape(g * n, t)
    mask = rollouts.completion_mask.reshape(g * n, t)
    # a learnable synthetic reward: the fraction of response tokens with an even id
    target = ((ids % 2 == 0) & mask.bool()).sum(-1) / mask.sum(-1).clamp_min(1)
    return (rollouts.prompt_ids.repeat_interleave(n, 0), rollouts.prompt_mask.repeat_interleave(n, 0), ids, mask,
            target.float())


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


def test_decode_consistent_copies_flip_tokens_and_carry_the_reward_of_their_decoded_text(tiny_lm, tokenizer):
    """The perturbed copies move rows towards reference top-k tokens; a real share of them decode to another token,
    and each copy's label is the true reward of exactly that decoded text."""
    from vgf_llm.value_fitting import perturbed_examples

    ro = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=10, batch_size=8).generate(PROMPTS, 4, seed=0)
    rows = [{"prompt": p} for p in PROMPTS]
    texts_seen = []

    def reward(prompts, completions, **kw):  # records what it scores; a reward that depends on the text
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        texts_seen.extend(texts)
        return [float(len(set(t))) for t in texts]

    weight = tiny_lm.get_input_embeddings().weight
    special = special_token_ids(tokenizer)
    p_ids, p_mask, noisy, mask, targets, frac = perturbed_examples(
        ro, rows, [reward], None, tiny_lm, weight, tokenizer, special, edit_fraction=0.5, copies=2, seed=0)
    assert noisy.shape == (2 * 12, ro.shape[2], weight.shape[1]) and targets.shape == (24,)
    assert 0.02 < frac < 0.5  # tokens really flip (the isotropic noise it replaces flipped none), most do not
    decoded = NearestTokenDecoder(weight, exclude_ids=special).nearest(noisy)
    ids = ro.completion_ids.reshape(12, -1).repeat(2, 1)
    movable = movable_mask(ids, mask, special).bool()
    decoded = torch.where(movable, decoded, ids)  # rows that may not move keep their token
    expected = [tokenizer.decode(decoded[i][mask[i].bool()], skip_special_tokens=True) for i in range(24)]
    assert texts_seen == expected
    assert targets.tolist() == [float(len(set(t))) for t in expected]


def test_value_model_gradients_reach_particles_only(tiny_lm, tokenizer, rollouts):
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4, num_layers=1, num_heads=3, aggregate="min"))
    p_ids, p_mask, ids, mask, _ = _value_data(tiny_lm, tokenizer, rollouts)
    rows = vm.embedding_weight[ids].detach().requires_grad_(True)
    values = vm.score_embeds(p_ids, p_mask, rows, mask)
    assert values.shape == (ids.shape[0],)
    values.sum().backward()
    assert rows.grad is not None and torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_lm.parameters())
    torch.testing.assert_close(vm.score_ids(p_ids, p_mask, ids, mask), values.detach())


def test_value_model_save_and_load_round_trip(tiny_lm_dir, tiny_lm, tokenizer, rollouts, tmp_path):
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4, num_heads=2))
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


def test_reference_topk_decoding_keeps_unmoved_tokens_and_stays_in_candidates(tiny_lm, tokenizer, rollouts):
    weight = tiny_lm.get_input_embeddings().weight
    special = special_token_ids(tokenizer)
    ids, cmask = rollouts.completion_ids, rollouts.completion_mask
    movable = movable_mask(ids, cmask, special)
    start = lift(weight, ids)
    dec = ReferenceTopKDecoder(tiny_lm, k=3, exclude_ids=special)
    assert torch.equal(dec.decode(start, start, ids, movable, rollouts.prompt_ids, rollouts.prompt_mask), ids)
    tiny = start + 1e-4 * torch.randn_like(start) * movable[..., None]
    assert torch.equal(dec.decode(tiny, start, ids, movable, rollouts.prompt_ids, rollouts.prompt_mask), ids)
    far = start + 50 * torch.randn_like(start) * movable[..., None]
    new = dec.decode(far, start, ids, movable, rollouts.prompt_ids, rollouts.prompt_mask)
    assert (new != ids).any() and torch.equal(new[movable == 0], ids[movable == 0])
    assert not torch.isin(new[movable.bool()], torch.tensor(sorted(special))).any()


def test_teacher_forced_topk_equals_sequential_up_to_the_first_edit(tiny_lm, tokenizer, rollouts):
    weight = tiny_lm.get_input_embeddings().weight
    special = special_token_ids(tokenizer)
    ids, cmask = rollouts.completion_ids, rollouts.completion_mask
    movable = movable_mask(ids, cmask, special)
    start = lift(weight, ids)
    far = start + 3 * torch.randn_like(start) * movable[..., None]
    args = (far, start, ids, movable, rollouts.prompt_ids, rollouts.prompt_mask)
    seq = ReferenceTopKDecoder(tiny_lm, k=4, exclude_ids=special, sequential=True).decode(*args)
    fast = ReferenceTopKDecoder(tiny_lm, k=4, exclude_ids=special, sequential=False).decode(*args)
    diff = seq != ids
    assert diff.any()
    first = torch.where(diff.any(-1), diff.long().argmax(-1), ids.shape[-1] - 1)
    for g in range(ids.shape[0]):
        for n in range(ids.shape[1]):
            f = int(first[g, n]) + 1
            assert torch.equal(seq[g, n, :f], fast[g, n, :f])


def test_gain_decoder_follows_the_displacement_towards_a_reference_candidate(tiny_lm, tokenizer, rollouts):
    weight = tiny_lm.get_input_embeddings().weight.detach()
    special = special_token_ids(tokenizer)
    ids, cmask = rollouts.completion_ids, rollouts.completion_mask
    movable = movable_mask(ids, cmask, special)
    start = lift(weight, ids)
    args = (rollouts.prompt_ids, rollouts.prompt_mask)
    dec = ReferenceGainDecoder(tiny_lm, k=4, max_edits=1, exclude_ids=special)
    assert torch.equal(dec.decode(start, start, ids, movable, *args), ids)  # no move, no edit
    # point one row of particle (0, 0) exactly at one of the reference's top-k candidates for that position
    pos = int(movable[0, 0].nonzero()[0])
    full = torch.cat([rollouts.prompt_ids[0], ids[0, 0]])[None]
    logits = tiny_lm(input_ids=full).logits[0, rollouts.prompt_ids.shape[1] - 1 + pos]
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[sorted(special)] = False
    top = logits.masked_fill(~allowed, -float("inf")).topk(4).indices
    target = int(next(c for c in top if c != ids[0, 0, pos]))
    moved = start.clone()
    moved[0, 0, pos] += 5 * (weight[target] - weight[ids[0, 0, pos]])
    new = dec.decode(moved, start, ids, movable, *args)
    assert new[0, 0, pos] == target
    assert int((new != ids).sum()) == 1
    # random moves: at most max_edits tokens per response change, never a special or padding position
    noisy = start + torch.randn_like(start) * movable[..., None]
    for k in (1, 3):
        new = ReferenceGainDecoder(tiny_lm, k=4, max_edits=k, exclude_ids=special).decode(noisy, start, ids, movable,
                                                                                             *args)
        assert ((new != ids).sum(-1) <= k).all() and (new != ids).any()
        assert torch.equal(new[movable == 0], ids[movable == 0])


def test_regeneration_keeps_the_prefix_up_to_the_first_edit(tiny_lm, tokenizer, rollouts):
    ids, cmask = rollouts.completion_ids, rollouts.completion_mask
    edited = ids.clone()
    edited[0, 1, 0] = (ids[0, 1, 0] + 1) % 50 + 10  # edit the first token of one response
    new, mask = regenerate_after_first_change(
        tiny_lm, tokenizer, rollouts.prompt_ids, rollouts.prompt_mask, edited, ids, cmask,
        eos_ids=eos_token_ids(tiny_lm, tokenizer), max_new_tokens=12, seed=0)
    assert new[0, 1, 0] == edited[0, 1, 0] and mask[0, 1].sum() <= 12
    for g, n in [(0, 0), (1, 2), (2, 3)]:  # untouched responses are returned as they were
        m = cmask[g, n].bool()
        assert torch.equal(new[g, n][mask[g, n].bool()], ids[g, n][m])


@pytest.fixture
def value_sampler_parts(tiny_lm, tokenizer):
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    with torch.no_grad():
        vm.head.weight.normal_()
    return tiny_lm, tokenizer, vm


def test_budget_zero_equals_best_of_n(value_sampler_parts):
    model, tok, vm = value_sampler_parts
    sampler = VGFSampler(model, tok, vm, num_particles=4, budget=TransportBudget(steps=0), max_new_tokens=10,
                         batch_size=2, progress=False)
    got = sampler.sample(PROMPTS, seed=5)
    expected = best_of_n(model, tok, vm, PROMPTS, num_particles=4, seed=5, batch_size=2, max_new_tokens=10)
    assert [(r.response, r.chosen) for r in got] == expected
    assert all(p.tokens_changed == 0 and p.text_before == p.text_after for r in got for p in r.particles)


@pytest.mark.parametrize("decoder,regenerate,selection,fluency", [
    ("nearest", False, "final", 0.0), ("reference_topk", True, "union", 0.5), ("nearest", False, "union", 0.0),
    ("reference_gain", False, "union", 0.0), ("verified", False, "union", 0.0), ("soft_topk", False, "union", 0.0)])
def test_sampler_moves_particles_and_reports_every_field(value_sampler_parts, decoder, regenerate, selection,
                                                         fluency):
    model, tok, vm = value_sampler_parts
    sampler = VGFSampler(model, tok, vm, num_particles=4, max_new_tokens=10, batch_size=2, progress=False,
                         budget=TransportBudget(steps=3, step_size=2.0, step_rule="sgd", alpha=0.01),
                         decoder=decoder, regenerate=regenerate, selection=selection, fluency_weight=fluency)
    results = sampler.sample(PROMPTS, seed=1)
    assert len(results) == len(PROMPTS)
    for r in results:
        assert len(r.particles) == 4 and 0 <= r.chosen < 4
        scores = [p.score_after for p in r.particles] + [p.score_before for p in r.particles]
        assert all(torch.isfinite(torch.tensor(scores)))
        chosen = r.particles[r.chosen]
        assert r.response == (chosen.text_after if r.chosen_moved else chosen.text_before)
        best = max(p.score_after for p in r.particles)
        if selection == "union":
            best = max(best, max(p.score_before for p in r.particles))
        assert (chosen.score_after if r.chosen_moved else chosen.score_before) == pytest.approx(best)
    assert sum(p.tokens_changed for r in results for p in r.particles) > 0
    assert all(p.displacement > 0 for r in results for p in r.particles)


def test_soft_token_particles_mix_reference_candidates_and_decode_the_winners(tiny_lm, tokenizer, rollouts):
    special = special_token_ids(tokenizer)
    dec = SoftTokenDecoder(tiny_lm, k=5, max_edits=1, init_margin=6.0, exclude_ids=special)
    ids = rollouts.completion_ids
    cand = dec.candidates(ids, rollouts.prompt_ids, rollouts.prompt_mask)
    assert cand.shape == (*ids.shape, 5) and torch.equal(cand[..., 0], ids)  # the original token in slot 0
    assert all(len(set(row.tolist())) == 5 for row in cand.reshape(-1, 5))  # no candidate twice
    assert not torch.isin(cand[..., 1:], torch.tensor(sorted(special))).any()  # specials are never proposed
    table = tiny_lm.get_input_embeddings().weight.detach()
    # the start rows sit next to the original tokens: nearer to them than to any other candidate
    start_rows = dec.rows(dec.start(cand), cand)
    dist = (start_rows[..., None, :] - table[cand]).norm(dim=-1)
    assert (dist.argmin(-1) == 0).all()
    # gradients reach the logits through the mixture: the candidate most aligned with the objective gains most
    z = dec.start(cand).requires_grad_(True)
    direction = torch.randn(table.shape[1])
    (dec.rows(z, cand) @ direction).sum().backward()
    aligned = (table[cand] @ direction)[..., 1:].argmax(-1)
    assert torch.equal(z.grad[..., 1:].argmax(-1), aligned)
    # decoding: where a candidate overtook the original, the largest margin per response wins (max_edits=1)
    movable = movable_mask(ids, rollouts.completion_mask, special)
    z = dec.start(cand)
    assert torch.equal(dec.decode_soft(z, cand, ids, movable), ids)  # nothing overtaken: nothing changes
    pos = movable[0, 0].nonzero().squeeze(1)[:2].tolist()
    z[0, 0, pos[0], 2], z[0, 0, pos[1], 3] = 1.0, 2.0
    got = dec.decode_soft(z, cand, ids, movable)
    assert got[0, 0, pos[1]] == cand[0, 0, pos[1], 3] and got[0, 0, pos[0]] == ids[0, 0, pos[0]]
    assert (got != ids).sum() == 1
    z[..., 1] = 9.0  # every position overtaken, but padding and special tokens never change
    got = dec.decode_soft(z, cand, ids, movable)
    assert torch.equal(got[~movable.bool()], ids[~movable.bool()])


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
    g, n, t = ro.shape
    args = (ro.prompt_ids.repeat_interleave(n, 0), ro.prompt_mask.repeat_interleave(n, 0),
            ro.completion_ids.reshape(g * n, t), ro.completion_mask.reshape(g * n, t))
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


def _verified_setup(tiny_lm, tokenizer, rollouts):
    special = special_token_ids(tokenizer)
    weight = tiny_lm.get_input_embeddings().weight.detach()
    ids, cmask = rollouts.completion_ids, rollouts.completion_mask
    movable = movable_mask(ids, cmask, special)
    return special, weight, ids, cmask, movable, lift(weight, ids)


def test_verified_decoder_only_keeps_swaps_that_really_raise_the_value(tiny_lm, tokenizer, rollouts):
    special, weight, ids, cmask, movable, start = _verified_setup(tiny_lm, tokenizer, rollouts)
    prompt = (rollouts.prompt_ids, rollouts.prompt_mask)
    favourite = torch.zeros(weight.shape[0])
    favourite[torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(1))[:150]] = 1.0
    calls = []

    def value_fn(p_ids, p_mask, seq, mask):  # the count of "favourite" tokens: an exact, known value
        calls.append(len(seq))
        return (favourite[seq] * mask).sum(-1)

    noisy = start + 3 * torch.randn_like(start) * movable[..., None]
    dec = VerifiedGainDecoder(tiny_lm, value_fn, k=8, max_edits=3, candidates=6, exclude_ids=special)
    new = dec.decode(noisy, start, ids, movable, *prompt, cmask)
    before, after = value_fn(None, None, ids.flatten(0, 1), cmask.flatten(0, 1)), value_fn(
        None, None, new.flatten(0, 1), cmask.flatten(0, 1))
    assert (after >= before).all() and (after > before).any()  # never worse, sometimes better
    changed = (new != ids).sum(-1).flatten()
    assert (changed <= 3).all() and ((after - before) == changed).all()  # every kept swap gained exactly one
    assert torch.equal(new[movable == 0], ids[movable == 0])
    assert dec.last_stats["evaluated"] <= 6 * 3 * ids.shape[0] * ids.shape[1]
    torch.testing.assert_close(dec.last_stats["value_after"].flatten(), after)
    # a margin no swap can clear, or no movement at all: nothing changes
    strict = VerifiedGainDecoder(tiny_lm, value_fn, k=8, max_edits=3, candidates=6, margin=1.5, exclude_ids=special)
    assert torch.equal(strict.decode(noisy, start, ids, movable, *prompt, cmask), ids)
    assert torch.equal(dec.decode(start, start, ids, movable, *prompt, cmask), ids)
    # top=1: only the best original of each prompt may be edited
    top1 = VerifiedGainDecoder(tiny_lm, value_fn, k=8, max_edits=3, candidates=6, top=1, exclude_ids=special)
    new1 = top1.decode(noisy, start, ids, movable, *prompt, cmask)
    assert ((new1 != ids).any(-1).sum(-1) <= 1).all()


def test_union_margin_keeps_the_best_original_unless_a_moved_particle_clearly_wins(value_sampler_parts):
    model, tok, vm = value_sampler_parts
    kw = dict(num_particles=4, max_new_tokens=10, batch_size=2, progress=False, selection="union",
              budget=TransportBudget(steps=2, step_size=2.0, step_rule="sgd", alpha=0.01), decoder="verified",
              max_edits=2, verify_candidates=4)
    plain = VGFSampler(model, tok, vm, **kw).sample(PROMPTS, seed=1)
    assert any(r.chosen_moved for r in plain)  # verified edits raise the value, so union picks them
    for r in plain:
        assert all(p.score_after >= p.score_before - 1e-4 for p in r.particles)
    strict = VGFSampler(model, tok, vm, union_margin=1e6, **kw).sample(PROMPTS, seed=1)
    for r in strict:
        best = max(range(4), key=lambda i: r.particles[i].score_before)
        assert not r.chosen_moved and r.chosen == best and r.response == r.particles[best].text_before
