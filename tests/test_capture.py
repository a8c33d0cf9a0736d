"""Capture: exact activations, resume after SIGKILL, and the cache manifest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from saekit import ActivationCache, CaptureConfig, capture_activations
from saekit.cli import main as saekit_main
from saekit.model import load_hf_model

REPO = Path(__file__).resolve().parents[1]


def test_cli_capture_matches_transformers_hidden_states(tmp_path, capsys):
    out = tmp_path / "acts"
    code = saekit_main(["cache", "--model", "gemma-3-270m", "--hook", "blocks.6.hook_resid_post",
                        "--dataset", "default", "--tokens", "512", "--context", "128",
                        "--batch-rows", "2", "--out", str(out)])
    assert code == 0
    assert "wrote 512 tokens" in capsys.readouterr().out
    cache = ActivationCache.open(out)
    tokens = cache.tokens()
    acts = torch.cat([cache.load_shard(i) for i in range(cache.n_shards)])
    assert acts.shape == (4, 128, 640)
    assert (tokens[:, 0] == cache.manifest.bos_token_id).all()

    hf_model, _ = load_hf_model("gemma-3-270m")
    with torch.no_grad():
        # hidden_states[0] is the embedding output, so block 6's output is index 7
        expected = hf_model(tokens, output_hidden_states=True).hidden_states[7]
    relative = (acts - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert relative.max().item() <= 1e-4


def test_manifest_and_shards_describe_each_other(small_capture):
    cache = ActivationCache.open(small_capture)
    m = cache.manifest.to_dict()  # as other clients of the format read manifest.json
    assert m["complete"] and m["n_rows"] == 48 and m["context"] == 64 and m["d_model"] == 640
    assert m["hooks"] == ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]
    assert [e["rows"] for e in m["shards"]] == [[i, i + 8] for i in range(0, 48, 8)]
    assert m["saekit_version"] and m["dtype"] == "float32"
    shard = cache.load_shard(0, "blocks.3.hook_resid_post")
    assert shard.shape == (8, 64, 640) and torch.isfinite(shard).all()
    # the two hooks were captured in one pass but hold different layers
    assert not torch.equal(shard, cache.load_shard(0, "blocks.6.hook_resid_post"))


def _capture_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "saekit", "cache", "--hook", "blocks.2.hook_resid_post",
            "--tokens", str(96 * 32), "--context", "32", "--batch-rows", "4",
            "--shard-rows", "8", "--out", str(out)]


def _listed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_capture_killed_mid_run_resumes_to_identical_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_capture_command(killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _listed_shards(killed) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _listed_shards(killed)
    assert 0 < done_before < 12, "the capture was not killed mid-run"
    assert not ActivationCache.open(killed, require_complete=False).manifest.complete

    subprocess.run(_capture_command(killed), env=env, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(_capture_command(clean), env=env, check=True, capture_output=True)

    killed_files = sorted(p.name for p in killed.iterdir())
    assert killed_files == sorted(p.name for p in clean.iterdir())
    assert len([f for f in killed_files if f.startswith("shard_")]) == 12
    for name in killed_files:
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name


def test_resume_discards_unlisted_and_temporary_files(small_capture, tmp_path, model):
    """A shard written but not yet listed, and a temp file, are both redone on resume."""
    config = CaptureConfig(hooks=["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"],
                           tokens=48 * 64, context=64, batch_rows=4, shard_rows=8)
    out = tmp_path / "partial"
    shutil.copytree(small_capture, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:2]
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard_00002.safetensors").write_bytes(b"garbage from a killed run")
    (out / "shard_00003.safetensors.tmp-abc").write_bytes(b"half")
    capture_activations(config, out, model=model)
    assert not list(out.glob("*.tmp-*"))
    for name in ("manifest.json", "shard_00002.safetensors", "shard_00005.safetensors"):
        assert (out / name).read_bytes() == (small_capture / name).read_bytes()


def test_tokens_are_kept_for_every_row(small_capture, model):
    tokens = load_file(small_capture / "tokens.safetensors")["tokens"]
    assert tokens.shape == (48, 64) and tokens.dtype == torch.int32
    text = model.tokenizer.decode(tokens[1, 1:].tolist())
    assert len(text) > 50
