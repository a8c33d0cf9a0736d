"""Defects found by the hostile-input campaign of issue 12 (damaged caches and SAE folders,
devices, datasets, API types): each was a traceback, a silently wrong result or a state that
blocked every rerun; each is now a clean saekit error or a repair."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from saekit import ActivationCache, CaptureConfig, capture_activations, cli
from saekit.corpus import load_corpus, pack_token_rows
from saekit.errors import ConfigError, CorpusError, CorruptCacheError, SaekitError
from saekit.sae import SAEMetadata, TopKSAE, load_sae, sae_config
from saekit.steer import Intervention, SteeringError
from saekit.steer_eval import steering_sweep
from saekit.train import TrainConfig, train

HOOKS = ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]


def small_config() -> CaptureConfig:
    """The settings ``small_capture`` was made with."""
    return CaptureConfig(hooks=HOOKS, tokens=48 * 64, context=64, batch_rows=4, shard_rows=8)


def copied(small_capture, tmp_path, change=None):
    out = tmp_path / "acts"
    shutil.copytree(small_capture, out)
    if change:
        manifest = json.loads((out / "manifest.json").read_text())
        change(manifest)
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_rerunning_the_capture_repairs_a_damaged_shard_of_a_complete_cache(
        small_capture, tmp_path, model):
    """It used to say 'run the same command again', and that command failed the same way."""
    out = copied(small_capture, tmp_path)
    shard = out / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CorruptCacheError, match="truncated or altered"):
        ActivationCache.open(out)
    capture_activations(small_config(), out, model=model)
    repaired, original = ActivationCache.open(out), ActivationCache.open(small_capture)
    for index in range(original.n_shards):
        torch.testing.assert_close(repaired.load_shard(index, HOOKS[1]),
                                   original.load_shard(index, HOOKS[1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device, named", [("tpu", "is not a device"), ("cuda:7", "no such"),
                                           ("", None)])
def test_devices_are_checked_with_the_config(device, named):
    if named is None:  # empty: the best available, as when the flag is left out
        assert TrainConfig(device=device).device == ""
        return
    with pytest.raises(ConfigError, match=f"--device.*{named}"):
        TrainConfig(device=device)


def test_an_unavailable_device_is_refused_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "acts"
    assert cli.main(["cache", "--tokens", "512", "--context", "64", "--device", "cuda",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "Traceback" not in err and not out.exists()


def test_a_hook_named_twice_is_captured_once():
    assert CaptureConfig(hooks=[HOOKS[1], HOOKS[1]]).hooks == [HOOKS[1]]


def test_an_empty_text_field_is_refused():
    with pytest.raises(ConfigError, match="--text-field is empty"):
        CaptureConfig(text_field=" ")


def test_a_malformed_jsonl_dataset_is_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match="bad.jsonl"):
        list(load_corpus(str(data)))


def test_a_corpus_of_whitespace_is_refused(tmp_path, model):
    data = tmp_path / "blank.txt"
    data.write_text("\n\n   \n\t\n\n" * 50)
    with pytest.raises(CorpusError, match="fewer than"):
        pack_token_rows(load_corpus(str(data)), model.tokenizer, 4, 64)


def test_a_non_text_field_is_named(tmp_path):
    data = tmp_path / "numbers.jsonl"
    data.write_text('{"text": 5}\n')
    with pytest.raises(CorpusError, match="holds int, not text"):
        list(load_corpus(str(data)))


@pytest.mark.parametrize("change, named", [
    (lambda m: m.update(d_model=320), r"\[rows, context, d_model\]"),
    (lambda m: m["shards"][0].update(rows=[0, 16]), "does not start where"),
    (lambda m: m.update(n_rows=96, n_tokens=96 * 64), "its shards hold 48 rows"),
    (lambda m: m.update(n_tokens=4096), "n_tokens 4096"),
])
def test_a_manifest_that_disagrees_with_its_shards_is_refused(small_capture, tmp_path, change,
                                                              named):
    """These trained silently on wrong data or crashed with an IndexError mid-training."""
    out = copied(small_capture, tmp_path, change)
    with pytest.raises(CorruptCacheError, match=named):
        ActivationCache.open(out).load_shard(0, HOOKS[1])


def test_a_damaged_checkpoint_is_set_aside_and_training_starts_over(small_capture, tmp_path,
                                                                     capsys):
    """It crashed with a zip-reader RuntimeError, and so did every rerun."""
    def config(out):
        return TrainConfig(activations=str(small_capture), out=str(out), hook=HOOKS[1],
                           latents=[64], options={"k": [4]}, tokens=1024, batch_size=64,
                           holdout_tokens=0)

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    trained = train(config(out))
    said = capsys.readouterr()
    assert "checkpoint.pt is damaged" in said.out + said.err  # tqdm.write, beside the bar
    assert (out / "checkpoint.pt.damaged").exists()
    fresh = train(config(tmp_path / "fresh"))
    torch.testing.assert_close(load_sae(next(iter(trained.values()))).W_dec,
                               load_sae(next(iter(fresh.values()))).W_dec)


@pytest.fixture
def saved(tmp_path):
    sae = TopKSAE(sae_config("topk", 16, 32, k=4, metadata=SAEMetadata(
        model_name="gemma-3-270m", hook_name="blocks.6.hook_resid_post")))
    return sae, sae.save(tmp_path / "sae")


@pytest.mark.parametrize("rewrite, named", [
    (lambda cfg: [], "holds list data"),
    (lambda cfg: {"cfg": cfg}, "needs d_in and d_sae"),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "d_sae"}, "needs d_sae"),
    (lambda cfg: cfg | {"d_in": "16"}, "d_in='16'"),
])
def test_a_cfg_json_of_the_wrong_shape_is_named(saved, rewrite, named):
    _, folder = saved
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(rewrite(cfg)))
    with pytest.raises(SaekitError, match=named):
        load_sae(folder)


def test_python_api_wrong_types_are_clean_errors(saved, model):
    from saekit import generate

    sae, _ = saved
    with pytest.raises(SaekitError, match="folder path"):
        load_sae(5)
    with pytest.raises(SaekitError, match="tensor"):
        sae.encode("hello")
    with pytest.raises(SteeringError, match="prompt as a non-empty string"):
        generate(model, None)
    with pytest.raises(SteeringError, match="integers, got True"):
        Intervention(sae, clamp={True: 2.0})
    with pytest.raises(SteeringError, match=r"write \['Hi there'\]"):
        steering_sweep(model, [[]], "Hi there", ["cat"])
    with pytest.raises(SteeringError, match="concept_keywords"):
        steering_sweep(model, [[]], ["Hi there"], "cat")


def test_an_sae_with_nan_weights_is_refused_at_load(saved):
    """`saekit eval` on it crashed while printing its report (second campaign run)."""
    from safetensors.torch import load_file, save_file

    _, folder = saved
    weights = load_file(folder / "sae_weights.safetensors")
    weights["W_dec"][0, 0] = float("nan")
    save_file(weights, folder / "sae_weights.safetensors")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["weights_sha256"]  # as a folder from another toolkit would be
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaekitError, match=r"\['W_dec'\] hold NaN"):
        load_sae(folder)


def test_a_binary_prompt_file_is_named(tmp_path):
    from saekit.steer_eval import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes(bytes([0xf5, 0xff, 0x00, 0x80]) * 8)
    with pytest.raises(SteeringError, match="prompts.txt is not UTF-8"):
        read_prompts(path)
