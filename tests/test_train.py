"""The trainer on real cached activations: sweeps, exact resume after SIGKILL, torchrun, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill import kill_at_first_checkpoint
from safetensors.torch import load_file, save_file

from saekit import CaptureConfig, capture_activations
from saekit.errors import NonFiniteActivationsError, SAEConfigError, TrainingError
from saekit.files import sha256_file
from saekit.sae import load_sae
from saekit.train import train, train_config
from saekit.train_runs import Run, check_finite_losses, check_finite_parameters

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def train_cache(model, tmp_path_factory):
    """160 rows x 64 tokens of layer-3 activations in 5 shards."""
    out = tmp_path_factory.mktemp("train") / "acts"
    config = CaptureConfig(hooks=["blocks.3.hook_resid_post"], tokens=160 * 64, context=64,
                           batch_rows=8, shard_rows=32)
    return capture_activations(config, out, model=model)


def _train_args(cache: Path, out: Path, tokens: int, arch: str = "topk",
                **extra: str) -> list[str]:
    args = ["train", "--activations", str(cache), "--out", str(out), "--arch", arch,
            "--latents", "512", "--k", "16", "--tokens", str(tokens), "--batch-size", "64",
            "--checkpoint-every", "25", "--log-every", "5", "--holdout-tokens", "2048"]
    for flag, value in extra.items():
        args += [f"--{flag.replace('_', '-')}", value]
    return args


def test_sweep_trains_and_saves_every_sae(train_cache, tmp_path):
    config = train_config(activations=str(train_cache), out=str(tmp_path / "sweep"),
                         arch=["topk", "relu"], latents=[256], k=[8, 16], l1_coefficient=[2.0],
                         tokens=64 * 60, batch_size=64, log_every=10, holdout_tokens=2048)
    saved = train(config)
    assert sorted(saved) == ["relu_w256_l12", "topk_w256_k16", "topk_w256_k8"]
    for name, folder in saved.items():
        sae = load_sae(folder)
        summary = json.loads((folder / "train_summary.json").read_text())["held_out"]
        assert sae.cfg.normalize_activations == "none"  # the scale is folded in
        assert 0 < summary["fvu"] < 0.9, (name, summary)
        assert 1500 < summary["tokens"] < 2048  # one 32-row shard held out, BOS dropped
        lines = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [l["step"] for l in lines] == [10, 20, 30, 40, 50, 60]
        assert {"loss", "fvu", "l0", "dead_fraction", "lr", "tokens_per_s"} <= set(lines[-1])
        assert (folder / "sparsity.safetensors").exists()
    k8 = json.loads((saved["topk_w256_k8"] / "train_summary.json").read_text())["held_out"]
    assert k8["l0"] == pytest.approx(8, abs=0.5)


def test_killed_training_resumes_to_identical_weights(train_cache, tmp_path):
    killed = tmp_path / "killed"
    tokens = 64 * 3000
    command = [sys.executable, "-m", "saekit", *_train_args(train_cache, killed, tokens)]
    step = kill_at_first_checkpoint(command, killed, ENV, timeout=300)
    assert 0 < step < 3000, "training was not killed mid-run"
    assert not (killed / "topk_w512_k16" / "sae_weights.safetensors").exists()

    # resumed with the paths spelled differently (issue 12: a trailing slash did not resume)
    respelled = [sys.executable, "-m", "saekit",
                 *_train_args(f"{train_cache}/.", f"{killed}/", tokens)]
    subprocess.run(respelled, env=ENV, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "saekit", *_train_args(train_cache, clean, tokens)],
                   env=ENV, check=True, capture_output=True)
    name = "topk_w512_k16"
    resumed, uninterrupted = (load_file(d / name / "sae_weights.safetensors")
                              for d in (killed, clean))
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    steps = [json.loads(l)["step"] for l in (killed / name / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 3001, 5))  # no step logged twice after the resume


def test_torchrun_two_processes_match_one(train_cache, tmp_path):
    tokens = str(64 * 40)
    single, double = tmp_path / "single", tmp_path / "double"
    archs = "topk,batchtopk"  # BatchTopK: selection and threshold over the global batch
    subprocess.run([sys.executable, "-m", "saekit",
                    *_train_args(train_cache, single, tokens, archs)],
                   env=ENV, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port=29517", "-m", "saekit"]
    result = subprocess.run([*torchrun, *_train_args(train_cache, double, tokens, archs)],
                            env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("topk_w512_k16", "batchtopk_w512_k16"):
        a, b = (load_file(d / name / "sae_weights.safetensors") for d in (single, double))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        assert not torch.equal(a["W_enc"], torch.zeros_like(a["W_enc"]))


def test_torchrun_refused_by_a_held_folder_stops_every_rank(train_cache, tmp_path):
    """Only rank 0 takes the output folder's lock; when it cannot, every rank stops at once
    with the reason (before, rank 1 waited in its first all-reduce until the timeout)."""
    from saekit.files import output_lock

    out = tmp_path / "held"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port=29519", "-m", "saekit"]
    with output_lock(out, "train"):
        result = subprocess.run([*torchrun, *_train_args(train_cache, out, str(64 * 10))],
                                env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert result.stderr.count("is in use by another saekit train") == 2, result.stderr[-3000:]


def test_resume_with_other_hyper_parameters(train_cache, tmp_path):
    out = tmp_path / "run"
    train(train_config(activations=str(train_cache), out=str(out), latents=[256], k=[8],
                      tokens=64 * 10, batch_size=64, checkpoint_every=5,
                      holdout_tokens=2048))
    with pytest.raises(TrainingError, match="k: checkpoint has \\[8\\], asked \\[16\\]"):
        train(train_config(activations=str(train_cache), out=str(out), latents=[256], k=[16],
                          tokens=64 * 10, batch_size=64, holdout_tokens=2048))


def test_k_not_below_latents():
    with pytest.raises(SAEConfigError, match="k"):
        from saekit.train import sweep_configs
        from saekit.sae import ARCHITECTURES, SAEMetadata
        config = train_config(latents=[64], k=[64])
        for cfg in sweep_configs(config, 640, SAEMetadata()).values():
            ARCHITECTURES[cfg.architecture](cfg)


def test_nan_in_activations_names_step_and_shard(train_cache, tmp_path):
    cache = tmp_path / "acts"
    shutil.copytree(train_cache, cache)
    shard = cache / "shard_00002.safetensors"
    tensors = load_file(shard)
    tensors["blocks.3.hook_resid_post"][5, 7, 3] = float("nan")
    save_file(tensors, shard)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][2].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NonFiniteActivationsError, match=r"At step \d+: Shard .*shard_00002"):
        train(train_config(activations=str(cache), out=str(tmp_path / "run"), latents=[256],
                          k=[8], tokens=64 * 200, batch_size=64, buffer_tokens=64 * 32,
                          holdout_tokens=2048))


def test_cache_smaller_than_one_batch(train_cache, tmp_path):
    with pytest.raises(TrainingError, match="fewer than one batch of 16384"):
        train(train_config(activations=str(train_cache), out=str(tmp_path / "run"),
                          tokens=16384 * 2, batch_size=16384))


def test_single_shard_cache_cannot_hold_out(train_cache, tmp_path, capsys):
    cache = tmp_path / "acts"
    shutil.copytree(train_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["n_rows"] = manifest["shards"][0]["rows"][1]
    manifest["n_tokens"] = manifest["n_rows"] * manifest["context"]  # a consistent manifest
    (cache / "manifest.json").write_text(json.dumps(manifest))
    config = train_config(activations=str(cache), out=str(tmp_path / "run"), latents=[256],
                         k=[8], tokens=256, batch_size=64, holdout_tokens=1024)
    with pytest.raises(TrainingError, match="1 shard, so none can be held out.*--holdout-tokens 0"):
        train(config)
    config.holdout_tokens = 0
    folder = train(config)["topk_w256_k8"]
    summary = json.loads((folder / "train_summary.json").read_text())
    assert set(summary["held_out"]) == {"dead_fraction_training"}
    assert not (folder / "sparsity.safetensors").exists()
    from saekit.cli import main  # the flag the error recommends works from the CLI too

    assert main(["train", "--activations", str(cache), "--out", str(tmp_path / "cli"),
                 "--latents", "256", "--k", "8", "--tokens", "256", "--batch-size", "64",
                 "--holdout-tokens", "0"]) == 0
    assert "no held-out tokens" in capsys.readouterr().out


def test_cli_reports_training_errors(tmp_path, capsys):
    from saekit.cli import main

    assert main(["train", "--activations", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not an activation cache" in capsys.readouterr().err


def test_every_architecture_setting_is_a_flag_and_reaches_the_saved_sae(train_cache, tmp_path):
    """Each architecture's own settings are `saekit train` flags; a sweep over a setting that
    is not the architecture's sweep field trains one SAE per value and names it."""
    from saekit.cli import main

    out = tmp_path / "run"
    argv = ["train", "--activations", str(train_cache), "--out", str(out),
            "--arch", "topk,jumprelu,relu,matryoshka", "--latents", "128", "--tokens", "640",
            "--batch-size", "64", "--holdout-tokens", "0", "--k", "8", "--aux-k", "16,32",
            "--aux-coefficient", "0.05", "--jumprelu-bandwidth", "0.1", "--jumprelu-init-l0",
            "20", "--l0-warmup-fraction", "0.5", "--jumprelu-threshold-lr-scale", "10",
            "--jumprelu-init-threshold", "0.02", "--l1-warmup-fraction", "0.3",
            "--decoder-init-norm", "0.2", "--matryoshka-prefixes", "3",
            "--matryoshka-growth", "2"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir() if (p / "cfg.json").exists())
    assert names == ["jumprelu_w128_l01", "matryoshka_w128_k8_aux_k16",
                     "matryoshka_w128_k8_aux_k32", "relu_w128_l15", "topk_w128_k8_aux_k16",
                     "topk_w128_k8_aux_k32"]
    assert load_sae(out / "matryoshka_w128_k8_aux_k16").widths == [32, 64, 128]
    jump = load_sae(out / "jumprelu_w128_l01").cfg.options
    assert (jump.jumprelu_bandwidth, jump.jumprelu_init_l0, jump.l0_warmup_fraction,
            jump.jumprelu_threshold_lr_scale, jump.jumprelu_init_threshold,
            jump.aux_coefficient) == (0.1, 20, 0.5, 10.0, 0.02, 0.05)
    relu = load_sae(out / "relu_w128_l15").cfg.options
    assert (relu.l1_warmup_fraction, relu.decoder_init_norm) == (0.3, 0.2)
    for aux_k in (16, 32):
        topk = load_sae(out / f"topk_w128_k8_aux_k{aux_k}").cfg.options
        assert (topk.k, topk.aux_k, topk.aux_coefficient) == (8, aux_k, 0.05)


