"""Training on the fly (no cache): the model reads the corpus as training goes. Same SAE as
training on a cache of the same rows, several hooks from one forward, kill -9 and rerun ends
bit-identical, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from kill import kill_at_first_checkpoint
from safetensors.torch import load_file

from saekit import CaptureConfig, capture_activations
from saekit.cli import main
from saekit.errors import ConfigError
from saekit.model_stream import rows_to_read
from saekit.sae import load_sae
from saekit.train import open_stream, train, train_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]  # shallow: a quick forward
NAME = "topk_w128_k8"
# rows of 32 tokens read 4 at a time, shuffled in units of 8 rows, 8 such units per group
READING = dict(context=32, batch_rows=4, shard_rows=8)
SETTINGS = dict(**READING, latents=[128], k=[8], tokens=64 * 40, batch_size=64,
                holdout_tokens=512, buffer_tokens=2048, checkpoint_every=10, log_every=5,
                seed=2)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "sae_weights.safetensors")


def _same_weights(a: Path, b: Path) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), (key, a, b)


def _summary(folder: Path) -> dict:
    return json.loads((folder / "train_summary.json").read_text())["held_out"]


def test_on_the_fly_equals_training_on_a_cache_of_the_same_rows(model, tmp_path):
    config = train_config(out=str(tmp_path / "fly"), hook=HOOKS[:1], **SETTINGS)
    source, stream, holdout = open_stream(config, model=model)
    n_rows = len(source.tokens())
    train_rows, held_rows = rows_to_read(config.tokens, config.holdout_tokens, 32, 8)
    assert held_rows == 16 and n_rows >= train_rows + held_rows and n_rows % 8 == 0
    assert len(holdout) == 2 and stream.batches_per_epoch() >= config.steps  # one epoch
    cache = capture_activations(
        CaptureConfig(hooks=HOOKS[:1], tokens=n_rows * 32, seed=2, **READING),
        tmp_path / "cache", model=model)
    fly = train(config, model=model)[NAME]
    cached_settings = {k: v for k, v in SETTINGS.items() if k not in READING}
    cached = train(train_config(out=str(tmp_path / "cached"), activations=str(cache),
                                **cached_settings))[NAME]
    _same_weights(fly, cached)
    assert _summary(fly) == _summary(cached)
    assert 0 < _summary(fly)["fvu"] < 1 and _summary(fly)["tokens"] > 400  # 16 held-out rows
    meta = load_sae(fly).cfg.metadata
    assert (meta.hook_name, meta.context_size, meta.dataset_path) == (HOOKS[0], 32, "default")


def test_two_hooks_on_the_fly_equal_one_run_per_hook(model, tmp_path):
    both = train(train_config(out=str(tmp_path / "both"), hook=HOOKS, **SETTINGS), model=model)
    for hook in HOOKS:
        alone = train(train_config(out=str(tmp_path / hook), hook=[hook], **SETTINGS),
                      model=model)[NAME]
        _same_weights(both[f"{hook}/{NAME}"], alone)
        assert _summary(both[f"{hook}/{NAME}"]) == _summary(alone)


def _command(out: Path, tokens: int, batch_rows: int = 4,
             launcher: tuple[str, ...] = (sys.executable, "-m")) -> list[str]:
    return [*launcher, "saekit", "train", "--hook", HOOKS[0], "--out", str(out),
            "--context", "32", "--batch-rows", str(batch_rows), "--shard-rows", "8",
            "--latents", "128",
            "--k", "8", "--tokens", str(tokens), "--batch-size", "64", "--holdout-tokens", "512",
            "--buffer-tokens", "2048", "--checkpoint-every", "10", "--log-every", "5"]


def test_killed_on_the_fly_training_resumes_bit_identical(tmp_path):
    tokens = 64 * 120  # 120 steps; a shuffle group is ~31 batches, so a kill lands mid-group
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    step = kill_at_first_checkpoint(_command(killed, tokens), killed, ENV)
    assert 0 < step < 120, "training was not killed mid-run"
    subprocess.run(_command(killed, tokens), env=ENV, check=True, capture_output=True)
    subprocess.run(_command(clean, tokens), env=ENV, check=True, capture_output=True)
    _same_weights(killed / NAME, clean / NAME)
    steps = [json.loads(line)["step"]
             for line in (killed / NAME / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 121, 5))


@pytest.mark.slow  # three model loads and a torchrun start: ~3 minutes here
def test_torchrun_on_the_fly_each_rank_reading_its_rows_matches_one_process(tmp_path):
    # one row per forward, so a row's activations do not depend on which rank reads it
    single, double = tmp_path / "single", tmp_path / "double"
    subprocess.run(_command(single, 64 * 40, batch_rows=1), env=ENV, check=True,
                   capture_output=True)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port=29523", "-m")
    result = subprocess.run(_command(double, 64 * 40, batch_rows=1, launcher=torchrun),
                            env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _weights(single / NAME), _weights(double / NAME)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert _summary(single / NAME)["fvu"] == pytest.approx(_summary(double / NAME)["fvu"],
                                                           abs=1e-4)


def test_on_the_fly_needs_a_hook_and_keeps_its_settings(model, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "--tokens", "2048"]) == 2
    assert "needs the hook(s) to read" in capsys.readouterr().err
    config = train_config(out=str(tmp_path / "run"), hook=HOOKS[:1], **SETTINGS)
    train(replace(config, tokens=64 * 10), model=model)
    with pytest.raises(Exception, match="context: checkpoint has 32, asked 64"):
        train(replace(config, tokens=64 * 10, context=64), model=model)
    with pytest.raises(ConfigError, match="text-field is empty"):
        train_config(out="x", hook=HOOKS[:1], text_field=" ")
    with pytest.raises(ConfigError, match="--context, --model-dtype: how the model reads"):
        train_config(out="x", activations="cache", model_dtype="bfloat16", context=64)
    with pytest.raises(ConfigError, match=r"blocks.1.mlp.hook_post gives activations shaped "
                                          r"\[1, 2, 2048\].*not \[batch, seq, d_model = 640\]"):
        train(replace(config, out=str(tmp_path / "mlp"), hook=["blocks.1.mlp.hook_post"]),
              model=model)
    assert not (tmp_path / "mlp" / "checkpoint.pt").exists()
