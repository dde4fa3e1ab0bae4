"""Logits moved during generation: at every generated token the next-token logits flow along a value of each
candidate token.

The particles are the model's next-token distributions while it generates. For the ``decoder_topk`` most likely
tokens v a value Q(v) of the prefix extended by v is read, and the value gradient flow on the logits in the mirror
(softmax) geometry has a closed form: ``transport_steps`` steps of ``transport_step_size`` move the candidates'
logits by eta x (Q(v) - the mean of Q under the model), eta = steps x step size, the exponential tilt
p(v) exp(eta Q(v)) / Z that is the KL-optimal improvement of one token's distribution for that value. Tokens outside
the top k keep their logits (their Q is taken to be the mean). The budget is therefore in nats per unit of value,
and a token whose candidates all have the same value is not moved at all: the tilt spends KL only where the value
says it pays. As in ``steering``, each particle keeps the Gumbel noise of its reference sample, so eta = 0
regenerates the reference token for token and budget 0 is best-of-N. Two sources of Q:

- ``PrefixTilt`` (``tilt_prefix``): the prefix value (``vgf_llm.prefix_value``, the head ``prefix_steering`` uses)
  read from decoder layer ``steer_layer``'s state at v's position (one extra pass of those layers over the k
  candidates, on a copy of the KV cache);
- ``RewardTilt`` (``tilt_reward``): the scorer itself, a reward model sharing the vocabulary, scoring the prefix
  extended by v (reward-guided decoding, as ARGS, Khanov et al. 2024), with its own KV cache along the particle.

``displacement`` is the KL(tilted || model) the particle's tokens were drawn under, summed over its tokens: the
transport's drift from the base, in nats per sequence.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import DynamicCache

from vgf_llm.spaces.base import Particles
from vgf_llm.spaces.prefix_steering import PrefixSteering, concat_traces
from vgf_llm.spaces.steering import RegeneratingSpace, regenerate, regenerated, stack_record
from vgf_llm.value import active_adapter, first_layers


def copy_cache(cache, layers: int, k: int) -> DynamicCache:
    """The first ``layers`` layers of a KV cache, each row repeated ``k`` times (the original is not touched)."""
    return DynamicCache(ddp_cache_data=[(c.keys.repeat_interleave(k, 0), c.values.repeat_interleave(k, 0))
                                        for c in cache.layers[:layers]])


def check_topk(topk: int, name: str) -> None:
    if topk < 2:
        raise ValueError(f"decoder={name!r} compares candidate tokens: decoder_topk must be >= 2, got {topk}")


class TiltDecoding:
    """The decode loop both tilts share: regenerate each particle under its own noise with every step's top-k
    logits tilted by eta x (Q - its mean under the model). A subclass reads Q (``candidate_values``) and may keep
    per-batch state (``begin``). Mixed into a ``RegeneratingSpace``, with ``topk``."""

    repulsion = False  # the flow on each particle's logits is closed-form; particles do not interact

    def begin(self, p_ids: torch.Tensor, p_mask: torch.Tensor) -> None:
        """Called once per batch, before its first token."""

    def candidate_values(self, cache, mask, candidates, tokens) -> torch.Tensor:
        raise NotImplementedError

    def tilt(self, logits: torch.Tensor, cache, mask: torch.Tensor, tokens: torch.Tensor,
             eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(tilted logits [B, V], KL(tilted || untilted) [B]): the top-k candidates' logits + eta x (Q - E_p[Q])."""
        logq = torch.log_softmax(logits, -1)
        top = logits.topk(min(self.topk, logits.shape[-1]), -1).indices
        q = self.candidate_values(cache, mask, top, tokens)
        p_top = logq.gather(-1, top).exp()
        mean = (p_top * q).sum(-1, keepdim=True) / p_top.sum(-1, keepdim=True).clamp_min(1e-12)
        tilted = logits.scatter_add(-1, top, eta * (q - mean))
        logp = torch.log_softmax(tilted, -1)
        return tilted, (logp.exp() * (logp - logq)).sum(-1)

    def move_and_decode(self, particles: Particles, budget: dict):
        """Regenerate every movable particle with each step's logits tilted by eta = steps x step_size. Returns
        (ids [G, N, T], mask, displacement [G, N]: the KL in nats the particle's tokens were drawn under, and an
        empty ``TransportTrace``: nothing here runs ``flow.transport``)."""
        ro = particles.rollouts
        g, n, t = ro.shape
        p_ids, p_mask, ids, cmask = ro.flat()
        eta = float(budget["steps"]) * float(budget["step_size"])
        movable = particles.mask.reshape(-1).bool()
        kl_sum = torch.zeros(g * n)
        alive = movable.clone()
        self.begin(p_ids, p_mask)

        def tilt(logits, cache, mask, tokens):
            if eta == 0:
                return logits
            tilted, kl = self.tilt(logits, cache, mask, tokens, eta)
            kl_sum.add_(torch.where(alive, kl, 0.0))
            return torch.where(movable[:, None], tilted, logits)

        @contextmanager
        def track(_step, done):  # rows past their EOS add no more KL (their tokens are padding)
            alive.copy_(movable & ~done)
            yield

        record = [] if self.keep_logps else None
        out = regenerate(self.model, self.tokenizer.pad_token_id, self.eos, p_ids, p_mask, particles.state["noise"],
                         self.temperature, track, record, tilt, adapter=self.reference.adapter)
        new_ids, new_mask = regenerated(out, ids, cmask, movable, self.eos, self.tokenizer.pad_token_id)
        self.last_stats = {"kl_per_sequence": float(kl_sum.mean())}
        if record is not None:
            self.last_logps = stack_record(record, t).reshape(g, n, t, -1)
        return new_ids.reshape(g, n, t), new_mask.reshape(g, n, t), kl_sum.reshape(g, n), concat_traces([], g, n)


