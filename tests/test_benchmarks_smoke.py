"""Smoke runs of the benchmarks (``benchmarks/speed.py``, ``frontier.py``, ``guided_sampling.py``, ``kl_ceiling.py``,
``flow_speed.py``; ``rollout_speed.py`` in the vLLM tier) on tiny models.

They check that every arm (VGF with per-step steering, VGF budget 0, TRL GRPO with and without KL; the guided-sampling
arms) runs end to end in one script run and that the outputs (JSON, Markdown, PNG) hold the numbers the docs quote;
not the numbers themselves.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vgf_llm.rollout.vllm_engine import vllm_available

pytest.importorskip("trl")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_speed_tiny(tiny_lm_dir, tmp_path):
    import speed

    out = tmp_path / "speed.json"
    results = speed.main(["--tiny", "--inline", "--model", str(tiny_lm_dir), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["arms"]) == {"vgf_steer_prefix", "bon", "grpo"}
    for arm, r in results["arms"].items():
        assert r["step_seconds"] > 0, arm
        assert all(math.isfinite(v) for v in r["phases"].values()), (arm, r["phases"])
        assert r["peak_rss_mb"] > 0
    vgf, bon = results["arms"]["vgf_steer_prefix"], results["arms"]["bon"]
    assert vgf["phases"]["rollout"] > 0 and vgf["phases"]["transport"] > 0 and vgf["phases"]["value_fit"] > 0
    assert bon["phases"]["transport"] == bon["phases"]["value_fit"] == 0  # budget 0 fits and moves nothing
    assert results["arms"]["grpo"]["phases"]["rollout"] > 0
    assert results["rollout"]["tokens_per_s"] > 0
    assert "TRL GRPO" in saved["table_md"] and "per-step steering" in saved["table_md"]


def test_serve_load_answers_every_client_without_crossing(tiny_lm_dir, tmp_path):
    """benchmarks/serve_load.py at 1 and 3 clients x 1 request, tiny sizes: both arms, every answer its own."""
    pytest.importorskip("openai")
    import serve_load

    out = tmp_path / "serve_load.json"
    result = serve_load.main(["--model", str(tiny_lm_dir), "--clients", "1", "3", "--requests", "1",
                              "--num_generations", "4", "--max_tokens", "4", "--batch_window_ms", "300",
                              "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["arm"], r["clients"]) for r in saved["rows"]] == [
        ("best-of-N", 1), ("VGF", 1), ("best-of-N", 3), ("VGF", 3)]
    for r in result["rows"]:
        assert r["answered"] == r["requests"] and r["crossed"] == 0 and not r["errors"], r
        assert r["requests_per_s"] > 0 and 0 < r["p50_s"] <= r["p95_s"]
    assert max(r["mean_batch"] for r in result["rows"] if r["clients"] == 3) > 1  # concurrent requests batched
    assert "| arm | clients |" in saved["table_md"] and "serve_load.py" in saved["command"]


def test_arms_vgf_steer_prefix_is_the_default_vgf_and_bon_its_budget_0(tmp_path):
    """The arms map onto the product: vgf_steer_prefix is VGFConfig's defaults, bon the same with transport_steps 0,
    a ':<step>' point only another step size, grpo_kl GRPO with the KL coefficient; retired arms are refused."""
    import arms
    import frontier

    from vgf_llm import VGFConfig

    assert set(arms.ARMS) == set(arms.ARM_LABELS) == set(frontier.COLORS)  # every arm is drawn and named
    s = arms.ArmSettings(task="helpful")
    transport = ("transport_steps", "transport_step_size", "steer_layer", "value_buffer_steps")

    def fields(c):
        return {k: getattr(c, k) for k in transport}

    plain, bon, swept = (arms.vgf_config(s, arm, str(tmp_path)) for arm in ("vgf_steer_prefix", "bon",
                                                                             "vgf_steer_prefix:0.4"))
    assert fields(plain) == fields(VGFConfig(output_dir=str(tmp_path)))
    assert fields(bon) == fields(plain) | {"transport_steps": 0}
    assert fields(swept) == fields(plain) | {"transport_step_size": 0.4}
    assert "step 0.4" in arms.arm_label("vgf_steer_prefix:0.4")
    assert arms.grpo_config(s, "grpo", str(tmp_path)).beta == 0.0
    assert arms.grpo_config(s, "grpo_kl", str(tmp_path)).beta == s.grpo_beta > 0
    for bad in ("bon:0.1", "grpo:0.1", "vgf_steer_prefix:abc", "vgf_steer_prefix:-1", "vgf", "vgf_tilted", "nope"):
        with pytest.raises(SystemExit):  # refused before any training
            frontier.main(["--arms", bad])


def test_guided_sampling_tiny(tiny_lm_dir, tmp_path):
    """Every arm of the guided-sampling benchmark in one run: best-of-n for each n, the VGF variant, and best-of-n at
    the VGF variant's wall-clock (n from the seconds both sides took in this run)."""
    import guided_sampling

    variant = "verified5-top1-c4-b1+union"
    guided_sampling.main(["--model", str(tiny_lm_dir), "--tasks", "sentiment", "--num_train_prompts", "4",
                          "--train_generations", "2", "--num_test_prompts", "2", "--num_particles", "2",
                          "--bon_sizes", "1,2,4", "--max_new_tokens", "4", "--seeds", "0,1", "--ridge_layers", "1,2",
                          "--variants", variant, "--retime_prompts", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    (res,) = saved["results"]
    arms = res["arms"]
    assert res["baseline"] == "best-of-2" and res["generation_timed_in_run"] and res["selector"] == "ridge"
    assert {"single sample", "pass@2 (oracle)", "best-of-1", "best-of-2", "best-of-4", variant} <= set(arms)
    for k in (1, 2, 4):
        assert [r["n"] for r in arms[f"best-of-{k}"]] == [k, k]
        assert [r["seconds"] for r in arms[f"best-of-{k}"]] == pytest.approx(
            [k * t for t in res["seconds_per_sample"]])
    equal = arms[f"best-of-n at {variant}'s wall-clock"]
    for seed, (vgf, bon) in enumerate(zip(arms[variant], equal, strict=True)):
        want = int(vgf["seconds"] // res["seconds_per_sample"][seed])
        assert bon["n"] == max(1, min(want, 4)) and bon["capped"] == (want > 4)
        assert bon["seconds"] == pytest.approx(bon["n"] * res["seconds_per_sample"][seed])
        assert bon["seconds"] <= vgf["seconds"] or bon["n"] == 1
    rows = {r["arm"].split(" (n =")[0]: r for r in saved["summary"]["sentiment"]}
    assert rows[variant]["diff_per_seed"] == pytest.approx(
        [a["reward"] - b["reward"] for a, b in zip(arms[variant], arms["best-of-2"], strict=True)])
    assert "best-of-n at" in (tmp_path / "results.md").read_text()


def test_guided_sampling_per_step_steering_arms_fit_the_prefix_value_on_train_rewards(tiny_lm_dir, tmp_path):
    """The per-step steering arms (named by layer and budget) move along a prefix value the sampler fits on the
    train rollouts' true rewards; the -random control moves along a random head and changes tokens too."""
    import guided_sampling

    arms = ["prefix-L1-b1x1+union", "prefix-L1-b1x1+union-random"]
    assert guided_sampling.variant(arms[1]).control == "random_direction"
    assert guided_sampling.variant("prefix-L1-b1x+union") is None
    guided_sampling.main(["--model", str(tiny_lm_dir), "--tasks", "sentiment", "--num_train_prompts", "8",
                          "--train_generations", "4", "--num_test_prompts", "2", "--num_particles", "2",
                          "--bon_sizes", "1,2", "--max_new_tokens", "6", "--seeds", "0", "--ridge_layers", "1,2",
                          "--variants", ",".join(arms), "--retime_prompts", "1", "--out", str(tmp_path)])
    (res,) = json.loads((tmp_path / "results.json").read_text())["results"]
    prefix = res["value_models"]["prefix value, layer 1"]
    assert prefix["method"] == "prefix ridge" and math.isfinite(prefix["val_corr"])
    for arm in arms:
        (run,) = res["arms"][arm]
        assert run["displacement"] > 0 and run["frac_particles_changed"] > 0, arm


def test_guided_sampling_variants_build_sampler_configs_and_default_to_the_samplers_budgets():
    """Every variant maps onto a valid ``SamplerConfig`` (a retired decoder or knob fails here), and the default
    variants are the sampler's two decoders at the budgets it uses by default."""
    import argparse

    import guided_sampling

    from vgf_llm.sampler import DEFAULT_BUDGETS

    args = argparse.Namespace(num_particles=4, max_new_tokens=8, temperature=1.0, batch_size=2)
    defaults = [guided_sampling.variant(name) for name in guided_sampling.DEFAULT_VARIANTS]
    for v in [*guided_sampling.VARIANTS.values(), *defaults]:
        c = v.sampler_config(args)
        assert (c.decoder, c.transport_steps, c.transport_step_size) == (v.decoder, v.steps, v.step_size), v.name
        assert c.num_generations == 4 and c.prompts_per_generation == 2, v.name
    assert {v.decoder: (v.steps, v.step_size) for v in defaults} == DEFAULT_BUDGETS


def test_guided_sampling_controls_keep_norms_and_mask():
    """The verified control hands the space's decode start + a random vector with each row's displacement norm and
    leaves rows that may not move (mask 0) at their start; the steer_prefix control swaps in a random head of the
    fitted head's norm in standardised units, a fresh one per seed."""
    import guided_sampling as gs
    import torch

    from vgf_llm.prefix_value import PrefixValue

    g, n, t, d = 2, 3, 5, 4
    start = torch.randn(g, n, t, d)
    mask = torch.ones(g, n, t)
    mask[:, :, -1] = 0
    moved = start + torch.randn(g, n, t, d) * mask[..., None]
    seen = {}

    class Space:
        def lift(self, rollouts):
            return start, mask

        def decode(self, rollouts, x):
            seen["rollouts"], seen["moved"] = rollouts, x
            return "ids", {}

    assert gs.random_direction(Space(), seed=0)("ro", moved) == ("ids", {})
    assert seen["rollouts"] == "ro"
    got = seen["moved"] - start
    torch.testing.assert_close(got.norm(dim=-1), (moved - start).norm(dim=-1))
    assert torch.equal(got[:, :, -1], torch.zeros(g, n, d))
    assert not torch.allclose(got, moved - start)

    pv = PrefixValue(layer=1, weight=torch.randn(d), bias=0.3, mean=torch.randn(d), std=torch.rand(d) + 0.5)
    sampler = SimpleNamespace(space=SimpleNamespace(value=pv))
    control = gs.variant("prefix-L1-b1x1+union-random")
    gs.use_control(sampler, control, pv, seed=0)
    first = sampler.space.value
    torch.testing.assert_close((first.weight * first.std).norm(), (pv.weight * pv.std).norm())
    assert not torch.allclose(first.weight, pv.weight) and (first.bias, first.layer) == (pv.bias, pv.layer)
    gs.use_control(sampler, control, pv, seed=1)
    assert not torch.allclose(sampler.space.value.weight, first.weight)
    sampler.space.value = pv
    gs.use_control(sampler, gs.variant("prefix-L1-b1x1+union"), pv, seed=0)  # a plain arm: nothing changes
    assert sampler.space.value is pv


def test_gold_at_matched_kl_interpolates_each_curve_and_never_extrapolates():
    import frontier

    curve = [(0.0, 0.5), (2.0, 0.7), (1.0, 0.65)]  # checkpoints in any order
    assert frontier.gold_at_kl(curve, 0.5) == pytest.approx(0.575)
    assert frontier.gold_at_kl(curve, 1.5) == pytest.approx(0.675)
    assert frontier.gold_at_kl(curve, 2.0) == pytest.approx(0.7)
    assert frontier.gold_at_kl(curve, 2.5) is None
    results = {"base": {"sampled_gold": 0.5}, "best_of_n": {"2": {"gold": 0.6, "kl_per_sequence": 0.19}},
               "runs": {"vgf": [{"checkpoints": {"4": {"kl_per_sequence": 1.0, "sampled_gold": 0.7}}},
                                {"checkpoints": {"4": {"kl_per_sequence": 0.8, "sampled_gold": 0.66}}}]}}
    table = frontier.matched_kl(results, [0.5, 1.0])
    assert table["vgf"][0.5] == pytest.approx((0.6, 0.0, 2))  # both seeds reach 0.5: 0.6 and 0.6
    assert table["vgf"][1.0][2] == 1  # only one seed reaches KL 1
    assert table["best_of_n"][1.0] is None


def test_frontier_refuses_a_held_out_set_the_task_cannot_fill_before_training(capsys):
    import frontier

    with pytest.raises(SystemExit) as exit_info:  # 1-digit chain_sum has about 45 distinct test questions
        frontier.main(["--task", "chain_sum", "--eval_prompts", "128"])
    assert exit_info.value.code == 2 and "distinct test questions" in capsys.readouterr().err


def test_frontier_resume_keeps_finished_runs_and_refuses_other_settings(tiny_lm_dir, tiny_reward_model_dir, tmp_path,
                                                                       capsys):
    import frontier

    args = ["--tiny", "--inline", "--model", str(tiny_lm_dir), "--reward_model", str(tiny_reward_model_dir),
            "--arms", "bon", "--out_dir", str(tmp_path), "--name", "resumed"]
    first = frontier.main(args + ["--seeds", "0"])
    second = frontier.main(args + ["--seeds", "0,1", "--resume"])
    runs = second["runs"]["bon"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0]["train_seconds"] == first["runs"]["bon"][0]["train_seconds"]  # kept, not trained again
    assert second["base"]["sampled_gold"] == first["base"]["sampled_gold"] and second["partial"] is False
    assert "bon seed 0: kept from the earlier run" in capsys.readouterr().out
    other = [a if a != "bon" else "vgf_steer_prefix:0.5" for a in args]  # another arm: bon's runs stay as they were
    third = frontier.main(other + ["--seeds", "0", "--resume"])
    assert [r["seed"] for r in third["runs"]["bon"]] == [0, 1] and len(third["runs"]["vgf_steer_prefix:0.5"]) == 1
    assert set(third["summary"]) == {"bon", "vgf_steer_prefix:0.5"}
    with pytest.raises(SystemExit):  # another learning rate would mix two experiments in one table
        frontier.main(args + ["--seeds", "0", "--resume", "--learning_rate", "0.1"])
    assert "other settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        frontier.main(args + ["--resume", "--name", "never_run"])
    assert "no earlier run" in capsys.readouterr().err


def test_frontier_tiny(tiny_lm_dir, tiny_reward_model_dir, tmp_path):
    import frontier

    chosen = ["vgf_steer_prefix", "vgf_steer_prefix:0.4", "bon", "grpo", "grpo_kl"]
    frontier.main(["--tiny", "--inline", "--model", str(tiny_lm_dir), "--reward_model", str(tiny_reward_model_dir),
                   "--arms", ",".join(chosen), "--seeds", "0,1", "--out_dir", str(tmp_path), "--name", "smoke"])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["partial"] is False
    assert saved["base"]["n"] == 4 and saved["base"]["kl_per_sequence"] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= saved["base"]["sampled_gold"] <= 1.0  # the gold reward, never trained on
    assert math.isfinite(saved["base"]["sampled_proxy"])  # the proxy reward model every arm trains on
    assert saved["best_of_n"]["2"]["kl_per_sequence"] == pytest.approx(math.log(2) - 0.5)
    for arm in chosen:
        runs = saved["runs"][arm]
        assert [r["seed"] for r in runs] == [0, 1], arm
        for r in runs:
            assert set(r["checkpoints"]) == {"1", "2"}, arm  # one adapter saved and scored per checkpoint step
            for sc in r["checkpoints"].values():
                assert sc["kl_per_sequence"] >= 0 and 0.0 <= sc["sampled_gold"] <= 1.0, arm
            assert r["completions_generated"] == 2 * 2 * 2, arm
        assert saved["summary"][arm]["2"]["seeds"] == 2, arm
    for arm in ("vgf_steer_prefix", "vgf_steer_prefix:0.4"):
        run = saved["runs"][arm][0]
        steer_log = [h for h in run["log_history"] if "transport/displacement" in h]
        assert steer_log and all(h["transport/displacement"] > 0 for h in steer_log), arm  # the states moved
        assert any("value/cv_corr" in h for h in run["log_history"]), arm  # the prefix value is refitted
        assert run["transport_reward_before"] is not None and run["transport_reward_after"] is not None, arm
        assert 0.0 <= run["transport_gold_before"] <= 1.0 and 0.0 <= run["transport_gold_after"] <= 1.0, arm
    assert saved["runs"]["bon"][0]["transport_raised_steps"] in (None, 0)  # budget 0 moves nothing
    assert saved["runs"]["bon"][0]["transport_gold_before"] is None  # nothing moved, nothing to score
    assert not any("kl" in h for h in saved["runs"]["grpo"][0]["log_history"])  # beta 0: TRL logs no KL
    assert any("kl" in h for h in saved["runs"]["grpo_kl"][0]["log_history"])
    assert saved["table_md"].count("\n") >= 2 + 1 + 1 + 5 * 2  # header, base, best-of-2, 5 arms x 2 checkpoints
    assert "gold at KL 0.5" in saved["table_md"] and "step 0.4" in saved["table_md"]
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_kl_ceiling_puts_the_gold_oracle_above_the_proxy_tilt_and_best_of_n(tiny_lm_dir, tiny_reward_model_dir,
                                                                          tmp_path):
    """Best-of-k's probabilities on ranked samples, exact KL from the empirical base, and the ordering the theory
    fixes: at every matched KL the gold tilt (KL-optimal for gold) holds at least the gold of either proxy target,
    and the proxy tilt (KL-optimal for the proxy) at least best-of-N's proxy reward."""
    import kl_ceiling
    import torch

    q = kl_ceiling.best_of_k(torch.tensor([[0.3, -1.0]]), 2)  # best of 2 draws from 2: the higher one 3/4 of the time
    assert torch.allclose(q, torch.tensor([[0.75, 0.25]], dtype=q.dtype))
    assert float(kl_ceiling.kl_from_uniform(torch.full((1, 4), 0.25))) == pytest.approx(0.0)
    out = kl_ceiling.main(["--model", str(tiny_lm_dir), "--reward_model", str(tiny_reward_model_dir),
                           "--eval_prompts", "4", "--samples", "6", "--max_completion_length", "6", "--threads", "1",
                           "--levels", "0.1,0.3", "--bootstrap", "20", "--out_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "kl_ceiling.json").read_text())
    assert saved["eval_prompts"] == 4 and [r["kl"] for r in saved["table"]] == [0.1, 0.3]
    for row in out["table"]:
        assert row["tilt_gold"] >= max(row["tilt_proxy"], row["best_of_n"]) - 1e-3
        assert row["tilt_proxy_proxy"] >= row["best_of_n_proxy"] - 1e-3
        assert row["margin"] == pytest.approx(row["tilt_proxy"] - row["best_of_n"])
    for k, kl in saved["best_of_k_kl"]["empirical"].items():  # on 6 samples a best-of-k spends less than log k - ...
        assert 0 < kl <= saved["best_of_k_kl"]["analytic"][k] + 1e-9


def test_flow_speed_quick_checks_the_transport_against_the_naive_loop():
    """--quick times the library's transport step against the naive loop on tiny shapes (after checking both give
    the same particles) and writes nothing."""
    import flow_speed

    rows = flow_speed.main(["--quick", "--repeats", "1", "--naive_budget_s", "1"])
    assert [(r["N"], r["groups"]) for r in rows] == [(4, 1), (4, 2), (8, 1), (8, 2)]
    for r in rows:
        assert r["vectorised_ms"] > 0 and r["naive_ms"] > 0 and r["ratio"] == pytest.approx(
            r["naive_ms"] / r["vectorised_ms"])


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed with compatible torch/transformers: run "
                    "`bash scripts/install_vllm.sh` and `.venv-vllm/bin/python -m pytest -m vllm "
                    "tests/test_benchmarks_smoke.py`")
def test_rollout_speed_times_vllm_and_hf_generate_on_the_same_prompts(smollm2_dir, tmp_path, monkeypatch):
    """vLLM tier: both backends generate, the ratio is theirs, the JSON records the command."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import rollout_speed

    out = tmp_path / "rollout_speed.json"
    result = rollout_speed.main(["--model", str(smollm2_dir), "--dtypes", "float32", "--num_prompts", "2",
                                 "--num_generations", "2", "--max_new_tokens", "4", "--repeats", "1",
                                 "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row == result["results"][0] and row["dtype"] == "float32"
    assert row["hf_generate"]["tokens_per_s"] > 0 and row["vllm"]["tokens_per_s"] > 0
    assert row["ratio_vllm_over_hf"] == pytest.approx(
        row["vllm"]["tokens_per_s"] / row["hf_generate"]["tokens_per_s"], abs=0.01)
    assert "benchmarks/rollout_speed.py --model" in result["command"]


@pytest.mark.slow
def test_gpu_smoke_rehearses_every_check_on_the_cpu(tmp_path):
    """The prepared single-GPU check (benchmarks/gpu_smoke.py) at tiny sizes on the CPU: every check runs and
    passes (ZeRO-3 only where deepspeed is installed), so device minutes only ever meet GPU problems."""
    import gpu_smoke

    out = tmp_path / "gpu_smoke.json"
    result = gpu_smoke.main(["--tiny", "--out", str(out)])
    checks = {r["check"]: r for r in json.loads(out.read_text())["results"]}
    assert {"train/steer_prefix", "train/budget_0", "train/steer_prefix_fp32", "sample/steer_prefix",
            "sample/verified", "memory"} <= set(checks)
    assert all(r["ok"] for r in result["results"]), [r.get("error") for r in result["results"]]
    assert all(len(checks[f"train/{a}"]["losses"]) == 2 for a in ("steer_prefix", "budget_0"))
    assert set(checks["memory"]["4"]["measured_mb"]) == set(checks["memory"]["8"]["predicted_mb"])


def test_compute_curves_tiny(tiny_lm_dir, tmp_path):
    """benchmarks/compute_curves.py at tiny size: best-of-N for every N from one draw (N x the per-sample time), a VGF
    arm on the first samples, win rates against greedy, the paired difference to best-of-N at equal wall-clock."""
    import compute_curves

    arm = "prefix-L1-b1x1+union"
    out = tmp_path / "curves.json"
    res = compute_curves.main(["--model", str(tiny_lm_dir), "--task", "sentiment", "--num_train_prompts", "8",
                               "--train_generations", "4", "--num_test_prompts", "2", "--n_max", "4", "--vgf_n", "2",
                               "--max_new_tokens", "4", "--seeds", "0,1", "--ridge_layers", "1,2", "--variants", arm,
                               "--cache", str(tmp_path / "cache"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["seeds_done"] == [0, 1] and out.with_suffix(".png").exists()
    for run in res["runs"]:
        a = run["arms"]
        assert [a[f"best-of-{n}"]["seconds"] for n in (1, 2, 4)] == pytest.approx(
            [n * run["seconds_per_sample"] for n in (1, 2, 4)])
        assert a[arm]["seconds"] > a["best-of-2"]["seconds"] and a[arm]["tokens"] > a["best-of-2"]["tokens"]
        assert all(0 <= x["win_rate"] <= 1 for x in a.values())
    rows = {r["arm"]: r for r in saved["summary"]}
    assert len(rows[arm]["diff_per_seed"]) == 2 and isinstance(rows[arm]["above"], bool)
    assert "| arm | true reward |" in saved["table_md"] and "per doubling of N" in saved["bon_peak"]


def test_compute_curves_reward_model_scorer_keeps_the_gold_held_out(tiny_lm_dir, tmp_path):
    """The helpful setting: a sequence-classification reward model (here the tiny LM with a fresh head) selects and
    its own scores of the train samples fit the steering; the table's y is the gold reward."""
    import compute_curves

    out = tmp_path / "curves.json"
    res = compute_curves.main(["--model", str(tiny_lm_dir), "--task", "helpful", "--scorer", str(tiny_lm_dir),
                               "--num_train_prompts", "8", "--train_generations", "4", "--num_test_prompts", "2",
                               "--n_max", "2", "--vgf_n", "2", "--max_new_tokens", "4", "--seeds", "0",
                               "--variants", "prefix-L1-b1x1+union,prefix-L1-b1x1+union+lik1",
                               "--likelihood_weights", "1", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert res["selector"]["scorer"] == str(tiny_lm_dir) and "train_corr_with_true" in res["selector"]
    assert set(res["runs"][0]["arms"]) == {"best-of-1", "best-of-2", "best-of-1+lik1", "best-of-2+lik1",
                                           "greedy (base)", "prefix-L1-b1x1+union", "prefix-L1-b1x1+union+lik1"}
    rows = {r["arm"]: r for r in res["summary"]}
    assert "tilted_diff" in rows["prefix-L1-b1x1+union+lik1"] and "tilted_diff" not in rows["prefix-L1-b1x1+union"]
    assert all("within_diff" in rows[a] for a in ("prefix-L1-b1x1+union", "prefix-L1-b1x1+union+lik1"))
    assert all(isinstance(r["proxy"][0], float) for r in res["summary"])  # the gold-vs-proxy picture's x

    # a second draw of the same size extends best-of-N to 2 x n_max, in place, once
    import extend_best_of_n

    extended = extend_best_of_n.main([str(out)])
    arms = extended["runs"][0]["arms"]
    assert list(arms)[:3] == ["best-of-1", "best-of-2", "best-of-4"]
    for suffix in ("", "+lik1"):
        assert arms[f"best-of-4{suffix}"]["seconds"] == pytest.approx(4 * arms[f"best-of-1{suffix}"]["seconds"])
    assert arms["best-of-4"]["proxy"] >= arms["best-of-2"]["proxy"]  # the max over a superset of the samples
    assert "| best-of-4+lik1 |" in extended["table_md"] and extended["args"]["ns"] == [1, 2, 4]
    with pytest.raises(SystemExit):
        extend_best_of_n.main([str(out)])

    # the proxy check reads the same cached draws: best-of-N by the proxy, the likelihood and their sums
    import proxy_check

    checked = proxy_check.main(["--model", str(tiny_lm_dir), "--scorer", str(tiny_lm_dir), "--draws",
                                "helpful-test-n2x2-t4-T1.0-b4-s0,helpful-test-n2x2-t4-T1.0-b4-s10000",
                                "--weights", "1", "--cache", str(tmp_path / "cache"),
                                "--out", str(tmp_path / "check.json")])["results"]
    assert len(checked) == 2 and len(json.loads((tmp_path / "check.json").read_text())["results"]) == 2
    for r in checked:
        assert set(r["best_of_n"]) == {"proxy", "likelihood", "proxy+1xlik"}
        assert all(list(by) == [2] and 0 <= by[2] <= 1 for by in r["best_of_n"].values())
        assert all(-1 <= r[k] <= 1 or math.isnan(r[k]) for k in ("corr_gold_proxy", "corr_gold_likelihood"))
