"""Logits moved during generation: at every generated token the next-token logits flow along a prefix value.

The particles are the model's next-token distributions while it generates. For the ``decoder_topk`` most likely
tokens v the prefix value (``vgf_llm.prefix_value``, the same head ``prefix_steering`` uses) reads Q(v): the value of
the prefix extended by v, from decoder layer ``steer_layer``'s state at the new position (one extra pass of those
layers over the k candidates, on a copy of the KV cache). The value gradient flow on the logits in the mirror
(softmax) geometry has a closed form: ``transport_steps`` steps of ``transport_step_size`` move the candidates'
logits by eta x (Q(v) - the mean of Q under the model), eta = steps x step size, the exponential tilt
p(v) exp(eta Q(v)) / Z that is the KL-optimal improvement of one token's distribution for that value. Tokens outside
the top k keep their logits (their Q is taken to be the mean). The budget is therefore in nats per unit of value,
and a token whose candidates all have the same value is not moved at all: the tilt spends KL only where the value
says it pays. As in ``steering``, each particle keeps the Gumbel noise of its reference sample, so eta = 0
regenerates the reference token for token and budget 0 is best-of-N.

``displacement`` is the KL(tilted || model) the particle's tokens were drawn under, summed over its tokens: the
transport's drift from the base, in nats per sequence.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import DynamicCache

from vgf_llm.rollout.hf import completion_mask_from_ids
from vgf_llm.spaces.base import Particles
from vgf_llm.spaces.prefix_steering import PrefixSteering, concat_traces
from vgf_llm.spaces.steering import regenerate
from vgf_llm.value import active_adapter, first_layers


class PrefixTilt(PrefixSteering):
    repulsion = False  # the flow on each particle's logits is closed-form; particles do not interact

    def __init__(self, model, tokenizer, scorer, *, steer_layer: int | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, topk: int = 8, seed: int = 0):
        super().__init__(model, tokenizer, scorer, steer_layer=steer_layer, temperature=temperature, top_p=top_p,
                         top_k=top_k, seed=seed)
        if topk < 2:
            raise ValueError(f"decoder='tilt_prefix' compares candidate tokens: decoder_topk must be >= 2, got {topk}")
        self.topk = topk

    @classmethod
    def from_config(cls, model, tokenizer, scorer, config):
        return cls(model, tokenizer, scorer, steer_layer=config.steer_layer, temperature=config.temperature,
                   top_p=config.top_p, top_k=config.top_k, topk=config.decoder_topk)

    @torch.no_grad()
    def candidate_values(self, cache, mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[B, k] the prefix value of each row's prefix (``cache``/``mask``, through its newest token) extended by
        each of its ``candidates`` [B, k]: decoder layers 1..steer_layer run once over all B x k candidates, on a
        copy of those layers' cache repeated k times (the cache itself is not touched)."""
        b, k = candidates.shape
        layer, device = self.steer_layer, mask.device
        copy = DynamicCache(ddp_cache_data=[(c.keys.repeat_interleave(k, 0), c.values.repeat_interleave(k, 0))
                                            for c in cache.layers[:layer]])
        am = torch.cat([mask, torch.ones_like(mask[:, :1])], 1).repeat_interleave(k, 0)
        decoder = self.model.get_decoder()
        captured = {}
        handle = decoder.layers[layer - 1].register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
        try:
            with active_adapter(self.model, None), first_layers(decoder, layer):
                decoder(input_ids=candidates.reshape(-1, 1).to(device), attention_mask=am,
                        position_ids=am.sum(-1, keepdim=True) - 1, past_key_values=copy, use_cache=True)
        finally:
            handle.remove()
        return self.prefix_value(captured["h"][:, -1].float()).reshape(b, k).cpu()

    def tilt(self, logits: torch.Tensor, cache, mask: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(tilted logits [B, V], KL(tilted || untilted) [B]): the top-k candidates' logits + eta x (Q - E_p[Q])."""
        probs = torch.softmax(logits, -1)
        top = logits.topk(min(self.topk, logits.shape[-1]), -1).indices
        q = self.candidate_values(cache, mask, top)
        p_top = probs.gather(-1, top)
        mean = (p_top * q).sum(-1, keepdim=True) / p_top.sum(-1, keepdim=True).clamp_min(1e-12)
        tilted = logits.scatter_add(-1, top, eta * (q - mean))
        logp, logq = torch.log_softmax(tilted, -1), torch.log_softmax(logits, -1)
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

        def tilt(logits, cache, mask):
            if eta == 0:
                return logits
            tilted, kl = self.tilt(logits, cache, mask, eta)
            kl_sum.add_(torch.where(alive, kl, 0.0))
            return torch.where(movable[:, None], tilted, logits)

        @contextmanager
        def track(_step, done):  # rows past their EOS add no more KL (their tokens are padding)
            alive.copy_(movable & ~done)
            yield

        record = [] if self.keep_logps else None
        out = regenerate(self.model, self.tokenizer.pad_token_id, self.eos, p_ids, p_mask, particles.state["noise"],
                         self.temperature, track, record, tilt)
        new_mask = completion_mask_from_ids(out, self.eos, self.tokenizer.pad_token_id)
        new_ids = torch.where(movable[:, None], out, ids)
        new_mask = torch.where(movable[:, None], new_mask, cmask)
        new_ids = torch.where(new_mask.bool(), new_ids, torch.full_like(new_ids, self.tokenizer.pad_token_id))
        self.last_stats = {"prefix_cv_corr": self.prefix_value.cv_corr, "kl_per_sequence": float(kl_sum.mean())}
        if record is not None:
            logps = torch.stack(record, 1)
            self.last_logps = torch.nn.functional.pad(logps, (0, 0, 0, t - logps.shape[1])).reshape(g, n, t, -1)
        return new_ids.reshape(g, n, t), new_mask.reshape(g, n, t), kl_sum.reshape(g, n), concat_traces([], g, n)
