"""Corpora (default mix, local files) and models from local Hugging Face folders."""

from __future__ import annotations

import itertools
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from saekit import CaptureConfig, ActivationCache, capture_activations, load_corpus, load_model
from saekit.corpus import pack_token_rows
from saekit.default_corpus import (DEFAULT_SOURCES, default_corpus, package_folder,
                                   split_long_document)
from saekit.errors import CorpusError
from saekit.model import resolve_model_path


def test_default_mix_keeps_its_shares_and_is_seeded():
    first = list(itertools.islice(default_corpus(seed=0), 3000))
    again = list(itertools.islice(default_corpus(seed=0), 3000))
    other = list(itertools.islice(default_corpus(seed=1), 3000))
    assert first == again and first != other
    readers = {s.name: {p for d in s.read(package_folder(s.module, s.package))
                        for p in split_long_document(d)} for s in DEFAULT_SOURCES}
    chars = {name: sum(len(d) for d in first if d in docs) for name, docs in readers.items()}
    total = sum(chars.values())
    for source in DEFAULT_SOURCES:
        assert abs(chars[source.name] / total - source.share) < 0.02, (source.name, chars)
    assert any("Golden Gate" in d for d in readers["wikipedia"])
    assert max(len(d) for d in first) < 20_000
    assert not any("<p>" in d or "&amp;" in d for d in readers["factbook"])


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_go_through_datasets(tmp_path, kind):
    docs = ["The first document is about bridges.", "The second one is about fish."]
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        pq.write_table(pa.table({"text": docs}), path)
    assert [d.strip() for d in load_corpus(str(path))] == docs


def test_missing_text_field_names_the_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(CorpusError, match=r"no field 'text'; its fields are \['body'\]"):
        list(load_corpus(str(path)))


def test_rows_start_with_bos_and_pack_documents(model):
    tok = model.tokenizer
    docs = ["alpha beta gamma " * 30, "delta epsilon " * 40, "zeta eta " * 50]
    rows = pack_token_rows(iter(docs), tok, n_rows=5, context=32, batch_documents=2)
    assert rows.shape == (5, 32)
    assert (rows[:, 0] == tok.bos_token_id).all()
    stream = torch.cat([r[1:] for r in rows]).tolist()
    assert tok.bos_token_id in stream  # a document boundary inside a row
    assert tok.decode(stream[:10]).startswith("alpha beta gamma")


@pytest.fixture(scope="module")
def tiny_local_model(tmp_path_factory):
    """A 2-layer random Gemma 3 saved as a plain Hugging Face folder, with the real tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("tiny-gemma")
    embedded = resolve_model_path("gemma-3-270m")
    config = Gemma3TextConfig(vocab_size=262144, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=32, sliding_window=16, layer_types=["sliding_attention",
                              "full_attention"], architectures=["Gemma3ForCausalLM"])
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{embedded}/{name}", folder / name)
    return folder


def test_local_hf_folder_loads_through_the_same_path(tiny_local_model, tmp_path):
    from transformers import AutoModelForCausalLM

    bridge = load_model(str(tiny_local_model))
    assert bridge.cfg.n_layers == 2 and bridge.cfg.d_model == 64
    out = capture_activations(
        CaptureConfig(model=str(tiny_local_model), hooks=["blocks.1.hook_resid_pre"],
                      tokens=4 * 32, context=32, batch_rows=2, shard_rows=4), tmp_path / "a")
    cache = ActivationCache.open(out)
    hf = AutoModelForCausalLM.from_pretrained(tiny_local_model).eval()
    with torch.no_grad():
        expected = hf(cache.tokens(), output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(cache.load_shard(0), expected, rtol=1e-4, atol=1e-5)


def test_unknown_model_name_says_what_to_pass(tmp_path):
    from saekit import ModelLoadError

    with pytest.raises(ModelLoadError, match="embedded default"):
        load_model(str(tmp_path / "no-such-model-folder-and-no-hub"))
