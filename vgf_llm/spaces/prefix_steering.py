"""Per-step steering (``steer_prefix``): the particles are the model's own hidden states while it generates.

At each generation step the N particles of a prompt are the N hidden states that predict their next tokens (the
output of decoder layer ``steer_layer`` at the newest position). ``flow.transport`` moves them, SVGD across the N
particles, along the gradient of a prefix value (``vgf_llm.prefix_value``: a linear head on that same layer,
fitted by ridge to final rewards), and the model decodes the next token from the moved state; the following states
are computed from the tokens actually decoded (RE-Control / controlled decoding with a prefix value, with VGF's
transport budget and repulsion). Each particle keeps the Gumbel noise of its reference sample
(``spaces.regenerate``), so a zero budget regenerates the reference token for token and budget 0 is best-of-N.

The head reads the moved layer, so its gradient is its weight vector: no backward pass at all. States move in
standardised units (each hidden unit divided by its spread in the fit), so ``transport_step_size`` is "about this
many standard deviations per unit per Adam step", at every generated token.

``fit`` keeps the last ``buffer_steps`` batches of rollouts with their targets and refits the prefix value on all
of them (the trainer: true rewards of its recent rollouts; the sampler: the scorer's values of the batch at hand).
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager

import torch

from vgf_llm.flow import transport
from vgf_llm.prefix_value import PrefixValue, fit_prefix_value, prefix_states, response_means
from vgf_llm.ridge import pearson
from vgf_llm.rollout.hf import Rollouts, eos_token_ids
from vgf_llm.spaces.base import Budget, Moved, concat_traces
from vgf_llm.spaces.reference import ReferenceTokens
from vgf_llm.spaces.regenerate import PosteriorNoise, check_plain_sampling, regenerate, regenerated


class PrefixSteering:
    name = "steer_prefix"

    def __init__(self, model, tokenizer, *, steer_layer: int | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, buffer_steps: int = 1):
        check_plain_sampling(self.name, temperature, top_k, top_p)
        depth = model.config.num_hidden_layers
        self.steer_layer = steer_layer if steer_layer is not None else max(1, depth // 2)
        if not 1 <= self.steer_layer <= depth:
            raise ValueError(f"steer_layer must be in 1..{depth}, got {self.steer_layer}")
        if buffer_steps < 1:
            raise ValueError(f"value_buffer_steps must be >= 1, got {buffer_steps}")
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.seed = temperature, seed
        self.eos = eos_token_ids(model, tokenizer)
        self.reference = ReferenceTokens(model, model.get_input_embeddings().weight)
        self.value: PrefixValue | None = None
        # (rollouts, targets [G, N]) of recent fits, and beside them each entry's prefix states, read once
        self.buffer: deque[tuple[Rollouts, torch.Tensor]] = deque(maxlen=buffer_steps)
        self._states: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=buffer_steps)

    # -- fit: the prefix value on the buffer --------------------------------------------------------------------
    def _read_states(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        return prefix_states(self.model, self.steer_layer, *rollouts.flat())

    def fit(self, rollouts: Rollouts, targets: torch.Tensor, *, seed: int = 0) -> dict:
        """Add ``rollouts`` and their final ``targets`` [G, N] to the buffer and refit the prefix value by ridge on
        every prefix of the buffer (strength cross-validated over folds of whole prompts). Returns the previous
        value's correlation with these targets (``corr``: it never saw them), and the new fit's out-of-fold ``cv_corr``
        and ``ridge`` (absent when too few finite targets: the previous value is kept)."""
        g, n, _ = rollouts.shape
        if len(self._states) != len(self.buffer):  # restored from a checkpoint: read its states once, here
            self._states.clear()
            self._states.extend(self._read_states(ro) for ro, _ in self.buffer)
        states, rows = self._read_states(rollouts)
        stats = {}
        r = targets.reshape(-1).float()
        if self.value is not None:
            pred = response_means(self.value(states), rows, g * n)
            ok = torch.isfinite(r) & torch.isfinite(pred)
            if ok.sum() > 2 and r[ok].std() > 0:
                stats["corr"] = pearson(pred[ok], r[ok])
        self.buffer.append((rollouts, targets.reshape(g, n).float()))
        self._states.append((states, rows))
        sizes = torch.tensor([ro.shape[0] * ro.shape[1] for ro, _ in self.buffer])
        offsets = (sizes.cumsum(0) - sizes).tolist()  # each entry's first row in the concatenated buffer
        all_targets = torch.cat([t.reshape(-1) for _, t in self.buffer])
        groups = torch.arange(len(all_targets)) // n  # one group per prompt (every entry holds n per prompt)
        fitted = fit_prefix_value(
            self.steer_layer, torch.cat([s for s, _ in self._states]),
            torch.cat([rw + o for (_, rw), o in zip(self._states, offsets, strict=True)]), all_targets, groups,
            seed=seed)
        if fitted is not None:
            self.value = fitted
            stats |= {"cv_corr": fitted.cv_corr, "ridge": fitted.ridge}
        return stats

    def restore(self, buffer: list[tuple[Rollouts, torch.Tensor]]) -> None:
        """Refill the buffer from a checkpoint (``list(space.buffer)``). Its prefix states are read, and the value
        refitted, at the next ``fit`` (where the caller holds the model's weights whole, e.g. under ZeRO-3)."""
        self.buffer.clear()
        self._states.clear()
        self.buffer.extend(buffer)

    # -- move: regenerate, moving the state at every step ---------------------------------------------------------
    def move(self, rollouts: Rollouts, budget: Budget) -> Moved:
        """Regenerate every non-empty particle, moving its state at ``steer_layer`` at every step with
        ``flow.transport``. Displacement: in standardised units, averaged over the steps it was moved at."""
        pv = self.value
        if pv is None:
            raise ValueError(f"decoder={self.name!r} has no prefix value yet: call fit(rollouts, targets) first (the "
                             "sampler fits it to the scorer's values of each batch, the trainer to true rewards)")
        g, n, t = rollouts.shape
        p_ids, p_mask, ids, cmask = rollouts.flat()
        noise = PosteriorNoise(self.reference, rollouts, self.temperature, self.seed)
        device = self.model.device
        weight_z = (pv.weight * pv.std).to(device)  # d V / d z for z = (h - mean) / std
        mean, std = pv.mean.to(device), pv.std.to(device)
        value_at_mean = pv.bias + float(pv.mean @ pv.weight)  # V = weight_z . z + value_at_mean
        movable = (cmask.sum(-1) > 0).to(device)
        alive = movable.clone()
        traces, disp_sum, moved_steps = [], torch.zeros(g * n, device=device), torch.zeros(g * n, device=device)
        flow_kwargs = budget.flow_kwargs()

        def grad_fn(z):  # called at every generated token: nothing to recompute
            return z @ weight_z + value_at_mean, weight_z.expand_as(z)

        def move(hidden):  # [B, S, d] -> the same with its newest position moved
            z = ((hidden[:, -1].float() - mean) / std).reshape(g, n, -1)
            live = alive.reshape(g, n).float()
            moved, trace = transport(z, grad_fn=grad_fn, mask=live, **flow_kwargs)
            traces.append(trace)
            if trace.displacement.shape[0]:
                disp_sum.add_(trace.displacement[-1].reshape(-1).to(device))
            moved_steps.add_(live.reshape(-1))
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

        out = regenerate(self.model, self.tokenizer.pad_token_id, self.eos, p_ids, p_mask, noise, self.temperature,
                         steering)
        new_ids, new_mask = regenerated(out, ids, cmask, movable.cpu(), self.eos, self.tokenizer.pad_token_id)
        disp = (disp_sum / moved_steps.clamp_min(1)).reshape(g, n).cpu()
        return Moved(new_ids.reshape(g, n, t), new_mask.reshape(g, n, t), disp, concat_traces(traces, g, n),
                     {"moved_positions": float(moved_steps.sum()), "prefix_cv_corr": pv.cv_corr})
