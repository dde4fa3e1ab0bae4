"""The proxy reward model of the gold/proxy task: preference pairs labelled by the gold reward, TRL's real
RewardTrainer on a tiny sequence-classification model, its held-out accuracy, the cache and the CLI."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

from vgf_llm import proxy_reward  # noqa: E402
from vgf_llm.models import MARKER_FILE, ModelNotAvailableError, prepare_model  # noqa: E402
from vgf_llm.proxy_reward import ProxyRewardSpec, pairwise_accuracy, preference_pairs  # noqa: E402
from vgf_llm.rewards import RewardModelReward, gold_helpful  # noqa: E402

GOOD = "Cooking at home is a wonderful way to relax and share a lovely meal with friends."
BAD = "Cooking is awful."


def test_pairs_are_ranked_by_the_gold_reward_and_ties_are_dropped():
    rows = [{"prompt": [{"role": "user", "content": "Give one practical tip for cooking."}], "topic": "cooking"}]
    pairs = preference_pairs(rows, [[BAD, GOOD, GOOD]], [gold_helpful], min_gap=0.1)
    # (BAD, GOOD) twice, never the tied (GOOD, GOOD) pair; chosen is always the higher-gold answer
    assert len(pairs) == 2
    assert all(c[0]["content"] == GOOD and r[0]["content"] == BAD for c, r in zip(pairs["chosen"], pairs["rejected"],
                                                                                 strict=True))
    assert all(gc - gr >= 0.1 for gc, gr in zip(pairs["gold_chosen"], pairs["gold_rejected"], strict=True))
    assert pairs[0]["prompt"] == rows[0]["prompt"]  # TRL's explicit-prompt preference format
    assert len(preference_pairs(rows, [[GOOD, GOOD + " Truly."]], [gold_helpful], min_gap=0.5)) == 0
    with pytest.raises(ValueError, match="min_gap"):
        preference_pairs(rows, [[GOOD]], [gold_helpful], min_gap=-1)


@pytest.fixture
def tiny_spec(tiny_lm_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("VGF_LLM_HOME", str(tmp_path / "home"))
    spec = ProxyRewardSpec(base=str(tiny_lm_dir), train_prompts=8, test_prompts=4, samples=3, max_new_tokens=12,
                           min_gap=0.0, batch_size=4, learning_rate=1e-3)
    monkeypatch.setitem(proxy_reward.PROXY_ALIASES, "tiny-helpful-rm", spec)
    return spec


def test_prepare_builds_with_reward_trainer_reports_accuracy_caches_and_reloads(tiny_spec, monkeypatch):
    with pytest.raises(ModelNotAvailableError):
        prepare_model("tiny-helpful-rm")  # not built yet: not silently something else
    folder = proxy_reward.prepare_proxy_reward_model("tiny-helpful-rm", progress=False)
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["kind"] == "proxy_reward_model" and marker["gold_reward"] == ["gold_helpful"]
    assert marker["train_pairs"] > 0 and marker["test_pairs"] > 0
    assert 0.0 <= marker["test_pairwise_accuracy"] <= 1.0 and 0.0 <= marker["train_pairwise_accuracy"] <= 1.0
    assert marker["train_loss"] > 0
    assert not (folder / "training_args.bin").exists()
    # the cached folder is what the alias resolves to, and a second prepare does not rebuild
    assert prepare_model("tiny-helpful-rm") == folder
    monkeypatch.setattr(proxy_reward, "build_proxy_reward_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert proxy_reward.prepare_proxy_reward_model("tiny-helpful-rm") == folder
    reward = RewardModelReward("tiny-helpful-rm")
    assert reward.model.config.num_labels == 1
    rows = [{"prompt": [{"role": "user", "content": "Give one practical tip for cooking."}], "topic": "cooking"}]
    pairs = preference_pairs(rows, [[BAD, GOOD]], [gold_helpful], min_gap=0.1)
    assert pairwise_accuracy(reward, pairs) in (0.0, 1.0)


def test_a_failed_build_leaves_no_folder_behind(tiny_spec, monkeypatch):
    def crash(spec, out_dir, progress=True):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(proxy_reward, "build_proxy_reward_model", crash)
    with pytest.raises(RuntimeError, match="killed"):
        proxy_reward.prepare_proxy_reward_model("tiny-helpful-rm")
    target = proxy_reward.alias_dir("tiny-helpful-rm")
    assert not target.exists() and not list(target.parent.glob(".tiny-helpful-rm.tmp-*"))
    with pytest.raises(ValueError, match="Unknown proxy reward model"):
        proxy_reward.prepare_proxy_reward_model("no-such-rm")


def test_models_cli_prepares_and_lists_the_proxy(tiny_spec, capsys):
    from vgf_llm.cli import main

    def listed() -> str:
        assert main(["models", "list"]) == 0
        return next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiny-helpful-rm"))

    assert "not prepared" in listed() and "vgf-llm models prepare tiny-helpful-rm" in listed()
    assert main(["models", "prepare", "tiny-helpful-rm"]) == 0
    out = capsys.readouterr().out
    assert "held-out pairwise accuracy" in out and str(proxy_reward.alias_dir("tiny-helpful-rm")) in out
    line = listed()
    assert "prepared" in line and "not prepared" not in line
