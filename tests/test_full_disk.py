"""A real full disk (a small tmpfs, grown after the failure): the run stops with a clean error,
leaves nothing half-written, and the same command then completes (issue 12: a full disk during
training left a torn metrics.jsonl that blocked every rerun; OSError gave tracebacks)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from saekit import cli
from saekit.cache import ActivationCache
from saekit.capture import CaptureConfig, capture_activations
from saekit.files import TMP_MARK

HOOK = "blocks.6.hook_resid_post"


@pytest.fixture
def small_disk(tmp_path):
    """``(mount point, resize)``: a 256 KiB tmpfs; ``resize("64m")`` frees space. Needs root
    (CI runs as root); skipped where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def half_written(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TMP_MARK in p.name]


def test_capture_on_a_full_disk_then_after_freeing_space(model, small_disk):
    disk, resize = small_disk
    config = CaptureConfig(hooks=[HOOK], tokens=32 * 64, context=64, batch_rows=8, shard_rows=8)
    with pytest.raises(OSError) as failed:  # one 8-row shard is 1.3 MB
        capture_activations(config, disk / "acts", model=model)
    assert failed.value.errno == errno.ENOSPC
    assert not half_written(disk)
    resize("64m")
    capture_activations(config, disk / "acts", model=model)
    cache = ActivationCache.open(disk / "acts")  # complete, every shard's checksum verified
    assert cache.tokens().shape == (32, 64)
    assert not half_written(disk)


def test_training_on_a_full_disk_then_after_freeing_space(small_capture, small_disk, capsys):
    disk, resize = small_disk
    argv = ["train", "--activations", str(small_capture), "--hook", HOOK, "--out",
            str(disk / "sae"), "--latents", "128", "--k", "8", "--tokens", str(64 * 40),
            "--batch-size", "64", "--log-every", "1", "--checkpoint-every", "10",
            "--holdout-tokens", "512"]
    assert cli.main(argv) == 2  # the first checkpoint (~2 MB with Adam's state) does not fit
    assert "No space left on device" in capsys.readouterr().err
    assert not half_written(disk)
    resize("64m")
    assert cli.main(argv) == 0
    folder = disk / "sae" / "topk_w128_k8"
    steps = [json.loads(line)["step"] for line in
             (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # every line whole, none twice
    assert (folder / "sae_weights.safetensors").exists() and not half_written(disk)
