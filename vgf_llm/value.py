"""Differentiable scorers S(x, u): the value gradient for transport and the test-time selector.

Both run on ``inputs_embeds`` so gradients reach the particles. Particles live in ``scorer.embedding_weight``:
- ``ValueModel``: the frozen base backbone (optionally cut after ``num_layers``) with its own LoRA adapter and a
  scalar head, fitted to true rewards of rollouts (``vgf_llm.value_fit``). It shares the
  policy's embedding table, so decoded tokens are policy tokens.
- ``RewardModelScorer``: a sequence-classification reward model sharing the policy's vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


def join_inputs(embed_weight, prompt_ids, prompt_mask, response_embeds, response_mask):
    """[prompt | response] as inputs_embeds in the model's dtype, attention mask and position ids (prompt
    left-padded), on the model's device (rollouts are kept on the CPU)."""
    device = embed_weight.device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    response_embeds, response_mask = response_embeds.to(device), response_mask.to(device)
    # the model's own dtype (bfloat16 models too): particles are float32, the cast passes their gradient back
    inputs = torch.cat([embed_weight[prompt_ids], response_embeds.to(embed_weight.dtype)], dim=1)
    mask = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return inputs, mask, positions


@contextlib.contextmanager
def active_adapter(model, name: str | None):
    """Run with only adapter ``name`` active (``None``: no adapter, i.e. the reference); restore afterwards."""
    if not getattr(model, "_hf_peft_config_loaded", False):
        if name is not None:
            raise ValueError(f"the model has no adapter {name!r}")
        yield
        return
    previous = model.active_adapters()
    try:
        if name is None:
            model.disable_adapters()
        else:
            model.enable_adapters()
            model.set_adapter(name)
        yield
    finally:
        model.enable_adapters()
        model.set_adapter(previous if len(previous) > 1 else previous[0])


@contextlib.contextmanager
def first_layers(decoder, num_layers: int | None):
    """Run the decoder with only its first ``num_layers`` blocks (a cheaper value trunk); weights are shared."""
    if num_layers is None or num_layers >= len(decoder.layers):
        yield
        return
    full = decoder.layers
    decoder.layers = full[:num_layers]
    try:
        yield
    finally:
        decoder.layers = full


@torch.no_grad()
def score_token_ids(scorer, prompt_ids, prompt_mask, response_ids, response_mask, batch_size: int = 32):
    """Score real token sequences in batches with any scorer's ``score_embeds`` (its own embedding rows)."""
    weight = scorer.embedding_weight
    return torch.cat([
        scorer.score_embeds(prompt_ids[s:s + batch_size], prompt_mask[s:s + batch_size],
                            weight[response_ids[s:s + batch_size].to(weight.device)], response_mask[s:s + batch_size])
        for s in range(0, response_ids.shape[0], batch_size)
    ]).cpu()


def base_fingerprint(model) -> str | None:
    """A short hash of the base model's embedding table (its first 256 rows, rounded to bfloat16 so fp32 and bf16
    loads agree): a value head means something only on the base it was fitted on, even where another base has the
    same shapes. None while the table is sharded (DeepSpeed ZeRO-3 outside a gather)."""
    weight = model.get_input_embeddings().weight.detach()
    if weight.numel() == 0:
        return None
    rows = weight[:256].to(torch.bfloat16).float().cpu().contiguous()
    digest = hashlib.sha256(rows.numpy().tobytes() + str(tuple(weight.shape)).encode())
    return digest.hexdigest()[:16]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


@dataclass
class ValueModelConfig:
    num_layers: int | None = None  # cut the backbone after this many blocks (None: all)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    pooling: str = "mean"  # response-state pooling: "mean" or "last"
    adapter_name: str = "value"


