"""Steering-vector particles that the language model decodes itself.

A particle is one vector u in the model's hidden space (d numbers), added to the output of decoder layer
``steer_layer`` at every position that predicts a response token. Decoding runs the reference model again,
autoregressively, with u added, so every token after a change follows from the model (no projection onto the
embedding table). Each particle keeps the sampling noise of its reference sample: ``lift`` draws Gumbel noise from
its posterior given the sampled tokens (the Gumbel-max structural model: argmax(logits / temperature + noise)
re-creates the sample exactly), and decoding takes argmax(steered logits / temperature + the same noise). So u = 0
decodes to the reference sample token for token and budget 0 is best-of-N; a small u changes only the tokens the
steer tips over, and what follows them is the model's own continuation under the same noise.

The value gradient needs no backward pass below ``steer_layer``: the scorer (a ``ValueModel`` on the same base
model, its trunk cut at or above ``steer_layer``) is run teacher-forced on the particle's reference tokens with u
added, and only the blocks above the steered one are differentiated (at the value model's own cut, only its final
norm, pooling and head: the cheapest gradient). The flow moves N vectors of d numbers per
prompt, so SVGD's kernel between particles is meaningful (repulsion on). Particles start at u = 0.

Needs plain temperature sampling (``top_k=0``, ``top_p=1``, ``temperature > 0``): the noise model is Gumbel-max.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from vgf_llm.rollout.hf import Rollouts, completion_mask_from_ids, eos_token_ids
from vgf_llm.spaces.base import Particles
from vgf_llm.spaces.reference import ReferenceTokens
from vgf_llm.value import active_adapter


def posterior_gumbel(logits: torch.Tensor, observed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gumbel noise e [B, V] given logits [B, V] such that argmax(logits + e) == observed [B], drawn from its
    posterior (top-down sampling: the maximum is Gumbel(logsumexp) at the observed token, every other value is a
    Gumbel truncated below it). Tokens at -inf keep noise 0 (they stay impossible)."""
    finite = torch.isfinite(logits)
    safe = torch.where(finite, logits, torch.zeros_like(logits))
    top = torch.logsumexp(logits, -1, keepdim=True) + _gumbel(logits.shape[:-1] + (1,), generator)
    values = safe + _gumbel(logits.shape, generator)
    truncated = -torch.logaddexp(-top, -values)  # Gumbel(l_i) conditioned on being < top, without overflow
    truncated.scatter_(-1, observed[:, None], top)
    return torch.where(finite, truncated - safe, torch.zeros_like(logits))


