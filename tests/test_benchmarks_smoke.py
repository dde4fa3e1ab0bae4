"""Smoke runs of the benchmarks (``benchmarks/speed.py``, ``benchmarks/train.py``, ``benchmarks/test_time.py``) on
the tiny test model.

They check that every arm (VGF, VGF budget 0, TRL GRPO; the test-time arms) runs end to end in one script run and that
the outputs (JSON, Markdown, PNG) hold the numbers the docs quote; not the numbers themselves.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_speed_tiny(tiny_lm_dir, tmp_path):
    import speed

    out = tmp_path / "speed.json"
    results = speed.main(["--tiny", "--inline", "--model", str(tiny_lm_dir), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["arms"]) == {"vgf", "bon", "grpo"}
    for arm, r in results["arms"].items():
        assert r["step_seconds"] > 0, arm
        assert all(math.isfinite(v) for v in r["phases"].values()), (arm, r["phases"])
        assert r["peak_rss_mb"] > 0
    assert results["arms"]["vgf"]["phases"]["rollout"] > 0
    assert results["arms"]["vgf"]["phases"]["transport"] > 0
    assert results["arms"]["bon"]["phases"]["transport"] < results["arms"]["vgf"]["phases"]["transport"]
    assert results["arms"]["grpo"]["phases"]["rollout"] > 0
    assert results["rollout"]["tokens_per_s"] > 0
    assert "TRL GRPO" in saved["table_md"]


def test_train_tiny(tiny_lm_dir, tmp_path):
    import train

    results = train.main(["--tiny", "--inline", "--model", str(tiny_lm_dir), "--out_dir", str(tmp_path),
                          "--name", "smoke"])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert set(saved["arms"]) == {"vgf", "bon", "grpo"}
    assert saved["base"]["n"] == results["base"]["n"] > 0
    for arm, r in saved["arms"].items():
        assert 0.0 <= r["accuracy"] <= 1.0, arm
        assert r["kl_per_token"] >= 0 and math.isfinite(r["kl_per_token"]), arm
        assert r["wall_seconds"] > 0 and r["peak_rss_mb"] > 0, arm
        (run,) = saved["per_seed"][arm]
        assert [h for h in run["log_history"] if "reward" in h], arm
        assert run["completions_generated"] == 2 * 2 * 2, arm  # steps x prompts x completions, equal for every arm
    assert saved["partial"] is False
    assert (tmp_path / "smoke.md").read_text().count("|") > 10
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_test_time_tiny(tiny_lm_dir, tmp_path):
    """Every arm of the test-time benchmark in one run: best-of-n for each n, the VGF variant, and best-of-n at the
    VGF variant's wall-clock (n from the seconds both sides took in this run)."""
    import test_time

    variant = "verified5-top1-c4-b1+union"
    test_time.main(["--model", str(tiny_lm_dir), "--tasks", "sentiment", "--num_train_prompts", "4",
                    "--train_generations", "2", "--num_test_prompts", "2", "--num_particles", "2", "--bon_sizes",
                    "1,2,4", "--max_new_tokens", "4", "--seeds", "0,1", "--ridge_layers", "1,2", "--variants", variant,
                    "--retime_prompts", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    (res,) = saved["results"]
    arms = res["arms"]
    assert res["baseline"] == "best-of-2" and res["generation_timed_in_run"]
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


def test_test_time_per_step_steering_arms_fit_one_prefix_value_per_layer(tiny_lm_dir, tmp_path):
    """The per-step steering arms (named by layer and budget) get the prefix value fitted on the train rollouts'
    true rewards, once per layer; the -random control moves along a random head and changes tokens too."""
    import test_time

    arms = ["prefix-L1-b1x1+union", "prefix-L1-b1x1+union-random"]
    assert test_time.variant(arms[1]).control == "random_direction" and test_time.variant("prefix-L1-b1x+union") is None
    test_time.main(["--model", str(tiny_lm_dir), "--tasks", "sentiment", "--num_train_prompts", "8",
                    "--train_generations", "4", "--num_test_prompts", "2", "--num_particles", "2", "--bon_sizes",
                    "1,2", "--max_new_tokens", "6", "--seeds", "0", "--ridge_layers", "1,2", "--variants",
                    ",".join(arms), "--retime_prompts", "1", "--out", str(tmp_path)])
    (res,) = json.loads((tmp_path / "results.json").read_text())["results"]
    prefix = res["value_models"]["prefix value, layer 1"]
    assert prefix["method"] == "prefix ridge" and math.isfinite(prefix["val_corr"])
    for arm in arms:
        (run,) = res["arms"][arm]
        assert run["displacement"] > 0 and run["frac_particles_changed"] > 0, arm


def test_test_time_variants_build_sampler_configs():
    """Every test-time variant maps onto a valid ``SamplerConfig`` (a retired decoder or knob fails here)."""
    import argparse

    import test_time

    args = argparse.Namespace(num_particles=4, max_new_tokens=8, temperature=1.0, batch_size=2)
    for v in test_time.VARIANTS.values():
        c = v.sampler_config(args)
        assert (c.decoder, c.transport_steps, c.transport_step_size) == (v.decoder, v.steps, v.step_size), v.name
        assert c.num_generations == 4 and c.prompts_per_generation == 2, v.name
    assert set(test_time.DEFAULT_VARIANTS) <= set(test_time.VARIANTS)


def test_random_direction_control_keeps_norms_and_mask():
    """The control hands the space's decode start + a random vector with each row's displacement norm, and leaves
    rows that may not move (mask 0) at their start."""
    import test_time
    import torch

    from vgf_llm.spaces import Particles

    g, n, t, d = 2, 3, 5, 4
    start = torch.randn(g, n, t, d)
    mask = torch.ones(g, n, t)
    mask[:, :, -1] = 0
    moved = start + torch.randn(g, n, t, d) * mask[..., None]
    particles = Particles(rollouts=None, start=start, mask=mask)
    seen = {}

    def decode(parts, x):
        seen["particles"], seen["moved"] = parts, x
        return "ids", "mask"

    assert test_time.random_direction(decode, seed=0)(particles, moved) == ("ids", "mask")
    assert seen["particles"] is particles
    got = seen["moved"] - start
    torch.testing.assert_close(got.norm(dim=-1), (moved - start).norm(dim=-1))
    assert torch.equal(got[:, :, -1], torch.zeros(g, n, d))
    assert not torch.allclose(got, moved - start)


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


def test_frontier_baseline_arms_are_their_plain_arms_plus_the_sample_baseline():
    from dataclasses import replace

    import arms
    import frontier

    assert set(frontier.LABELS) == set(frontier.ARMS) == set(frontier.COLORS)  # every arm is drawn and named
    s = arms.ArmSettings(task="helpful")
    for plain in ("bon", "vgf_tilted", "vgf_steer_prefix"):
        a, b = (frontier.arm_settings(s, arm, 0.04, {}) for arm in (plain, plain + "_baseline"))
        assert frontier.ARMS[plain] == frontier.ARMS[plain + "_baseline"]
        assert b.extra == a.extra | {"distill_baseline": True} and replace(b, extra={}) == replace(a, extra={})
    assert not any(frontier.arm_settings(s, arm, 0.04, {}).extra.get("distill_baseline")
                   for arm in frontier.ARMS if not arm.endswith("_baseline"))
    swept = frontier.arm_settings(s, "vgf_steer_prefix:0.4", 0.04, {}, prefix=(15, 0.2))  # a budget sweep point
    plain = frontier.arm_settings(s, "vgf_steer_prefix", 0.04, {}, prefix=(15, 0.2))
    assert (plain.transport_step_size, swept.transport_step_size) == (0.2, 0.4)
    assert replace(swept, transport_step_size=0.2) == plain and "step 0.4" in frontier.arm_label("vgf_steer_prefix:0.4")
    for plain in ("vgf_steer_prefix", "vgf_tilt_prefix", "vgf_tilt_reward"):  # _distribution: only the target
        a, b = (frontier.arm_settings(s, arm, 0.04, {}, tilt_eta=(2.0, 3.0))
                for arm in (plain, plain + "_distribution"))
        assert b.extra == a.extra | {"distill_target": "distribution"} and replace(b, extra={}) == replace(a, extra={})
    tilt = frontier.arm_settings(s, "vgf_tilt_prefix", 0.04, {}, prefix=(15, 0.2), tilt_eta=(2.0, 3.0))
    assert (tilt.decoder, tilt.transport_steps, tilt.transport_step_size, tilt.extra["steer_layer"]) == (
        "tilt_prefix", 1, 2.0, 15)
    tilt = frontier.arm_settings(s, "vgf_tilt_reward", 0.04, {}, prefix=(15, 0.2), tilt_eta=(2.0, 3.0))
    assert (tilt.decoder, tilt.transport_steps, tilt.transport_step_size) == ("tilt_reward", 1, 3.0)
    for bad in ("bon:0.1", "vgf:abc", "vgf:-1", "nope:0.1"):  # refused before any training
        with pytest.raises(SystemExit):
            frontier.main(["--arms", bad])


def test_frontier_tiny(tiny_lm_dir, tiny_reward_model_dir, tmp_path):
    import frontier

    frontier.main(["--tiny", "--inline", "--model", str(tiny_lm_dir), "--reward_model", str(tiny_reward_model_dir),
                   "--arms", "vgf,vgf_pairs,vgf_tilted,vgf_steer,vgf_steer_ridge,vgf_steer_prefix,"
                   "vgf_tilt_prefix_distribution,vgf_tilt_reward,bon,grpo,grpo_kl",
                   "--seeds", "0,1", "--out_dir", str(tmp_path), "--name", "smoke"])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["partial"] is False
    assert saved["base"]["n"] == 4 and saved["base"]["kl_per_sequence"] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= saved["base"]["sampled_gold"] <= 1.0  # the gold reward, never trained on
    assert math.isfinite(saved["base"]["sampled_proxy"])  # the proxy reward model every arm trains on
    assert saved["best_of_n"]["2"]["kl_per_sequence"] == pytest.approx(math.log(2) - 0.5)
    for arm in ("vgf", "vgf_pairs", "vgf_tilted", "vgf_steer", "vgf_steer_ridge", "vgf_steer_prefix",
                "vgf_tilt_prefix_distribution", "vgf_tilt_reward", "bon", "grpo", "grpo_kl"):
        runs = saved["runs"][arm]
        assert [r["seed"] for r in runs] == [0, 1], arm
        for r in runs:
            assert set(r["checkpoints"]) == {"1", "2"}, arm  # one adapter saved and scored per checkpoint step
            for sc in r["checkpoints"].values():
                assert sc["kl_per_sequence"] >= 0 and 0.0 <= sc["sampled_gold"] <= 1.0, arm
            assert r["completions_generated"] == 2 * 2 * 2, arm
        assert saved["summary"][arm]["2"]["seeds"] == 2, arm
    for arm in ("vgf_steer", "vgf_steer_ridge", "vgf_steer_prefix", "vgf_tilt_prefix_distribution", "vgf_tilt_reward"):
        steer_log = [h for h in saved["runs"][arm][0]["log_history"] if "transport/displacement" in h]
        assert steer_log and all(h["transport/displacement"] > 0 for h in steer_log), arm  # the vectors moved
    for arm in ("vgf_steer_ridge", "vgf_steer_prefix", "vgf_tilt_prefix_distribution"):  # the head is refitted
        assert any("value/cv_corr" in h for h in saved["runs"][arm][0]["log_history"]), arm
    for arm in ("vgf", "vgf_pairs", "vgf_tilted", "vgf_steer"):
        run = saved["runs"][arm][0]
        assert run["transport_reward_before"] is not None and run["transport_reward_after"] is not None
        assert 0.0 <= run["transport_gold_before"] <= 1.0 and 0.0 <= run["transport_gold_after"] <= 1.0
    pairs_log = [h for h in saved["runs"]["vgf_pairs"][0]["log_history"] if "distill/pairs" in h]
    plain_log = [h for h in saved["runs"]["vgf"][0]["log_history"] if "distill/pairs" in h]
    assert pairs_log and plain_log and all(h["distill/pairs"] == 0 for h in plain_log)  # the plain arm has none
    assert saved["runs"]["bon"][0]["transport_raised_steps"] in (None, 0)  # budget 0 moves nothing
    assert saved["runs"]["bon"][0]["transport_gold_before"] is None  # nothing moved, nothing to score
    assert saved["table_md"].count("\n") >= 2 + 1 + 1 + 8 * 2  # header, base, best-of-2, 8 arms x 2 checkpoints
    assert "gold at KL 0.5" in saved["table_md"]
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_edits_records_every_kept_edit_with_its_rewards(tiny_lm_dir, tiny_reward_model_dir, tmp_path):
    """benchmarks/edits.py on tiny models (helpful task, the tiny reward model as proxy): each recorded edit changed
    the text and raised the training reward; the gold reward of both sides is recorded."""
    import edits

    out = edits.main(["--task", "helpful", "--steps", "1", "--max_completion_length", "8", "--model",
                      str(tiny_lm_dir), "--reward_model", str(tiny_reward_model_dir), "--out_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "edits_helpful.json").read_text())
    assert saved["edits"] == out["edits"] and len(saved["steps"]) == 1
    assert saved["steps"][0]["reward_after"] >= saved["steps"][0]["reward_before"]
    assert out["edits"], "the tiny reward model's gradient should find at least one improving swap"
    for e in out["edits"]:
        assert e["transported"] != e["original"] and e["reward_after"] > e["reward_before"]
        assert 0.0 <= e["gold_before"] <= 1.0 and 0.0 <= e["gold_after"] <= 1.0


def test_transport_kl_measures_the_particles_kl_and_gold_against_best_of_n(tiny_lm_dir, tiny_reward_model_dir,
                                                                            tmp_path):
    """The probe runs both decode-time spaces on the same rollouts: their KL is exact (0 where nothing moved, > 0
    once the budget moves anything), the gold before transport is the same for every configuration, and the table's
    best-of-N rows come from those same samples."""
    import transport_kl

    out = transport_kl.main(["--model", str(tiny_lm_dir), "--reward_model", str(tiny_reward_model_dir), "--layer", "1",
                             "--configs", "tilt_prefix:0,tilt_prefix:50,steer_prefix:2", "--steps", "2",
                             "--max_completion_length", "6", "--threads", "1", "--out_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "transport_kl.json").read_text())
    assert [r["budget"] for r in saved["runs"]] == [0.0, 50.0, 2.0]
    zero, tilt, steer = (r["summary"] for r in out["runs"])
    assert zero["kl_per_sequence"] == pytest.approx(0.0, abs=1e-2) and zero["tokens_changed"] == 0
    assert tilt["kl_per_sequence"] > 0.01 and steer["kl_per_sequence"] > 0.01
    assert zero["gold_before"] == tilt["gold_before"] == steer["gold_before"]
    assert set(saved["best_of_gold"]) == {"2", "4", "8"} and all(0 <= v <= 1 for v in saved["best_of_gold"].values())


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