def test_a_setting_of_an_architecture_not_trained_is_refused(tmp_path, capsys):
    from saekit.cli import main

    argv = ["train", "--activations", str(tmp_path), "--out", str(tmp_path / "o"),
            "--arch", "relu", "--k", "8"]
    assert main(argv) == 2
    assert "--k is a setting of batchtopk, matryoshka, topk, and this run trains relu" in \
        capsys.readouterr().err
    with pytest.raises(SAEConfigError, match="--jumprelu-bandwidth must be > 0"):
        train_config(arch=["jumprelu"], jumprelu_bandwidth=[0.0])


def test_checkpoints_from_before_architecture_options_still_resume():
    """A checkpoint key that held k and the coefficients as fields compares equal to today's."""
    from saekit.train import _upgrade_legacy_sweep

    today = train_config(activations="a", arch=["topk", "relu"], k=[8],
                         l1_coefficient=[2.0]).resume_key()
    legacy = {k: v for k, v in today.items() if k != "sweep"} | {
        "k": [8], "l1_coefficient": [2.0], "l0_coefficient": [1.0], "aux_coefficient": 1 / 32}
    _upgrade_legacy_sweep(legacy)
    assert legacy == today


def test_numpy_sweep_values_and_options_by_keyword():
    """Review: numpy values in a sweep reached the checkpoint key (which then would not load);
    ``options=`` given to the helpers collided with the settings given by name."""
    import numpy as np

    config = train_config(activations="a", options={"k": [np.int64(16)]}, aux_k=[np.int64(64)])
    key = config.resume_key()["sweep"]["topk"]
    assert key["k"] == [16] and type(key["k"][0]) is int and key["aux_k"] == [64]


