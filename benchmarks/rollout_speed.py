"""Rollout speed: vLLM (VLLMBackend, colocate) vs Hugging Face generate (HFGenerateBackend) on the same prompts.

Both backends run in this one process on the same model, prompts, sampling settings and thread count, so the
ratio is measured under the same machine load. Tokens/s counts generated tokens (completion_mask, EOS included)
divided by the wall time of ``generate``; the first call of each backend is a warm-up and is not counted. Rollouts
come from the frozen base, so no weight sync is timed (there is none).

    # needs vLLM: on CPU, the separate environment from scripts/install_vllm.sh
    OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 \
        .venv-vllm/bin/python benchmarks/rollout_speed.py

Prints a table and writes benchmarks/results/rollout_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about a river.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning to cook.",
    "What is 17 + 25? Answer briefly.",
    "Describe a cat to someone who has never seen one.",
    "Write a short, friendly greeting for a new colleague.",
    "Name two planets and one fact about each.",
]


def measure(backend, prompts, num_generations: int, repeats: int, seed: int) -> dict:
    backend.generate(prompts[:2], num_generations, seed=seed + 999)  # warm-up
    runs = []
    for r in range(repeats):
        start = time.perf_counter()
        ro = backend.generate(prompts, num_generations, seed=seed + r)
        wall = time.perf_counter() - start
        tokens = int(ro.completion_mask.sum())
        runs.append({"seconds": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
                     "load_avg_1min": round(os.getloadavg()[0], 2)})
    return {"runs": runs, "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--num_prompts", type=int, default=8)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8, help="HF generate: prompts per generate call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the HF side (vLLM: OMP_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout_speed.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vgf_llm.models import prepare_model
    from vgf_llm.rollout.hf import HFGenerateBackend
    from vgf_llm.rollout.vllm_backend import VLLMBackend

    torch.set_num_threads(args.threads)
    path = prepare_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [[{"role": "user", "content": p}] for p in (PROMPTS * 8)[: args.num_prompts]]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        hf = HFGenerateBackend(model, tok, batch_size=args.batch_size, **sampling)
        hf_result = measure(hf, prompts, args.num_generations, args.repeats, args.seed)
        start = time.perf_counter()
        with VLLMBackend(path, tok, vllm_dtype=dtype_name, vllm_max_model_length=2048,
                         kv_cache_memory_bytes=1 << 30, **sampling) as vl:
            startup = time.perf_counter() - start
            vl_result = measure(vl, prompts, args.num_generations, args.repeats, args.seed)
        rows.append({
            "dtype": dtype_name,
            "hf_generate": hf_result,
            "vllm": {**vl_result, "startup_s": round(startup, 1)},
            "ratio_vllm_over_hf": round(vl_result["tokens_per_s"] / hf_result["tokens_per_s"], 2),
        })
        del model, hf

    print(f"\n{args.model}: {args.num_prompts} prompts x {args.num_generations} samples x <= {args.max_new_tokens} "
          f"new tokens, temperature 1, {args.threads} thread(s), median of {args.repeats} runs")
    print("| dtype | HF generate tok/s | vLLM tok/s | vLLM / HF | vLLM start-up s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['hf_generate']['tokens_per_s']} | {r['vllm']['tokens_per_s']} | "
              f"{r['ratio_vllm_over_hf']}x | {r['vllm']['startup_s']} |")
    result = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/rollout_speed.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "settings": vars(args),
        "env": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "vllm": vllm.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
