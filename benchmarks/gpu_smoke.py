"""The prepared single-GPU check of issue 26: the whole GPU path once, at the shipped recipes' sizes, in minutes.

Nothing large travels: the model is a random-init decoder of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14/2
heads, MLP 4864, the full 151,936-token vocabulary) in bf16, the tokenizer the test suite's offline BPE
(tests/conftest.py). In order, each a row of the table (a failure is recorded and the next check runs):

1. ``train/<arm>``: 2 training steps single-GPU with LoRA for each kept training arm (``steer_prefix``: per-step
   steering, ``budget_0``: best-of-N distillation), bf16; ``train/steer_prefix_fp32`` the same in fp32 (step time
   bf16 vs fp32);
2. ``sample/<decoder>``: test-time sampling with each kept particle space (``steer_prefix``, ``verified``);
3. ``zero3/init_<on|off>``: ``vgf-llm train`` under DeepSpeed ZeRO-3 at world size 1, ``zero3_init_flag`` on and
   off (on the CPU: the CLI's one ZeRO-3 launch); skipped, with a line saying so, without deepspeed;
4. ``memory``: the peak of each phase of a step at 2-3 row counts next to ``memory_model.predict``.

    python benchmarks/gpu_smoke.py            # CUDA, bf16 (bash scripts/gpu_smoke.sh on a device)
    python benchmarks/gpu_smoke.py --tiny     # CPU rehearsal at tiny sizes (~1 min), same checks
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import arms  # noqa: E402
import memory_model  # noqa: E402

QWEN_05B = dict(hidden=896, layers=24, vocab=151_936, intermediate=4864, heads=14, kv_heads=2)
TINY = dict(hidden=64, layers=2, vocab=4096, intermediate=128, heads=4, kv_heads=2)
PROMPTS = [f"Write one sentence about a {w}." for w in ("chair", "river", "garden", "road", "table", "bridge")]


def length_reward(completions, **kwargs) -> list[float]:
    """A reward any random model's text varies in (its length): the check is of the machinery, not of learning."""
    from vgf_llm.rewards import completion_text

    return [len(completion_text(c)) / 100 for c in completions]


def build(out: Path, shape: dict, dtype) -> Path:
    """A model folder (random weights of ``shape`` in ``dtype`` + the offline tokenizer) any loader takes by path."""
    from conftest import CORPUS, _train_tokenizer

    tokenizer = _train_tokenizer(CORPUS, 400, out)
    memory_model.random_model(tokenizer, dtype=dtype, **shape).save_pretrained(out)
    return out


def check(results: list, name: str, fn) -> None:
    """Run one check; its figures (or its error) become a row."""
    start = time.perf_counter()
    try:
        row = {"ok": True, **fn()}
    except Exception as e:  # a smoke check records what broke and goes on
        row = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    row["seconds"] = round(time.perf_counter() - start, 2)
    results.append({"check": name, **row})
    print(f"[{'ok' if row['ok'] else 'FAILED'}] {name} ({row['seconds']} s) "
          f"{row.get('error') or {k: v for k, v in row.items() if k not in ('ok', 'seconds')}}", flush=True)


def train(model_dir: Path, out: Path, *, transport: bool, bf16: bool, cuda: bool, tokens: int, prompts: int) -> dict:
    """2 optimizer steps of ``VGFTrainer`` with LoRA: per-step step seconds, finite losses, the peak memory."""
    import torch

    from vgf_llm import VGFConfig, VGFTrainer

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    args = VGFConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=prompts, num_generations=4,
                     generation_batch_size=4 * prompts, max_completion_length=tokens, transport_steps=int(transport),
                     transport_step_size=0.2, learning_rate=1e-4, bf16=bf16, use_cpu=not cuda, logging_steps=1,
                     save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    clock = arms.StepClock()
    trainer = VGFTrainer(str(model_dir), length_reward, args=args, train_dataset=[{"prompt": p} for p in PROMPTS],
                         callbacks=[clock])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if len(losses) != 2 or not all(map(lambda x: x == x and abs(x) < float("inf"), losses)):
        raise RuntimeError(f"losses {losses}")
    trainable = {str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}
    return {"step_seconds": [round(s, 3) for s in clock.steps], "losses": losses, "trainable_dtypes": sorted(trainable),
            "tokens_changed": [h.get("transport/tokens_changed") for h in trainer.state.log_history
                               if "transport/tokens_changed" in h],
            "gpu_peak_mb": arms.gpu_peak_mb()}


def sample(model_dir: Path, decoder: str, cuda: bool, tokens: int) -> dict:
    """Test-time sampling with ``decoder`` and a value model on the base: every particle scored, one picked."""
    import torch

    from vgf_llm.models import load_model, load_tokenizer
    from vgf_llm.sampler import SamplerConfig, VGFSampler
    from vgf_llm.value import ValueModel

    model = load_model(str(model_dir)).to("cuda" if cuda else "cpu").eval()
    tok = load_tokenizer(str(model_dir))
    config = SamplerConfig(decoder=decoder, num_generations=4, max_completion_length=tokens,
                           generation_batch_size=8)
    results = VGFSampler(model, tok, ValueModel(model), config, progress=False).sample(PROMPTS[:2], seed=0)
    scores = [p.score_after for r in results for p in r.particles]
    if not torch.isfinite(torch.tensor(scores)).all():
        raise RuntimeError(f"non-finite scores {scores}")
    return {"tokens_changed": sum(p.tokens_changed for r in results for p in r.particles)}


