"""The memory model of one VGF step (docs/gpu.md "Memory model"), checked against measured peaks on a tiny model.

``PeakMemory`` measures the peak of the tensors allocated inside a block (live bytes over time, every op's outputs
counted once per storage, views of their inputs not at all, released when the storage dies), on the CPU; on CUDA it
reads the allocator's peak. tracemalloc cannot see torch's allocations, so this is the CPU's measure here (and the
tests' memory checks). ``predict`` is the formula, ``largest_rows`` the sizing derived from it.

    python benchmarks/memory_model.py     # the measured-vs-predicted table and the Qwen2.5 sizing (~1 min on a CPU)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: ...`` then ``m.peak``: the most bytes of tensors allocated inside the block that
    were alive at once (CPU tensors; on ``device='cuda'`` the CUDA allocator's peak above the block's start)."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device, self.live, self.peak, self._seen = torch.device(device), 0, 0, {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        return super().__enter__()

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
            return None
        return super().__exit__(*exc)

    def _free(self, key, nbytes):
        self._seen.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._seen and key not in inputs:  # views and in-place: not allocated
                    self._seen[key] = weakref.finalize(storage, self._free, key, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


# -- the phases of one step, measured --------------------------------------------------------------------------------

PHASES = ("generate", "prefix_read", "steering", "reference_logps", "distill")


def random_model(tokenizer, *, hidden: int, layers: int, vocab: int, intermediate: int, heads: int, kv_heads: int,
                 dtype=torch.float32, device: str = "cpu"):
    """A random-init Llama/Qwen-style decoder of the given shape (``vocab`` may exceed the tokenizer's, as Qwen's
    padded 151,936 does), on ``device`` in ``dtype``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def lora(model):
    """The policy's LoRA on every linear layer of the decoder (as the benchmarks' arms), trainable in float32."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))


def measure_phases(model, tokenizer, rows: int, prompt: int, tokens: int, *, generations: int = 4) -> dict:
    """Peak bytes of each phase of one step on ``rows`` completions (``generations`` per prompt) of ``tokens``
    tokens after ``prompt`` prompt tokens; ``model`` is LoRA-wrapped (``lora``) and its adapters are trained in
    the distillation phase. The phases run as the trainer runs them (``VGFTrainer._step_targets``)."""
    from vgf_llm.distill import completion_logps
    from vgf_llm.prefix_value import PrefixValue, prefix_states
    from vgf_llm.rollout.hf import Rollouts
    from vgf_llm.spaces import Budget, PrefixSteering

    device = str(model.device)
    groups = rows // generations
    gen = torch.Generator().manual_seed(0)
    p_ids = torch.randint(4, len(tokenizer), (groups, prompt), generator=gen)
    p_mask = torch.ones_like(p_ids)
    flat_p = p_ids.repeat_interleave(generations, 0).to(device)
    peaks = {}
    with torch.no_grad(), model.disable_adapter(), PeakMemory(device) as m:
        out = model.generate(input_ids=flat_p, attention_mask=torch.ones_like(flat_p), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens)
    peaks["generate"] = m.peak
    ids = out[:, prompt:].cpu()
    ro = Rollouts(p_ids, p_mask, ids.view(groups, generations, -1), torch.ones_like(ids).view(groups, generations, -1),
                  [[""] * generations] * groups)
    layer = max(1, model.config.num_hidden_layers // 2)
    with PeakMemory(device) as m:
        prefix_states(model, layer, *ro.flat())
    peaks["prefix_read"] = m.peak
    space = PrefixSteering(model, tokenizer, steer_layer=layer)
    d = model.config.hidden_size
    space.value = PrefixValue(layer=layer, weight=torch.randn(d, generator=gen), bias=0.0, mean=torch.zeros(d),
                              std=torch.ones(d))
    with PeakMemory(device) as m:
        space.move(ro, Budget(1, 0.1))
    peaks["steering"] = m.peak
    full = torch.cat([flat_p, ids.to(device)], 1)
    mask = torch.ones_like(full)
    with torch.no_grad(), model.disable_adapter(), PeakMemory(device) as m:
        completion_logps(model, full, mask, prompt)
    peaks["reference_logps"] = m.peak
    model.train()
    with PeakMemory(device) as m:
        completion_logps(model, full, mask, prompt).sum().backward()
    model.eval()
    model.zero_grad(set_to_none=True)
    peaks["distill"] = m.peak
    return peaks


# -- the formula -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the memory of a step depends on: hidden size, layers, vocabulary, MLP width, key/value width (kv heads x
    head dim) and the parameter count."""

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    kv: int
    params: float


