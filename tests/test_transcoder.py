"""Transcoders (and skip transcoders): an SAE of any activation that reads one hook and
reconstructs another. Synthetic recovery, files in saekit's, SAELens's and sparsify's layouts,
and on the real model: training from a two-hook cache, splicing at the output hook, steering."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from saekit import CaptureConfig, capture_activations
from saekit.cache import ActivationCache
from saekit.errors import CacheMismatchError, ConfigError, SAEConfigError, SAEInputError
from saekit.evaluate import downstream_metrics
from saekit.formats import load_foreign_sae
from saekit.sae import ARCHITECTURES, load_sae, sae_config
from saekit.steer import Intervention, steer
from saekit.train import train, train_config

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def sparse_codes(n: int, n_true: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[n, n_true]: k active codes per row, values in [0.5, 1.5)."""
    codes = torch.zeros(n, n_true)
    active = torch.rand(n, n_true, generator=generator).argsort(1)[:, :k]
    return codes.scatter_(1, active, torch.rand(n, k, generator=generator) + 0.5)


def fit(sae, batches, steps: int, lr: float = 3e-3):
    """Train ``sae`` on ``batches(n) -> (x, y)`` with the trainer's step order."""
    sae.init_from_data(*batches(4096))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    idle = torch.zeros(sae.d_sae)
    for _ in range(steps):
        x, y = batches(256)
        step = sae.training_forward(x, dead_mask=idle > 5000, target=y)
        optimizer.zero_grad()
        step.losses["loss"].backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
        idle += 256
        idle[step.fired] = 0
    sae.fold_activation_scale()
    return sae


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@torch.no_grad()
def check_fit(sae, batches) -> float:
    x, y = batches(4096)
    return fvu(y, sae(x)[0])


def test_topk_transcoder_recovers_a_sparse_map():
    """x = z A, y = z B with z sparse: the decoder rows find B's rows."""
    generator = torch.Generator().manual_seed(0)
    A = F.normalize(torch.randn(64, 32, generator=generator), dim=1)
    B = F.normalize(torch.randn(64, 48, generator=generator), dim=1)

    def batches(n):
        z = sparse_codes(n, 64, 2, generator)
        return z @ A, z @ B

    sae = ARCHITECTURES["topk"](sae_config("topk", 32, 128, k=2, d_out=48,
                                           normalize_activations="expected_average_only_in"))
    fit(sae, batches, steps=800)
    with torch.no_grad():
        best = (F.normalize(sae.W_dec, dim=1) @ B.T).max(0).values
    assert best.mean() > 0.9, best.mean()
    assert check_fit(sae, batches) < 0.1


def test_skip_transcoder_learns_the_dense_linear_part():
    """y = z B + x M^T where x also holds dense noise: only the skip term can carry that part."""
    generator = torch.Generator().manual_seed(1)
    A = F.normalize(torch.randn(64, 32, generator=generator), dim=1)
    B = F.normalize(torch.randn(64, 48, generator=generator), dim=1)
    M = 0.3 * torch.randn(48, 32, generator=generator)

    def batches(n):
        z = sparse_codes(n, 64, 2, generator)
        x = z @ A + 0.3 * torch.randn(n, 32, generator=generator)
        return x, z @ B + x @ M.T

    settings = dict(k=2, d_out=48, normalize_activations="expected_average_only_in")
    plain = fit(ARCHITECTURES["topk"](sae_config("topk", 32, 128, **settings)), batches, 400)
    skip = fit(ARCHITECTURES["topk"](sae_config("topk", 32, 128, skip_connection=True,
                                                **settings)), batches, 400)
    plain_fvu, skip_fvu = check_fit(plain, batches), check_fit(skip, batches)
    assert skip_fvu < 0.1 and plain_fvu > 0.4, (skip_fvu, plain_fvu)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_save_load_round_trip(arch, tmp_path):
    extra = {"k": 4} if "topk" in arch else {}
    cfg = sae_config(arch, 16, 64, d_out=24, skip_connection=True,
                     normalize_activations="expected_average_only_in", **extra)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = HOOK_IN, HOOK_OUT
    sae = ARCHITECTURES[arch](cfg)
    x, y = torch.randn(512, 16), 7 * torch.randn(512, 24)
    sae.init_from_data(x, y)
    with torch.no_grad():
        sae.W_skip.copy_(torch.randn(24, 16))
    sae.training_forward(x, target=y)  # sets a batchtopk threshold
    x = torch.randn(64, 16)
    before = sae(x)[0]
    sae.fold_activation_scale()
    folded = sae(x)[0]
    torch.testing.assert_close(folded, before, rtol=1e-4, atol=1e-4)
    back = load_sae(sae.save(tmp_path / arch))
    assert torch.equal(back(x)[0], folded)
    assert (back.cfg.d_out, back.cfg.skip_connection, back.cfg.architecture) == (24, True, arch)
    assert back.cfg.metadata.hook_name_out == HOOK_OUT
    cfg_json = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert cfg_json["d_out"] == 24 and cfg_json["apply_b_dec_to_input"] is False
    assert cfg_json["architecture"] == {"topk": "topk"}.get(arch, "jumprelu_skip_transcoder")


