"""Particle spaces (vgf_llm.spaces): lift, gradient and decoding of embedding-row and soft-token particles."""

import math

import pytest
import torch
from conftest import CHAT_PROMPTS as PROMPTS  # the chat prompts the conftest rollouts fixture samples

from vgf_llm.rollout.hf import HFGenerateBackend
from vgf_llm.sampler import SamplerConfig
from vgf_llm.spaces import (
    SPACES,
    GainEdits,
    ReferenceTokens,
    SoftTokens,
    VerifiedEdits,
    make_space,
    movable_mask,
    special_token_ids,
)
from vgf_llm.value import ValueModel, ValueModelConfig


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


def test_reference_candidates_put_the_original_first_and_never_propose_specials(tiny_lm, tokenizer, rollouts):
    special = special_token_ids(tokenizer)
    reference = ReferenceTokens(tiny_lm, tiny_lm.get_input_embeddings().weight, exclude_ids=special, k=5)
    p_ids, p_mask, ids, _ = rollouts.flat()
    cand = reference.candidates(ids, p_ids, p_mask, batch_size=5)
    assert cand.shape == (*ids.shape, 5) and torch.equal(cand[..., 0], ids)
    assert all(len(set(row.tolist())) == 5 for row in cand.reshape(-1, 5))  # no candidate twice
    assert not torch.isin(cand[..., 1:], torch.tensor(sorted(special))).any()
    # the top-k are the reference's most likely next tokens, from one teacher-forced pass
    full = torch.cat([rollouts.prompt_ids[0], ids[0]])[None]
    mask = torch.cat([rollouts.prompt_mask[0], torch.ones_like(ids[0])])[None]
    logits = tiny_lm(input_ids=full, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[0, rollouts.prompt_ids.shape[1] - 1]
    logits[sorted(special)] = -float("inf")
    assert set(reference.topk(ids[:1], p_ids[:1], p_mask[:1])[0, 0].tolist()) == set(logits.topk(5).indices.tolist())


def reward_scorer(tiny_reward_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from vgf_llm.value import RewardModelScorer

    return RewardModelScorer(AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir),
                             AutoTokenizer.from_pretrained(tiny_reward_model_dir), tokenizer)


def test_make_space_builds_every_named_space_from_a_config(tiny_lm, tokenizer, tiny_reward_model_dir):
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    rm = reward_scorer(tiny_reward_model_dir, tokenizer)
    for name, cls in SPACES.items():
        config = SamplerConfig(decoder=name, decoder_topk=3, max_edits=2, steer_layer=1)
        space = make_space(name, tiny_lm, tokenizer, rm if name == "tilt_reward" else vm, config)
        assert isinstance(space, cls)
        if name == "tilt_reward":
            assert space.topk == 3 and space.reward_model is rm.model
        elif name in ("steer", "steer_prefix", "tilt_prefix"):
            assert space.steer_layer == 1 and getattr(space, "topk", 3) == 3
        else:
            assert space.max_edits == 2 and space.reference.k == 3
    with pytest.raises(ValueError, match="choose one of"):
        make_space("nearest", tiny_lm, tokenizer, vm, SamplerConfig())


def test_embedding_rows_lift_to_the_scorers_rows_and_take_its_gradient(tiny_lm, tokenizer, rollouts):
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    with torch.no_grad():
        vm.head.weight.normal_()
    space = GainEdits(tiny_lm, vm, exclude_ids=special_token_ids(tokenizer))
    particles = space.lift(rollouts)
    weight = tiny_lm.get_input_embeddings().weight.detach()
    assert torch.equal(particles.start, weight[rollouts.completion_ids])
    values, grad = space.grad(particles, particles.start)
    p_ids, p_mask, ids, mask = rollouts.flat()
    torch.testing.assert_close(values.reshape(-1), vm.score_ids(p_ids, p_mask, ids, mask))
    assert grad.shape == particles.start.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gain_edits_follow_the_move_towards_a_reference_candidate(tiny_lm, tokenizer, rollouts):
    special = special_token_ids(tokenizer)
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    space = GainEdits(tiny_lm, vm, exclude_ids=special, topk=4, max_edits=1)
    particles = space.lift(rollouts)
    ids, movable, start = rollouts.completion_ids, particles.mask, particles.start
    weight = tiny_lm.get_input_embeddings().weight.detach()
    assert torch.equal(space.decode(particles, start)[0], ids)  # no move, no edit
    # point one row of particle (0, 0) exactly at one of the reference's top-k candidates for that position
    pos = int(movable[0, 0].nonzero()[0])
    p_ids, p_mask, flat_ids, _ = rollouts.flat()
    top = space.reference.topk(flat_ids[:1], p_ids[:1], p_mask[:1])[0, pos]
    target = int(next(c for c in top if c != ids[0, 0, pos]))
    moved = start.clone()
    moved[0, 0, pos] += 5 * (weight[target] - weight[ids[0, 0, pos]])
    new, mask = space.decode(particles, moved)
    assert new[0, 0, pos] == target and int((new != ids).sum()) == 1 and torch.equal(mask, rollouts.completion_mask)
    # random moves: at most max_edits tokens per response change, never a special or padding position
    noisy = start + torch.randn_like(start) * movable[..., None]
    for k in (1, 3):
        new, _ = GainEdits(tiny_lm, vm, exclude_ids=special, topk=4, max_edits=k).decode(particles, noisy)
        assert ((new != ids).sum(-1) <= k).all() and (new != ids).any()
        assert torch.equal(new[movable == 0], ids[movable == 0])


def test_verified_edits_only_keep_swaps_that_really_raise_the_value(tiny_lm, tokenizer, rollouts):
    special = special_token_ids(tokenizer)
    vocab = tiny_lm.get_input_embeddings().weight.shape[0]
    favourite = torch.zeros(vocab)
    favourite[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:150]] = 1.0
    scorer = TokenCountScorer(tiny_lm, favourite)

    def space(**kw):
        return VerifiedEdits(tiny_lm, scorer, exclude_ids=special, **{"topk": 8, "max_edits": 3, "candidates": 6,
                                                                        "top": None, **kw})

    particles = space().lift(rollouts)
    ids, cmask, movable, start = rollouts.completion_ids, rollouts.completion_mask, particles.mask, particles.start
    noisy = start + 3 * torch.randn_like(start) * movable[..., None]
    dec = space()
    new, _ = dec.decode(particles, noisy)
    before = scorer.score_ids(None, None, ids.flatten(0, 1), cmask.flatten(0, 1))
    after = scorer.score_ids(None, None, new.flatten(0, 1), cmask.flatten(0, 1))
    assert (after >= before).all() and (after > before).any()  # never worse, sometimes better
    changed = (new != ids).sum(-1).flatten()
    assert (changed <= 3).all() and ((after - before) == changed).all()  # every kept swap gained exactly one
    assert torch.equal(new[movable == 0], ids[movable == 0])
    assert dec.last_stats["evaluated"] <= 6 * 3 * ids.shape[0] * ids.shape[1]
    torch.testing.assert_close(dec.last_stats["value_after"].flatten(), after)
    # a margin no swap can clear, or no movement at all: nothing changes
    assert torch.equal(space(margin=1.5).decode(particles, noisy)[0], ids)
    assert torch.equal(dec.decode(particles, start)[0], ids)
    # top=1: only the best original of each prompt may be edited
    new1, _ = space(top=1).decode(particles, noisy)
    assert ((new1 != ids).any(-1).sum(-1) <= 1).all()


