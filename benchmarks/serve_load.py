"""Throughput and latency of `vgf-llm serve` under a bounded loopback load (issue 27): requests/s and p50/p95
latency at 1, 4 and 16 concurrent clients, best-of-N (``transport_steps`` 0) against VGF (the sampler's default,
per-step steering), the HF ``generate`` backend on the CPU, one server for both arms (the arm is a per-request knob).

Each client sends ``--requests`` chat requests one after another (a closed loop) through the real ``openai`` client.
Every answer is checked against the response its own prompt got inside the sampling batch (none lost, none crossed);
the mean batch is the number of prompts per sampling call. The scorer is a value model with an unfitted (random)
head: these are timings, not rewards.

    python benchmarks/serve_load.py                                  # tiny random model on SmolLM2's tokenizer
    python benchmarks/serve_load.py --model smollm2-135m-instruct    # the real one
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
from flow_speed import machine

from vgf_llm.models import load_model, load_tokenizer
from vgf_llm.sampler import SamplerConfig
from vgf_llm.serve import ServeConfig, batch_sampler, create_app, serving
from vgf_llm.value import ValueModel

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = "smollm2-135m-instruct"
ARMS = {"best-of-N": {"transport_steps": 0}, "VGF": {}}  # VGF: the server's default (SamplerConfig's)
TOPICS = ["a chair", "the sea", "a train", "a garden", "a city", "a book", "the rain", "a bridge"]


def tiny_model():
    """A random 2-layer Llama of width 64 on SmolLM2's tokenizer: the server and batching overhead, not a model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vgf_llm.models import prepare_model

    config = AutoConfig.from_pretrained(prepare_model(TOKENIZER))
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=16))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), load_tokenizer(TOKENIZER)


class Recorder:
    """``sample_batch`` that remembers each prompt's response and each call's size (the check of the answers)."""

    def __init__(self, sample_batch):
        self.sample_batch, self.responses, self.sizes = sample_batch, {}, []

    def __call__(self, config, prompts, seed):
        results = self.sample_batch(config, prompts, seed)
        self.sizes.append(len(prompts))
        self.responses.update((json.dumps(p), r.response) for p, r in zip(prompts, results, strict=True))
        return results


def load(url: str, name: str, clients: int, requests: int, knobs: dict, max_tokens: int, tag: str) -> dict:
    """``clients`` threads, each sending ``requests`` requests in turn; latencies and answers by prompt."""
    import openai

    latencies, answers, errors = [], {}, []

    def client(c: int) -> None:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900)
        for r in range(requests):
            messages = [{"role": "user", "content": f"Write one sentence about {TOPICS[(c + r) % len(TOPICS)]}. "
                                                    f"({tag}, client {c}, request {r})"}]
            start = time.perf_counter()
            try:
                reply = api.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                                    extra_body=knobs)
            except openai.APIError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)
            answers[json.dumps(messages)] = reply.choices[0].message.content

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"latencies": latencies, "answers": answers, "errors": errors, "wall_s": wall}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def markdown(rows: list[dict]) -> str:
    lines = ["| arm | clients | requests | answered | crossed | requests/s | p50 latency s | p95 latency s | "
             "prompts per sampling call |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['clients']} | {r['requests']} | {r['answered']} | {r['crossed']} | "
                     f"{r['requests_per_s']:.3f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['mean_batch']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random, on SmolLM2's tokenizer), an alias or a folder.")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="Concurrent clients per level.")
    p.add_argument("--requests", type=int, default=2, help="Requests per client at each level.")
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--max_tokens", type=int, default=16)
    p.add_argument("--batch_window_ms", type=float, default=20.0)
    p.add_argument("--max_batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serve_load_<model>.json).")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.model == "tiny":
        model, tokenizer = tiny_model()
    else:
        model, tokenizer = load_model(a.model).eval(), load_tokenizer(a.model)
    scorer = ValueModel(model)
    recorder = Recorder(batch_sampler(model, tokenizer, scorer))
    defaults = SamplerConfig(num_generations=a.num_generations, max_completion_length=a.max_tokens)
    config = ServeConfig(served_model_name="served", batch_window_ms=a.batch_window_ms,
                         max_batch_size=a.max_batch_size)
    rows = []
    with serving(create_app(model, tokenizer, scorer, defaults, config, sample_batch=recorder)) as url:
        for arm, knobs in ARMS.items():
            load(url, "served", 1, 1, knobs, a.max_tokens, f"warm-up {arm}")  # first-call costs, not timed
        for clients in a.clients:
            for arm, knobs in ARMS.items():
                calls = len(recorder.sizes)
                got = load(url, "served", clients, a.requests, knobs, a.max_tokens, f"{arm}, {clients} clients")
                crossed = sum(recorder.responses.get(k) != v for k, v in got["answers"].items())
                sizes = recorder.sizes[calls:]
                rows.append({"arm": arm, "clients": clients, "requests": clients * a.requests,
                             "answered": len(got["answers"]), "crossed": crossed, "errors": got["errors"],
                             "requests_per_s": len(got["answers"]) / got["wall_s"], "wall_s": got["wall_s"],
                             "p50_s": percentile(got["latencies"], 0.5), "p95_s": percentile(got["latencies"], 0.95),
                             "mean_latency_s": statistics.fmean(got["latencies"]) if got["latencies"] else None,
                             "sampling_calls": len(sizes), "mean_batch": statistics.fmean(sizes) if sizes else 0.0})
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    command = f"python benchmarks/serve_load.py --model {a.model} --clients {' '.join(map(str, a.clients))} " \
              f"--requests {a.requests} --num_generations {a.num_generations} --max_tokens {a.max_tokens}"
    result = {"machine": machine(), "command": command, "settings": vars(a), "rows": rows, "table_md": markdown(rows)}
    print(f"\n{machine()}\n{command}\n\n{result['table_md']}")
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"serve_load_{Path(a.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
