"""``saekit concept``: keyword retrieval over token rows, the concept's vocabulary, and the
whole search on the real model with an SAE that has one planted concept feature among random
ones: it must find that feature, whose edit raises the probability of the concept's words most."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from saekit.cli import main
from saekit.concept import (ConceptSearch, decoder_directions, find_concept_steering,
                            residual_scale)
from saekit.concept_texts import (ConceptError, concept_texts, concept_token_ids,
                                  find_mentions, keyword_list)
from saekit.concept_run import ConceptConfig
from saekit.corpus import load_corpus, pack_token_rows
from saekit.sae import sae_config, SAEMetadata, TopKSAE
from saekit.specialize import (SpecializeConfig, most_changed_features, specialize_sae,
                               unfold_activation_scale)

HOOK = "blocks.6.hook_resid_post"
PLANTED = 7
KEYWORDS = ["cheese*", "cheddar"]


@pytest.fixture(scope="module")
def rows(model):
    """60k tokens of the default corpus as 128-token rows."""
    return pack_token_rows(load_corpus("default"), model.tokenizer, 470, 128)


@pytest.fixture(scope="module")
def planted(model, rows, tmp_path_factory):
    """A TopK SAE (512 random latents) whose latent 7 reads and writes the cheese direction:
    the mean activation around 'cheese' mentions minus the mean over ordinary rows."""
    from saekit.concept import window_activations

    texts = concept_texts(rows, model.tokenizer, KEYWORDS, max_texts=32)
    concept = window_activations(model, HOOK, texts.windows)
    ordinary = window_activations(model, HOOK, [r[1:] for r in rows[:16]])
    direction = F.normalize(concept.mean(0) - ordinary.mean(0), dim=0)
    sae = TopKSAE(sae_config("topk", 640, 512, k=16, metadata=SAEMetadata(
        hook_name=HOOK, model_name="gemma-3-270m")))
    sae.init_from_data(ordinary)
    with torch.no_grad():
        sae.W_dec[PLANTED] = direction
        sae.W_enc[:, PLANTED] = direction / residual_scale(ordinary)
    folder = tmp_path_factory.mktemp("planted") / "sae"
    sae.save(folder)
    return folder, sae


def test_mentions_map_to_the_keyword_tokens(model, rows):
    found = find_mentions(rows, model.tokenizer, KEYWORDS, model.tokenizer.bos_token_id)
    assert found
    for row, first, last in found[:20]:
        text = model.tokenizer.decode(rows[row, first:last + 1].tolist()).lower()
        assert "chees" in text or "cheddar" in text
    texts = concept_texts(rows, model.tokenizer, KEYWORDS, max_texts=5)
    assert len(texts.texts) == 5 and texts.n_mentions == len(found)
    assert all("chees" in t.lower() or "cheddar" in t.lower() for t in texts.texts)
    assert all(model.tokenizer.bos_token_id not in w.tolist() for w in texts.windows)


def test_no_mention_is_a_clear_error_naming_the_count(model, rows):
    with pytest.raises(ConceptError, match=r"occur 0 times in the 60,160 tokens"):
        concept_texts(rows, model.tokenizer, ["zqxwvplonk"])
    with pytest.raises(ConceptError, match="at least one keyword"):
        keyword_list(" , ")


def test_concept_token_ids_start_the_keywords(model):
    tokenizer = model.tokenizer
    ids = concept_token_ids(tokenizer, ["cheese*"])
    assert tokenizer(" cheese", add_special_tokens=False)["input_ids"][0] in ids
    assert tokenizer(" Cheese", add_special_tokens=False)["input_ids"][0] in ids
    assert all(len(tokenizer.decode([i]).strip()) >= 3 for i in ids)


def test_decoder_directions_are_what_one_unit_adds(planted):
    _, sae = planted
    directions = decoder_directions(sae)
    one = torch.zeros(1, sae.d_sae)
    one[0, 3] = 1.0
    torch.testing.assert_close(directions[3], (sae.decode(one) - sae.decode(one * 0))[0])


def test_search_finds_the_planted_feature_and_it_steers(model, planted, rows):
    folder, sae = planted
    from saekit.analyse import ModelSource, feature_statistics
    from saekit.concept import window_activations

    sample = rows[:16]
    statistics = feature_statistics(sae, ModelSource(model, sample))
    reference = window_activations(model, HOOK, [r[1:] for r in sample])
    search = ConceptSearch(candidates_per_ranking=4, groups=[1], strengths=[1.0, 2.0, 3.0],
                           screen_strengths=[2.0, 3.0],
                           max_new_tokens=12, samples_per_prompt=1)
    prompts = ["I think that", "Tell me about your weekend.", "My favourite place is"]
    result = find_concept_steering(model, sae, rows, reference, statistics, "cheese", KEYWORDS,
                                   search=search, validation_prompts=prompts[:2] + ["Here is"],
                                   evaluation_prompts=prompts, evaluation_samples=2)
    assert result["features"] == [PLANTED]
    lifts = {c["feature"]: max(c["screen_lift"]) for c in result["candidates"]}
    assert lifts[PLANTED] == max(lifts.values()) and lifts[PLANTED] > 1.0  # log p(cheese) up
    assert result["n_generations"] == 6 and len(result["samples"]["steered"]) == 6
    assert {"concept", "keywords", "features", "values", "unsteered", "steered",
            "n_generations", "samples"} <= set(result)
    sources = {c["feature"]: c["sources"] for c in result["candidates"]}
    assert "alignment" in sources[PLANTED]


def test_cli_writes_concept_json_and_rejects_bad_input(planted, tmp_path, capsys):
    folder, _ = planted
    out = tmp_path / "out"
    common = ["concept", "--sae", str(folder), "--name", "cheese", "--out", str(out),
              "--tokens", "20000", "--statistics-rows", "4"]
    assert main(common + ["--keywords", "zqxwvplonk"]) == 2
    assert "occur 0 times" in capsys.readouterr().err
    assert not out.exists()
    assert main(common + ["--keywords", "cheese", "--strengths=-1,2"]) == 2
    assert "--strengths must be > 0, got -1.0" in capsys.readouterr().err
    assert main(common + ["--keywords", "cheese", "--strengths", "nan"]) == 2
    assert not out.exists()
    assert main(common + ["--keywords", "cheese*,cheddar", "--groups", "1,2", "--strengths",
                          "2", "--max-new-tokens", "6", "--samples-per-prompt", "1",
                          "--evaluation-samples", "1",
                          "--candidates-per-ranking", "2"]) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "concept.json").read_text())
    assert written["concept"] == "cheese" and written["n_generations"] == 10
    assert "unsteered" in printed and "steered" in printed
    assert sorted(p.name for p in out.iterdir()) == ["concept.json"]


def test_sae_hook_the_model_lacks_is_a_clear_error(planted, tmp_path, capsys):
    _, sae = planted
    sae.cfg.metadata.hook_name = "blocks.40.hook_resid_post"
    try:
        folder = tmp_path / "bad"
        sae.save(folder)
    finally:
        sae.cfg.metadata.hook_name = HOOK
    out = tmp_path / "out"
    assert main(["concept", "--sae", str(folder), "--name", "x", "--keywords", "cheese",
                 "--out", str(out)]) == 2
    assert "layer 40" in capsys.readouterr().err
    assert not out.exists()


def test_config_checks_before_any_work():
    with pytest.raises(ConceptError, match="--sae"):
        ConceptConfig(name="x", keywords=["a"], out="o").check()
    with pytest.raises(ConceptError, match="--target-rate"):
        ConceptSearch(target_rate=1.5)
    with pytest.raises(ConceptError, match="--temperature"):
        ConceptSearch(temperature=float("nan"))
    with pytest.raises(ConceptError, match="--concept-fraction"):
        SpecializeConfig(concept_fraction=1.0)
    with pytest.raises(ConceptError, match="--specialize-lr"):
        SpecializeConfig(specialize_lr=float("inf"))


def test_unfolding_the_activation_scale_keeps_every_output():
    torch.manual_seed(0)
    sae = TopKSAE(sae_config("topk", 64, 256, k=8,
                            normalize_activations="expected_average_only_in"))
    x = torch.randn(512, 64) * 300 + 40
    sae.init_from_data(x)
    trained_scale = sae.cfg.activation_scale
    sae.fold_activation_scale()
    before = sae(x)
    unfold_activation_scale(sae, x)
    assert sae.cfg.normalize_activations != "none"
    assert sae.cfg.activation_scale == pytest.approx(trained_scale, rel=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))
    after = sae(x)
    torch.testing.assert_close(after[1], before[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[0], before[0], rtol=1e-4, atol=1e-2)


def test_specialising_learns_the_concept_and_keeps_ordinary_text(model, rows):
    """An SAE with no concept feature (random latents), fine-tuned on cheese windows mixed with
    ordinary rows, reconstructs cheese text much better and ordinary text about as well."""
    from saekit.concept import window_activations

    texts = concept_texts(rows, model.tokenizer, KEYWORDS, max_texts=48)
    concept = window_activations(model, HOOK, texts.windows)
    ordinary = window_activations(model, HOOK, [r[1:] for r in rows[100:140]])
    torch.manual_seed(0)
    sae = TopKSAE(sae_config("topk", 640, 512, k=16, metadata=SAEMetadata(hook_name=HOOK),
                            normalize_activations="expected_average_only_in"))
    sae.init_from_data(ordinary)
    sae.fold_activation_scale()
    tuned, report = specialize_sae(sae, concept, ordinary,
                                   SpecializeConfig(specialize_steps=150, specialize_lr=1e-3,
                                                    specialize_batch=256))
    assert report["fvu_concept_after"] < 0.8 * report["fvu_concept_before"]
    assert report["fvu_ordinary_after"] < 1.1 * report["fvu_ordinary_before"]
    assert tuned.cfg.normalize_activations == "none"  # saved like any trained SAE
    assert not torch.equal(tuned.W_dec, sae.W_dec)  # a copy was tuned, not the input
    rising = most_changed_features(sae, tuned, concept, top=3)
    assert rising[0]["mean_after"] > rising[0]["mean_before"]


def test_specialize_finds_a_concept_the_corpus_never_mentions(planted, tmp_path, capsys):
    """--specialize: texts come from the model's own continuations of prompts naming the
    concept, the SAE is fine-tuned on them and saved, and the search runs on that SAE."""
    folder, _ = planted
    out = tmp_path / "out"
    assert main(["concept", "--sae", str(folder), "--name", "Zorblaxia", "--keywords",
                 "Zorblax*", "--out", str(out), "--tokens", "20000", "--statistics-rows", "4",
                 "--specialize", "--generations", "6", "--generation-tokens", "8",
                 "--specialize-steps", "5", "--specialize-batch", "64", "--groups", "1",
                 "--strengths", "1", "--max-new-tokens", "6", "--samples-per-prompt", "1",
                 "--evaluation-samples", "1",
                 "--candidates-per-ranking", "2"]) == 0
    written = json.loads((out / "concept.json").read_text())
    tuned = out / "specialized_sae"
    assert written["sae"] == str(tuned) and (tuned / "cfg.json").exists()
    report = json.loads((tuned / "specialize.json").read_text())
    assert report["corpus_mentions"] == 0 and len(report["generated_texts"]) == 6
    assert all("Zorblaxia" in t for t in report["generated_texts"])
    assert written["retrieval"]["n_texts"] == 6
    assert written["specialization"]["fvu_ordinary_after"] > 0
