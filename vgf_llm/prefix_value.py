"""A prefix value: a linear head on one decoder layer's hidden state at every response prefix, fitted by ridge to
the final reward of the response the prefix belongs to (the prefix/token-level value of controlled decoding).

Because the head is linear in the very state a particle space moves, its gradient is its weight vector: moving a
state along the value costs no backward pass. The state at a position is the layer's output there, the one that
predicts the next token, so the value of the prefix "prompt + the first k response tokens" is read at the k-th
response position (k = 0: the last prompt position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vgf_llm.adapters import active_adapter, first_layers
from vgf_llm.ridge import RIDGE_STRENGTHS, ridge_cv, ridge_solve


@dataclass
class PrefixValue:
    """V(h) = weight . h + bias on the raw output h of decoder layer ``layer``; ``mean``/``std`` are the states'
    per-unit statistics from the fit (the particle space moves states in these standardised units)."""

    layer: int
    weight: torch.Tensor  # [d]
    bias: float
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]
    cv_corr: float = float("nan")  # out-of-fold correlation (folds of whole prompts) of the chosen fit
    ridge: float = float("nan")

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        return states.float() @ self.weight.float().to(states.device) + self.bias


@torch.no_grad()
def prefix_states(model, layer: int, prompt_ids, prompt_mask, ids, mask, *, batch_size: int = 16):
    """[P, d] float64 states of every prefix (the last prompt position and each response position except the
    last real one, i.e. the states that predict a response token) and [P] the flat row each belongs to. The
    reference (adapters off) reads them teacher-forced; the decoder runs only up to ``layer``."""
    decoder = model.get_decoder()
    captured = {}
    handle = decoder.layers[layer - 1].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    device = model.get_input_embeddings().weight.device
    width = prompt_ids.shape[1]
    states, rows = [], []
    try:
        with active_adapter(model, None), first_layers(decoder, layer):
            for s in range(0, len(ids), batch_size):
                sl = slice(s, s + batch_size)
                am = torch.cat([prompt_mask[sl], mask[sl]], 1).to(device)
                decoder(input_ids=torch.cat([prompt_ids[sl], ids[sl]], 1).to(device), attention_mask=am,
                        position_ids=(am.long().cumsum(-1) - 1).clamp_min(0))
                h = captured["h"][:, width - 1:-1].float().cpu()  # states that predict response tokens 0..T-1
                used = mask[sl].bool()  # the state before response token t is used when token t exists
                states.append(h[used].double())
                rows.append(torch.arange(s, s + h.shape[0])[:, None].expand_as(used)[used])
    finally:
        handle.remove()
    return torch.cat(states), torch.cat(rows)


def response_means(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """[n] the mean of per-prefix ``values`` over each response's prefixes (``rows``: the response of each; NaN
    for an empty response): how a prefix value is checked on fresh rollouts it was not fitted on."""
    total = torch.zeros(n).index_add_(0, rows, values.float().cpu())
    return total / torch.bincount(rows, minlength=n).float()


def fit_prefix_value(layer: int, states: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                     groups: torch.Tensor, *, lambdas=RIDGE_STRENGTHS, folds: int = 4,
                     seed: int = 0) -> PrefixValue | None:
    """Ridge of each response's final ``targets`` (NaN: skipped) on the states of all its prefixes (``states``,
    ``rows``: ``prefix_states``' output, read once per response by whoever keeps a buffer), strength chosen by
    out-of-fold correlation over folds of whole ``groups`` (prompts; responses of a single prompt are their own
    groups). None with fewer than 4 responses with a finite target."""
    y = torch.as_tensor(targets).double()
    groups = torch.as_tensor(groups)
    sel = torch.isfinite(y[rows])
    x, row = states[sel].double(), rows[sel]
    if len(row.unique()) < 4:
        return None
    if len(groups[row].unique()) < 2:  # one prompt: its responses are the folds
        groups = torch.arange(len(y))
    py, pg = y[row], groups[row]
    cv = ridge_cv({(layer, "prefix"): x}, py, pg, lambdas=lambdas, folds=min(folds, len(pg.unique())), seed=seed)
    best = cv["best"]
    w, b = ridge_solve(x, py, best["ridge"])
    return PrefixValue(layer=layer, weight=w.float(), bias=float(b), mean=x.mean(0).float(),
                       std=x.std(0).clamp_min(1e-6).float(), cv_corr=float(best["cv_corr"]), ridge=best["ridge"])