class PrefixTilt(TiltDecoding, PrefixSteering):
    """Q(v): the prefix value at decoder layer ``steer_layer``, read at v's own position."""

    name = "tilt_prefix"

    def __init__(self, model, tokenizer, scorer, *, steer_layer: int | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, topk: int = 8, seed: int = 0):
        super().__init__(model, tokenizer, scorer, steer_layer=steer_layer, temperature=temperature, top_p=top_p,
                         top_k=top_k, seed=seed)
        check_topk(topk, self.name)
        self.topk = topk

    @classmethod
    def from_config(cls, model, tokenizer, scorer, config):
        return cls(model, tokenizer, scorer, steer_layer=config.steer_layer, temperature=config.temperature,
                   top_p=config.top_p, top_k=config.top_k, topk=config.decoder_topk)

    @torch.no_grad()
    def candidate_values(self, cache, mask: torch.Tensor, candidates: torch.Tensor, tokens=None) -> torch.Tensor:
        """[B, k] the prefix value of each row's prefix (``cache``/``mask``, through its newest token) extended by
        each of its ``candidates`` [B, k]: decoder layers 1..steer_layer run once over all B x k candidates, on a
        copy of those layers' cache repeated k times (the cache itself is not touched)."""
        b, k = candidates.shape
        layer, device = self.steer_layer, mask.device
        am = torch.cat([mask, torch.ones_like(mask[:, :1])], 1).repeat_interleave(k, 0)
        decoder = self.model.get_decoder()
        captured = {}
        handle = decoder.layers[layer - 1].register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
        try:
            with active_adapter(self.model, None), first_layers(decoder, layer):
                decoder(input_ids=candidates.reshape(-1, 1).to(device), attention_mask=am,
                        position_ids=am.sum(-1, keepdim=True) - 1, past_key_values=copy_cache(cache, layer, k),
                        use_cache=True)
        finally:
            handle.remove()
        return self.prefix_value(captured["h"][:, -1].float()).reshape(b, k).cpu()


class RewardTilt(TiltDecoding, RegeneratingSpace):
    """Q(v): the scorer, a sequence-classification reward model on the policy's vocabulary, scoring the prompt and
    the response so far extended by v. The reward model keeps its own KV cache along the particles, fed one token
    per step; the candidates run on a copy of it."""

    name = "tilt_reward"

    def __init__(self, model, tokenizer, scorer, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 topk: int = 8, seed: int = 0):
        self.reward_model = getattr(scorer, "model", None)
        if self.reward_model is None or not hasattr(self.reward_model, "score"):
            raise ValueError("decoder='tilt_reward' scores each candidate token with the reward model itself: it "
                             "needs a reward-model scorer (scorer='reward_model' / --reward_model_path)")
        super().__init__(model, tokenizer, scorer, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        check_topk(topk, self.name)
        self.topk = topk
        self._cache, self._fed = None, 0  # the reward model's KV cache along the particles; response tokens in it

    @classmethod
    def from_config(cls, model, tokenizer, scorer, config):
        return cls(model, tokenizer, scorer, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                   topk=config.decoder_topk)

    def _run(self, ids, mask, cache):
        device = self.reward_model.device
        mask = mask.to(device)
        out = self.reward_model.base_model(input_ids=ids.to(device), attention_mask=mask,
                                           position_ids=(mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:],
                                           past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1], out.past_key_values

    @torch.no_grad()
    def begin(self, p_ids, p_mask) -> None:
        """The reward model reads the prompts once; each step then feeds it the newest response token."""
        self._cache = self._run(p_ids, p_mask, None)[1]
        self._fed = 0

    @torch.no_grad()
    def candidate_values(self, cache, mask: torch.Tensor, candidates: torch.Tensor, tokens) -> torch.Tensor:
        b, k = candidates.shape
        if tokens.shape[1] > self._fed:  # the token drawn at the last step
            self._cache = self._run(tokens[:, -1:], mask, self._cache)[1]
            self._fed = tokens.shape[1]
        am = torch.cat([mask, torch.ones_like(mask[:, :1])], 1).repeat_interleave(k, 0)
        copy = copy_cache(self._cache, len(self._cache.layers), k)
        last, _ = self._run(candidates.reshape(-1, 1), am, copy)
        return self.reward_model.score(last)[:, 0].float().reshape(b, k).cpu()