def test_soft_tokens_mix_reference_candidates_and_decode_the_winners(tiny_lm, tokenizer, rollouts):
    special = special_token_ids(tokenizer)
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    space = SoftTokens(tiny_lm, vm, exclude_ids=special, topk=5, max_edits=1, init_margin=6.0)
    particles = space.lift(rollouts)
    ids, movable, cand = rollouts.completion_ids, particles.mask, particles.state["candidates"]
    assert cand.shape == (*ids.shape, 5) and torch.equal(cand[..., 0], ids) and particles.start.shape == cand.shape
    table = tiny_lm.get_input_embeddings().weight.detach()
    # the start rows sit next to the original tokens: nearer to them than to any other candidate
    dist = (space.rows(particles.start, particles)[..., None, :] - table[cand]).norm(dim=-1)
    assert (dist.argmin(-1) == 0).all()
    # gradients reach the logits through the mixture: the candidate most aligned with the objective gains most
    z = particles.start.clone().requires_grad_(True)
    direction = torch.randn(table.shape[1])
    (space.rows(z, particles) @ direction).sum().backward()
    assert torch.equal(z.grad[..., 1:].argmax(-1), (table[cand] @ direction)[..., 1:].argmax(-1))
    # decoding: where a candidate overtook the original, the largest margin per response wins (max_edits=1)
    z = particles.start.clone()
    assert torch.equal(space.decode(particles, z)[0], ids)  # nothing overtaken: nothing changes
    pos = movable[0, 0].nonzero().squeeze(1)[:2].tolist()
    z[0, 0, pos[0], 2], z[0, 0, pos[1], 3] = 1.0, 2.0
    got, _ = space.decode(particles, z)
    assert got[0, 0, pos[1]] == cand[0, 0, pos[1], 3] and got[0, 0, pos[0]] == ids[0, 0, pos[0]]
    assert (got != ids).sum() == 1
    z[..., 1] = 9.0  # every position overtaken, but padding and special tokens never change
    got, _ = space.decode(particles, z)
    assert torch.equal(got[~movable.bool()], ids[~movable.bool()])
    assert space.repulsion is False  # logits of two particles index different candidate sets


