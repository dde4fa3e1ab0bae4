"""``VGFTrainer``: distil transported particles into a LoRA policy, on top of ``transformers.Trainer``.

The Trainer supplies the loop, gradient accumulation, DDP/DeepSpeed, checkpoints, logging and the Hub; this file
adds one training step (``step_targets`` builds the targets, ``compute_loss`` distils them):

    rollouts from the frozen base (adapters off) -> true rewards -> refit the prefix value on a buffer of recent
    rollouts -> per-step steering transport (``spaces.PrefixSteering``) -> re-score with the true reward ->
    weighted cross-entropy within each prompt group into the policy adapter.

Rollouts always come from the frozen base, so a rollout engine with its own copy of the weights (vLLM) never needs
a weight sync, and there is no second copy of the model: the base carries the policy adapter (``default``, what is
saved and pushed) and nothing else. ``transport_steps: 0`` is best-of-N distillation (no value fit, no transport).

(Over 400 lines on purpose: these are overrides of one ``Trainer`` subclass, the step, logging, checkpoints,
ZeRO-3 gathers and the Hub, which only make sense together; the distillation arithmetic is in ``distill.py``.)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import gather_object
from peft.tuners.tuners_utils import cast_adapter_dtype
from transformers import PreTrainedModel, Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import enable_full_determinism, rotate_checkpoints, set_seed

from vgf_llm.adapters import active_adapter
from vgf_llm.checks import check_prompts, check_prompts_fit, damaged_file, prompts_of
from vgf_llm.config import VGFConfig
from vgf_llm.distill import MIN_TARGET_WEIGHT, completion_logps, distill_weights, group_std, pad_cat
from vgf_llm.evaluation import policy_rewards
from vgf_llm.rewards import (
    RewardFunctionError,
    RewardModelReward,
    resolve_reward_funcs,
    reward_func_name,
    reward_texts_and_parts,
)
from vgf_llm.rollout.hf import Rollouts, tokens_changed
from vgf_llm.rollout.vllm_backend import make_rollout_backend
from vgf_llm.spaces import PrefixSteering

logger = logging.getLogger(__name__)
POLICY = "default"  # PEFT's name for a single adapter, so the saved folder loads with PeftModel.from_pretrained
CHECKPOINT_COMPLETE = "vgf_checkpoint_complete"  # written last into a checkpoint folder


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest checkpoint of ``output_dir`` that was saved to the end and reads back (incomplete or damaged
    ones are skipped, with a warning naming why, and kept on disk)."""
    folders = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[-1])
                     if f.name.split("-")[-1].isdigit() else -1, reverse=True) if Path(output_dir).is_dir() else []
    for folder in folders:
        if not (folder / CHECKPOINT_COMPLETE).is_file():
            logger.warning("skipping %s: incomplete (cut off while saving)", folder)
            continue
        damage = damaged_file(folder)
        if damage is None:
            return str(folder)
        logger.warning("skipping %s: %s; resuming from the checkpoint before it (nothing is deleted)", folder, damage)
    raise ValueError(f"no complete checkpoint to resume from in {output_dir}")