class ValueModel(nn.Module):
    """V(x, y): frozen base backbone + LoRA adapter ``adapter_name`` + a linear head on pooled response states."""

    def __init__(self, model, config: ValueModelConfig | None = None):
        super().__init__()
        from peft import LoraConfig

        self.config = config = config or ValueModelConfig()
        if config.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {config.pooling!r}")
        self.model = model  # not registered as a submodule: the value model owns only its adapter and head
        for p in model.parameters():
            p.requires_grad_(False)
        n_layers = model.config.num_hidden_layers
        layers = list(range(min(config.num_layers or n_layers, n_layers)))
        model.add_adapter(
            LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       target_modules=config.target_modules, layers_to_transform=layers),
            adapter_name=config.adapter_name,
        )
        model.disable_adapters()  # the model stays the reference unless a scorer asks for its adapter
        self._adapter_params = self.adapter_parameters()
        self._fitting = False
        hidden = model.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden))
        nn.init.zeros_(self.head.bias)
        self.head.to(model.device).requires_grad_(False)

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def adapter_parameters(self) -> list[nn.Parameter]:
        name = self.config.adapter_name
        return [p for n, p in self.model.named_parameters() if "lora_" in n and f".{name}." in n]

    def score_embeds(self, prompt_ids, prompt_mask, response_embeds, response_mask) -> torch.Tensor:
        """[B] values of responses given as embedding rows (differentiable in ``response_embeds``)."""
        pooled = self.pooled_embeds(prompt_ids, prompt_mask, response_embeds, response_mask)
        return self.head(pooled.to(self.head.weight.dtype))[:, 0]

    def pooled_embeds(self, prompt_ids, prompt_mask, response_embeds, response_mask) -> torch.Tensor:
        """[B, d] the pooled response states the head reads (the trunk with this model's adapter, cut)."""
        inputs, mask, positions = join_inputs(self.embedding_weight, prompt_ids, prompt_mask,
                                              response_embeds, response_mask)
        decoder = self.model.get_decoder()
        with active_adapter(self.model, self.config.adapter_name), first_layers(decoder, self.config.num_layers):
            for p in self._adapter_params:  # PEFT's set_adapter turns grads on; only fit() may train the adapter
                p.requires_grad_(self._fitting)
            states = decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).last_hidden_state
        states = states[:, prompt_ids.shape[1]:]
        rmask = response_mask.to(states.dtype)
        if self.config.pooling == "mean":
            pooled = (states * rmask[..., None]).sum(1) / rmask.sum(1, keepdim=True).clamp_min(1)
        else:
            last = (rmask.sum(1).long() - 1).clamp_min(0)
            pooled = states[torch.arange(states.shape[0]), last]
        return pooled

    def score_ids(self, prompt_ids, prompt_mask, response_ids, response_mask, batch_size: int = 32) -> torch.Tensor:
        return score_token_ids(self, prompt_ids, prompt_mask, response_ids, response_mask, batch_size)

    def fit(self, prompt_ids, prompt_mask, responses, response_mask, targets, *, epochs: int = 3, lr: float = 1e-3,
            batch_size: int = 16, val_fraction: float = 0.15, seed: int = 0, progress: bool = True,
            groups=None) -> dict:
        """Regress the true rewards (MSE); ``responses`` are token ids [B, T] or embedding rows [B, T, d].

        Returns held-out figures (``val_loss_before/after``, ``val_corr``) so users see if the value model is any
        good before trusting its gradient. Base weights stay frozen; only the adapter and the head train.
        ``groups`` [B] (e.g. the prompt index of each sample): the held-out set is made of whole groups, so samples
        of one prompt never sit on both sides of the split.
        """
        targets = torch.as_tensor(targets, dtype=torch.float32)
        keep = torch.isfinite(targets)
        if keep.sum() < 4:
            raise ValueError(f"need at least 4 finite rewards to fit a value model, got {int(keep.sum())}")
        idx = keep.nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        # at least 3 held-out samples (a correlation of fewer means nothing), never more than a quarter of the data
        n_val = max(min(3, len(idx) // 4), int(len(idx) * val_fraction)) if val_fraction > 0 else 0
        if groups is not None and n_val:
            groups = torch.as_tensor(groups)[idx]
            uniq = groups.unique()
            uniq = uniq[torch.randperm(len(uniq), generator=gen)]
            n_groups = max(1, min(len(uniq) - 1, round(len(uniq) * n_val / len(idx))))
            in_val = torch.isin(groups, uniq[:n_groups])
            val, train = idx[in_val], idx[~in_val]
            n_val = len(val)
        else:
            val, train = idx[:n_val], idx[n_val:]

        def rows(sel):
            r = responses[sel]
            return self.embedding_weight[r] if r.dtype == torch.long else r

        def loss_on(sel):
            pred = self.score_embeds(prompt_ids[sel], prompt_mask[sel], rows(sel), response_mask[sel])
            return ((pred - targets[sel].to(pred.device)) ** 2).mean()

        def evaluate(sel):
            with torch.no_grad():
                preds = torch.cat([self.score_embeds(prompt_ids[b], prompt_mask[b], rows(b), response_mask[b])
                                   for b in sel.split(batch_size)]).cpu()
            return float(((preds - targets[sel]) ** 2).mean()), pearson(preds, targets[sel])

        before = evaluate(val) if n_val else (float("nan"), float("nan"))
        params = self._adapter_params + list(self.head.parameters())
        for p in params:
            p.requires_grad_(True)
        self._fitting = True
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        losses = []
        bar = tqdm(total=epochs * math.ceil(len(train) / batch_size), desc="value fit", disable=not progress,
                   leave=False)
        # the adapter stays active through backward: PEFT turns an inactive adapter's grads off, dropping them
        with active_adapter(self.model, self.config.adapter_name):
            for _ in range(epochs):
                for b in train[torch.randperm(len(train), generator=gen)].split(batch_size):
                    loss = loss_on(b)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                    bar.update()
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        opt.zero_grad(set_to_none=True)  # no stale grads for a trainer that clips over all of the model's parameters
        self._fitting = False
        for p in params:
            p.requires_grad_(False)
        after = evaluate(val) if n_val else (float("nan"), float("nan"))
        return {"train_loss_first": losses[0], "train_loss_last": losses[-1], "val_loss_before": before[0],
                "val_loss_after": after[0], "val_corr": after[1], "num_train": len(train), "num_val": n_val}

    def save(self, path: str | Path) -> None:
        """Adapter + head + config (the base model is not saved: it is the user's base model)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        state = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters()
                 if "lora_" in n and f".{self.config.adapter_name}." in n}
        state.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()})
        save_file(state, str(path / "value_model.safetensors"))
        record = {**asdict(self.config), "base_fingerprint": base_fingerprint(self.model)}
        (path / "value_model.json").write_text(json.dumps(record, indent=2))

    @classmethod
    def load(cls, model, path: str | Path) -> ValueModel:
        """A new value model on ``model`` with the adapter and head saved in ``path``."""
        path = Path(path)
        if not (path / "value_model.json").exists():
            raise FileNotFoundError(f"{path} holds no value model (value_model.json missing)")
        saved = json.loads((path / "value_model.json").read_text())
        if saved.pop("num_heads", 1) != 1:  # ensembles were retired (docs/benchmarks.md, tag variants-2026-11)
            raise ValueError(f"{path} holds an ensemble value model, which this version no longer reads")
        saved.pop("aggregate", None)
        fitted_on = saved.pop("base_fingerprint", None)
        vm = cls(model, ValueModelConfig(**saved))
        vm.load_weights(path)  # another architecture fails here, naming the tensor that does not fit
        here = base_fingerprint(model)
        if fitted_on and here and fitted_on != here:
            raise ValueError(f"the value model in {path} was fitted on another base model (its embedding table's "
                             f"fingerprint {fitted_on} differs from this model's {here}), even if the shapes match")
        return vm

    def load_weights(self, path: str | Path) -> None:
        """Copy the adapter and head saved in ``path`` into this value model (e.g. to resume training)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "value_model.safetensors").exists():
            raise FileNotFoundError(f"{path} holds no value model (value_model.safetensors missing)")
        state = load_file(str(path / "value_model.safetensors"))
        params = dict(self.model.named_parameters())
        params.update({f"head.{k}": v for k, v in self.head.named_parameters()})
        wrong = [n for n, v in state.items() if n not in params or params[n].shape != v.shape]
        if wrong:
            raise ValueError(f"the value model in {path} was fitted on another base model: {wrong[0]} does not fit "
                             "this one (missing or of another shape)")
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)