# -- steering vectors: particles the model decodes itself -----------------------------------------------------------


def test_posterior_gumbel_noise_re_creates_the_observed_token():
    from vgf_llm.spaces.steering import posterior_gumbel

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


def steer_value_model(tiny_lm, favourite: int):
    """A value model whose value is the mean logit of token ``favourite`` over the response: a head that prefers
    one token (the tiny model ties its output head to the embedding table)."""
    vm = ValueModel(tiny_lm, ValueModelConfig(lora_r=4))
    with torch.no_grad():
        vm.head.weight.copy_(tiny_lm.get_input_embeddings().weight[favourite][None])
        vm.head.bias.zero_()
    return vm


def test_steering_at_zero_reproduces_the_reference_samples_through_the_model(tiny_lm, tokenizer, rollouts):
    from vgf_llm.spaces import SteeringVectors

    space = SteeringVectors(tiny_lm, tokenizer, steer_value_model(tiny_lm, 20), steer_layer=1)
    particles = space.lift(rollouts)
    assert particles.start.shape == (*rollouts.shape[:2], tiny_lm.config.hidden_size)
    assert not particles.start.any()
    assert particles.state["noise"].shape[:2] == rollouts.completion_ids.flatten(0, 1).shape
    ids, mask = space.decode(particles, particles.start)  # u = 0: nothing to regenerate
    assert torch.equal(ids, rollouts.completion_ids) and torch.equal(mask, rollouts.completion_mask)
    # a vanishing steer goes through the model's own generation and still gives every sample back, token for token
    ids, mask = space.decode(particles, particles.start + 1e-7)
    assert torch.equal(mask, rollouts.completion_mask)
    assert torch.equal(ids, rollouts.completion_ids)


def test_the_value_gradient_moves_the_decoded_tokens_towards_the_preferred_token(sharp_lm, tokenizer):
    from vgf_llm.spaces import SteeringVectors

    rollouts = HFGenerateBackend(sharp_lm, tokenizer, max_new_tokens=12, batch_size=2).generate(PROMPTS, 4, seed=3)
    favourite = 20
    vm = steer_value_model(sharp_lm, favourite)
    space = SteeringVectors(sharp_lm, tokenizer, vm, steer_layer=1)
    particles = space.lift(rollouts)
    values, grad = space.grad(particles, particles.start)
    p_ids, p_mask, ids, mask = rollouts.flat()
    torch.testing.assert_close(values.reshape(-1), vm.score_ids(p_ids, p_mask, ids, mask), rtol=1e-4, atol=1e-4)
    assert grad.shape == particles.start.shape and grad.abs().sum() > 0
    direction = grad / grad.norm(dim=-1, keepdim=True)
    counts = []
    for size in (0.0, 3.0, 6.0):  # along the value gradient the favourite token gets more frequent, never less
        new, new_mask = space.decode(particles, particles.start + size * direction)
        counts.append(int(((new == favourite) & new_mask.bool()).sum()))
    assert counts[0] == int(((rollouts.completion_ids == favourite) & rollouts.completion_mask.bool()).sum())
    assert counts[0] <= counts[1] <= counts[2] and counts[2] > counts[0] + 10
    # a random direction of the same size does not favour it
    other = torch.randn(direction.shape, generator=torch.Generator().manual_seed(0))
    new, new_mask = space.decode(particles, particles.start + 6.0 * other / other.norm(dim=-1, keepdim=True))
    assert int(((new == favourite) & new_mask.bool()).sum()) < counts[2]


