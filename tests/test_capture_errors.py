"""Bad input to capture and to the cache gets a clear error, and leaves nothing behind."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from saekit import (ActivationCache, ActivationStream, CacheMismatchError, CaptureConfig,
                    CorpusError, CorruptCacheError, HookNameError, capture_activations)
from saekit.cli import main as saekit_main
from saekit.corpus import load_corpus
from saekit.default_corpus import CorpusSource, default_corpus


def _config(**changes) -> CaptureConfig:
    base = dict(hooks=["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"],
                tokens=48 * 64, context=64, batch_rows=4, shard_rows=8)
    return CaptureConfig(**{**base, **changes})


def test_unknown_hook_lists_nearest_names(model, tmp_path):
    with pytest.raises(HookNameError) as err:
        capture_activations(_config(hooks=["blocks.6.hook_resid_pots"]), tmp_path / "x",
                            model=model)
    assert "no hook 'blocks.6.hook_resid_pots'" in str(err.value)
    assert "blocks.6.hook_resid_post" in str(err.value)
    assert not (tmp_path / "x").exists()


def test_layer_beyond_the_model(model, tmp_path):
    with pytest.raises(HookNameError, match=r"layer 40, but the model has 18 layers \(0 to 17\)"):
        capture_activations(_config(hooks=["blocks.40.hook_resid_post"]), tmp_path / "x",
                            model=model)
    assert not (tmp_path / "x").exists()


def test_cli_reports_bad_hook_without_traceback(tmp_path, capsys):
    code = saekit_main(["cache", "--hook", "blocks.99.hook_resid_post", "--tokens", "256",
                        "--out", str(tmp_path / "x")])
    assert code == 2
    assert "layer 99" in capsys.readouterr().err


def test_empty_corpus(model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="fewer than 63 tokens"):
        capture_activations(_config(dataset=str(empty)), tmp_path / "x", model=model)
    assert not (tmp_path / "x").exists()


def test_missing_corpus_file(model, tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.jsonl"))


def test_missing_data_package_says_which_pip_install():
    missing = CorpusSource("poems", "saekit-no-such-poems", "saekit_no_such_poems", 1.0,
                           lambda folder: [])
    with pytest.raises(CorpusError, match="pip install saekit-no-such-poems"):
        next(default_corpus(0, sources=[missing]))


def test_out_holding_a_cache_for_other_settings(small_capture, model, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(small_capture, out)
    with pytest.raises(CacheMismatchError) as err:
        capture_activations(_config(tokens=96 * 64), out, model=model)
    assert "tokens: cache has 3072, asked 6144" in str(err.value)
    assert "Use another --out" in str(err.value)


def test_out_holding_other_files(model, tmp_path):
    out = tmp_path / "acts"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not an activation cache"):
        capture_activations(_config(), out, model=model)
    assert (out / "notes.txt").read_text() == "mine"


def test_truncated_shard_is_named(small_capture, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(small_capture, out)
    shard = out / "shard_00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CorruptCacheError, match="shard_00003.safetensors has 1000 bytes"):
        ActivationCache.open(out)


def test_altered_shard_is_named_by_the_stream(small_capture, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(small_capture, out)
    shard = out / "shard_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    stream = ActivationStream(ActivationCache.open(out), batch_size=64,
                              hook="blocks.6.hook_resid_post", buffer_tokens=64 * 8)
    with pytest.raises(CorruptCacheError, match="shard_00002.safetensors does not match its sha256"):
        for _ in stream.batches():
            pass


def test_manifest_listing_a_missing_shard(small_capture, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(small_capture, out)
    (out / "shard_00001.safetensors").unlink()
    with pytest.raises(CorruptCacheError, match="shard_00001.safetensors is listed in the manifest"):
        ActivationCache.open(out)


def test_incomplete_cache_refused_for_reading(small_capture, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(small_capture, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCacheError, match="incomplete"):
        ActivationCache.open(out)


def test_not_a_cache(tmp_path):
    with pytest.raises(CorruptCacheError, match="not an activation cache"):
        ActivationCache.open(tmp_path)


@pytest.mark.parametrize("change, named", [
    (lambda m: m.pop("d_model"), "'d_model'"),
    (lambda m: m.update(context="128"), "'context' is '128'"),
    (lambda m: m.update(n_rows=-5), "'n_rows' is -5"),
    (lambda m: m.update(hooks=[]), "'hooks' is []"),
    (lambda m: m.update(complete="yes"), "'complete'"),
    (lambda m: m["shards"][0].update(rows=[8, 0]), "shard entry 0"),
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), "shard entry 0"),
    (lambda m: m["shards"].append("x"), "shard entry"),
])
def test_a_damaged_manifest_names_the_key(small_capture, tmp_path, change, named):
    out = tmp_path / "acts"
    shutil.copytree(small_capture, out)
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCacheError, match=re.escape(named)):
        ActivationCache.open(out)


def test_the_typed_manifest_writes_back_what_it_read(small_capture):
    """Every key round-trips, including ones saekit does not know (kept in ``extra``)."""
    from saekit.manifest import CacheManifest

    data = json.loads((small_capture / "manifest.json").read_text())
    manifest = CacheManifest.from_dict(data | {"note": "re-sharded by hand"})
    assert manifest.to_dict() == data | {"note": "re-sharded by hand"}
    assert manifest.extra == {"note": "re-sharded by hand"}
    assert manifest.rows_done == manifest.n_rows and manifest.shards[0].n_rows > 0
