"""``saekit demo`` end to end at a tiny size: every stage runs and the summary holds what it
printed; a second run reuses the capture, the SAE and the concept selections."""

from __future__ import annotations

import json

import saekit.demo as demo
from saekit.demo import DemoConfig, run_demo


def test_demo_tells_the_whole_story(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "load_model", lambda device=None: model)
    config = DemoConfig(out=str(tmp_path), tokens=48 * 128, shard_rows=16, retrain=True,
                        train_tokens=4096, holdout_tokens=1024, batch_size=256, latents=256,
                        k=8, concept="kings", keywords=["king*", "the"], statistics_rows=16,
                        samples_per_prompt=1, groups=[1], validation_samples=1,
                        max_new_tokens=4, shown_prompts=1)
    result = run_demo(config)
    out = capsys.readouterr().out
    for n in range(1, 9):
        assert f"=== {n}. " in out
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == json.loads(
        json.dumps(result))
    feature = result["feature"]
    assert result["concept"] == "kings" and feature == result["features"][0]
    assert result["sae"] == str(tmp_path / "sae" / "topk_w256_k8")
    assert (tmp_path / "dashboard" / f"feature_{feature}.html").is_file()
    assert result["held_out"]["l0"] == 8
    assert result["steering"]["unsteered"]["kl_neutral"] == 0
    assert result["steering"]["clamped"]["kl_neutral"] > 0
    assert result["steering"]["clamped"]["n_generations"] == 10
    assert len(result["steering"]["mean_difference"]) == 2
    assert isinstance(result["target_met"], bool) and result["verdict"] in out
    assert "Golden Gate" in result["golden_gate"]["verdict"]
    # a second run reuses the cache, the SAE and the selections: nothing done again
    weights = tmp_path / "sae" / "topk_w256_k8" / "sae_weights.safetensors"
    before = weights.stat().st_mtime_ns
    assert run_demo(config)["features"] == result["features"]
    captured = capsys.readouterr()
    assert "capture blocks" not in captured.err and "train 1 SAE" not in captured.err
    assert "reusing" in captured.out
    assert weights.stat().st_mtime_ns == before


def test_shipped_sae_is_what_retrain_trains():
    """The shipped SAE's recipe is the one ``saekit demo --retrain`` runs, and its cfg.json
    and weights match that recipe (width, k, hook, model); weights load as float32."""
    from saekit.demo import RETRAIN_COMMAND, SHIPPED_SAE, recipe
    from saekit.sae import load_sae

    shipped = json.loads((SHIPPED_SAE / "recipe.json").read_text())
    assert shipped == {"command": RETRAIN_COMMAND, "train": recipe(DemoConfig())}
    assert "--retrain" in RETRAIN_COMMAND and "--tokens 1200000" in RETRAIN_COMMAND
    sae = load_sae(SHIPPED_SAE)  # checks the weights against the sha256 its cfg.json records
    assert json.loads((SHIPPED_SAE / "cfg.json").read_text())["weights_sha256"]
    config = DemoConfig()
    assert (sae.cfg.architecture, sae.d_sae, sae.cfg.options.k) == ("topk", config.latents, config.k)
    assert sae.cfg.metadata.hook_name == "blocks.6.hook_resid_post"
    assert sae.cfg.metadata.model_name == "gemma-3-270m"
    assert sae.W_dec.dtype.is_floating_point and str(sae.W_dec.dtype) == "torch.float32"
    summary = json.loads((SHIPPED_SAE / "train_summary.json").read_text())
    assert summary["tokens"] <= config.train_tokens and summary["held_out"]["l0"] == config.k


def test_shipping_an_sae_stores_bfloat16_weights_that_load_and_verify(tmp_path):
    """ship_sae rewrites the weights as bfloat16: the cfg.json it writes records their sha256,
    so the shipped folder loads (as float32) and passes its own integrity check."""
    import torch

    from saekit.files import write_json
    from saekit.sae import SAEMetadata, TopKSAE, load_sae, sae_config

    sae = TopKSAE(sae_config("topk", 16, 32, k=4, metadata=SAEMetadata(
        model_name="gemma-3-270m", hook_name="blocks.6.hook_resid_post")))
    trained = sae.save(tmp_path / "trained")
    write_json(trained / "train_summary.json", {"held_out": {}})
    shipped = load_sae(demo.ship_sae(trained, tmp_path / "shipped"))
    assert shipped.W_dec.dtype == torch.float32
    torch.testing.assert_close(shipped.W_dec, sae.W_dec.bfloat16().float())