def test_the_sampler_runs_steering_particles_and_budget_zero_is_best_of_n(sharp_lm, tokenizer):
    from vgf_llm.sampler import VGFSampler

    tiny_lm = sharp_lm
    vm = steer_value_model(tiny_lm, 20)
    kw = dict(num_generations=4, max_completion_length=10, generation_batch_size=12, decoder="steer", steer_layer=1)
    zero = VGFSampler(tiny_lm, tokenizer, vm, SamplerConfig(transport_steps=0, **kw), progress=False)
    moved = VGFSampler(tiny_lm, tokenizer, vm, SamplerConfig(transport_steps=4, transport_step_size=0.5, **kw),
                       progress=False)
    base, steered = zero.sample(PROMPTS, seed=2), moved.sample(PROMPTS, seed=2)
    assert [p.text_before for r in base for p in r.particles] == [p.text_before for r in steered for p in r.particles]
    assert sum(p.tokens_changed for r in steered for p in r.particles) > 0
    assert all(p.displacement > 0 for r in steered for p in r.particles)
    for r in steered:  # union selection: the value of the chosen response is the best of originals and moved
        best = max(max(p.score_before for p in r.particles), max(p.score_after for p in r.particles))
        chosen = r.particles[r.chosen]
        assert (chosen.score_after if r.chosen_moved else chosen.score_before) == pytest.approx(best)


def test_steering_refuses_what_it_cannot_do(tiny_lm, tokenizer, tiny_reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from vgf_llm.spaces import SteeringVectors
    from vgf_llm.value import RewardModelScorer

    vm = steer_value_model(tiny_lm, 20)
    with pytest.raises(ValueError, match="top_k=0"):
        SteeringVectors(tiny_lm, tokenizer, vm, top_k=5)
    with pytest.raises(ValueError, match="steer_layer"):
        SteeringVectors(tiny_lm, tokenizer, vm, steer_layer=3)  # deeper than the value model reads
    rm = RewardModelScorer(AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir),
                           AutoTokenizer.from_pretrained(tiny_reward_model_dir), tokenizer)
    with pytest.raises(ValueError, match="ValueModel"):
        SteeringVectors(tiny_lm, tokenizer, rm)


@pytest.mark.slow
def test_steering_on_smollm2_reproduces_at_zero_and_edits_through_the_model(smollm2_dir):
    """The real model: a vanishing steer regenerates every sample token for token (the posterior Gumbel noise is
    exact for a 49k vocabulary too); a steer along the value gradient changes tokens and the model continues them."""
    from vgf_llm.models import load_model, load_tokenizer
    from vgf_llm.spaces import SteeringVectors

    model, tok = load_model(str(smollm2_dir)).eval(), load_tokenizer(str(smollm2_dir))
    prompts = [[{"role": "user", "content": "Write one sentence about a river."}],
               [{"role": "user", "content": "What is 3 + 4?"}]]
    ro = HFGenerateBackend(model, tok, max_new_tokens=12, batch_size=2).generate(prompts, 3, seed=0)
    vm = ValueModel(model, ValueModelConfig(num_layers=4))
    with torch.no_grad():
        vm.head.weight.normal_(std=0.05)
    space = SteeringVectors(model, tok, vm, steer_layer=2)
    particles = space.lift(ro)
    ids, mask = space.decode(particles, particles.start + 1e-6)
    assert torch.equal(ids, ro.completion_ids) and torch.equal(mask, ro.completion_mask)
    _, grad = space.grad(particles, particles.start)
    moved = particles.start + 8.0 * grad / grad.norm(dim=-1, keepdim=True)
    new, new_mask = space.decode(particles, moved)
    assert (new != ro.completion_ids).any()
    texts = [tok.decode(new[g, n][new_mask[g, n].bool()], skip_special_tokens=True) for g in range(2) for n in range(3)]
    assert all(t.strip() for t in texts)  # every steered particle still decodes to text


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
    pv = fit_prefix_value(tiny_lm, 1, p_ids, p_mask, ids, mask, reward, groups)
    assert pv.layer == 1 and pv.weight.shape == (tiny_lm.config.hidden_size,)
    states, rows = prefix_states(tiny_lm, 1, p_ids, p_mask, ids, mask)
    assert len(states) == int(mask.sum()) and torch.equal(rows.bincount(minlength=len(ids)), mask.sum(-1))
    shuffled = fit_prefix_value(tiny_lm, 1, p_ids, p_mask, ids, mask,
                                reward[torch.randperm(len(reward), generator=torch.Generator().manual_seed(1))], groups)
    assert pv.cv_corr > 0.15 and pv.cv_corr > shuffled.cv_corr + 0.2, (pv.cv_corr, shuffled.cv_corr)
    per_response = response_means(pv(states), rows, len(ids))
    by_hand = torch.zeros(len(ids)).index_add_(0, rows, pv(states.float())) / mask.sum(-1)
    torch.testing.assert_close(per_response, by_hand)
    assert torch.corrcoef(torch.stack([per_response, reward.float()]))[0, 1] > 0.7
    assert fit_prefix_value(tiny_lm, 1, p_ids[:3], p_mask[:3], ids[:3], mask[:3], reward[:3], groups[:3]) is None
    one_prompt = fit_prefix_value(tiny_lm, 1, p_ids[:6], p_mask[:6], ids[:6], mask[:6], reward[:6], groups[:6])
    assert one_prompt is not None and math.isfinite(one_prompt.cv_corr)  # folds of single responses then