def test_saelens_transcoder_layouts_load(tmp_path):
    """SAELens's skip_transcoder and jumprelu_transcoder folders, written here by hand."""
    generator = torch.Generator().manual_seed(2)
    weights = {"W_enc": torch.randn(16, 64, generator=generator),
               "b_enc": torch.randn(64, generator=generator) - 1,
               "W_dec": torch.randn(64, 24, generator=generator),
               "b_dec": torch.randn(24, generator=generator),
               "W_skip": torch.randn(24, 16, generator=generator),
               "threshold": torch.rand(64, generator=generator)}
    x = torch.randn(32, 16, generator=generator)
    pre = x @ weights["W_enc"] + weights["b_enc"]
    expected = {"skip_transcoder": pre.relu() @ weights["W_dec"] + weights["b_dec"]
                + x @ weights["W_skip"].T,
                "jumprelu_transcoder": (pre * (pre > weights["threshold"])) @ weights["W_dec"]
                + weights["b_dec"]}
    keys = {"skip_transcoder": ["W_enc", "b_enc", "W_dec", "b_dec", "W_skip"],
            "jumprelu_transcoder": ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]}
    for name, wanted in expected.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cfg.json").write_text(json.dumps({
            "architecture": name, "d_in": 16, "d_sae": 64, "d_out": 24, "dtype": "float32",
            "apply_b_dec_to_input": False, "normalize_activations": "none",
            "metadata": {"model_name": "gemma-3-270m", "hook_name": HOOK_IN,
                         "hook_name_out": HOOK_OUT, "sae_lens_version": "6.5.0"}}))
        save_file({k: weights[k] for k in keys[name]}, folder / "sae_weights.safetensors")
        sae = load_foreign_sae(folder)
        torch.testing.assert_close(sae(x)[0], wanted)
        assert (sae.cfg.d_out, sae.cfg.metadata.hook_name_out) == (24, HOOK_OUT)
    cfg = json.loads((tmp_path / "skip_transcoder" / "cfg.json").read_text())
    del cfg["d_out"]
    (tmp_path / "skip_transcoder" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEConfigError, match="d_out"):
        load_foreign_sae(tmp_path / "skip_transcoder")


def test_sparsify_transcoder_layout_loads(tmp_path):
    """A sparsify skip transcoder of the MLP of layer 1: no b_dec subtracted from the input."""
    generator = torch.Generator().manual_seed(3)
    folder = tmp_path / "layers.1.mlp"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 16, "num_latents": 64, "k": 4,
                                                 "activation": "topk", "transcode": True,
                                                 "skip_connection": True}))
    weights = {"encoder.weight": torch.randn(64, 16, generator=generator),
               "encoder.bias": torch.randn(64, generator=generator),
               "W_dec": torch.randn(64, 16, generator=generator),
               "b_dec": torch.randn(16, generator=generator),
               "W_skip": torch.randn(16, 16, generator=generator)}
    save_file(weights, folder / "sae.safetensors")
    x = torch.randn(32, 16, generator=generator)
    pre = (x @ weights["encoder.weight"].T + weights["encoder.bias"]).relu()
    values, indices = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, indices, values)
    sae = load_foreign_sae(folder)
    torch.testing.assert_close(sae(x)[0], acts @ weights["W_dec"] + weights["b_dec"]
                               + x @ weights["W_skip"].T)
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out) == \
        ("blocks.1.mlp.hook_in", "blocks.1.mlp.hook_out")


