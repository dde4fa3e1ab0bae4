"""What the commands share: where prompts come from, their true reward, the model, strict JSON output, and
(``generate``, ``serve``) where the N reference samples come from (``VLLMArguments``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, make_dataclass

from vgf_llm.cli import CLIError
from vgf_llm.prompt_files import read_prompts_jsonl


@dataclass
class PromptArguments:
    """The model, the prompts and their true reward (the same names as the training recipes)."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Model alias (see `vgf-llm models list`), local folder or Hub id in the local cache."})
    task: str | None = field(default=None, metadata={
        "help": "Prompts built offline: 'sentiment' or a reasoning-gym task name (chain_sum, basic_arithmetic, ...)."})
    prompts: str | None = field(default=None, metadata={
        "help": "FILE.jsonl instead of task: one JSON object per line with a 'prompt' (a string or chat messages); "
                "other fields are passed to reward functions as dataset columns."})
    num_prompts: int | None = field(default=None, metadata={
        "help": "Prompts to use (default: all rows of prompts; 32 test / 64 train prompts of a task)."})
    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "True reward(s): registered names (vader, reasoning_gym, gsm8k, boxed) or pkg.module:function "
                "(default for a task: its own reward)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward function."})
    seed: int = field(default=0, metadata={"help": "Seeds the task's prompts, sampling and fitting."})
    device: str = field(default="cpu", metadata={"help": "Torch device of the models."})

    def __post_init__(self):
        if (self.task is None) == (self.prompts is None):
            raise CLIError("give exactly one of --task or --prompts")
        if not self.model_name_or_path:
            raise CLIError("set --model_name_or_path (a model alias, local folder or cached Hub id)")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise CLIError(f"--num_prompts must be >= 1, got {self.num_prompts}")

    def rows(self, split: str, default_size: int) -> list[dict]:
        """Prompt rows of the task's ``split`` (``default_size`` of them unless ``num_prompts``) or of the file."""
        if self.task:
            from vgf_llm.tasks import task_dataset

            return task_dataset(self.task, size=self.num_prompts or default_size, seed=self.seed,
                                split=split).to_list()
        rows = read_prompts_jsonl(self.prompts)
        return rows[: self.num_prompts] if self.num_prompts else rows

    def reward_names(self) -> list[str] | None:
        """reward_funcs, else the true reward of the task, else None (no true reward)."""
        if self.reward_funcs:
            return self.reward_funcs
        if self.task:
            from vgf_llm.tasks import task_reward_names

            return task_reward_names(self.task)
        return None

    def reward_functions(self) -> list | None:
        from vgf_llm.rewards import resolve_reward_funcs

        names = self.reward_names()
        if names is None:
            if self.reward_weights is not None:
                raise CLIError("--reward_weights needs --reward_funcs or --task")
            return None
        if self.reward_weights is not None and len(self.reward_weights) != len(names):
            raise CLIError(f"--reward_weights has {len(self.reward_weights)} values for {len(names)} reward "
                           "functions")
        return resolve_reward_funcs(names)

    def check_fit(self, rows: list[dict], model, tokenizer, max_completion_length: int, split: str) -> None:
        """Refuse a prompt longer than the model's context before any sampling (and warn when prompt plus
        completion may go past it), naming the prompts file or task and the row."""
        from vgf_llm.checks import check_prompts_fit

        where = self.prompts or f"the {split} prompts of task {self.task}"
        check_prompts_fit([r["prompt"] for r in rows], where, tokenizer, model, max_completion_length)

    def load_model(self):
        """(model in eval mode, tokenizer)."""
        from vgf_llm.models import load_model, load_tokenizer

        return load_model(self.model_name_or_path, device=self.device).eval(), load_tokenizer(self.model_name_or_path)


# VGFConfig's own vLLM fields (names, defaults, help), so the commands and training cannot drift apart; the sleep mode
# is left out: nothing else shares the device with the engine at test time.
VLLM_FIELDS = ("use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
               "vllm_server_timeout", "vllm_gpu_memory_utilization", "vllm_max_model_length",
               "vllm_tensor_parallel_size")


def _vllm_fields() -> list[tuple]:
    from vgf_llm.config import VGFConfig

    own = {f.name: f for f in fields(VGFConfig)}
    return [(name, own[name].type, field(default=own[name].default, metadata=own[name].metadata))
            for name in VLLM_FIELDS]


@dataclass
class VLLMArguments(make_dataclass("_VLLMFields", _vllm_fields())):
    """The N reference samples from vLLM (``--use_vllm``: a colocated engine, or ``--vllm_mode server`` and a
    ``vllm serve`` URL) instead of HF generate. Only the samples: the frozen base needs no weight sync, and the
    transport, decoding and selection stay in-process on the model (docs/vllm.md)."""

    def __post_init__(self):
        if self.vllm_mode not in ("colocate", "server"):
            raise CLIError(f"--vllm_mode must be colocate or server, got {self.vllm_mode!r}")

    def rollout_backend(self, model, tokenizer, config, *, batch_size: int, max_new_tokens: int | None = None,
                        num_generations: int | None = None, max_prompt_length: int | None = None):
        """A ``VLLMBackend`` with ``config``'s sampling knobs (a ``SamplerConfig``), or None without ``use_vllm``
        (the sampler's own HF backend). The sizes bound a colocated engine: ``batch_size`` prompts x
        ``num_generations`` sequences of ``max_prompt_length`` + ``max_new_tokens`` tokens (default: config's)."""
        if not self.use_vllm:
            return None
        from vgf_llm.rollout.vllm_backend import make_rollout_backend
        from vgf_llm.rollout.vllm_client import VLLMServerError
        from vgf_llm.rollout.vllm_engine import VLLMUnavailableError

        options = {name: getattr(self, name) for name in VLLM_FIELDS[1:]}
        try:
            return make_rollout_backend(
                model, tokenizer, use_vllm=True, max_new_tokens=max_new_tokens or config.max_completion_length,
                temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, batch_size=batch_size,
                num_generations=num_generations or config.num_generations, max_prompt_length=max_prompt_length,
                return_logprobs=True, **options)  # the sampled tokens' own: the likelihood brake reads them
        except (VLLMUnavailableError, VLLMServerError) as err:
            raise CLIError(str(err)) from err


def with_sampling(backend, config):
    """``backend`` (one engine, shared) sampling with ``config``'s knobs: a request may set its own."""
    backend = copy.copy(backend)
    backend.max_new_tokens, backend.temperature = config.max_completion_length, config.temperature
    backend.top_p, backend.top_k = config.top_p, config.top_k
    return backend


def parse(dataclasses: tuple, argv: list[str], prog: str, description: str):
    """Parse ``argv`` (and ``--config x.yaml``) into ``dataclasses`` with TRL's parser; bad values are CLIErrors.

    The parser rewrites ``X | None`` field types of the classes in place (``dataclasses.fields(cls)[i].type``, and
    a subclass shares its base's field objects: ``VGFConfig``'s rollout fields are ``SamplerConfig``'s); they are
    put back afterwards, so later type checks of those classes (the server's request validation) see the declared
    types."""
    from trl import TrlParser

    declared = [(f, f.type) for cls in dataclasses for f in fields(cls)]
    try:
        parser = TrlParser(dataclasses, prog=prog, description=description + " --config x.yaml sets any of the "
                           "options below from a YAML file; options on the command line override it.")
        return parser.parse_args_and_config(argv)
    finally:
        for f, declared_type in declared:
            f.type = declared_type