def test_prefix_steering_at_zero_step_reproduces_the_reference_samples(tiny_lm, tokenizer, rollouts):
    from vgf_llm.spaces import PrefixSteering

    space = PrefixSteering(tiny_lm, tokenizer, None, steer_layer=1)
    space.prefix_value = favourite_prefix_value(tiny_lm, 20)
    particles = space.lift(rollouts)
    budget = dict(steps=2, step_size=0.0, alpha=1.0, step_rule="adam", radius=None, repulsion=True)
    ids, mask, disp, trace = space.move_and_decode(particles, budget)  # every state goes through the hook, unmoved
    assert torch.equal(mask, rollouts.completion_mask) and torch.equal(ids, rollouts.completion_ids)
    assert not disp.any() and trace.values.shape[1:] == rollouts.shape[:2] and trace.values.shape[0] > 2


@pytest.mark.parametrize("decoder", ["steer_prefix", "tilt_prefix"])
def test_on_policy_particles_are_re_created_under_the_adapter_that_drew_them(tiny_lm_dir, tokenizer, decoder):
    """particle_source='policy': the samples come from the policy adapter, so a moved particle must be decoded by
    the policy too (its continuation after a changed token, the distributions it is distilled towards, the KL the
    tilt measures). At budget 0 each is regenerated token for token, and the distributions its tokens were drawn
    from are the policy's teacher-forced ones, not the base's."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from vgf_llm.spaces import PrefixSteering, PrefixTilt
    from vgf_llm.trainer import POLICY
    from vgf_llm.value import active_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
                      adapter_name=POLICY)
    with torch.no_grad():  # a policy far from the base
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    with active_adapter(model, POLICY):
        ro = HFGenerateBackend(model, tokenizer, max_new_tokens=12, batch_size=4).generate(PROMPTS, 4, seed=3)
    p_ids, p_mask, ids, cmask = ro.flat()

    def teacher_forced(adapter):
        with torch.no_grad(), active_adapter(model, adapter):
            logits = model(input_ids=torch.cat([p_ids, ids], 1),
                           attention_mask=torch.cat([p_mask, torch.ones_like(ids)], 1)).logits
        return torch.log_softmax(logits[:, p_ids.shape[1] - 1:-1].float(), -1)

    budget = dict(steps=1, step_size=0.0, alpha=1.0, step_rule="adam", radius=None, repulsion=False)
    space = (PrefixSteering if decoder == "steer_prefix" else PrefixTilt)(model, tokenizer, None, steer_layer=1)
    space.prefix_value = favourite_prefix_value(model, 20)
    space.keep_logps = True
    keep = cmask.bool()
    for adapter, other in ((POLICY, None), (None, POLICY)):
        space.reference.adapter = adapter
        new_ids, new_mask = space.move_and_decode(space.lift(ro), budget)[:2]
        assert torch.equal(new_mask, ro.completion_mask) and torch.equal(new_ids, ro.completion_ids)
        drawn = space.last_logps.flatten(0, 1).float()[keep]
        assert torch.allclose(drawn, teacher_forced(adapter)[keep], atol=0.05)
        assert not torch.allclose(drawn, teacher_forced(other)[keep], atol=0.5)


def test_prefix_steering_keeps_the_distributions_it_decoded_from(sharp_lm, tokenizer):
    """keep_logps: at step size 0 the kept distributions are the base's own along the samples (teacher-forced);
    moved, each decoded token is the Gumbel-max of its kept distribution and the particle's noise, and the
    distributions differ from the base's: they are what the steered model sampled from."""
    from vgf_llm.distill import completion_logits, token_kl
    from vgf_llm.spaces import PrefixSteering

    rollouts = HFGenerateBackend(sharp_lm, tokenizer, max_new_tokens=10, batch_size=2).generate(PROMPTS, 4, seed=3)
    space = PrefixSteering(sharp_lm, tokenizer, None, steer_layer=1)
    space.prefix_value = favourite_prefix_value(sharp_lm, 20)
    space.keep_logps = True
    particles = space.lift(rollouts)
    g, n, t = rollouts.shape

    def base_logps(ids, mask):
        p_ids, p_mask = particles.rollouts.prompt_ids, particles.rollouts.prompt_mask
        p_ids, p_mask = p_ids.repeat_interleave(n, 0), p_mask.repeat_interleave(n, 0)
        with torch.no_grad():
            logits = completion_logits(sharp_lm, torch.cat([p_ids, ids], 1), torch.cat([p_mask, mask], 1),
                                       p_ids.shape[1])
        return torch.log_softmax(logits.float(), -1)

    budget = dict(steps=1, step_size=0.0, alpha=1.0, step_rule="adam", radius=None, repulsion=True)
    ids, mask, _, _ = space.move_and_decode(particles, budget)
    kept, used = space.last_logps.reshape(g * n, t, -1), mask.reshape(g * n, t).bool()
    base = base_logps(ids.reshape(g * n, t), mask.reshape(g * n, t))
    assert kept.dtype == torch.bfloat16 and float(token_kl(kept, base)[used].abs().max()) < 1e-2
    ids, mask, _, _ = space.move_and_decode(particles, dict(budget, step_size=2.0))
    kept, used = space.last_logps.reshape(g * n, t, -1), mask.reshape(g * n, t).bool()
    drawn = (kept.float() + particles.state["noise"]).argmax(-1)
    assert float((drawn == ids.reshape(g * n, t))[used].float().mean()) > 0.95
    base = base_logps(ids.reshape(g * n, t), mask.reshape(g * n, t))
    assert float(token_kl(kept, base)[used].mean()) > 0.1