def test_bad_transcoder_input_errors():
    cfg = sae_config("topk", 16, 64, k=4, d_out=24)
    sae = ARCHITECTURES["topk"](cfg)
    with pytest.raises(SAEInputError, match="target"):
        sae.init_from_data(torch.randn(8, 16))
    with pytest.raises(SAEInputError, match="d_out = 24"):
        sae.training_forward(torch.randn(8, 16), target=torch.randn(8, 16))
    with pytest.raises(SAEConfigError, match="apply_b_dec_to_input"):
        ARCHITECTURES["topk"](sae_config("topk", 16, 64, k=4, d_out=24, apply_b_dec_to_input=True))
    with pytest.raises(SAEConfigError, match="skip_connection needs a transcoder"):
        sae_config("topk", 16, 64, k=4, skip_connection=True)
    with pytest.raises(ConfigError, match="--hook-out"):
        train_config(activations="x", out="y", hook="a", skip_connection=True)


# --- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_cache(model, tmp_path_factory):
    """24 rows x 32 tokens of layer 1's MLP input and output, in 3 shards."""
    config = CaptureConfig(hooks=[HOOK_IN, HOOK_OUT], tokens=24 * 32, context=32, batch_rows=8,
                           shard_rows=8)
    return capture_activations(config, tmp_path_factory.mktemp("tc") / "acts", model=model)


@pytest.fixture(scope="module")
def trained(mlp_cache, tmp_path_factory):
    """A skip transcoder of layer 1's MLP, trained briefly by ``train``."""
    out = tmp_path_factory.mktemp("tc") / "saes"
    config = train_config(activations=str(mlp_cache), out=str(out), arch=["topk"], latents=[256],
                          k=[16], hook=HOOK_IN, hook_out=HOOK_OUT, skip_connection=True,
                          tokens=64 * 300, batch_size=64, lr=3e-3, holdout_tokens=200)
    (folder,) = train(config).values()
    return folder


def test_training_from_a_two_hook_cache(trained, mlp_cache, tmp_path):
    sae = load_sae(trained)
    summary = json.loads((trained / "train_summary.json").read_text())["held_out"]
    assert sae.cfg.transcoder and sae.cfg.skip_connection
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out) == (HOOK_IN, HOOK_OUT)
    assert 0 < summary["fvu"] < 0.9 and summary["l0"] == pytest.approx(16, abs=1)
    with pytest.raises(CacheMismatchError, match="blocks.1.hook_resid_post"):
        train(train_config(activations=str(mlp_cache), out=str(tmp_path / "bad"), hook=HOOK_IN,
                           hook_out="blocks.1.hook_resid_post", tokens=64, batch_size=64))


def test_splicing_replaces_the_output_hook(model, trained, mlp_cache):
    """Spliced at the MLP output: the scores are real numbers, and a transcoder that outputs
    zeros gives exactly the loss of zero-ablating the MLP output."""
    sae = load_sae(trained)
    rows = ActivationCache.open(mlp_cache).tokens()[-1:, :24]  # held-out text
    metrics = downstream_metrics(model, sae, rows)
    assert metrics["ce_loss_spliced"] != metrics["ce_loss_clean"]
    assert math.isfinite(metrics["ce_loss_recovered"]) and metrics["kl_div"] > 0
    assert metrics["tokens"] == 23 and 0 < metrics["fvu"] < 2
    with torch.no_grad():
        for name in ("W_dec", "b_dec", "W_skip"):
            getattr(sae, name).zero_()
    zeros = downstream_metrics(model, sae, rows)
    assert zeros["ce_loss_spliced"] == pytest.approx(zeros["ce_loss_zero"], abs=1e-6)


def test_steering_at_the_output_hook(model, trained):
    sae = load_sae(trained)
    ids = model.to_tokens("The fish swam in the river near the old mill")
    clean = model(ids)
    with steer(model, Intervention(sae)):
        assert torch.equal(model(ids), clean)  # empty: bit-identical
    captured = []

    def record(act, hook):  # hook_mlp_out is an alias: hook.name is the canonical name
        captured.append(act.clone())

    feature = 5
    with steer(model, Intervention(sae, add={feature: 4.0})):
        steered = model.run_with_hooks(ids, fwd_hooks=[(HOOK_OUT, record)])
    model.run_with_hooks(ids, fwd_hooks=[(HOOK_OUT, record)])
    assert not torch.equal(steered, clean)
    change = captured[0][0] - captured[1][0]
    assert change[0].abs().max() == 0  # BOS left alone
    torch.testing.assert_close(change[1:], (4.0 * sae.W_dec[feature]).expand_as(change[1:]),
                               rtol=1e-3, atol=1e-2)
