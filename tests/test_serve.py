"""`vgf-llm serve` (vgf_llm.serve, vgf_llm.cli.serve) answering the real `openai` client on 127.0.0.1: chat and
text completions, VGF knobs as extra body fields, budget 0 equal to best-of-N with the same seed, a merged adapter,
the API key, OpenAI-shaped 4xx for bad requests, and concurrent requests batched into fewer sampling calls without
crossing their answers."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from vgf_llm.cli import main as cli_main  # noqa: E402
from vgf_llm.sampler import SamplerConfig, VGFSampler  # noqa: E402
from vgf_llm.serve import ServeConfig, batch_sampler, create_app, serving  # noqa: E402
from vgf_llm.value import ValueModel  # noqa: E402

NAME = "tiny"
DEFAULTS = SamplerConfig(num_generations=4, max_completion_length=8)
MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]


class Spy:
    """Wraps the real ``sample_batch``, recording each call's prompts and responses."""

    def __init__(self, model, tokenizer, scorer, delay_s: float = 0.0):
        self.real, self.delay_s, self.calls = batch_sampler(model, tokenizer, scorer), delay_s, []

    def __call__(self, config, prompts, seed):
        time.sleep(self.delay_s)
        results = self.real(config, prompts, seed)
        self.calls.append([(json.dumps(p), r.response) for p, r in zip(prompts, results, strict=True)])
        return results


@pytest.fixture(scope="module")
def parts(tiny_lm_dir, tokenizer):
    from vgf_llm.models import load_model

    model = load_model(tiny_lm_dir).eval()
    return model, tokenizer, ValueModel(model)  # a random head: the scores are arbitrary but fixed


def client(url, key="none", **kwargs):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def server(parts):
    app = create_app(*parts, DEFAULTS, ServeConfig(served_model_name=NAME, max_prompt_tokens=64))
    with serving(app) as url:
        yield url


def test_chat_completion_answers_the_openai_client(server):
    c = client(server)
    r = c.chat.completions.create(model=NAME, messages=MESSAGES)
    assert r.object == "chat.completion" and r.model == NAME and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 <= r.usage.completion_tokens <= DEFAULTS.max_completion_length
    vgf = choice.vgf  # the default settings: per-step steering, 4 particles
    assert vgf["decoder"] == "steer_prefix" and vgf["num_generations"] == 4 and vgf["transport_steps"] == 1
    assert vgf["likelihood_weight"] == 0.0  # a value model: the brake is off by default
    assert isinstance(vgf["score"], float) and isinstance(vgf["moved"], bool) and "particles" not in vgf
    assert [m.id for m in c.models.list().data] == [NAME]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_text_completions_take_a_list_of_prompts_n_and_vgf_knobs(server):
    r = client(server).completions.create(
        model=NAME, prompt=["The cat", "The dog"], n=2, max_tokens=5, seed=1,
        extra_body={"num_generations": 3, "transport_steps": 0, "return_particles": True})
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    for choice in r.choices:
        vgf = choice.vgf
        assert vgf["num_generations"] == 3 and vgf["transport_steps"] == 0 and not vgf["moved"]
        particles = vgf["particles"]
        assert len(particles) == 3 and all(p["tokens_changed"] == 0 for p in particles)  # budget 0 moves nothing
        assert vgf["score"] == max(p["score_before"] for p in particles)  # best-of-N: the best original
        assert choice.text == particles[vgf["chosen"]]["text_before"]


@pytest.mark.parametrize("steps", [0, None])
def test_a_seeded_request_equals_the_sampler_with_the_same_seed(server, parts, steps):
    """Budget 0 is best-of-N: the response equals VGFSampler(transport_steps=0).sample with the seed; so does the
    default transport's."""
    knobs = {} if steps is None else {"transport_steps": steps}
    r = client(server).chat.completions.create(model=NAME, messages=MESSAGES, seed=7, extra_body=knobs)
    expected = VGFSampler(*parts, SamplerConfig(num_generations=4, max_completion_length=8, **knobs),
                          progress=False).sample([MESSAGES], seed=7)[0]
    assert r.choices[0].message.content == expected.response
    assert r.choices[0].vgf["chosen"] == expected.chosen and r.choices[0].vgf["moved"] == expected.chosen_moved


