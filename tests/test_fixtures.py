"""The shared offline fixtures are real, working components (tokenizer, causal LM, reward models, datasets)."""

import torch


def test_tokenizer_round_trips_text(tokenizer):
    text = "What is 12 + 30? The answer is 42. I love this wonderful day!\nNew line, unseen word: xylophone."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode())  # merges were learned, not just bytes
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_vocab(tokenizer):
    assert 300 <= len(tokenizer) <= 500
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == im_start


def test_tokenizer_applies_chatml_template(tokenizer):
    messages = [{"role": "user", "content": "Hello!"}]
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == "<|im_start|>user\nHello!<|im_end|>\n"
    assert with_prompt == without + "<|im_start|>assistant\n"
    full = messages + [{"role": "assistant", "content": "Hi."}]
    assert tokenizer.apply_chat_template(full, tokenize=False).endswith("<|im_start|>assistant\nHi.<|im_end|>\n")


def test_tiny_lm_shape_and_tied_embeddings(tiny_lm, tokenizer):
    cfg = tiny_lm.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert cfg.vocab_size == len(tokenizer)
    assert tiny_lm.get_output_embeddings().weight.data_ptr() == tiny_lm.get_input_embeddings().weight.data_ptr()


def test_tiny_lm_generates(tiny_lm, tiny_lm_dir):
    from vgf_llm.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_lm_dir)  # padding_side="left"
    prompts = ["What is 3 + 4?", "Write one sentence about a chair."]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = tiny_lm.generate(**batch, max_new_tokens=6, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1] :]
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 6
    assert int(new.max()) < len(tokenizer)
    assert all(isinstance(t, str) for t in tokenizer.batch_decode(new, skip_special_tokens=True))


def test_reward_model_scores(tiny_reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["I love this day.", "I hate this terrible day, it is awful."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 1)
    assert torch.isfinite(logits).all()
    assert logits[0, 0] != logits[1, 0]


def test_other_vocab_reward_model_differs(tiny_reward_model_dir, other_vocab_reward_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    same = AutoConfig.from_pretrained(tiny_reward_model_dir).vocab_size
    other = AutoConfig.from_pretrained(other_vocab_reward_model_dir).vocab_size
    assert same != other
    assert len(AutoTokenizer.from_pretrained(other_vocab_reward_model_dir)) == other


def test_prompt_datasets(standard_prompts, conversational_prompts):
    from trl.data_utils import is_conversational

    assert standard_prompts.column_names == ["prompt", "answer"] == conversational_prompts.column_names
    assert not is_conversational(standard_prompts[0])
    assert is_conversational(conversational_prompts[0])
    assert conversational_prompts[0]["prompt"][0]["content"] == standard_prompts[0]["prompt"]