# from each model's config.json on the Hub (Qwen/Qwen2.5-{0.5B,1.5B,7B}-Instruct): hidden_size, num_hidden_layers,
# vocab_size, intermediate_size, num_key_value_heads x (hidden_size / num_attention_heads); parameters as published
QWEN = {"Qwen2.5-0.5B": Shape(896, 24, 151_936, 4864, 2 * 64, 0.494e9),
        "Qwen2.5-1.5B": Shape(1536, 28, 151_936, 8960, 2 * 128, 1.54e9),
        "Qwen2.5-7B": Shape(3584, 28, 152_064, 18944, 4 * 128, 7.62e9)}


def predict(s: Shape, rows: int, prompt: int, tokens: int, *, kept: int | None = None, b: int = 2,
            checkpointing: bool = False) -> dict:
    """Peak bytes of each phase above what is already held (weights, optimizer), ``b`` bytes per element of the
    model's dtype, fp32 logits. ``kept``: rows distilled (default ``rows``; up to 2 x rows with a transport).

    - one layer's transient activations per token, no grad: ``a0 = 4 d + 3 d_ff`` (norm, q/k/v/attention, gate, up,
      act x up); saved for backward per token and layer with LoRA on every linear: ``a1 = 8 d + 4 d_ff + 2 kv``;
    - the KV cache of ``r`` rows: ``2 L r S kv b``, counted twice (a step's concatenation holds old and new);
    - generate: the cache, ~4 [r, V] fp32 sampling tensors per step, the prompt pass;
    - prefix read: chunks of 16 rows through the first layers, the states kept on the host (fp32 + fp64);
    - steering: the reference's final states [r, T, d] (read in chunks of ``REFERENCE_CHUNK_ROWS`` rows first),
      then the cache and ~9 [r, V] fp32 noise/logit tensors per step;
    - reference log-probs: the final states of the kept rows, then ``LOGPS_CHUNK_ROWS`` rows of logits at a time
      (fp32, plus the head's own output below fp32);
    - distillation: the saved activations (only each layer's input with gradient checkpointing, plus one layer
      recomputed), the final states, and one checkpointed logits chunk forward and backward (4 fp32-sized copies
      of each logit in fp32, 5 below).
    """
    from vgf_llm.distill import LOGPS_CHUNK_ROWS
    from vgf_llm.spaces.reference import REFERENCE_CHUNK_ROWS

    d, L, V, ff, kv = s.hidden, s.layers, s.vocab, s.intermediate, s.kv
    S, k = prompt + tokens, rows if kept is None else kept
    a0, a1 = 4 * d + 3 * ff, 8 * d + 4 * ff + 2 * kv
    cache = 2 * 2 * L * rows * S * kv * b
    chunk = LOGPS_CHUNK_ROWS * tokens * V
    saved = L * k * S * (d * b) + k * S * a1 * b if checkpointing else L * k * S * a1 * b
    return {"generate": cache + 4 * rows * V * 4 + rows * prompt * a0 * b,
            "prefix_read": min(rows, 16) * S * (d + a0) * b + rows * tokens * d * 12,
            "steering": rows * tokens * d * b + max(REFERENCE_CHUNK_ROWS * S * (d + a0) * b, cache + 9 * rows * V * 4),
            "reference_logps": max(k * S * (d + a0) * b, k * S * d * b + chunk * (4 if b == 4 else 4 + b)),
            "distill": saved + k * S * d * b + chunk * (16 if b == 4 else 20)}


