"""Per-step steering: the particles are the model's own hidden states while it generates, moved at every step.

At each generation step the N particles of a prompt are the N hidden states that predict their next tokens (the
output of decoder layer ``steer_layer`` at the newest position). ``flow.transport`` moves them, SVGD across the N
particles, along the gradient of a prefix value (``vgf_llm.prefix_value``: a linear head on that same layer,
fitted by ridge to final rewards), and the model decodes the next token from the moved state; the following states
are computed from the tokens actually decoded (RE-Control / controlled decoding with a prefix value, with VGF's
transport budget and repulsion). As in ``steering``, each particle keeps the Gumbel noise of its reference sample,
so a zero budget regenerates the reference token for token and budget 0 is best-of-N.

The head reads the moved layer, so its gradient is its weight vector: no backward pass at all. States move in
standardised units (each hidden unit divided by its spread in the fit), so ``transport_step_size`` is "about this
many standard deviations per unit per Adam step", at every generated token.

The prefix value is fitted to true rewards by whoever has them (``fit_prefix``: the trainer on its rollout buffer,
benchmarks on labelled rollouts); without one, ``lift`` fits it to the scorer's values of the batch being moved.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from vgf_llm.flow import TransportTrace, transport
from vgf_llm.prefix_value import PrefixValue, fit_prefix_value
from vgf_llm.rollout.hf import Rollouts
from vgf_llm.spaces.base import Particles
from vgf_llm.spaces.steering import RegeneratingSpace, regenerate, regenerated, stack_record


class PrefixSteering(RegeneratingSpace):
    name = "steer_prefix"
    repulsion = True

    def __init__(self, model, tokenizer, scorer, *, steer_layer: int | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0):
        super().__init__(model, tokenizer, scorer, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        depth = model.config.num_hidden_layers
        self.steer_layer = steer_layer if steer_layer is not None else max(1, depth // 2)
        if not 1 <= self.steer_layer <= depth:
            raise ValueError(f"steer_layer must be in 1..{depth}, got {self.steer_layer}")
        self.prefix_value: PrefixValue | None = None

    @classmethod
    def from_config(cls, model, tokenizer, scorer, config):
        return cls(model, tokenizer, scorer, steer_layer=config.steer_layer, temperature=config.temperature,
                   top_p=config.top_p, top_k=config.top_k)

    def fit_prefix(self, prompt_ids, prompt_mask, ids, mask, targets, groups, seed: int = 0) -> PrefixValue | None:
        """Fit the prefix value on flat rollouts and their final ``targets`` (true rewards), folds of ``groups``."""
        fitted = fit_prefix_value(self.model, self.steer_layer, prompt_ids, prompt_mask, ids, mask, targets, groups,
                                  seed=seed)
        if fitted is not None:
            self.prefix_value = fitted
        return fitted

    @torch.no_grad()
    def lift(self, rollouts: Rollouts) -> Particles:
        g, n, _ = rollouts.shape
        if self.prefix_value is None:  # nobody gave rewards: distil the scorer's values of this batch
            p_ids, p_mask, ids, mask = rollouts.flat()
            values = self.scorer.score_ids(p_ids, p_mask, ids, mask).float().cpu()
            if self.fit_prefix(p_ids, p_mask, ids, mask, values, torch.arange(g).repeat_interleave(n)) is None:
                raise ValueError(f"decoder={self.name!r} could not fit a prefix value on this batch (too few "
                                 "prompts or responses): give it more prompts per batch, or fit one with fit_prefix")
        return super().lift(rollouts)

    def move_and_decode(self, particles: Particles, budget: dict):
        """Regenerate every movable particle, moving its state at ``steer_layer`` at every step with
        ``flow.transport(**budget)``. Returns (ids [G, N, T], mask, displacement [G, N] in standardised units,
        averaged over the steps it was moved at, and the concatenated ``TransportTrace``)."""
        ro = particles.rollouts
        g, n, t = ro.shape
        p_ids, p_mask, ids, cmask = ro.flat()
        pv = self.prefix_value
        device = self.model.device
        weight_z = (pv.weight * pv.std).to(device)  # d V / d z for z = (h - mean) / std
        mean, std = pv.mean.to(device), pv.std.to(device)
        value_at_mean = pv.bias + float(pv.mean @ pv.weight)  # V = weight_z . z + value_at_mean
        movable = particles.mask.reshape(-1).bool()
        alive = movable.clone()
        traces, disp_sum, moved_steps = [], torch.zeros(g * n), torch.zeros(g * n)

        def grad_fn(z):  # called at every generated token: nothing to recompute
            return z @ weight_z + value_at_mean, weight_z.expand_as(z)

        def move(hidden):  # [B, S, d] -> the same with its newest position moved
            z = ((hidden[:, -1].float() - mean) / std).reshape(g, n, -1)
            live = alive.reshape(g, n).float().to(device)
            moved, trace = transport(z, grad_fn=grad_fn, mask=live, **budget)
            traces.append(trace)
            if trace.displacement.shape[0]:
                disp_sum.add_(trace.displacement[-1].reshape(-1))
            moved_steps.add_(live.reshape(-1).cpu())
            hidden = hidden.clone()
            hidden[:, -1] = (moved.reshape(g * n, -1) * std + mean).to(hidden.dtype)
            return hidden

        layer = self.model.get_decoder().layers[self.steer_layer - 1]

        def hook(_module, _inputs, output):
            if isinstance(output, tuple):
                return (move(output[0]), *output[1:])
            return move(output)

        @contextmanager
        def steering(_step, done):
            alive.copy_(movable & ~done)  # rows past their EOS stop moving (their tokens are padding)
            handle = layer.register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()

        record = [] if self.keep_logps else None
        out = regenerate(self.model, self.tokenizer.pad_token_id, self.eos, p_ids, p_mask, particles.state["noise"],
                         self.temperature, steering, record, adapter=self.reference.adapter)
        new_ids, new_mask = regenerated(out, ids, cmask, movable, self.eos, self.tokenizer.pad_token_id)
        disp = (disp_sum / moved_steps.clamp_min(1)).reshape(g, n)
        self.last_stats = {"moved_positions": float(moved_steps.sum()), "prefix_cv_corr": pv.cv_corr}
        if record is not None:
            self.last_logps = stack_record(record, t).reshape(g, n, t, -1)
        return new_ids.reshape(g, n, t), new_mask.reshape(g, n, t), disp, concat_traces(traces, g, n)


def concat_traces(traces: list[TransportTrace], g: int, n: int) -> TransportTrace:
    """One trace of every per-step transport, steps after steps."""
    if not traces:
        empty = torch.empty(0, g, n)
        return TransportTrace(empty, empty, empty, torch.empty(0, g), torch.empty(0, g, n, dtype=torch.bool),
                              torch.empty(0, g, dtype=torch.bool))
    return TransportTrace(*[torch.cat([getattr(tr, f) for tr in traces]) for f in (
        "values", "displacement", "max_row_shift", "bandwidth", "nonfinite", "bandwidth_fallback")])
