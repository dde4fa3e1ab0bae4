"""The toy bandit example does what it claims: VGF leaves the reference support and beats best-of-N; L=0 is BoN."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "examples" / "toy_bandit.py"
_spec = importlib.util.spec_from_file_location("toy_bandit", _PATH)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

SMALL = dict(num_prompts=8, num_particles=6, steps=30, step_size=0.1, alpha=0.1, seed=0)


def test_reference_is_a_truncated_standard_gaussian():
    ref = toy.sample_reference(500, 8, torch.Generator().manual_seed(0))
    r2 = (ref**2).sum(-1)
    assert r2.max() <= toy.SUPPORT_RADIUS**2
    # E[r^2] of N(0, I_2) truncated at radius 3: 2 * (1 - 5.5 e^-4.5 / (1 - e^-4.5)) = 1.876
    assert r2.mean().item() == pytest.approx(1.876, abs=0.05)
    assert ref.mean((0, 1)).abs().max() < 0.05


def test_vgf_leaves_the_support_and_beats_best_of_n(tmp_path):
    f = toy.run(**SMALL, out=tmp_path)
    assert f["reward_best_of_n"] > f["reward_reference"]  # selection alone helps a little
    assert f["reward_vgf_selected"] > f["reward_best_of_n"] + 0.3
    assert f["reward_vgf_particles"] > f["reward_reference"]
    assert f["frac_best_of_n_outside_support"] == 0.0  # reference samples never leave the disc
    assert f["frac_vgf_outside_support"] >= 0.2
    assert f["frac_vgf_selected_outside_support"] >= 0.5  # the winners are the particles that left
    assert f["mean_displacement"] > 1.0
    png = (tmp_path / "toy_bandit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((tmp_path / "toy_bandit.json").read_text()) == json.loads(json.dumps(f))


def test_zero_steps_is_exactly_best_of_n():
    f = toy.run(**{**SMALL, "steps": 0}, out=None)
    assert f["reward_vgf_selected"] == f["reward_best_of_n"]
    assert f["reward_vgf_particles"] == f["reward_reference"]
    assert f["mean_displacement"] == 0.0 and f["frac_vgf_outside_support"] == 0.0


def test_main_prints_table_and_honours_no_plot(tmp_path, capsys):
    f = toy.main(["--groups", "4", "--num_particles", "4", "--steps", "5", "--out", str(tmp_path), "--no_plot"])
    printed = capsys.readouterr().out
    assert f"| vgf_selected | {f['reward_vgf_selected']:.3f} |" in printed
    assert f["config"]["num_prompts"] == 4 and f["config"]["steps"] == 5
    assert (tmp_path / "toy_bandit.json").exists() and not (tmp_path / "toy_bandit.png").exists()