def config_shape(config) -> Shape:
    heads = config.num_attention_heads
    return Shape(config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size,
                 config.num_key_value_heads * (config.hidden_size // heads), 0)


# -- sizing: the largest batch that fits ---------------------------------------------------------------------------

GPU_BYTES = 80e9  # one 80 GB card
RESERVED = 3e9  # CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation (assumed)
VLLM_SHARE = 0.3  # vllm_gpu_memory_utilization of the colocated engine (held through training: assumed)


def fixed_bytes(s: Shape, lora_rank: int = 32) -> float:
    """Weights in bf16 and the LoRA adapters with fp32 weights, gradients and two Adam moments (16 bytes each)."""
    per_layer = 2 * (s.hidden + s.hidden) + 2 * (s.hidden + s.kv) + 3 * (s.hidden + s.intermediate)  # 7 linears
    lora_params = lora_rank * s.layers * per_layer
    return 2 * s.params + 16 * lora_params


def largest_rows(s: Shape, prompt: int, tokens: int, *, vllm: bool, transport: bool, checkpointing: bool,
                 step: int = 8) -> int:
    """The most completions per device and micro-batch (``per_device_train_batch_size x num_generations``, a
    multiple of ``step``) whose step fits: rollouts from vLLM leave the generate phase to vLLM's share; with a
    transport up to 2 x rows are distilled."""
    budget = GPU_BYTES * (1 - VLLM_SHARE if vllm else 1) - RESERVED - fixed_bytes(s)
    rows = 0
    while True:
        nxt = rows + step
        phases = predict(s, nxt, prompt, tokens, kept=2 * nxt if transport else nxt, checkpointing=checkpointing)
        if vllm:
            phases.pop("generate")
        if max(phases.values()) > budget:
            return rows
        rows = nxt


def measured_table(tokenizer, shapes, rows_list, prompt: int, tokens: int) -> list[dict]:
    """Measured (CPU, fp32) and predicted peaks of every phase for each tiny shape and row count."""
    out = []
    for shape in shapes:
        model = lora(random_model(tokenizer, **shape))
        for rows in rows_list:
            got = measure_phases(model, tokenizer, rows, prompt, tokens)
            pred = predict(config_shape(model.config), rows, prompt, tokens, b=4)
            out.append({"shape": shape, "rows": rows, "measured": got, "predicted": pred})
    return out


def main(argv=None) -> dict:
    import argparse
    import json
    import sys
    import tempfile
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", type=int, default=256, help="Prompt tokens for the sizing (GSM8K, chat-formatted).")
    p.add_argument("--tokens", type=int, default=512, help="Completion tokens for the sizing (max_completion_length).")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "memory_model.json"))
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import CORPUS, _train_tokenizer  # the test suite's offline tokenizer

    tokenizer = _train_tokenizer(CORPUS, 400, tempfile.mkdtemp())
    shapes = [dict(hidden=64, layers=2, vocab=4096, intermediate=128, heads=4, kv_heads=2),
              dict(hidden=128, layers=3, vocab=8192, intermediate=256, heads=4, kv_heads=2)]
    table = measured_table(tokenizer, shapes, (4, 8, 16), 16, 32)
    print("| shape (d, L, V) | rows | " + " | ".join(f"{ph} MB meas / pred" for ph in PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for r in table:
        sh = r["shape"]
        cells = " | ".join(f"{r['measured'][ph] / 1e6:.2f} / {r['predicted'][ph] / 1e6:.2f}" for ph in PHASES)
        print(f"| {sh['hidden']}, {sh['layers']}, {sh['vocab']} | {r['rows']} | {cells} |")
    sizing = {name: {f"{'vllm' if v else 'hf'}_{'steer' if t else 'bon'}_{'gc' if c else 'nogc'}":
                     largest_rows(s, a.prompt, a.tokens, vllm=v, transport=t, checkpointing=c)
                     for v in (False, True) for t in (False, True) for c in (False, True)}
              for name, s in QWEN.items()}
    print(f"\nlargest per_device_train_batch_size x num_generations on one 80 GB GPU (bf16, prompt {a.prompt}, "
          f"completion {a.tokens} tokens; steer: up to 2 x rows distilled; gc: gradient checkpointing)")
    keys = list(next(iter(sizing.values())))
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, row in sizing.items():
        print(f"| {name} | " + " | ".join(str(row[k]) for k in keys) + " |")
    result = {"table": table, "sizing": sizing, "prompt": a.prompt, "tokens": a.tokens}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