def test_a_non_finite_loss_is_reported_at_the_first_step_it_happened():
    """Steps record non-finite losses on the device (no host sync); the check, run before
    logging or saving, names the first such step and its non-finite terms."""
    run = Run("topk_w64_k4", None, None, torch.zeros(64, dtype=torch.long))
    config = train_config(out="x", activations="c", lr=0.5)
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf")]):
        run.note_nonfinite({"fvu": torch.tensor(0.5), "loss": torch.tensor(value)}, step)
        if step == 1:
            check_finite_losses([run], config)  # nothing yet
    with pytest.raises(TrainingError, match=r"topk_w64_k4: the loss became non-finite at step "
                                            r"2 \(\{'loss': nan\}\)"):
        check_finite_losses([run], config)


def test_non_finite_parameters_are_named_and_refused():
    """``check_finite_parameters`` (run by ``train`` on every rank before a checkpoint and at
    the end) names the SAE and the tensor. That every torchrun rank runs it is not tested
    here (it would take a two-process run driven to non-finite parameters)."""
    from saekit.sae import SAEConfig, TopKSAE

    sae = TopKSAE(SAEConfig("topk", d_in=8, d_sae=16, options={"k": 2}))
    run = Run("topk_w16_k2", sae, None, torch.zeros(16, dtype=torch.long))
    check_finite_parameters([run], 3)  # finite: nothing raised
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"topk_w16_k2: parameters \['W_dec'\] are "
                                            r"non-finite after step 3"):
        check_finite_parameters([run], 3)
