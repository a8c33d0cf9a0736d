"""``saekit demo`` end to end at a tiny size: every stage runs and the summary holds what it printed."""

from __future__ import annotations

import json

import saekit.demo as demo
from saekit.demo import DemoConfig, run_demo


def test_demo_tells_the_whole_story(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "load_model", lambda device=None: model)
    config = DemoConfig(out=str(tmp_path), tokens=48 * 128, shard_rows=16, train_tokens=4096,
                        holdout_tokens=1024, batch_size=256, latents=256, k=8,
                        statistics_rows=16, clamp_multiples=[4.0], vector_scales=[3.0],
                        max_new_tokens=4, shown_prompts=1)
    result = run_demo(config)
    out = capsys.readouterr().out
    for n in range(1, 9):
        assert f"=== {n}. " in out
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == json.loads(
        json.dumps(result))
    feature = result["feature"]
    assert feature == result["search"][0]["feature"]
    assert (tmp_path / "dashboard" / f"feature_{feature}.html").is_file()
    assert (tmp_path / "steering" / "steering_curve.png").is_file()
    assert result["held_out"]["l0"] == 8
    labels = list(result["steering"])
    assert labels[0] == "unsteered" and labels[1].startswith("clamp 4x max")
    assert labels[2] == "add 3 v"
    assert result["steering"]["unsteered"]["kl_neutral"] == 0
    assert result["steering"]["add 3 v"]["kl_neutral"] > 0
    assert set(result["concept_mentions_in_cache"]) == set(config.keywords)
    assert result["verdict"].startswith("target met" if result["target_met"] else "target MISSED")
    assert result["verdict"] in out
    # a second run reuses the cache and the SAE: nothing captured or trained again
    weights = tmp_path / "sae" / "topk_w256_k8" / "sae_weights.safetensors"
    before = weights.stat().st_mtime_ns
    assert run_demo(config)["feature"] == feature
    err = capsys.readouterr().err
    assert "capture blocks" not in err and "train 1 SAE" not in err
    assert weights.stat().st_mtime_ns == before
