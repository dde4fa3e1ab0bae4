"""Differentiable scorers S(x, u): the value gradient for transport and the test-time selector.

Both run on ``inputs_embeds`` so gradients reach the particles. Particles live in ``scorer.embedding_weight``:
- ``ValueModel``: the frozen base model (adapters off) cut after ``num_layers`` blocks, and a linear head on its
  pooled response states solved by ridge (``vgf_llm.value_fit``). It shares the policy's embedding table, so
  decoded tokens are policy tokens. (Value models with their own LoRA adapter fitted by SGD were retired: ridge
  won at test time and in training, docs/benchmarks.md "Retired".)
- ``RewardModelScorer``: a sequence-classification reward model sharing the policy's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from vgf_llm.adapters import active_adapter, first_layers

SCORE_CHUNK_ROWS = 8  # rows per scorer pass (and per value-gradient backward): activations of 8 rows at a time


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


@torch.no_grad()
def score_token_ids(scorer, prompt_ids, prompt_mask, response_ids, response_mask,
                    batch_size: int = SCORE_CHUNK_ROWS):
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


@dataclass
class ValueModelConfig:
    num_layers: int | None = None  # cut the backbone after this many blocks (None: all)
    pooling: str = "mean"  # response-state pooling: "mean" or "last"


class ValueModel(nn.Module):
    """V(x, y): the frozen base model (adapters off) cut after ``num_layers`` blocks + a float32 linear head on its
    pooled response states. The base is not a submodule (it is the user's model); the head follows the trunk's
    device at every call, so a model moved after the value model was built (e.g. by ``Trainer``) just works."""

    def __init__(self, model, config: ValueModelConfig | None = None):
        super().__init__()
        self.config = config = config or ValueModelConfig()
        if config.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {config.pooling!r}")
        self.model = model
        for p in model.parameters():  # the value is read from the frozen reference; only the particles get gradients
            p.requires_grad_(False)
        hidden = model.config.hidden_size
        self.head = nn.Linear(hidden, 1).requires_grad_(False)  # random until fitted (value_fit solves it)
        nn.init.normal_(self.head.weight, std=hidden ** -0.5)
        nn.init.zeros_(self.head.bias)

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def score_embeds(self, prompt_ids, prompt_mask, response_embeds, response_mask) -> torch.Tensor:
        """[B] values of responses given as embedding rows (differentiable in ``response_embeds``)."""
        pooled = self.pooled_embeds(prompt_ids, prompt_mask, response_embeds, response_mask).float()
        if self.head.weight.device != pooled.device:
            self.head.to(pooled.device)
        return self.head(pooled)[:, 0]

    def pooled_embeds(self, prompt_ids, prompt_mask, response_embeds, response_mask) -> torch.Tensor:
        """[B, d] the pooled response states the head reads (the reference trunk, cut)."""
        inputs, mask, positions = join_inputs(self.embedding_weight, prompt_ids, prompt_mask,
                                              response_embeds, response_mask)
        decoder = self.model.get_decoder()
        with active_adapter(self.model, None), first_layers(decoder, self.config.num_layers):
            states = decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).last_hidden_state
        states = states[:, prompt_ids.shape[1]:]
        rmask = response_mask.to(device=states.device, dtype=states.dtype)
        if self.config.pooling == "mean":
            return (states * rmask[..., None]).sum(1) / rmask.sum(1, keepdim=True).clamp_min(1)
        last = (rmask.sum(1).long() - 1).clamp_min(0)
        return states[torch.arange(states.shape[0]), last]

    def score_ids(self, prompt_ids, prompt_mask, response_ids, response_mask,
                  batch_size: int = SCORE_CHUNK_ROWS) -> torch.Tensor:
        return score_token_ids(self, prompt_ids, prompt_mask, response_ids, response_mask, batch_size)

    @torch.no_grad()
    def set_head(self, weight: torch.Tensor, bias: float) -> None:
        """Write a solved regression (weights [d], intercept) into the head."""
        self.head.weight.copy_(weight.float()[None].to(self.head.weight))
        self.head.bias.fill_(float(bias))

    def save(self, path: str | Path) -> None:
        """Head + config (the base model is not saved: it is the user's base model)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({f"head.{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(path / "value_model.safetensors"))
        record = {**asdict(self.config), "base_fingerprint": base_fingerprint(self.model)}
        (path / "value_model.json").write_text(json.dumps(record, indent=2))

    @classmethod
    def load(cls, model, path: str | Path) -> ValueModel:
        """A new value model on ``model`` with the head saved in ``path``."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "value_model.json").exists():
            raise FileNotFoundError(f"{path} holds no value model (value_model.json missing)")
        if not (path / "value_model.safetensors").exists():
            raise FileNotFoundError(f"{path} holds no value model (value_model.safetensors missing)")
        saved = json.loads((path / "value_model.json").read_text())
        state = load_file(str(path / "value_model.safetensors"))
        if saved.get("num_heads", 1) != 1 or any("lora_" in k for k in state):
            raise ValueError(f"{path} holds a value model of a retired kind (an ensemble or a LoRA adapter fitted by "
                             "SGD, docs/benchmarks.md 'Retired'): fit it again with `vgf-llm fit-value`")
        fitted_on = saved.get("base_fingerprint")
        vm = cls(model, ValueModelConfig(num_layers=saved.get("num_layers"), pooling=saved.get("pooling", "mean")))
        head = {k.removeprefix("head."): v for k, v in state.items()}
        if head.get("weight") is None or head["weight"].shape != vm.head.weight.shape:
            raise ValueError(f"the value model in {path} was fitted on another base model: its head does not fit "
                             "this one (missing or of another shape)")
        vm.head.load_state_dict(head)
        here = base_fingerprint(model)
        if fitted_on and here and fitted_on != here:
            raise ValueError(f"the value model in {path} was fitted on another base model (its embedding table's "
                             f"fingerprint {fitted_on} differs from this model's {here}), even if the shapes match")
        return vm


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
        return logits[:, 0].float()

    def score_ids(self, prompt_ids, prompt_mask, response_ids, response_mask,
                  batch_size: int = SCORE_CHUNK_ROWS) -> torch.Tensor:
        return score_token_ids(self, prompt_ids, prompt_mask, response_ids, response_mask, batch_size)