def test_prefix_steering_moves_the_decoded_tokens_towards_the_preferred_token(sharp_lm, tokenizer):
    from vgf_llm.spaces import PrefixSteering

    rollouts = HFGenerateBackend(sharp_lm, tokenizer, max_new_tokens=12, batch_size=2).generate(PROMPTS, 4, seed=3)
    favourite = 20
    space = PrefixSteering(sharp_lm, tokenizer, None, steer_layer=1)

    def count(sign: float, step_size: float) -> int:
        space.prefix_value = favourite_prefix_value(sharp_lm, favourite, sign=sign)
        budget = dict(steps=1, step_size=step_size, alpha=1.0, step_rule="adam", radius=None, repulsion=True)
        ids, mask, disp, trace = space.move_and_decode(space.lift(rollouts), budget)
        assert torch.isfinite(trace.values).all() and not trace.nonfinite.any()
        assert step_size == 0 or (disp > 0).all()
        return int(((ids == favourite) & mask.bool()).sum())

    original = int(((rollouts.completion_ids == favourite) & rollouts.completion_mask.bool()).sum())
    assert count(1.0, 0.0) == original
    up = [count(1.0, s) for s in (0.5, 2.0)]
    assert original <= up[0] <= up[1] and up[1] > original + 10, (original, up)
    assert count(-1.0, 2.0) <= original  # against the value: the token gets rarer


def test_prefix_tilt_reads_each_candidates_value_at_its_own_position(tiny_lm, tokenizer, rollouts):
    """Q(v) of a candidate token is the prefix value of the state at v's own position when the prefix is extended
    by v: the same number ``prefix_states`` reads teacher-forced; the KV cache it was given is left as it was."""
    from vgf_llm.prefix_value import prefix_states
    from vgf_llm.spaces import PrefixTilt

    space = PrefixTilt(tiny_lm, tokenizer, None, steer_layer=2, topk=4)
    space.prefix_value = favourite_prefix_value(tiny_lm, 20, layer=2)
    p_ids, p_mask, ids, mask = rollouts.flat()
    rows, k = torch.arange(4), 3  # prefix: the prompt and the first k response tokens
    am = torch.cat([p_mask[rows], mask[rows, :k]], 1)
    with torch.no_grad():
        out = tiny_lm(input_ids=torch.cat([p_ids[rows], ids[rows, :k]], 1), attention_mask=am,
                      position_ids=(am.cumsum(-1) - 1).clamp_min(0), use_cache=True)
    cache = out.past_key_values
    before = cache.get_seq_length()
    candidates = torch.tensor([[20, 7, 11], [5, 20, 9], [30, 31, 32], [20, 20, 4]])
    q = space.candidate_values(cache, am, candidates)
    assert cache.get_seq_length() == before
    for r in range(4):
        for c in range(3):
            ext = torch.cat([ids[r, :k], candidates[r, c:c + 1], torch.tensor([0])])[None]
            states, _ = prefix_states(tiny_lm, 2, p_ids[r:r + 1], p_mask[r:r + 1], ext, torch.ones_like(ext))
            torch.testing.assert_close(q[r, c], space.prefix_value(states[k + 1:k + 2].float())[0], rtol=1e-4,
                                       atol=1e-4)


