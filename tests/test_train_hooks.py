"""Several hooks in one training run: the same SAEs as one run per hook, per-hook folders,
metrics, held-out evaluation and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import saekit.train
from saekit.cli import main
from saekit.errors import CacheMismatchError, ConfigError, TrainingError
from saekit.sae import load_sae
from saekit.train import train, train_config

HOOKS = ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]
NAMES = ["topk_w64_k4", "topk_w64_k8"]
# 6 shards of 8 rows x 64 tokens: one held out, 5 x 8 x 63 = 2,520 training tokens (1 epoch+)
SETTINGS = dict(latents=[64], k=[4, 8], tokens=64 * 40, batch_size=64, checkpoint_every=10,
                log_every=5, holdout_tokens=512, buffer_tokens=1024, seed=3)


def _run(cache: Path, out: Path, hooks: list[str]) -> dict[str, Path]:
    return train(train_config(activations=str(cache), out=str(out), hook=hooks, **SETTINGS))


def _metrics(folder: Path) -> list[dict]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]


def _same_sae(a: Path, b: Path) -> None:
    """Same weights (bit for bit), same training log and held-out metrics."""
    first, second = load_sae(a), load_sae(b)
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(x, y), (a, name, float((x - y).abs().max()))
    assert _metrics(a) == _metrics(b)
    first, second = (json.loads((f / "train_summary.json").read_text()) for f in (a, b))
    assert first.pop("name") == f"{a.parent.name}/{a.name}" and second.pop("name") == b.name
    assert first == second


@pytest.fixture(scope="module")
def single_runs(small_capture, tmp_path_factory):
    """One run per hook, as before: folders named by the sweep alone."""
    root = tmp_path_factory.mktemp("single")
    runs = {hook: _run(small_capture, root / hook, [hook]) for hook in HOOKS}
    for hook, saved in runs.items():
        assert sorted(saved) == NAMES
        assert all(folder == root / hook / name for name, folder in saved.items())
    return runs


def test_two_hooks_in_one_run_equal_two_runs(small_capture, single_runs, tmp_path, capsys):
    out = tmp_path / "both"
    assert main(["train", "--activations", str(small_capture), "--out", str(out),
                 "--hook", HOOKS[0], "--hook", HOOKS[1], "--latents", "64", "--k", "4,8",
                 "--tokens", str(64 * 40), "--batch-size", "64", "--checkpoint-every", "10",
                 "--log-every", "5", "--holdout-tokens", "512", "--buffer-tokens", "1024",
                 "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    for hook in HOOKS:
        for name in NAMES:
            folder = out / hook / name
            assert f"{hook}/{name}: held-out FVU" in printed
            assert load_sae(folder).cfg.metadata.hook_name == hook
            _same_sae(folder, single_runs[hook][name])
    summary = json.loads((out / HOOKS[1] / NAMES[0] / "train_summary.json").read_text())
    assert 0 < summary["held_out"]["fvu"] < 1 and summary["steps"] == 40


def test_two_hook_run_resumes_after_a_crash(small_capture, single_runs, tmp_path, monkeypatch):
    out = tmp_path / "both"
    real_step = saekit.train.train_step

    def crash_at_25(run, batch, config, step, ranks):
        if step == 25:
            raise KeyboardInterrupt  # as a kill between checkpoints 20 and 30
        return real_step(run, batch, config, step, ranks)

    monkeypatch.setattr(saekit.train, "train_step", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        _run(small_capture, out, HOOKS)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 20
    monkeypatch.setattr(saekit.train, "train_step", real_step)
    saved = _run(small_capture, out, HOOKS)
    assert sorted(saved) == [f"{hook}/{name}" for hook in HOOKS for name in NAMES]
    for hook in HOOKS:
        for name in NAMES:
            _same_sae(saved[f"{hook}/{name}"], single_runs[hook][name])
    with pytest.raises(TrainingError, match="hook: checkpoint has .*blocks.6.*, asked "
                                            "'blocks.3.hook_resid_post'"):
        _run(small_capture, out, HOOKS[:1])


def test_hook_list_config():
    assert train_config(hook="blocks.6.hook_resid_post").hook == ["blocks.6.hook_resid_post"]
    assert train_config(hook=None).resume_key()["hook"] is None
    assert train_config(hook=HOOKS[:1]).resume_key()["hook"] == HOOKS[0]  # as before lists
    assert train_config(hook=[*HOOKS, HOOKS[0]]).hook == HOOKS
    with pytest.raises(ConfigError, match="--hook-out trains transcoders from one --hook"):
        train_config(hook=HOOKS, hook_out="blocks.6.hook_mlp_out")
    with pytest.raises(ConfigError, match="--hook takes a list"):
        train_config(hook=5)


def test_hook_not_in_cache_is_named(small_capture, tmp_path):
    with pytest.raises(CacheMismatchError, match="not 'blocks.9.hook_resid_post'"):
        _run(small_capture, tmp_path / "run", [HOOKS[0], "blocks.9.hook_resid_post"])