def test_an_adapter_is_merged_into_the_served_model_and_the_value_reads_the_base(tiny_lm_dir, tokenizer,
                                                                                 tmp_path):
    from peft import LoraConfig, get_peft_model

    from vgf_llm.cli.serve import ServeArguments, load_served
    from vgf_llm.models import load_model

    base = load_model(tiny_lm_dir)
    ValueModel(base).save(tmp_path / "value")
    lora = LoraConfig(r=4, lora_alpha=4096, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # large
    get_peft_model(load_model(tiny_lm_dir), lora).save_pretrained(tmp_path / "adapter")
    args = ServeArguments(model_name_or_path=str(tiny_lm_dir), adapter_path=str(tmp_path / "adapter"),
                          value_model_path=str(tmp_path / "value"))
    served, tok, scorer = load_served(args)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(served.state_dict()[weight], base.state_dict()[weight])  # the adapter is in
    assert torch.equal(scorer.model.state_dict()[weight], base.state_dict()[weight])  # the value reads the base

    config = SamplerConfig(num_generations=4, max_completion_length=8, transport_steps=0)
    with serving(create_app(served, tok, scorer, config, ServeConfig(served_model_name=NAME))) as url:
        got = client(url).chat.completions.create(model=NAME, messages=MESSAGES, seed=3).choices[0].message.content
    on_served, on_base = (VGFSampler(m, tok, scorer, config, progress=False).sample([MESSAGES], seed=3)[0]
                          for m in (served, base))
    assert got == on_served.response  # the particles come from the served model, not the base
    assert [p.text_before for p in on_served.particles] != [p.text_before for p in on_base.particles]


def test_the_api_key_guards_v1_but_not_health(parts):
    app = create_app(*parts, DEFAULTS, ServeConfig(served_model_name=NAME, api_key="s3cret"))
    with serving(app) as url:
        for key in ("wrong", "none"):
            with pytest.raises(openai.AuthenticationError) as err:
                client(url, key).chat.completions.create(model=NAME, messages=MESSAGES)
            assert err.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        assert client(url, "s3cret").chat.completions.create(model=NAME, messages=MESSAGES).choices


def test_a_non_loopback_host_needs_an_api_key(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    from vgf_llm.cli.serve import ServeArguments, check_exposure

    monkeypatch.delenv("VGF_LLM_API_KEY", raising=False)
    argv = ["serve", "--model_name_or_path", str(tiny_lm_dir), "--value_model_path", str(tmp_path), "--host",
            "0.0.0.0"]
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2 and "--api_key" in capsys.readouterr().err
    monkeypatch.setenv("VGF_LLM_API_KEY", "k")
    args = ServeArguments(model_name_or_path=str(tiny_lm_dir), value_model_path=str(tmp_path), host="0.0.0.0")
    config = ServeConfig()
    check_exposure(args, config)
    assert config.api_key == "k"


@pytest.mark.parametrize("kwargs, param", [
    ({"extra_body": {"transport_steps": "many"}}, "transport_steps"),  # a knob of the wrong type
    ({"extra_body": {"transport_step_size": -1.0}}, None),  # refused by SamplerConfig's own check
    ({"extra_body": {"num_particles": 4}}, "num_particles"),  # not a SamplerConfig knob
    ({"extra_body": {"num_generations": 17}}, "num_generations"),  # above --max_num_generations
    ({"extra_body": {"num_generations": 2}}, "num_generations"),  # too few to fit steer_prefix's prefix value
    ({"max_tokens": 100_000}, "max_tokens"),  # above --max_tokens
    ({"n": 17}, "n"),  # more completions than --max_batch_size
    ({"stream": True}, "stream"),
    ({"messages": [{"role": "user", "content": "three " * 200}]}, None),  # above --max_prompt_tokens
    ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
])
def test_bad_requests_get_one_openai_shaped_400(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(**{"model": NAME, "messages": MESSAGES, **kwargs})
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert body["param"] == param and body["message"] and "Traceback" not in body["message"]


def test_malformed_and_oversize_bodies_get_openai_shaped_errors(parts):
    app = create_app(*parts, DEFAULTS, ServeConfig(served_model_name=NAME, max_body_bytes=2000))
    with serving(app) as url:
        with pytest.raises(openai.APIStatusError) as err:
            client(url).completions.create(model=NAME, prompt="x" * 5000)
        assert err.value.status_code == 413 and set(err.value.body) == {"message", "type", "param", "code"}
        for body in (b"{not json", b'{"prompt": 5}', b'{"model": "tiny"}'):
            r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert set(httpx.get(f"{url}/v2/nothing").json()["error"]) == {"message", "type", "param", "code"}
        with pytest.raises(openai.NotFoundError):
            client(url).completions.create(model="another-model", prompt="hi")


def test_a_request_past_its_timeout_gets_a_504(parts):
    app = create_app(*parts, DEFAULTS, ServeConfig(served_model_name=NAME, request_timeout_s=0.2),
                     sample_batch=Spy(*parts, delay_s=1.0))
    with serving(app) as url:
        with pytest.raises(openai.InternalServerError) as err:
            client(url).completions.create(model=NAME, prompt="The cat")
        assert err.value.status_code == 504 and err.value.body["code"] == "timeout"


def test_concurrent_requests_share_sampling_calls_and_get_their_own_answers(parts):
    spy = Spy(*parts)
    app = create_app(*parts, DEFAULTS, ServeConfig(served_model_name=NAME, batch_window_ms=500),
                     sample_batch=spy)
    prompts = [f"Sentence {i}: the cat" for i in range(6)]
    answers = {}
    with serving(app) as url:
        c = client(url)

        def ask(prompt):
            answers[prompt] = c.completions.create(model=NAME, prompt=prompt).choices[0].text

        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert sorted(answers) == sorted(prompts)  # every request answered
    assert 1 <= len(spy.calls) < len(prompts)  # batched: fewer sampling calls than requests
    sampled = dict(pair for call in spy.calls for pair in call)
    assert {p: sampled[json.dumps(p)] for p in prompts} == answers  # each got its own prompt's response


def test_serve_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    out = capsys.readouterr().out
    for option in ("--adapter_path", "--value_model_path", "--host", "--api_key", "--max_num_generations",
                   "--batch_window_ms", "--max_body_bytes", "--request_timeout_s", "--transport_steps",
                   "--use_vllm", "--vllm_mode", "--vllm_server_base_url"):
        assert option in out, option


# -- --use_vllm: the N reference samples from a vLLM server (here tests/openai_standin.py), the rest in-process
def test_the_particles_can_come_from_a_vllm_server(tiny_lm, tiny_lm_dir, tokenizer, tiny_reward_model_dir):
    """A request's particles come from the server with the request's own sampling knobs (max_tokens, n)."""
    from openai_standin import serve_standin

    from vgf_llm.cli.common import VLLMArguments, parse
    from vgf_llm.cli.serve import ServeArguments, load_served, vllm_sample_batch
    from vgf_llm.rollout.vllm_backend import make_rollout_backend

    with serve_standin(tiny_lm, tokenizer) as (url, standin):
        argv = (f"--model_name_or_path {tiny_lm_dir} --reward_model_path {tiny_reward_model_dir} --use_vllm "
                f"--vllm_mode server --vllm_server_base_url {url} --vllm_server_timeout 10 --served_model_name tiny "
                "--num_generations 4 --max_completion_length 8 --transport_steps 0 --max_num_generations 4")
        args, config, vllm, defaults = parse((ServeArguments, ServeConfig, VLLMArguments, SamplerConfig),
                                             argv.split(), "test", "")
        model, tok, scorer = load_served(args)
        app = create_app(model, tok, scorer, defaults, config,
                         sample_batch=vllm_sample_batch(vllm, model, tok, scorer, defaults, config))
        with serving(app) as server:
            reply = client(server).completions.create(
                model="tiny", prompt="the cat sat on", max_tokens=5, seed=7, extra_body={"num_generations": 3})
        assert [(q["n"], q["max_tokens"]) for q in standin.requests] == [(3, 5)]
        with make_rollout_backend(tiny_lm, tokenizer, use_vllm=True, vllm_mode="server", vllm_server_base_url=url,
                                  max_new_tokens=5) as backend:
            expected = backend.generate(["the cat sat on"], 3, seed=7 * 1_000_003)
    assert reply.choices[0].text in expected.texts[0]


def test_serve_refuses_vllm_with_an_adapter(tiny_lm_dir, tiny_reward_model_dir, tmp_path, capsys):
    """vLLM would sample from the base folder while the particles are steered on the merged model."""
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli_main(f"serve --model_name_or_path {tiny_lm_dir} --reward_model_path {tiny_reward_model_dir} "
                 f"--adapter_path {tmp_path} --use_vllm".split())
    assert "--use_vllm with --adapter_path" in capsys.readouterr().err