def default_lora_config():
    """LoRA on every attention and MLP projection, rank 16: a common TRL/PEFT starting point."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def checkpointing_kwargs(kwargs: dict | None) -> dict:
    """``gradient_checkpointing_kwargs`` as TRL's GRPOTrainer sets them: non-reentrant unless asked, reentrant under
    ZeRO-3 (LoRA + ZeRO-3 needs it: huggingface/trl#2514)."""
    kwargs = dict(kwargs or {})
    if is_deepspeed_zero3_enabled():
        if kwargs.get("use_reentrant") is False:
            logger.warning("gradient checkpointing with use_reentrant=False under ZeRO-3: forced to True (LoRA + "
                           "ZeRO-3 needs reentrant checkpointing, as in TRL)")
        kwargs["use_reentrant"] = True
    kwargs.setdefault("use_reentrant", False)
    return kwargs


def check_prompt_dataset(dataset, name: str) -> None:
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(f"the {name} needs a 'prompt' column (standard text or conversational messages, as TRL's "
                         f"prompt-only datasets); it has {columns}")
    if len(dataset) == 0:
        raise ValueError(f"the {name} is empty")
    check_prompts(prompts_of(dataset), f"the {name}")


class VGFTrainer(Trainer):
    """Fine-tune a LoRA policy with Value Gradient Flow; the surface follows TRL's ``GRPOTrainer``.

    model: a hub id, a local path, an alias such as ``smollm2-135m-instruct``, or a ``PreTrainedModel`` (without
        adapters: the trainer adds the policy adapter from ``peft_config``, default ``default_lora_config()``).
    reward_funcs: one or a list of TRL reward functions (callables, registered names, ``pkg.module:function``) or
        sequence-classification reward models (a model object or a path).
    args: ``VGFConfig``. train_dataset / eval_dataset: prompt-only datasets with a ``prompt`` column (a string or
        chat messages); every other column is passed to the reward functions by name.
    rollout_backend: replaces the backend chosen by ``use_vllm``: any object with ``generate(prompts, n, seed) ->
        Rollouts``.
    """

    def __init__(self, model, reward_funcs, args: VGFConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None, reward_processing_classes=None,
                 rollout_backend=None):
        from vgf_llm.models import hub_id, load_model, load_tokenizer

        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = VGFConfig(output_dir=f"{Path(str(name)).name}-VGF")
        # seed before the policy adapter is created (Trainer.__init__ seeds only later), so one
        # seed gives one adapter, through the CLI as through the API
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        if is_deepspeed_zero3_enabled():  # zero.Init (at load) sizes the shards from DeepSpeed's process group
            import deepspeed

            _ = args.device  # the process group of the launcher (torchrun / accelerate)
            deepspeed.init_distributed()
        if isinstance(model, (str, os.PathLike)):
            base_name = os.fspath(model)
            model = load_model(base_name, **(args.model_init_kwargs or {}))
        elif isinstance(model, PreTrainedModel):
            base_name = model.config._name_or_path
        else:
            raise TypeError("model must be a hub id, a local path or a PreTrainedModel (pass a PeftModel's "
                            f"base model and its LoraConfig as peft_config), got {type(model).__name__}")
        if getattr(model, "_hf_peft_config_loaded", False):
            raise ValueError("the model already carries adapters: pass the plain base model and a peft_config")
        self.base_model_name = hub_id(base_name)  # what the card and adapter_config.json name, so the adapter loads
        if processing_class is None:
            processing_class = load_tokenizer(base_name)
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        check_prompt_dataset(train_dataset, "train_dataset")
        check_prompt_dataset(eval_dataset, "eval_dataset")

        self.reward_funcs = resolve_reward_funcs(reward_funcs, reward_processing_classes)
        self.reward_names = [reward_func_name(f) for f in self.reward_funcs]
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(args.reward_weights)} reward_weights for {len(self.reward_funcs)} reward functions")

        peft_config = peft_config or default_lora_config()
        peft_config.base_model_name_or_path = self.base_model_name
        model.add_adapter(peft_config, adapter_name=POLICY)
        # float32 adapter over a bf16/fp16 base (PEFT's autocast_adapter_dtype, as get_peft_model and TRL do):
        # AdamW on bf16 weights rounds small updates away
        cast_adapter_dtype(model, POLICY)
        model.enable_adapters()
        model.set_adapter(POLICY)  # trainable: the policy adapter only
        if args.gradient_checkpointing:
            args.gradient_checkpointing_kwargs = checkpointing_kwargs(args.gradient_checkpointing_kwargs)
            model.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks still get a gradient (TRL)

        super().__init__(model=model, args=args, data_collator=lambda rows: rows, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks)
        self._prepare_reward_models()
        self.backend = rollout_backend or self._rollout_backend()
        # the transport (None at budget 0: best-of-N distillation reads no value and moves nothing)
        self.space = PrefixSteering(model, processing_class, steer_layer=args.steer_layer,
                                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                    buffer_steps=args.value_buffer_steps) if args.transport_steps > 0 else None
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._phase_seconds: dict[str, float] = {}
        self._micro_batches = 0
        self._unrewarded_batches = 0  # consecutive micro-batches in which no reward applied to any rollout
        self._reward_span: tuple | None = None  # (min, max, count) of the run's rewards, see _check_rewarded
        self._last_completions: dict = {}
        self._extra_columns: dict[str, list] = {}
        self._micro_step = (-1, 0)  # (global step, micro-batch index): seeds rollouts reproducibly across resumes

    # -- construction -------------------------------------------------------------------------------------------
    def _prepare_reward_models(self) -> None:
        """Reward models on the accelerator's device (sharded by DeepSpeed under it), with the run's autocast, as
        TRL's GRPOTrainer prepares them."""
        from trl.models import prepare_deepspeed

        for func in self.reward_funcs:
            if isinstance(func, RewardModelReward):
                func.model = prepare_deepspeed(func.model, self.accelerator) if self.is_deepspeed_enabled else \
                    self.accelerator.prepare_model(func.model, evaluation_mode=True, device_placement=True)

    def _rollout_backend(self):
        a = self.args
        vllm = dict(vllm_mode=a.vllm_mode, gpu_memory_utilization=a.vllm_gpu_memory_utilization,
                    enable_sleep_mode=a.vllm_enable_sleep_mode, server_host=a.vllm_server_host,
                    server_port=a.vllm_server_port, server_timeout=a.vllm_server_timeout,
                    server_base_url=a.vllm_server_base_url, tensor_parallel_size=a.vllm_tensor_parallel_size,
                    max_model_length=a.vllm_max_model_length) if a.use_vllm else {}
        # one generate call per micro-batch: vLLM's engine is sized for that many prompts x num_generations
        batch = a.per_device_train_batch_size if a.use_vllm else a.prompts_per_generation
        return make_rollout_backend(self.model, self.processing_class, use_vllm=a.use_vllm,
                                    max_new_tokens=a.max_completion_length, temperature=a.temperature, top_p=a.top_p,
                                    top_k=a.top_k, batch_size=batch, num_generations=a.num_generations, **vllm)

    # -- one step -----------------------------------------------------------------------------------------------
    def _next_seed(self) -> int:
        step, micro = self._micro_step
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro_step = (self.state.global_step, micro)
        return ((self.args.seed * 1_000_003 + self.state.global_step) * 101 + micro) * 1009 + \
            self.accelerator.process_index

    def _rewards(self, rows: list[dict], texts: list[str], ro: Rollouts, idx: list[int] | None = None) -> torch.Tensor:
        """True rewards (NaN where every function returned None) of ``texts`` (the completions of ``ro``, or those at
        flat positions ``idx``), called as TRL's GRPOTrainer calls reward functions: the dataset columns,
        ``completion_ids``, ``trainer_state``, and ``log_extra`` / ``log_metric`` for the functions' own logs."""
        _, _, ids, mask = ro.flat()
        rows_of = range(len(ids)) if idx is None else idx
        completion_ids = [ids[i][mask[i].bool()].tolist() for i in rows_of]
        try:
            total, per_func = reward_texts_and_parts(
                self.reward_funcs, self.args.reward_weights, rows, texts, completion_ids=completion_ids,
                trainer_state=self.state, log_extra=self._log_extra,
                log_metric=lambda name, value: self._metrics[name].append(float(value)))
        except (RewardFunctionError, TypeError, ValueError) as err:
            raise type(err)(f"at step {self.state.global_step}: {err}") from err
        for name, col in zip(self.reward_names, per_func.T, strict=True):
            if torch.isfinite(col).any():
                self._metrics[f"rewards/{name}/mean"].append(float(col.nanmean()))
        if len(total) and not torch.isfinite(total).any():
            logger.warning("step %d: every reward function returned None for all %d completions: nothing to learn "
                           "from this batch (check the reward functions and the dataset columns they need)",
                           self.state.global_step, len(total))
        return total

    def _log_extra(self, column: str, values: list) -> None:
        """A reward function's extra column for the completions printed with ``log_completions`` (TRL's log_extra)."""
        self._extra_columns.setdefault(column, list(values))  # the rollouts' call, not the re-scoring

    @contextmanager
    def _timed(self, phase: str):
        """Adds the phase's wall-clock to ``timing/<phase>`` (seconds per micro-batch, summed within it)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._phase_seconds[phase] = self._phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    @contextmanager
    def gathered_model(self):
        """The model with every weight whole, for generation, transport and decoding.

        DeepSpeed ZeRO-3 shards the base weights, but generation, the prefix states and the steering regeneration
        call the decoder directly, so under ZeRO-3 this gathers every parameter for the duration, as TRL does for
        generation (``unwrap_model_for_generation``, gradient checkpointing off inside and back on with the run's
        kwargs). Elsewhere it does nothing."""
        if not is_deepspeed_zero3_enabled():
            yield self.model
            return
        import deepspeed

        if getattr(self, "deepspeed", None) is not None:  # the engine exists (training has started)
            from trl.models.utils import unwrap_model_for_generation

            with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                             gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) \
                    as model:
                yield model
        else:
            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                yield self.model

    def _prepare_inputs(self, rows: list[dict]) -> dict:
        if not isinstance(rows, list):  # evaluation paths of the parent class
            return super()._prepare_inputs(rows)
        with self.gathered_model():
            return self.step_targets(rows)

    def step_targets(self, rows: list[dict]) -> dict:
        """One step's distillation batch for prompt rows ``rows`` (what ``compute_loss`` takes): rollouts -> true
        rewards -> prefix-value fit -> transport -> re-score -> weighted targets. Public so benchmarks can run the
        step without an optimizer update.

        It runs under the run's autocast (``bf16``/``fp16``): the rollouts, prefix states, steering regeneration and
        reference pass call the decoder directly, outside the autocast accelerate puts around ``model.forward``."""
        with self.accelerator.autocast():
            return self._step_targets(rows)

    def _step_targets(self, rows: list[dict]) -> dict:
        args, tok, model = self.args, self.processing_class, self.model
        seed = self._next_seed()
        self._micro_batches += 1
        prompts = [r["prompt"] for r in rows]
        g, n = len(rows), args.num_generations
        model.eval()
        with self._timed("rollout"), active_adapter(model, None):
            ro = self.backend.generate(prompts, n, seed)
        flat_rows = [r for r in rows for _ in range(n)]
        with self._timed("reward"):
            rewards = self._rewards(flat_rows, [t for group in ro.texts for t in group], ro).view(g, n)
        self._check_rewarded(rewards)
        new_ids, new_mask, disp = ro.completion_ids, ro.completion_mask, torch.zeros(g, n)
        if self.space is not None:
            with self._timed("value_fit"):
                stats = self.space.fit(*self._gathered(ro, rewards), seed=args.seed + self.state.global_step)
            for key in ("corr", "cv_corr", "ridge"):
                if key in stats:
                    self._metrics[f"value/{key}"].append(stats[key])
            if self.space.value is not None:  # too few rewarded rollouts so far: this batch is not moved
                with self._timed("transport"):
                    m = self.space.move(ro, args.budget)
                new_ids, new_mask, disp = m.ids, m.mask, m.displacement
                self._metrics["transport/nonfinite"].append(float(m.trace.nonfinite.sum()))
        moved = Rollouts(ro.prompt_ids, ro.prompt_mask, new_ids, new_mask,
                         [[tok.decode(new_ids[i, j][new_mask[i, j].bool()], skip_special_tokens=True)
                           for j in range(n)] for i in range(g)])
        changed = tokens_changed(ro.completion_ids, ro.completion_mask, new_ids, new_mask)
        moved_rewards = rewards.clone()
        idx = changed.reshape(-1).nonzero().squeeze(1).tolist()
        if self._sharded_reward_model():  # each forward of it is a collective: every process scores every row
            idx = list(range(g * n))
        if idx:
            with self._timed("reward"):
                texts = [moved.texts[i // n][i % n] for i in idx]
                moved_rewards.view(-1)[idx] = self._rewards([flat_rows[i] for i in idx], texts, moved, idx)
        with self._timed("distill"):  # the reference's log-probabilities of the targets (for the KL)
            targets = self._targets(ro, moved, rewards, moved_rewards, changed)
        model.train()
        self._log_step(prompts, ro, moved, rewards, moved_rewards, changed, disp)
        return targets

    def _sharded_reward_model(self) -> bool:
        return is_deepspeed_zero3_enabled() and any(isinstance(f, RewardModelReward) for f in self.reward_funcs)

    def _check_rewarded(self, rewards: torch.Tensor) -> None:
        """Stop, instead of training on nothing, once ``max_unrewarded_batches`` micro-batches in a row had nothing
        to learn from: no reward at all (every function returned None for every rollout), or, as long as the run
        has never seen two different rewards, one reward for everything (a constant reward, or identical samples).
        Ties after a varied reward (all right, all wrong) are ordinary and pass. Counted over all processes, so
        every process stops at the same step."""
        inf, finite = float("inf"), rewards[torch.isfinite(rewards)].float()
        span = torch.tensor([[finite.min(), finite.max(), len(finite)] if len(finite) else [inf, -inf, 0]])
        if self.accelerator.num_processes > 1:
            span = self.accelerator.gather(span.to(self.accelerator.device)).cpu()
        low, high, count = float(span[:, 0].min()), float(span[:, 1].max()), int(span[:, 2].sum())
        if self._reward_span is None:  # (min, max, number) of the run's rewards; a resumed run's logs count
            logged = [e for e in self.state.log_history if "reward" in e]
            varied = len({e["reward"] for e in logged}) > 1 or any(e.get("reward_std", 0) > 0 for e in logged)
            self._reward_span = (-inf, inf, 2) if varied else (inf, -inf, 0)
        seen = self._reward_span
        self._reward_span = (min(seen[0], low), max(seen[1], high), seen[2] + count)
        unrewarded = count == 0
        same = not unrewarded and self._reward_span[2] > 1 and self._reward_span[0] == self._reward_span[1]
        if same:
            logger.warning("step %d: every completion so far got the same reward (%g): nothing to learn from yet "
                           "(a constant reward function, or completions that are all alike?)",
                           self.state.global_step, low)
        self._unrewarded_batches = self._unrewarded_batches + 1 if unrewarded or same else 0
        if self._unrewarded_batches > self.args.max_unrewarded_batches and same:
            raise ValueError(
                f"at step {self.state.global_step}: every completion got the same reward ({low:g}) in "
                f"{self._unrewarded_batches} micro-batches in a row and never another one, so there is nothing to "
                f"learn from: check that the reward functions ({', '.join(self.reward_names)}) tell completions "
                "apart and that sampling varies (temperature > 0), or raise max_unrewarded_batches")
        if self._unrewarded_batches > self.args.max_unrewarded_batches:
            raise ValueError(
                f"at step {self.state.global_step}: no reward function scored any completion in "
                f"{self._unrewarded_batches} micro-batches in a row (all returned None), so there is nothing to "
                f"learn from: check the reward functions ({', '.join(self.reward_names)}) and the dataset columns "
                "they need, or raise max_unrewarded_batches")

    def _gathered(self, ro: Rollouts, rewards: torch.Tensor) -> tuple[Rollouts, torch.Tensor]:
        """Every process's rollouts and rewards, so that every process fits the same prefix value."""
        if self.accelerator.num_processes == 1:
            return ro, rewards
        acc, pad = self.accelerator, self.processing_class.pad_token_id
        return Rollouts(acc.gather(acc.pad_across_processes(ro.prompt_ids, dim=1, pad_index=pad, pad_first=True)),
                        acc.gather(acc.pad_across_processes(ro.prompt_mask, dim=1, pad_index=0, pad_first=True)),
                        acc.gather(acc.pad_across_processes(ro.completion_ids, dim=2, pad_index=pad)),
                        acc.gather(acc.pad_across_processes(ro.completion_mask, dim=2, pad_index=0)),
                        []), acc.gather(rewards)

    def _targets(self, ro, moved, rewards, moved_rewards, changed) -> dict:
        """The distillation batch: the kept (prompt, response) sequences among the originals and the transported
        particles, weighed by softmax(true reward / distill_temperature) within each prompt group, and the
        reference's log-probabilities of every row (for the logged KL)."""
        args, pad = self.args, self.processing_class.pad_token_id
        g, n, _ = ro.shape
        # candidates [G, 2N, T]: the N originals, then the N transported particles (n + j was moved from j)
        ids = pad_cat([ro.completion_ids.reshape(g * n, -1), moved.completion_ids.reshape(g * n, -1)], pad)
        masks = pad_cat([ro.completion_mask.reshape(g * n, -1), moved.completion_mask.reshape(g * n, -1)], 0)
        ids = ids.view(2, g, n, -1).transpose(0, 1).reshape(g, 2 * n, -1)
        masks = masks.view(2, g, n, -1).transpose(0, 1).reshape(g, 2 * n, -1)
        # an unchanged transported particle is its original: it is counted once
        pool = torch.cat([rewards, torch.where(changed > 0, moved_rewards, torch.nan)], 1)
        skip = (group_std(pool) == 0) if args.skip_zero_std_groups else torch.zeros(g, dtype=torch.bool)
        weights = distill_weights(pool, args.distill_temperature)
        weights[skip] = 0
        weights[weights < MIN_TARGET_WEIGHT] = 0  # negligible targets cost a forward and backward each
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        self._metrics["frac_groups_skipped"].append(float(skip.float().mean()))
        rows = (weights != 0).nonzero()
        if rows.shape[0] == 0:  # nothing to distil: one zero-weight row, so every process still runs the forward
            rows = torch.zeros(1, 2, dtype=torch.long)  # and backward its DDP/DeepSpeed collectives expect
        completion_ids, completion_mask = ids[rows[:, 0], rows[:, 1]], masks[rows[:, 0], rows[:, 1]]
        device = self.accelerator.device
        batch = {"input_ids": torch.cat([ro.prompt_ids[rows[:, 0]], completion_ids], 1).to(device),
                 "attention_mask": torch.cat([ro.prompt_mask[rows[:, 0]], completion_mask], 1).to(device),
                 "completion_mask": completion_mask.to(device), "weights": weights[rows[:, 0], rows[:, 1]].to(device),
                 "completion_start": ro.prompt_ids.shape[1], "num_groups": g}
        with torch.no_grad(), active_adapter(self.model, None):
            batch["ref_logps"] = completion_logps(self.model, batch["input_ids"], batch["attention_mask"],
                                                  batch["completion_start"])
        return batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Weighted cross-entropy of the kept targets (weights sum to 1 per group), averaged over the groups."""
        with self._timed("distill"), active_adapter(self.accelerator.unwrap_model(model), POLICY):
            logps = completion_logps(model, inputs["input_ids"], inputs["attention_mask"],
                                     inputs["completion_start"])
        mask = inputs["completion_mask"].to(logps.dtype)
        nll = -(logps * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        weights = inputs["weights"]
        loss = (weights * nll).sum() / inputs["num_groups"]
        if (weights > 0).any():
            target = mask * (weights > 0)[:, None].to(mask.dtype)
            log_ratio = inputs["ref_logps"] - logps.detach()
            k3 = (torch.exp(log_ratio) - log_ratio - 1) * target  # TRL's per-token KL estimator
            self._metrics["kl"].append(float(k3.sum() / target.sum().clamp_min(1)))
            self._metrics["distill/nll"].append(float((nll.detach() * weights).sum() / weights.sum()))
        return (loss, None) if return_outputs else loss

    def _log_step(self, prompts, ro, moved, rewards, moved_rewards, changed, disp) -> None:
        m = self._metrics
        finite = torch.isfinite(rewards)
        stds = group_std(rewards)
        if finite.any():  # a batch where no reward applied (all None) has no reward to log
            m["reward"].append(float(rewards.nanmean()))
            m["reward_std"].append(float(stds.mean()))
            m["transport/reward_before"].append(float(rewards.nanmean()))
            m["transport/reward_after"].append(float(moved_rewards.nanmean()))
        m["frac_reward_zero_std"].append(float((stds == 0).float().mean()))
        m["transport/tokens_changed"].append(float(changed.float().mean()))
        m["transport/displacement"].append(float(disp.float().mean()))
        m["completions/mean_length"].append(float(ro.completion_mask.sum(-1).float().mean()))
        g, n = rewards.shape
        self._last_completions = dict(  # every rollout of the micro-batch, for TRL's completions table
            prompts=[prompts[i // n] for i in range(g * n)], completions=[t for group in moved.texts for t in group],
            rewards={"reward": rewards.reshape(-1).tolist(), "after transport": moved_rewards.reshape(-1).tolist()},
            extra={"original": [t for group in ro.texts for t in group], **self._extra_columns})
        self._extra_columns = {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the step metrics (averaged over the micro-batches and processes since the last log) to the logs."""
        prefix = "eval_" if next(iter(logs), "").startswith("eval_") else ""
        if not prefix:
            steps = max(1.0, self._micro_batches / self.args.gradient_accumulation_steps)
            for phase, seconds in self._phase_seconds.items():  # per optimizer step, averaged since the last log
                self._metrics[f"timing/{phase}"].append(seconds / steps)
            self._phase_seconds, self._micro_batches = {}, 0
            local = {key: sum(values) / len(values) for key, values in self._metrics.items() if values}
            # processes may hold different keys (e.g. no value/corr where rewards tied): gather objects, not tensors
            per_process = gather_object([local]) if self.accelerator.num_processes > 1 else [local]
            for key in sorted({k for d in per_process for k in d}):
                values = [d[key] for d in per_process if key in d]
                logs[key] = sum(values) / len(values)
            self._metrics.clear()
            if self.args.log_completions and self._last_completions and self.is_world_process_zero():
                from trl.trainer.utils import print_prompt_completions_sample

                c = self._last_completions
                extra = {k: v for k, v in c["extra"].items() if len(v) == len(c["completions"])}
                print_prompt_completions_sample(c["prompts"], c["completions"], c["rewards"], None,
                                                self.state.global_step, self.args.num_completions_to_print, extra)
        super().log(logs, start_time)

    # -- evaluation -----------------------------------------------------------------------------------------------
    def greedy_rewards(self, rows: list[dict], adapter: str | None = POLICY) -> tuple[list[float], list[str]]:
        """True reward and text of one greedy completion per row (``adapter=None``: the base), the rows split
        across processes and gathered back in order. The shards are of equal size (short ones repeat the last row: a
        ZeRO-3 reward model's forward is a collective) and travel as (row, reward, text) objects, since the shards
        of a set that does not divide differ in size."""
        indexed = list(enumerate(rows))
        with self.accelerator.split_between_processes(indexed, apply_padding=True) as local, \
                self.gathered_model():
            rewards, texts = policy_rewards(self.model, self.processing_class, [r for _, r in local], self.reward_funcs,
                                            self.args.reward_weights, adapter=adapter,
                                            max_new_tokens=self.args.max_completion_length,
                                            batch_size=self.args.per_device_eval_batch_size,
                                            progress=self.is_world_process_zero())
        scored = dict(gather_object([(i, (r, t)) for (i, _), r, t in zip(local, rewards, texts, strict=True)]))
        return [scored[i][0] for i, _ in indexed], [scored[i][1] for i, _ in indexed]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean true reward of the policy's greedy completions on the evaluation prompts."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset")
        rewards, _ = self.greedy_rewards([dict(r) for r in dataset])
        metrics = {f"{metric_key_prefix}_reward": float(torch.tensor(rewards).nanmean())}
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- checkpoints and the Hub ----------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The policy adapter only (PEFT format, loads with ``PeftModel.from_pretrained``), tokenizer, args."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        with active_adapter(model, POLICY):
            model.save_pretrained(output_dir, state_dict=state_dict)
        config = Path(output_dir) / "adapter_config.json"
        if self.args.should_save and config.is_file():  # transformers writes the local folder: name the Hub id
            data = json.loads(config.read_text())
            data["base_model_name_or_path"] = self.base_model_name
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if self.args.should_save:
            self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint plus the prefix value's rollout buffer, then a marker file written last: a
        checkpoint without it was cut off while saving and is never resumed from. Old checkpoints are rotated out
        only after the new one is complete, so a kill mid-save keeps the last good one."""
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            partial = folder / "vgf_state.pt.partial"
            torch.save({"value_buffer": list(self.space.buffer) if self.space is not None else []}, partial)
            os.replace(partial, folder / "vgf_state.pt")
            (folder / CHECKPOINT_COMPLETE).write_text(f"{self.state.global_step}\n")
            if limit:
                rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_vgf_state(self, checkpoint: str) -> None:
        folder = Path(checkpoint)
        if not (folder / CHECKPOINT_COMPLETE).is_file():
            raise ValueError(f"{folder} is incomplete (no {CHECKPOINT_COMPLETE}: it was cut off while saving); resume "
                             "from an earlier checkpoint, or with resume_from_checkpoint=true for the last complete "
                             "one")
        damage = damaged_file(folder)
        if damage:
            raise ValueError(f"cannot resume from {folder}: {damage}; resume from an earlier checkpoint, or with "
                             "resume_from_checkpoint=true for the last one that reads back")
        if self.space is not None:  # the next step refits the prefix value on the saved buffer and its own batch
            self.space.restore(torch.load(folder / "vgf_state.pt", weights_only=False)["value_buffer"])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The policy adapter back into ``default`` (the parent only knows PeftModel-wrapped adapters)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        file = Path(resume_from_checkpoint) / "adapter_model.safetensors"
        if not file.exists():
            raise FileNotFoundError(f"no adapter_model.safetensors in {resume_from_checkpoint}")
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(file)).items()}
        result = set_peft_model_state_dict(model, state, adapter_name=POLICY)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"the checkpoint's adapter does not fit this model: {result.unexpected_keys[:3]}")

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        for name, data in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            if data is not None:  # a prompt past the context would crawl through generation: refuse it now
                check_prompts_fit(prompts_of(data), f"the {name}", self.processing_class, self.model,
                                  self.args.max_completion_length)
        if resume_from_checkpoint:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            self._load_vgf_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def init_hf_repo(self, token: str | None = None) -> None:
        """Nothing at start-up: the repository is created when the adapter is pushed (works offline until then)."""

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """On every save with ``hub_strategy='every_save'``: the adapter and the card, never the checkpoint."""
        if self.args.hub_strategy == "every_save":
            self.push_to_hub(commit_message=f"Training in progress, step {self.state.global_step}")

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs):
        """Upload the policy adapter and a model card, and nothing else."""
        from vgf_llm.hub import upload_adapter

        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        dataset_name = getattr(getattr(self.train_dataset, "info", None), "dataset_name", None)
        return upload_adapter(self.args.output_dir, repo_id=self.args.hub_model_id or Path(self.args.output_dir).name,
                              base_model=self.base_model_name, reward_names=self.reward_names, config=self.args,
                              dataset_name=dataset_name, commit_message=commit_message,
                              token=token or self.args.hub_token, revision=revision,
                              private=self.args.hub_private_repo)