def zero3(model_dir: Path, out: Path, init_flag: bool | None, cuda: bool, tokens: int) -> dict:
    """``vgf-llm train`` under ZeRO-3 in one process (2 steps, per-step steering); ``init_flag`` is accelerate's
    ``zero3_init_flag`` (CUDA only: the CPU launcher passes the DeepSpeed config to the Trainer)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    data = out / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    recipe = dict(model_name_or_path=str(model_dir), dataset_name=str(data), train_size=4, eval_size=2,
                  reward_funcs=["gpu_smoke:length_reward"], output_dir=str(out / "run"), max_steps=2,
                  per_device_train_batch_size=2, num_generations=4, max_completion_length=tokens, transport_steps=1,
                  save_strategy="no", use_cpu=not cuda, bf16=cuda, disable_tqdm=True, report_to="none", plot=False)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    config = "zero3"
    if cuda:
        spec = yaml.safe_load((ROOT / "vgf_llm" / "launch" / "accelerate" / "zero3.yaml").read_text())
        spec["deepspeed_config"]["zero3_init_flag"] = init_flag
        config = str(out / "accelerate.yaml")
        Path(config).write_text(yaml.safe_dump(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run([sys.executable, "-m", "vgf_llm.cli", "train", "--accelerate_config", config,
                           "--num_processes", "1", "--config", str(out / "recipe.yaml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2500:]}")
    summary = json.loads((out / "run" / "eval_results.json").read_text())
    return {k: summary[k] for k in ("world_size", "dtype", "base_reward", "trained_reward")}


def memory(model_dir: Path, rows_list, cuda: bool, prompt: int, tokens: int, bf16: bool) -> dict:
    """Each phase's peak at every row count, and the memory model's prediction beside it."""
    import torch

    from vgf_llm.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if bf16 else torch.float32)
    model = memory_model.lora(model.to("cuda" if cuda else "cpu").eval())
    shape = memory_model.config_shape(model.config)
    return {str(rows): {"measured_mb": {k: round(v / 1e6, 2) for k, v in
                                        memory_model.measure_phases(model, tok, rows, prompt, tokens).items()},
                        "predicted_mb": {k: round(v / 1e6, 2) for k, v in
                                         memory_model.predict(shape, rows, prompt, tokens, b=2 if bf16 else 4).items()}}
            for rows in rows_list}


def table(results: list) -> str:
    lines = ["| check | ok | seconds | figures |", "|---|---|---|---|"]
    for r in results:
        figures = r.get("error") or {k: v for k, v in r.items() if k not in ("check", "ok", "seconds", "trace")}
        lines.append(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r['seconds']} | {figures} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: a tiny model, short completions.")
    p.add_argument("--skip", default="", help="Comma-separated checks to leave out (train, sample, zero3, memory).")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_smoke[_tiny].json).")
    a = p.parse_args(argv)
    arms.offline()
    import torch

    cuda = torch.cuda.is_available() and not a.tiny
    shape, tokens, prompt = (TINY, 8, 16) if a.tiny else (QWEN_05B, 128, 64)
    rows_list = (4, 8) if a.tiny else (8, 16, 32)
    skip = set(filter(None, a.skip.split(",")))
    results: list[dict] = []
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; model shape {shape}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build(tmp / "model", shape, torch.bfloat16 if cuda else torch.float32)
        if "train" not in skip:
            for name, transport, bf16 in (("steer_prefix", True, True), ("budget_0", False, True),
                                          ("steer_prefix_fp32", True, False)):
                check(results, f"train/{name}", lambda t=transport, b=bf16, n=name: train(
                    model_dir, tmp / n, transport=t, bf16=b, cuda=cuda, tokens=tokens, prompts=2))
        if "sample" not in skip:
            for decoder in ("steer_prefix", "verified"):
                check(results, f"sample/{decoder}", lambda d=decoder: sample(model_dir, d, cuda, tokens))
        if "zero3" not in skip:
            if importlib.util.find_spec("deepspeed") is None:
                print("[skipped] zero3: deepspeed is not installed (carry its wheel: scripts/gpu_smoke.sh)")
            for flag in ((True, False) if cuda else (None,)):
                if importlib.util.find_spec("deepspeed") is not None:
                    label = "cpu" if flag is None else ("on" if flag else "off")
                    check(results, f"zero3/init_{label}", lambda f=flag, lb=label: zero3(
                        model_dir, tmp / f"zero3_{lb}", f, cuda, tokens))
        if "memory" not in skip:
            check(results, "memory", lambda: memory(model_dir, rows_list, cuda, prompt, tokens, bf16=cuda))
    md = table(results)
    print("\n" + md)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": a.tiny, "shape": shape,
              "results": results, "table_md": md, **arms.provenance("gpu_smoke.py", argv)}
    out = a.out or HERE / "results" / f"gpu_smoke{'_tiny' if a.tiny else ''}.json"
    print(f"wrote {arms.write_json(out, result)}")
    return result


if __name__ == "__main__":
    main()