def test_prefix_tilt_reproduces_at_zero_and_tilts_towards_the_valued_token(tiny_lm, tokenizer, rollouts):
    """eta = 0 regenerates the reference samples; a positive budget makes the valued token more frequent, a
    negative value never does; the displacement is the KL the tokens were drawn under, 0 at eta 0 and growing with
    it; the kept distributions are the tilted ones (each token is the Gumbel-max of its kept distribution)."""
    from vgf_llm.prefix_value import PrefixValue
    from vgf_llm.spaces import PrefixTilt

    favourite, d = 20, tiny_lm.config.hidden_size
    e = tiny_lm.get_input_embeddings().weight[favourite].detach().float()
    space = PrefixTilt(tiny_lm, tokenizer, None, steer_layer=1, topk=tiny_lm.config.vocab_size)
    space.keep_logps = True

    def run(sign: float, eta: float):  # layer 1 still carries the token's embedding: Q(favourite) is about 10 sign
        space.prefix_value = PrefixValue(layer=1, weight=sign * 10 * e / (e @ e), bias=0.0, mean=torch.zeros(d),
                                         std=torch.ones(d))
        particles = space.lift(rollouts)
        ids, mask, disp, _ = space.move_and_decode(particles, dict(steps=1, step_size=eta))
        drawn = (space.last_logps.float() + particles.state["noise"].reshape(*ids.shape, -1)).argmax(-1)
        assert float((drawn == ids)[mask.bool()].float().mean()) > 0.95
        return int(((ids == favourite) & mask.bool()).sum()), float(disp.mean()), ids, mask

    original = int(((rollouts.completion_ids == favourite) & rollouts.completion_mask.bool()).sum())
    count0, kl0, ids0, mask0 = run(1.0, 0.0)
    assert count0 == original and kl0 == 0
    assert torch.equal(ids0, rollouts.completion_ids) and torch.equal(mask0, rollouts.completion_mask)
    small, big = run(1.0, 0.2), run(1.0, 1.0)
    assert original <= small[0] <= big[0] and big[0] > original + 10, (original, small[0], big[0])
    assert 0 < small[1] < big[1]
    assert run(-1.0, 1.0)[0] <= original


def test_reward_tilt_scores_each_candidate_as_the_reward_model_scores_the_whole_text(tiny_lm, tokenizer, rollouts,
                                                                                     tiny_reward_model_dir):
    """tilt_reward: at every step Q(v) is the reward model's score of the prompt and the response so far extended
    by v, computed on the reward model's own cache along the particle (checked against scoring the whole text);
    eta = 0 regenerates the reference samples with zero KL; a budget raises the reward model's mean score of the
    particles; a value-model scorer is refused."""
    from vgf_llm.spaces import RewardTilt

    rm = reward_scorer(tiny_reward_model_dir, tokenizer)
    space = RewardTilt(tiny_lm, tokenizer, rm, topk=16)
    seen = []
    values = space.candidate_values

    def checked(cache, mask, candidates, tokens):
        q = values(cache, mask, candidates, tokens)
        seen.append((tokens.clone(), candidates.clone(), q))
        return q

    space.candidate_values = checked
    particles = space.lift(rollouts)
    p_ids, p_mask, ids, mask = rollouts.flat()
    ids0, mask0, kl0, _ = space.move_and_decode(particles, dict(steps=1, step_size=0.0))
    assert torch.equal(ids0, rollouts.completion_ids) and torch.equal(mask0, rollouts.completion_mask)
    assert float(kl0.abs().max()) == 0 and not seen  # eta 0 reads no values
    moved, moved_mask, kl, _ = space.move_and_decode(particles, dict(steps=1, step_size=30.0))
    assert len(seen) >= 3 and (kl > 0).all()
    for tokens, candidates, q in (seen[0], seen[2]):  # the first step (prompt only) and a later one
        row, t = 1, tokens.shape[1]
        whole = rm.score_ids(p_ids[row:row + 1].expand(candidates.shape[1], -1),
                             p_mask[row:row + 1].expand(candidates.shape[1], -1),
                             torch.cat([tokens[row].expand(candidates.shape[1], t), candidates[row][:, None]], 1),
                             torch.ones(candidates.shape[1], t + 1, dtype=torch.long))
        torch.testing.assert_close(q[row], whole.float(), rtol=1e-4, atol=1e-4)
    g, n, t = moved.shape
    before = rm.score_ids(p_ids, p_mask, ids, mask).mean()
    after = rm.score_ids(p_ids, p_mask, moved.reshape(g * n, t), moved_mask.reshape(g * n, t)).mean()
    assert after > before
    with pytest.raises(ValueError, match="reward-model scorer"):
        RewardTilt(tiny_lm, tokenizer, ValueModel(tiny_lm, ValueModelConfig(lora_r=4)))


