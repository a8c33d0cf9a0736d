"""Evaluation: metrics against hand computations, splicing into the real model, plots, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saekit.cli import build_parser
from saekit.evaluate import (EvaluationError, ce_loss_recovered, density_histogram,
                             downstream_metrics, reconstruction_metrics)
from saekit.sae import ReLUSAE, sae_config, SAEMetadata, TopKSAE

HOOK = "blocks.6.hook_resid_post"


def hand_set_relu_sae() -> ReLUSAE:
    """d_in 2, d_sae 3: latents 0 and 1 copy ReLU(x_0), ReLU(x_1); latent 2 never fires."""
    sae = ReLUSAE(sae_config("relu", 2, 3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1.0], [5.0, 5.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[1.0, -2], [3, 1], [-1, -1], [2, 0]])
    # x_hat = ReLU(x): errors (0,-2), 0, (-1,-1), 0 -> sum of squares 6
    # mean (1.25, -0.5); sum ||x - mean||^2 = 8.75 + 5 = 13.75
    metrics = reconstruction_metrics(hand_set_relu_sae(), [x[:3], x[3:]], chunk=2)
    assert metrics["tokens"] == 4
    assert metrics["fvu"] == pytest.approx(6 / 13.75)
    assert metrics["explained_variance"] == pytest.approx(1 - 6 / 13.75)
    assert metrics["mse"] == pytest.approx(6 / 4)
    assert metrics["l0"] == pytest.approx((1 + 2 + 0 + 1) / 4)
    assert metrics["cosine"] == pytest.approx((1 / math.sqrt(5) + 1 + 0 + 1) / 4)
    torch.testing.assert_close(metrics["firing_frequency"], torch.tensor([0.75, 0.25, 0.0]))
    assert metrics["dead_fraction"] == pytest.approx(1 / 3)
    assert metrics["dense_fraction"] == pytest.approx(2 / 3)
    with pytest.raises(EvaluationError):
        reconstruction_metrics(hand_set_relu_sae(), [])


def test_ce_loss_recovered_by_hand():
    assert ce_loss_recovered(clean=2.0, spliced=2.0, zero=5.0) == 1.0
    assert ce_loss_recovered(clean=2.0, spliced=5.0, zero=5.0) == 0.0
    assert ce_loss_recovered(clean=2.0, spliced=3.0, zero=5.0) == pytest.approx(2 / 3)
    assert ce_loss_recovered(clean=2.0, spliced=6.5, zero=5.0) == pytest.approx(-0.5)
    assert math.isnan(ce_loss_recovered(clean=2.0, spliced=2.5, zero=2.0))


def test_density_histogram_writes_png(tmp_path):
    frequency = torch.cat([torch.zeros(10), 10 ** -torch.linspace(0.5, 5.5, 200),
                           torch.full((5,), 0.3)])
    path = density_histogram(frequency, tmp_path / "plots" / "density.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    density_histogram(torch.zeros(8), tmp_path / "all_dead.png")  # nothing to draw: still a plot
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["all_dead.png",
                                                                          "density.png"]


def splice_sae(d_sae: int = 512) -> TopKSAE:
    return TopKSAE(sae_config("topk", 640, d_sae, k=16, metadata=SAEMetadata(
        model_name="gemma-3-270m", hook_name=HOOK)))


@pytest.fixture(scope="module")
def rows(model):
    from saekit import load_corpus, pack_token_rows

    tokens = pack_token_rows(load_corpus("default"), model.tokenizer, 2, 64)
    tokens[1, 30] = model.tokenizer.bos_token_id  # a document boundary mid-row
    return tokens


def expected_counts(tokens, bos):
    spliced = tokens != bos
    scored = spliced[:, :-1] & (tokens[:, 1:] != bos)
    return int(spliced.sum()), int(scored.sum())


def test_downstream_metrics_perfect_reconstruction(model, rows):
    sae = splice_sae()
    sae.forward = lambda x: (x.clone(), sae.encode(x))
    metrics = downstream_metrics(model, sae, rows, batch_rows=1)
    assert metrics["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["delta_lm_loss"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["kl_div"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["fvu"] == 0.0 and metrics["cosine"] == pytest.approx(1.0)
    assert metrics["ce_loss_zero"] > metrics["ce_loss_clean"] + 0.5
    n_spliced, n_scored = expected_counts(rows, model.tokenizer.bos_token_id)
    assert (metrics["tokens"], metrics["scored_predictions"]) == (n_spliced, n_scored)
    assert (metrics["rows"], metrics["context"]) == (2, 64)
    assert metrics["l0"] <= 16


def test_downstream_metrics_zero_reconstruction(model, rows):
    sae = splice_sae()
    sae.forward = lambda x: (torch.zeros_like(x), sae.encode(x))
    metrics = downstream_metrics(model, sae, rows, batch_rows=2)
    assert metrics["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["ce_loss_spliced"] == pytest.approx(metrics["ce_loss_zero"], abs=1e-5)
    assert metrics["kl_div"] > 0.1 and metrics["cosine"] == 0.0
    assert metrics["fvu"] > 1  # ||x||^2 over the variance about the (large) mean


def test_downstream_metrics_bad_input():
    sae = ReLUSAE(sae_config("relu", 640, 8))  # no hook in its metadata
    with pytest.raises(EvaluationError, match="hook"):
        downstream_metrics(None, sae, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(EvaluationError, match="rows"):
        downstream_metrics(None, splice_sae(), torch.zeros(8, dtype=torch.long))


def test_eval_cli(model, rows, tmp_path, monkeypatch, capsys):
    sae = splice_sae()
    captured = {}
    with torch.no_grad():  # a few real activations (BOS left out) to put b_dec among them
        model.run_with_hooks(rows, stop_at_layer=7, fwd_hooks=[
            (HOOK, lambda act, hook: captured.setdefault("x", act.clone()))])
    sae.init_from_data(captured["x"][rows != model.tokenizer.bos_token_id])
    sae.save(tmp_path / "sae")

    loaded = []
    monkeypatch.setattr("saekit.model.load_model",
                        lambda name, device=None: loaded.append(name) or model)
    parser = build_parser()
    out = tmp_path / "report" / "eval.json"
    args = parser.parse_args(["eval", "--sae", str(tmp_path / "sae"), "--tokens", "256",
                              "--context", "64", "--out", str(out)])
    args.run(args)

    assert loaded == ["gemma-3-270m"]
    report = json.loads(out.read_text())
    assert report["rows"] == 4 and report["context"] == 64
    assert report["hook_name"] == HOOK and report["architecture"] == "topk"
    assert report["d_sae"] == 512 and report["k"] == 16
    assert 0 < report["l0"] <= 16 and report["fvu"] > 0
    assert report["ce_loss_clean"] < report["ce_loss_zero"]
    assert report["kl_div"] > 0 and math.isfinite(report["ce_loss_recovered"])
    assert report["delta_lm_loss"] == pytest.approx(
        report["ce_loss_spliced"] - report["ce_loss_clean"])
    assert report["dead_latents"] == round(report["dead_fraction"] * 512)
    assert "firing_frequency" not in report
    assert (out.parent / report["density_plot"]).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "CE loss recovered" in printed and "FVU" in printed