def check_same_vocabulary(policy_tokenizer, other_tokenizer, what: str = "reward model") -> None:
    """Particles decode to policy tokens only if both sides index the same vocabulary: fail loudly otherwise."""
    a, b = policy_tokenizer.get_vocab(), other_tokenizer.get_vocab()
    if a != b:
        only_a = len(set(a.items()) - set(b.items()))
        raise ValueError(
            f"the {what}'s vocabulary differs from the policy's ({len(b)} vs {len(a)} tokens, {only_a} entries "
            f"differ): embedding-space transport needs a {what} built on the same tokenizer. Use a value model as the "
            "scorer instead (fitted to this reward model's scores, e.g. `vgf-llm fit-value`), with the reward "
            "model as the reward."
        )


class RewardModelScorer(nn.Module):
    """A sequence-classification reward model used directly as the differentiable scorer (its logit 0)."""

    def __init__(self, reward_model, reward_tokenizer, policy_tokenizer):
        super().__init__()
        check_same_vocabulary(policy_tokenizer, reward_tokenizer)
        self.model = reward_model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = reward_tokenizer.pad_token_id

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def score_embeds(self, prompt_ids, prompt_mask, response_embeds, response_mask) -> torch.Tensor:
        inputs, mask, positions = join_inputs(self.embedding_weight, prompt_ids, prompt_mask,
                                              response_embeds, response_mask)
        # the classifier pools the last non-pad token; with right padding in the middle it must be told where
        states = self.model.base_model(inputs_embeds=inputs, attention_mask=mask,
                                       position_ids=positions).last_hidden_state
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
        logits = self.model.score(states[torch.arange(states.shape[0]), last])
        return logits[:, 0]

    def score_ids(self, prompt_ids, prompt_mask, response_ids, response_mask, batch_size: int = 32) -> torch.Tensor:
        return score_token_ids(self, prompt_ids, prompt_mask, response_ids, response_mask, batch_size)
