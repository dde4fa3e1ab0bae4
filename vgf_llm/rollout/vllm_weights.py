"""The policy's weights as a vLLM engine wants them: LoRA merged into fresh tensors, gathered under DeepSpeed
ZeRO-3, the tied ``lm_head.weight`` always included (vLLM keeps a separate output head; without it the head silently
stays on the old weights).
"""

from __future__ import annotations

import contextlib

import torch


def _is_zero3(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _gathered(params, zero3: bool):
    """Full parameters inside the block (DeepSpeed ZeRO-3 partitions them); a no-op otherwise."""
    params = list(params)
    if not zero3 or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed engine / FSDP / torch.compile wrappers (accelerate's own unwrapping)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def _merged_tuner_layer(layer, adapters: list[str]) -> dict[str, torch.Tensor]:
    """The base layer's weight (and bias) with the given adapters of one PEFT tuner layer merged in.

    Plain LoRA: W + get_delta_weight (= B @ A * scaling, fan_in_fan_out handled by PEFT) computed into a new tensor.
    LoRA variants (DoRA, ...): the variant's ``merge_safe`` on a copy. Other tuners (IA3, ...): merge then unmerge.
    The layer itself is left as it was (up to the float rounding of merge/unmerge in the last case).
    """
    base = layer.get_base_layer()
    weight = base.weight.detach().clone()
    bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
    already = set(getattr(layer, "merged_adapters", []))
    todo = [a for a in adapters if a not in already]
    lora_names = set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))
    if todo and not lora_names:  # a non-LoRA tuner layer (IA3, ...): let PEFT merge, copy, unmerge
        layer.merge(adapter_names=todo)
        try:
            weight = base.weight.detach().clone()
            bias = base.bias.detach().clone() if bias is not None else None
        finally:
            layer.unmerge()
        return {"weight": weight, "bias": bias}
    variants = getattr(layer, "lora_variant", {})
    for a in todo:
        if a not in lora_names:
            continue
        if a in variants:
            weight = variants[a].merge_safe(layer, a, weight)
        else:
            weight = weight + layer.get_delta_weight(a).to(weight.dtype)
        if getattr(layer, "lora_bias", {}).get(a, False) and bias is not None:
            bias = bias + (layer.lora_B[a].bias * layer.scaling[a]).to(bias.dtype)
    return {"weight": weight, "bias": bias}


def _input_output_embedding_names(root: torch.nn.Module) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in root.named_modules()}
    inp = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    out = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    in_name = names.get(id(inp)) if inp is not None else None
    out_name = names.get(id(out)) if out is not None else None
    # PEFT wraps modules: the wrapper's name is the original module's name
    for suffix in (".base_layer", ".original_module"):
        if in_name and in_name.endswith(suffix):
            in_name = in_name[: -len(suffix)]
        if out_name and out_name.endswith(suffix):
            out_name = out_name[: -len(suffix)]
    return in_name, out_name


def _ties_embeddings(root: torch.nn.Module) -> bool:
    config = getattr(root, "config", None)
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


@torch.no_grad()
def policy_state_dict(model: torch.nn.Module, *, adapter_names: list[str] | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The policy's full weights in the Hugging Face checkpoint layout, on CPU, ready for the engine.

    ``model`` is a transformers causal LM, optionally wrapped by PEFT (``PeftModel``) and/or DDP/DeepSpeed.
    The adapters in ``adapter_names`` (default: the active ones) are merged into new tensors; other adapters on the
    same base (e.g. a value-model adapter) are ignored. ``modules_to_save`` copies of the active adapter replace the
    originals. Under ZeRO-3 the parameters are gathered module by module. Tied embeddings: ``lm_head.weight`` (the
    output-embedding name) is set to the (merged) input embedding. Floating tensors are cast to ``dtype`` if given.
    The model is not modified.
    """
    model = unwrap_model(model)
    zero3 = _is_zero3(model)
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # peft is a dependency, but keep plain models working without it
        PeftModel = BaseTunerLayer = AuxiliaryTrainingWrapper = ()  # noqa: N806

    if PeftModel and isinstance(model, PeftModel):
        root = model.get_base_model()
        adapters = list(adapter_names) if adapter_names is not None else list(model.active_adapters)
    else:  # a plain model, or adapters injected by transformers' PEFT integration (model.add_adapter)
        root = model
        if adapter_names is not None:
            adapters = list(adapter_names)
        elif getattr(model, "_hf_peft_config_loaded", False):
            adapters = list(model.active_adapters())
        else:
            adapters = []

    out: dict[str, torch.Tensor] = {}
    done: list[str] = []

    def inside_done(name: str) -> bool:
        return any(name.startswith(d + ".") for d in done)

    def put(name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        tensor = tensor.detach().to("cpu", copy=True)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous()

    for name, module in root.named_modules():
        if inside_done(name):
            continue
        prefix = f"{name}." if name else ""
        if BaseTunerLayer and isinstance(module, BaseTunerLayer):
            with _gathered(module.parameters(), zero3):
                for key, tensor in _merged_tuner_layer(module, adapters).items():
                    put(prefix + key, tensor)
            done.append(name)
        elif AuxiliaryTrainingWrapper and isinstance(module, AuxiliaryTrainingWrapper):
            copies = getattr(module, "modules_to_save", {})
            active = [a for a in adapters if a in copies]
            inner = copies[active[0]] if active else module.original_module
            if hasattr(module, "token_adapter"):  # TrainableTokensWrapper: merge via PEFT's own forward weights
                raise NotImplementedError("trainable_token_indices adapters are not supported by the vLLM sync")
            with _gathered(inner.parameters(), zero3):
                for key, param in inner.named_parameters():
                    put(prefix + key, param)
            done.append(name)
        else:
            direct = list(module.named_parameters(recurse=False))
            if direct:
                with _gathered([p for _, p in direct], zero3):
                    for key, param in direct:
                        put(prefix + key, param)

    if _ties_embeddings(root):
        in_name, out_name = _input_output_embedding_names(root)
        if in_name and f"{in_name}.weight" in out:
            out[f"{out_name or 'lm_head'}.weight"] = out[f"{in_name}.weight"].clone()
    return out


