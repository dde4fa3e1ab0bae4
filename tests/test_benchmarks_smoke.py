"""Smoke runs of the training benchmarks (``benchmarks/speed.py`` and ``benchmarks/train.py``) on the tiny test model.

They check that every arm (VGF, VGF budget 0, TRL GRPO) runs end to end in one script run and that the outputs
(JSON, Markdown, PNG) hold the numbers the docs quote; not the numbers themselves.
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
