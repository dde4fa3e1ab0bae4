"""``VGFConfig``: ``transformers.TrainingArguments`` plus the knobs of a VGF run, with TRL's names where TRL has one.

Batch semantics (the usual confusion, and different from TRL's GRPO): ``per_device_train_batch_size`` counts
**prompts**, not completions. One optimizer step consumes

    per_device_train_batch_size x gradient_accumulation_steps x num_processes   prompts,

and each prompt gets ``num_generations`` rollouts (the particles), so a step generates ``num_generations`` times
that many completions. Each micro-batch runs the whole pipeline on its own prompts: rollouts -> rewards -> value-model
update -> transport -> decode -> re-score with the true reward -> weighted cross-entropy into the policy adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from vgf_llm.sampler import TransportConfig

PARTICLE_SOURCES = ("reference", "policy")
TRANSPORT_VERIFIERS = ("reward", "scorer")
TRANSPORT_TARGETS = ("reward", "tilted")
SCORERS = ("value", "reward_model")
VALUE_FITS = ("lora", "ridge")
DISTILL_WEIGHTINGS = ("softmax", "best", "advantage")
DISTILL_POOLS = ("union", "moved")
DISTILL_TARGETS = ("tokens", "distribution")


@dataclass
class VGFConfig(TransportConfig, TrainingArguments):
    """Everything of ``TrainingArguments`` (output_dir, learning_rate, max_steps, save_steps, push_to_hub,
    hub_model_id, report_to, deepspeed, ...), the rollout, budget and particle-space fields of
    ``vgf_llm.sampler.TransportConfig`` (shared with ``VGFSampler``, same defaults), and the fields below. See the
    module docstring for what a batch is."""

    # -- model ----------------------------------------------------------------------------------------------
    model_init_kwargs: dict | None = field(default=None, metadata={"help": "kwargs for from_pretrained (hub id)."})

    # -- generation: num_generations, max_completion_length, temperature, top_p, top_k and
    #    generation_batch_size come from TransportConfig (TRL's names); vLLM ---------------------------------
    use_vllm: bool = field(default=False, metadata={"help": "Generate rollouts with vLLM instead of HF generate."})
    vllm_mode: str = field(default="colocate", metadata={"help": "'colocate' (in-process engine) or 'server'."})
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

    # -- VGF transport: the budget (transport_steps, transport_step_size, transport_alpha, transport_radius,
    #    repulsion) and the particle space (decoder, decoder_topk, max_edits, verify_top, verify_candidates) come
    #    from TransportConfig, with the sampler's defaults ------------------------------------------------------
    transport_verifier: str = field(default="reward", metadata={
        "help": "decoder='verified': what checks each proposed swap in training. 'reward' (the true reward, which "
                "re-scores moved particles anyway: a kept swap raises it, and every particle is edited) or 'scorer' "
                "(the value model, as at test time, on the verify_top best originals)."})
    transport_target: str = field(default="reward", metadata={
        "help": "What the transport's edits must raise in training. 'reward' (the paper's target exp(R / alpha): "
                "the true reward) or 'tilted' (R + distill_temperature x log mu(y | x), the log-density of the "
                "KL-regularised target mu exp(R / distill_temperature) that the distillation weights approximate: an "
                "edit must pay for the likelihood it costs under the base). 'tilted' also weighs each transported "
                "particle by that value, i.e. importance-corrects it for having been moved."})
    particle_source: str = field(default="reference", metadata={
        "help": "'reference' (base model, adapter off: training amortises test-time VGF) or 'policy' (iterates)."})

    # -- scorer / value model -------------------------------------------------------------------------------
    scorer: str = field(default="value", metadata={"help": "'value' (fitted online) or 'reward_model'."})
    reward_model_path: str | None = field(default=None, metadata={
        "help": "Sequence-classification reward model sharing the policy's vocabulary (scorer='reward_model')."})
    value_model_path: str | None = field(default=None, metadata={
        "help": "Warm start from a value model saved by `vgf-llm fit-value`."})
    value_num_layers: int | None = field(default=None, metadata={"help": "Cut the value trunk after N blocks."})
    value_lora_r: int = 8
    value_learning_rate: float = 1e-3
    value_epochs: int = field(default=2, metadata={"help": "Passes over the value buffer per step."})
    value_batch_size: int = 16
    value_buffer_steps: int = field(default=4, metadata={"help": "Recent micro-steps of rollouts the value fits."})
    value_fit: str = field(default="lora", metadata={
        "help": "How the online value model is refitted each step: 'lora' (SGD on its adapter and head, "
                "value_epochs passes over the buffer) or 'ridge' (its trunk stays as it is: a closed-form ridge "
                "head on the pooled states at the value_num_layers cut, the strength cross-validated by prompt on "
                "the buffer; the test-time winner, cheap enough for a long value_buffer_steps)."})

    # -- distillation ---------------------------------------------------------------------------------------
    distill_pool: str = field(default="union", metadata={
        "help": "Targets: 'union' (original and transported responses) or 'moved' (transported only)."})
    distill_weighting: str = field(default="softmax", metadata={
        "help": "Weights within a group from the true rewards: 'softmax' (temperature distill_temperature), "
                "'best' (argmax only) or 'advantage' (reward above the group mean)."})
    distill_temperature: float = 0.1
    distill_target: str = field(default="tokens", metadata={
        "help": "What each kept response teaches: 'tokens' (cross-entropy of its sampled tokens) or 'distribution' "
                "(decoder='steer_prefix' / 'tilt_*': KL from the full next-token distribution it was decoded "
                "from, at "
                "every one of its tokens: the steered model's for a transported particle, the base's for an "
                "original). The policy then learns the transport's tilt at every token instead of the one token "
                "drawn, and is not sharpened on the samples; the budget sets how far that target is from the base. "
                "Memory: the targets are kept as rows x tokens x vocabulary bfloat16 log-probabilities."})
    distill_baseline: bool = field(default=False, metadata={
        "help": "Subtract from each group's weighted cross-entropy the mean cross-entropy of its original samples "
                "(weights then sum to 0 per group, the low-reward samples' negative). A control variate, as GRPO's "
                "group mean: its expected gradient is zero while the policy is the sampler, so the update keeps "
                "what separates the targets from the samples and drops what they share."})
    edit_pair_weight: float = field(default=0.0, metadata={
        "help": "Weight of the minimal-pair loss (0: off). Each transported particle whose edits raised the true "
                "reward and its original differ in a few tokens only: a DPO-style logistic loss on the pair "
                "(reference = the base) teaches what the edit changed and nothing of what the two share."})
    edit_pair_beta: float = field(default=0.5, metadata={
        "help": "DPO's beta for the minimal-pair loss: the margin in log-ratio nats saturates near a few / beta."})
    max_unrewarded_batches: int = field(default=2, metadata={
        "help": "Consecutive micro-batches in which every reward function returns None for every rollout that are "
                "skipped with a warning; one more stops training with an error (0: stop at the first)."})
    skip_zero_std_groups: bool = field(default=True, metadata={
        "help": "Skip groups whose rewards are all equal (no preference to distil, as GRPO's zero advantage)."})

    # -- TrainingArguments defaults that suit VGF -----------------------------------------------------------
    learning_rate: float = 2e-4
    logging_steps: float = 1
    per_device_train_batch_size: int = 4
    remove_unused_columns: bool = False  # extra dataset columns go to the reward functions
    save_steps: float = 50

    def __post_init__(self):
        super().__post_init__()
        if self.max_unrewarded_batches < 0:
            raise ValueError(f"max_unrewarded_batches must be >= 0, got {self.max_unrewarded_batches}")
        choices = {"particle_source": PARTICLE_SOURCES, "transport_verifier": TRANSPORT_VERIFIERS,
                   "transport_target": TRANSPORT_TARGETS,
                   "scorer": SCORERS, "value_fit": VALUE_FITS, "distill_weighting": DISTILL_WEIGHTINGS,
                   "distill_pool": DISTILL_POOLS, "distill_target": DISTILL_TARGETS,
                   "vllm_mode": ("colocate", "server")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: transport and the distillation weights compare particles")
        if self.scorer == "reward_model" and not self.reward_model_path:
            raise ValueError("scorer='reward_model' needs reward_model_path")
        if self.distill_temperature <= 0:
            raise ValueError("distill_temperature must be > 0")
        if self.transport_target == "tilted" and self.transport_verifier != "reward":
            raise ValueError("transport_target='tilted' checks edits with the true reward plus the base's "
                             "log-likelihood: it needs transport_verifier='reward'")
        decodes = ("steer_prefix", "tilt_prefix", "tilt_reward")  # the spaces that keep their distributions
        if self.distill_target == "distribution" and (self.decoder not in decodes or self.transport_steps < 1):
            raise ValueError("distill_target='distribution' distils the distributions the steered model decoded the "
                             f"transported particles from: it needs decoder in {decodes} and transport_steps >= 1, "
                             f"got decoder={self.decoder!r}, transport_steps={self.transport_steps}")
        if self.edit_pair_weight < 0 or self.edit_pair_beta <= 0:
            raise ValueError(f"edit_pair_weight must be >= 0 and edit_pair_beta > 0, got {self.edit_pair_weight}, "
                             f"{self.edit_pair_beta}")

    @property
    def prompts_per_step(self) -> int:
        """Prompts one optimizer step consumes (all processes)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
