"""The Hub: a model card for a VGF-trained adapter, and an upload of the adapter and card only.

Not TRL's ``generate_model_card`` on purpose: its template has no place for what a VGF adapter needs said (the
reward functions and the transport budget) and its quick start loads the repository as
a full model, while this card shows ``PeftModel.from_pretrained`` on the base it names; the Hub metadata (tags,
``base_model``, datasets, ``library_name: peft``) is the same ``ModelCardData`` TRL fills.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

CITATION = """@inproceedings{xu2026vgf,
  title     = {Reinforcement Learning via Value Gradient Flow},
  author    = {Xu, Haoran and Hu, Kaiwen and Sojoudi, Somayeh and Zhang, Amy},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  note      = {arXiv:2604.14265}
}"""


def model_card(*, base_model: str, reward_names: list[str], config, dataset_name: str | None = None,
               repo_id: str | None = None) -> str:
    """README.md text with the Hub's YAML metadata (tags, base model, datasets) and how the adapter was trained."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="peft", base_model=base_model, tags=["vgf-llm", "vgf", "lora", "peft"],
                         datasets=[dataset_name] if dataset_name else None, pipeline_tag="text-generation")
    budget = (f"per-step steering at layer {config.steer_layer or 'half depth'}, {config.transport_steps} steps x "
              f"step size {config.transport_step_size} per token (adam), prefix value refitted on "
              f"{config.value_buffer_steps} steps of rollouts" if config.transport_steps > 0
              else "0 (best-of-N distillation)")
    body = f"""
# {repo_id or "VGF adapter"}

A LoRA adapter for [{base_model}](https://huggingface.co/{base_model}) trained with
[vgf-llm](https://github.com/vgf-llm/vgf-llm) (Value Gradient Flow): rollouts of the
frozen base model are moved along a value gradient under a transport budget, decoded, re-scored with the true
reward and distilled into this adapter.

- Reward functions: {", ".join(reward_names)}
- Transport budget: {budget}
- Particles per prompt: {config.num_generations}; max completion length {config.max_completion_length}
- Training: {config.max_steps if config.max_steps > 0 else config.num_train_epochs} \
{"steps" if config.max_steps > 0 else "epochs"}, learning rate {config.learning_rate}
{f"- Dataset: {dataset_name}" if dataset_name else ""}

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model}"), "{repo_id or "<this repo>"}")
```

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


def upload_adapter(output_dir: str, *, repo_id: str, base_model: str, reward_names: list[str], config,
                   dataset_name: str | None = None, commit_message: str | None = None, token: str | None = None,
                   revision: str | None = None, private: bool | None = None):
    """Write the card next to the adapter, then upload a folder holding the adapter files and the card only."""
    from huggingface_hub import HfApi

    output = Path(output_dir)
    missing = [f for f in ADAPTER_FILES if not (output / f).exists()]
    if missing:
        raise FileNotFoundError(f"{output} has no {missing}: save the adapter before pushing it")
    card = model_card(base_model=base_model, reward_names=reward_names, config=config, dataset_name=dataset_name,
                      repo_id=repo_id)
    (output / "README.md").write_text(card)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        for name in (*ADAPTER_FILES, "README.md"):
            shutil.copy2(output / name, Path(staging) / name)
        return api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message,
                                 revision=revision)