def test_the_sampler_runs_prefix_steering_and_fits_the_prefix_value_to_the_scorer(tiny_lm, tokenizer):
    """Without a fitted prefix value the space distils the scorer's values of the batch; budget 0 is best-of-N."""
    from vgf_llm.sampler import VGFSampler

    vm = steer_value_model(tiny_lm, 20)
    kw = dict(num_generations=4, max_completion_length=10, generation_batch_size=12, decoder="steer_prefix",
              steer_layer=1)
    zero = VGFSampler(tiny_lm, tokenizer, vm, SamplerConfig(transport_steps=0, **kw), progress=False)
    moved = VGFSampler(tiny_lm, tokenizer, vm, SamplerConfig(transport_steps=1, transport_step_size=1.0, **kw),
                       progress=False)
    base, steered = zero.sample(PROMPTS, seed=2), moved.sample(PROMPTS, seed=2)
    assert zero.space.prefix_value is None  # budget 0 never lifts
    assert moved.space.prefix_value is not None and moved.space.prefix_value.layer == 1
    assert [p.text_before for r in base for p in r.particles] == [p.text_before for r in steered for p in r.particles]
    assert sum(p.tokens_changed for r in steered for p in r.particles) > 0
    assert all(p.displacement > 0 for r in steered for p in r.particles)
    before = sum(p.score_before for r in steered for p in r.particles)
    after = sum(p.score_after for r in steered for p in r.particles)
    assert after > before  # the scorer prefers token 20; its distilled prefix value moves the text towards it


def test_prefix_steering_refuses_what_it_cannot_do(tiny_lm, tokenizer):
    from vgf_llm.spaces import PrefixSteering

    with pytest.raises(ValueError, match="top_k=0"):
        PrefixSteering(tiny_lm, tokenizer, None, top_k=5)
    with pytest.raises(ValueError, match="steer_layer"):
        PrefixSteering(tiny_lm, tokenizer, None, steer_layer=tiny_lm.config.num_hidden_layers + 1)


@pytest.mark.slow
def test_per_step_steering_on_smollm2_reproduces_at_zero_and_follows_its_prefix_value(smollm2_dir):
    """The real model: every state goes through the per-step transport unmoved at step size 0 and the samples come
    back token for token; a prefix value fitted on the samples' own "response mentions a digit" reward, followed
    with a real budget, changes tokens and never produces non-finite values."""
    from vgf_llm.models import load_model, load_tokenizer
    from vgf_llm.spaces import PrefixSteering

    model, tok = load_model(str(smollm2_dir)).eval(), load_tokenizer(str(smollm2_dir))
    prompts = [[{"role": "user", "content": "Write one sentence about a river."}],
               [{"role": "user", "content": "What is 3 + 4?"}]]
    ro = HFGenerateBackend(model, tok, max_new_tokens=12, batch_size=2).generate(prompts, 4, seed=0)
    space = PrefixSteering(model, tok, None, steer_layer=8)
    p_ids, p_mask, ids, mask = ro.flat()
    digit = torch.tensor([float(any(ch.isdigit() for ch in t)) for group in ro.texts for t in group])
    digit[0] = 1 - digit[0]  # two classes whatever the samples say
    assert space.fit_prefix(p_ids, p_mask, ids, mask, digit, torch.arange(2).repeat_interleave(4)) is not None
    particles = space.lift(ro)
    budget = dict(steps=1, step_size=0.0, alpha=1.0, step_rule="adam", radius=None, repulsion=True)
    new, new_mask, _, _ = space.move_and_decode(particles, budget)
    assert torch.equal(new, ro.completion_ids) and torch.equal(new_mask, ro.completion_mask)
    new, new_mask, disp, trace = space.move_and_decode(particles, dict(budget, step_size=0.5))
    assert (new != ro.completion_ids).any() and (disp > 0).all() and torch.isfinite(trace.values).all()
