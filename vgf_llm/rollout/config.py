"""The rollout knobs, with TRL's names: how many samples per prompt, how long, how they are drawn, how many per
``generate`` call. Shared by the test-time ``SamplerConfig`` and the training ``VGFConfig`` (the same knobs mean the
same thing in both products; the transport's knobs are each product's own)."""

from __future__ import annotations

from dataclasses import dataclass, field


def check_sampling(num_generations: int, temperature: float) -> None:
    """Best-of-N (and every transport) compares N samples of a prompt: N identical greedy samples leave nothing to
    choose from, so temperature 0 with more than one generation is refused, not silently run."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and num_generations > 1:
        raise ValueError(f"temperature=0 draws the same (greedy) sample {num_generations} times: best-of-N and the "
                         "transport then have nothing to choose from. Sample with temperature > 0 (e.g. 1.0), or "
                         "set num_generations=1")


@dataclass
class RolloutConfig:
    """How particles are drawn from the reference (TRL's names)."""

    num_generations: int = field(default=8, metadata={"help": "Particles (reference samples) per prompt."})
    max_completion_length: int = field(default=64, metadata={"help": "Max new tokens per sample."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the rollouts."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of the rollouts (0: off)."})
    generation_batch_size: int | None = field(default=None, metadata={
        "help": "Completions per generate() call (TRL's unit): generation_batch_size / num_generations prompts, "
                "each with its num_generations samples; a multiple of num_generations (None: 4 prompts' worth)."})

    def __post_init__(self):
        for name in ("num_generations", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_sampling(self.num_generations, self.temperature)
        if self.generation_batch_size is not None and (self.generation_batch_size < self.num_generations
                                                       or self.generation_batch_size % self.num_generations):
            raise ValueError(f"generation_batch_size={self.generation_batch_size} counts completions (as in TRL): it "
                             f"must be a multiple of num_generations={self.num_generations}")
        parent = getattr(super(), "__post_init__", None)  # TrainingArguments, when VGFConfig mixes this in
        if parent is not None:
            parent()

    @property
    def prompts_per_generation(self) -> int:
        """Prompts per generate() call: ``generation_batch_size`` completions of ``num_generations`` each."""
        return 4 if self.generation_batch_size is None else self.generation_batch_size // self.num_generations
