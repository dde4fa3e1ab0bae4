"""``VGFConfig``: ``transformers.TrainingArguments`` plus the knobs of a VGF run, with TRL's names where TRL has one.

Batch semantics (the usual confusion, and different from TRL's GRPO): ``per_device_train_batch_size`` counts
**prompts**, not completions. One optimizer step consumes

    per_device_train_batch_size x gradient_accumulation_steps x num_processes   prompts,

and each prompt gets ``num_generations`` rollouts from the frozen base (the particles), so a step generates
``num_generations`` times that many completions. Each micro-batch runs the whole pipeline on its own prompts:
rollouts -> true rewards -> refit the prefix value -> per-step steering transport -> re-score with the true reward
-> weighted cross-entropy into the policy adapter.

The transport group below has the *training* defaults, chosen by the training benchmarks (docs/benchmarks.md, "The
reward-KL frontier", run 3): per-step steering with a ridge prefix value, 1 step of 0.2 per token at half the
model's depth, refitted on 8 steps of rollouts. It ties best-of-N distillation at equal KL (gold 0.720 vs 0.721 at
KL 0.5) and keeps climbing past best-of-N's KL ceiling without GRPO's drift (0.764 at KL 1.45). ``transport_steps:
0`` is best-of-N distillation: the KL-optimal target for a 0/1 reward and a third of the step cost — use it for
exact-answer tasks. The test-time defaults (``vgf_llm.sampler.SamplerConfig``) are a separate set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from vgf_llm.rollout.config import RolloutConfig
from vgf_llm.spaces.base import Budget


@dataclass
class VGFConfig(RolloutConfig, TrainingArguments):
    """Everything of ``TrainingArguments`` (output_dir, learning_rate, max_steps, save_steps, push_to_hub,
    hub_model_id, report_to, deepspeed, ...), the rollout knobs of ``RolloutConfig`` (TRL's names), and the fields
    below. See the module docstring for what a batch is and where the defaults come from."""

    # -- model ----------------------------------------------------------------------------------------------
    model_init_kwargs: dict | None = field(default=None, metadata={"help": "kwargs for from_pretrained (hub id)."})

    # -- vLLM (rollouts come from the frozen base: the engine never needs a weight sync) -----------------------
    use_vllm: bool = field(default=False, metadata={"help": "Generate rollouts with vLLM instead of HF generate."})
    vllm_mode: str = field(default="colocate", metadata={
        "help": "'colocate' (in-process engine) or 'server' (vLLM's own OpenAI-compatible server: `vllm serve`)."})
    vllm_gpu_memory_utilization: float = 0.3
    vllm_enable_sleep_mode: bool = False
    vllm_server_host: str = "127.0.0.1"
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_server_base_url: str | None = field(default=None, metadata={
        "help": "Server mode: the server's URL (overrides vllm_server_host and vllm_server_port)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Colocate mode: GPUs per vLLM engine."})
    vllm_max_model_length: int | None = field(default=None, metadata={
        "help": "Colocate mode: vLLM's context length (default: the model's)."})

    # -- rewards --------------------------------------------------------------------------------------------
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward function."})
    log_completions: bool = field(default=False, metadata={"help": "Print a table of completions when logging."})
    num_completions_to_print: int | None = 4
    max_unrewarded_batches: int = field(default=2, metadata={
        "help": "Consecutive micro-batches with nothing to learn (every reward None, or, while the run has never seen "
                "two different rewards, the same reward for every completion) that are skipped with a warning; one "
                "more stops training with an error (0: stop at the first)."})

    # -- the transport (per-step steering along a prefix value; training's own defaults) ---------------------
    transport_steps: int = field(default=1, metadata={
        "help": "Adam steps per generated token (0 = best-of-N distillation: no transport, no value fit)."})
    transport_step_size: float = field(default=0.2, metadata={
        "help": "Step per generated token, in standard deviations of each hidden unit (frontier run 3's 0.2)."})
    steer_layer: int | None = field(default=None, metadata={
        "help": "The decoder layer whose output is moved and read by the prefix value (default: half the model's "
                "depth)."})
    value_buffer_steps: int = field(default=8, metadata={
        "help": "Recent micro-batches of rollouts (with their true rewards) the prefix value is refitted on."})

    # -- distillation ---------------------------------------------------------------------------------------
    distill_temperature: float = field(default=0.1, metadata={
        "help": "Softmax temperature of the weights within a prompt group (originals and transported particles, "
                "weighed by their true rewards)."})
    skip_zero_std_groups: bool = field(default=True, metadata={
        "help": "Skip groups whose rewards are all equal (no preference to distil, as GRPO's zero advantage)."})

    # -- TrainingArguments defaults that suit VGF -----------------------------------------------------------
    learning_rate: float = 2e-4
    logging_steps: float = 1
    per_device_train_batch_size: int = 4
    remove_unused_columns: bool = False  # extra dataset columns go to the reward functions
    save_steps: float = 50

    def __post_init__(self):
        _ = self.budget  # names the wrong one of the budget's values
        super().__post_init__()
        if self.max_unrewarded_batches < 0:
            raise ValueError(f"max_unrewarded_batches must be >= 0, got {self.max_unrewarded_batches}")
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(f"vllm_mode={self.vllm_mode!r}; choose one of ('colocate', 'server')")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: transport and the distillation weights compare particles")
        if self.distill_temperature <= 0:
            raise ValueError("distill_temperature must be > 0")
        if self.value_buffer_steps < 1:
            raise ValueError(f"value_buffer_steps must be >= 1, got {self.value_buffer_steps}")

    @property
    def budget(self) -> Budget:
        return Budget(self.transport_steps, self.transport_step_size)

    @property
    def prompts_per_step(self) -> int:
        """Prompts one optimizer step consumes (all processes)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