def _gumbel(shape, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp(1e-12, 1 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def posterior_noise(reference: ReferenceTokens, rollouts: Rollouts, temperature: float, seed: int) -> torch.Tensor:
    """[G * N, T, V] Gumbel noise per flat rollout row under which argmax(reference logits / temperature + noise)
    re-creates every sampled token (posterior given the sample); positions after a sample's end get prior noise."""
    g, n, t = rollouts.shape
    p_ids, p_mask, ids, cmask = rollouts.flat()
    gen = torch.Generator().manual_seed(seed)
    noise = []
    for s in range(0, g * n, 16):
        logits = reference.logits(ids[s:s + 16], p_ids[s:s + 16], p_mask[s:s + 16]) / temperature
        b, _, v = logits.shape
        e = posterior_gumbel(logits.reshape(b * t, v), ids[s:s + 16].reshape(-1), gen).reshape(b, t, v)
        free = ~cmask[s:s + 16].bool()  # after the sample's end: no observation, prior noise
        e[free] = _gumbel((int(free.sum()), v), gen)
        noise.append(e)
    return torch.cat(noise)


def noise_particles(reference: ReferenceTokens, rollouts: Rollouts, temperature: float, seed: int,
                    width: int = 1) -> Particles:
    """Particles that re-create their reference samples: the state is each sample's posterior Gumbel noise, the
    start zeros [G, N, width], and every non-empty response may move."""
    g, n, _ = rollouts.shape
    noise = posterior_noise(reference, rollouts, temperature, seed)
    movable = (rollouts.completion_mask.sum(-1) > 0).float()
    return Particles(rollouts, torch.zeros(g, n, width), movable, {"noise": noise})


def check_plain_sampling(decoder: str, temperature: float, top_k, top_p: float) -> None:
    """The spaces that re-create each reference sample by Gumbel-max need plain temperature sampling."""
    if temperature <= 0 or top_k not in (0, None) or top_p != 1.0:
        raise ValueError(f"decoder={decoder!r} re-creates each reference sample by Gumbel-max: it needs plain "
                         f"temperature sampling (temperature > 0, top_k=0, top_p=1), got {temperature}, {top_k}, "
                         f"{top_p}")


def regenerated(out, ids, mask, movable, eos: set[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [B, T] of a regeneration ``out``: the original rows where not ``movable``, padding after EOS."""
    new_mask = torch.where(movable[:, None], completion_mask_from_ids(out, eos, pad_id), mask)
    new_ids = torch.where(movable[:, None], out, ids)
    return torch.where(new_mask.bool(), new_ids, torch.full_like(new_ids, pad_id)), new_mask


def stack_record(record: list, width: int) -> torch.Tensor:
    """[B, width, V] of ``regenerate``'s per-step record; decoding stops once every row is done, so the positions
    it never reached are all padding (zeros here, masked by whoever reads them)."""
    logps = torch.stack(record, 1)
    return torch.nn.functional.pad(logps, (0, 0, 0, width - logps.shape[1]))


@torch.no_grad()
def regenerate(model, pad_id: int, eos: set[int], p_ids, p_mask, noise, temperature: float, steering,
               record: list | None = None, tilt=None, adapter: str | None = None) -> torch.Tensor:
    """[B, T] tokens: argmax(logits / temperature + noise[:, t]) step by step with a KV cache, the reference
    (``adapter`` active; None: adapters off) running under ``steering(step, done)`` (a context manager per
    forward call: step 0 is the prompt pass; ``done`` [B] marks rows already past their EOS); after a row's EOS its
    tokens are padding.
    ``record``: a list each step's [B, V] distribution the token was drawn from, log_softmax(logits /
    temperature) in bfloat16, is appended to (the steered model's own next-token distributions). ``tilt(logits,
    cache, mask, tokens)``: moves each step's [B, V] logits / temperature before the token is drawn (``mask``: the
    attention mask so far, ``cache``: the KV cache up to the newest token, ``tokens``: the response so far)."""
    device = model.device
    b, t = noise.shape[:2]
    out = torch.full((b, t), pad_id, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    eos = torch.tensor(sorted(eos))
    mask = p_mask.to(device)
    with active_adapter(model, adapter), steering(0, done):
        step = model(input_ids=p_ids.to(device), attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True)
    cache = step.past_key_values
    for pos in range(t):
        scaled = step.logits[:, -1].float().cpu() / temperature
        if tilt is not None:
            scaled = tilt(scaled, step.past_key_values, mask, out[:, :pos])
        if record is not None:
            record.append(torch.log_softmax(scaled, -1).to(torch.bfloat16))
        logits = scaled + noise[:, pos]
        token = torch.where(done, torch.full((b,), pad_id), logits.argmax(-1))
        out[:, pos] = token
        done |= torch.isin(token, eos)
        if done.all() or pos == t - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        with active_adapter(model, adapter), steering(pos + 1, done):
            step = model(input_ids=token[:, None].to(device), attention_mask=mask,
                         position_ids=mask.sum(-1, keepdim=True) - 1, past_key_values=cache, use_cache=True)
        cache = step.past_key_values
    return out


class RegeneratingSpace:
    """What the spaces that move while the model decodes share: each particle is its sample's posterior Gumbel noise
    (``lift``), regenerated by the model (``ReferenceTokens.adapter``: under the adapter that drew it) while the space
    moves it; ``keep_logps`` asks ``move_and_decode`` to keep, in ``last_logps``, the distributions the tokens were
    drawn from. A subclass names itself (``name``) and implements ``move_and_decode``."""

    name = ""
    moves_while_decoding = True  # the sampler hands it the budget instead of running one transport before decoding

    def __init__(self, model, tokenizer, scorer, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0):
        check_plain_sampling(self.name, temperature, top_k, top_p)
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.temperature, self.seed = temperature, seed
        self.eos = eos_token_ids(model, tokenizer)
        self.reference = ReferenceTokens(model, model.get_input_embeddings().weight)
        self.last_stats: dict = {}
        self.keep_logps = False  # set by whoever distils the moved distributions (distill_target='distribution')
        self.last_logps: torch.Tensor | None = None  # [G, N, T, V] of the last move_and_decode, when kept

    @torch.no_grad()
    def lift(self, rollouts: Rollouts) -> Particles:
        return noise_particles(self.reference, rollouts, self.temperature, self.seed)


class SteeringHook:
    """Adds ``vectors`` [B, d] to the output of one decoder layer at the positions ``mask`` [B, S] marks (None: at
    every position; incremental decoding feeds one position at a time)."""

    def __init__(self, layer_module):
        self.layer, self.vectors, self.mask = layer_module, None, None

    def _hook(self, _module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        shift = self.vectors[:, None, :].to(hidden.dtype)
        if self.mask is not None:
            shift = shift * self.mask[..., None].to(hidden.dtype)
        hidden = hidden + shift
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    @contextmanager
    def active(self, vectors: torch.Tensor, mask: torch.Tensor | None = None):
        self.vectors, self.mask = vectors, mask
        handle = self.layer.register_forward_hook(self._hook)
        try:
            yield
        finally:
            handle.remove()
            self.vectors = self.mask = None


class SteeringVectors:
    repulsion = True

    def __init__(self, model, tokenizer, scorer, *, steer_layer: int | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0):
        if getattr(scorer, "model", None) is not model:
            raise ValueError("decoder='steer' needs a value model on the policy's own base model (a ValueModel): the "
                             "particles are the model's hidden states, and the scorer must read them")
        check_plain_sampling("steer", temperature, top_k, top_p)
        depth = getattr(scorer.config, "num_layers", None) or model.config.num_hidden_layers
        depth = min(depth, model.config.num_hidden_layers)
        self.steer_layer = steer_layer if steer_layer is not None else max(1, depth // 2)
        if not 1 <= self.steer_layer <= depth:
            raise ValueError(f"steer_layer must be in 1..{depth} (the value model reads layer {depth}), "
                             f"got {self.steer_layer}")
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.temperature, self.seed = temperature, seed
        self.eos = eos_token_ids(model, tokenizer)
        self.hook = SteeringHook(model.get_decoder().layers[self.steer_layer - 1])
        # the reference's own next-token logits (nothing excluded: the noise must re-create every sampled token)
        self.reference = ReferenceTokens(model, scorer.embedding_weight)

    @classmethod
    def from_config(cls, model, tokenizer, scorer, config):
        return cls(model, tokenizer, scorer, steer_layer=config.steer_layer, temperature=config.temperature,
                   top_p=config.top_p, top_k=config.top_k)

    # -- lift: the start (u = 0) and each particle's posterior noise ----------------------------------------------
    @torch.no_grad()
    def lift(self, rollouts: Rollouts) -> Particles:
        return noise_particles(self.reference, rollouts, self.temperature, self.seed, self.model.config.hidden_size)

    # -- grad: the scorer on the reference tokens with u added at the steered layer --------------------------------
    def _steer_mask(self, p_mask: torch.Tensor, t: int) -> torch.Tensor:
        """1 at the last prompt position and at every response position (the states that predict response tokens)."""
        mask = torch.zeros(p_mask.shape[0], p_mask.shape[1] + t)
        mask[:, p_mask.shape[1] - 1:] = 1.0
        return mask

    def grad(self, particles: Particles, u: torch.Tensor):
        ro = particles.rollouts
        g, n, t = ro.shape
        p_ids, p_mask, ids, cmask = ro.flat()
        device = self.scorer.embedding_weight.device
        leaf = u.detach().reshape(g * n, -1).to(device).requires_grad_(True)
        rows = self.scorer.embedding_weight.detach()[ids.to(device)]
        with torch.enable_grad(), self.hook.active(leaf, self._steer_mask(p_mask, t).to(device)):
            values = self.scorer.score_embeds(p_ids, p_mask, rows, cmask)
            (grad,) = torch.autograd.grad(values.sum(), leaf)
        return values.detach().reshape(g, n).cpu(), grad.reshape(u.shape).cpu()

    # -- decode: the model generates again with u added, under each particle's own noise ---------------------------
    @torch.no_grad()
    def decode(self, particles: Particles, moved: torch.Tensor):
        ro = particles.rollouts
        g, n, t = ro.shape
        p_ids, p_mask, ids, cmask = ro.flat()
        u = moved.reshape(g * n, -1)
        todo = (u != particles.start.reshape(g * n, -1)).any(-1).nonzero().squeeze(1)
        new_ids, new_mask = ids.clone(), cmask.clone()
        if len(todo):
            out = self.generate(p_ids[todo], p_mask[todo], u[todo], particles.state["noise"][todo])
            new_ids[todo], new_mask[todo] = out, completion_mask_from_ids(out, self.eos, self.tokenizer.pad_token_id)
        new_ids = torch.where(new_mask.bool(), new_ids, torch.full_like(new_ids, self.tokenizer.pad_token_id))
        return new_ids.reshape(g, n, t), new_mask.reshape(g, n, t)

    def generate(self, p_ids, p_mask, u, noise) -> torch.Tensor:
        """[B, T] tokens regenerated with u added at the steered layer, under each row's noise."""
        first, later = self._steer_mask(p_mask, 0).to(self.model.device), None
        return regenerate(self.model, self.tokenizer.pad_token_id, self.eos, p_ids, p_mask, noise, self.temperature,
                          lambda step, _done: self.hook.active(u.to(self.model.device), first if step == 0 else later),
                          adapter=self.reference.adapter)
