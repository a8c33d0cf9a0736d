"""Every command that takes ``--sae`` reads the foreign layouts ``saekit.formats`` knows: a
Gemma Scope 2 folder and a sparsify folder at Gemma 3 270M's width, run through ``saekit steer``,
``steer-eval``, ``dashboard``, ``eval`` and ``concept`` on the real model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from saekit.cli import main
from saekit.formats import detect_layout, load_foreign_sae

D_IN, D_SAE, FEATURE = 640, 48, 5


def gemma_scope_2(folder):
    g = torch.Generator().manual_seed(0)
    params = {"w_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.01,
              "w_dec": torch.randn(D_SAE, D_IN, generator=g),
              "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(D_IN),
              "threshold": torch.full((D_SAE,), 0.05)}
    folder.mkdir(parents=True)
    save_file(params, str(folder / "params.safetensors"))
    hook = "model.layers.6.output"
    (folder / "config.json").write_text(json.dumps({
        "hf_hook_point_in": hook, "hf_hook_point_out": hook, "width": D_SAE,
        "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 8,
        "affine_connection": False, "type": "sae"}))
    return folder


def sparsify(folder):
    g = torch.Generator().manual_seed(1)
    weights = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.01,
               "encoder.bias": torch.zeros(D_SAE),
               "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.zeros(D_IN)}
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "num_latents": D_SAE, "k": 4, "normalize_decoder": True,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}))
    return folder


@pytest.fixture(scope="module", params=["gemma_scope_2", "sparsify"])
def foreign(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "gemma_scope_2":
        return gemma_scope_2(root / "resid_post" / "layer_6_width_48_l0_small")
    return sparsify(root / "layers.6")


def test_the_folder_is_the_foreign_layout(foreign):
    assert detect_layout(foreign).name in ("gemma_scope_2", "sparsify")
    meta = load_foreign_sae(foreign).cfg.metadata
    assert meta.hook_name == "blocks.6.hook_resid_post"


def test_steer_and_steer_eval(foreign, model, tmp_path, capsys):
    assert main(["steer", "--sae", str(foreign), "--feature", str(FEATURE), "--value", "300",
                 "--prompt", "The weather today", "--max-new-tokens", "6", "--temperature", "0",
                 "--compare"]) == 0
    printed = capsys.readouterr().out
    steered, unsteered = printed.split("=== unsteered")
    assert f"clamp feature {FEATURE} = 300" in steered
    assert steered.split("===\n", 1)[1].strip() != unsteered.split("===\n", 1)[1].strip()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The weather today\nMy favourite food is\n")
    out = tmp_path / "curve"
    assert main(["steer-eval", "--sae", str(foreign), "--feature", str(FEATURE), "--concept",
                 "the", "--values", "0,300", "--prompts", str(prompts), "--neutral",
                 str(prompts), "--samples-per-prompt", "1", "--max-new-tokens", "6",
                 "--out", str(out)]) == 0
    result = json.loads(next(out.glob("*.json")).read_text())
    kl = [row["kl_neutral"] for row in result["curve"]]
    assert kl[1] > 1 > 10 * kl[0]  # clamping to 0 moves little; 300 a lot


def test_dashboard(foreign, model, small_capture, tmp_path):
    out = tmp_path / "dash"
    assert main(["dashboard", "--sae", str(foreign), "--activations", str(small_capture),
                 "--features", f"{FEATURE},{FEATURE + 1}", "--n-examples", "3",
                 "--out", str(out)]) == 0
    assert (out / "index.html").exists()
    assert len(list(out.glob("**/*.html"))) >= 3


def test_eval(foreign, model, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--sae", str(foreign), "--tokens", "256", "--context", "64",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["d_sae"], report["hook_name"]) == (D_SAE, "blocks.6.hook_resid_post")
    assert report["model"] == "gemma-3-270m" and report["fvu"] > 0


def test_concept(foreign, model, tmp_path):
    out = tmp_path / "concept"
    assert main(["concept", "--sae", str(foreign), "--name", "cheese", "--keywords",
                 "cheese*", "--out", str(out), "--tokens", "20000", "--statistics-rows", "4",
                 "--groups", "1,2", "--strengths", "0.2", "--max-new-tokens", "4",
                 "--samples-per-prompt", "1", "--evaluation-samples", "1",
                 "--candidates-per-ranking", "2"]) == 0
    written = json.loads((out / "concept.json").read_text())
    assert written["hook"] == "blocks.6.hook_resid_post"
    assert all(0 <= f < D_SAE for f in written["features"])
