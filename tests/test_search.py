"""Finding features by their explanations: `search_features` and `saekit search`, on real
explanations.jsonl files (the format `saekit explain` writes)."""

from __future__ import annotations

import json

import pytest

from saekit import cli
from saekit.errors import ConfigError, SaekitError
from saekit.search import (FeatureMatch, SearchConfig, by_feature, load_explanations,
                           search_features)


def record(feature: int, explanation: str, detection: float | None = None,
           fuzzing: float | None = None, sae: str = "/sae/a") -> dict:
    scores = {name: {"balanced_accuracy": value, "auroc": value, "n_activating": 10}
              for name, value in (("detection", detection), ("fuzzing", fuzzing))
              if value is not None}
    return {"feature": feature, "explanation": explanation, "scores": scores,
            "examples": {"shown": ["3:4"]}, "logit_lens": [" cheese"], "sae": sae,
            "explainer": "smollm2-135m-instruct", "prompt_version": "explain-v1"}


RECORDS = [
    record(1, "cheese and other dairy foods", 0.70),
    record(2, "Cheeses, butter and milk", 0.95),
    record(3, "fish and rivers", 0.99),
    record(4, "goat CHEESE salad", 0.60, fuzzing=0.90),  # mean 0.75
    record(5, "dairy farming", None),
    record(6, "the word 'in' before a year", 0.80),
    record(7, "cheese", None),
]


def write(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


@pytest.fixture
def explanations(tmp_path):
    path = tmp_path / "explain" / "explanations.jsonl"
    path.parent.mkdir()
    write(path, RECORDS)
    return path


def test_finds_and_ranks_by_match_then_score(explanations):
    found = search_features(explanations, "cheese")
    assert all(isinstance(m, FeatureMatch) for m in found)
    # the word itself (scored best first, unscored last), then a prefix ("Cheeses")
    assert [m.feature for m in found] == [4, 1, 7, 2]
    assert found[0].score == pytest.approx(0.75) and found[0].matched == ("cheese",)
    assert found[0].record.scores["fuzzing"]["balanced_accuracy"] == 0.90
    assert found[2].score is None and found[3].phrase is False
    # more query words matched beats a better score; the phrase beats both; "and" is ignored
    two = search_features(explanations, "Cheese and DAIRY")
    assert [m.feature for m in two] == [1, 2, 4, 5, 7]
    assert two[0].phrase is False and two[0].matched == ("cheese", "dairy")
    assert [m.feature for m in search_features(explanations, "fish")] == [3]
    assert search_features(explanations, "volcano") == []
    assert [m.feature for m in search_features(explanations, "cheese", top=2)] == [4, 1]


def test_a_folder_and_loaded_records_work_too(explanations):
    by_folder = search_features(explanations.parent, "dairy")
    by_records = search_features(load_explanations(explanations), "dairy")
    assert [m.feature for m in by_folder] == [m.feature for m in by_records] == [1, 5]


def test_the_last_record_of_a_feature_wins_and_sae_picks_records(tmp_path):
    path = tmp_path / "explanations.jsonl"
    write(path, [record(1, "old cheese", 0.5), record(1, "new cheese", 0.6),
                 record(1, "other sae's cheese", 0.9, sae=str(tmp_path.resolve() / "sae_b"))])
    assert [m.explanation for m in search_features(path, "cheese")] == ["other sae's cheese"]
    (tmp_path / "sae_b").mkdir()  # given as a path, the SAE is named as explain names it
    assert by_feature(load_explanations(path), sae="/sae/a")[1].explanation == "new cheese"
    assert by_feature(load_explanations(path), sae=tmp_path / "sae_b")[1].score == 0.9
    assert by_feature(load_explanations(path), sae="/elsewhere")[1].score == 0.9  # none: all


def test_a_torn_last_line_is_skipped_and_the_file_left_alone(explanations):
    text = explanations.read_text() + '{"feature": 8, "explanation": "chee'
    explanations.write_text(text)
    assert [r.feature for r in load_explanations(explanations)] == [r["feature"] for r in RECORDS]
    assert explanations.read_text() == text  # read-only: the explain run repairs its own file


@pytest.mark.parametrize("query", ["", "   ", "?!", None])
def test_an_empty_query_is_refused(explanations, query):
    with pytest.raises(ConfigError, match="no words"):
        search_features(explanations, query)
    with pytest.raises(ConfigError, match="--query"):
        SearchConfig(explanations=str(explanations), query=query or "")


@pytest.mark.parametrize("content, message", [
    (None, "No explanations file at"),
    ('{"feature": 1, "explanation": "x"}\nnot json\n{"feature": 2, "explanation": "y"}\n',
     "line 2 is not JSON"),
    ('{"feature": "1", "explanation": "x"}\n', "line 1 is not an explanation record"),
    ('[1, 2]\n', "line 1 is not an explanation record"),
    ('{"feature": -3, "explanation": "x"}\n', "line 1 is not an explanation record"),
    (b"\xff\xfe{}\n", "Cannot read"),
])
def test_bad_files_are_clean_errors(tmp_path, capsys, content, message):
    path = tmp_path / "explanations.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SaekitError, match=message):
        search_features(path, "cheese")
    assert cli.main(["search", "--explanations", str(path), "--query", "cheese"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saekit search: error: ") and message in err
    assert "Traceback" not in err and str(path) in err


def test_the_command_prints_the_best_matches(explanations, capsys):
    assert cli.main(["search", "--explanations", str(explanations.parent), "--query",
                     "cheese", "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 features match 'cheese', the best 2:"
    assert [line.split()[:2] for line in lines[2:]] == [["4", "0.750"], ["1", "0.700"]]
    assert cli.main(["search", "--explanations", str(explanations), "--query", "volcano"]) == 0
    assert capsys.readouterr().out == "no explanation matches 'volcano'\n"
    assert cli.main(["search", "--explanations", str(explanations), "--query", " "]) == 2
    assert "--query" in capsys.readouterr().err


def test_control_characters_are_not_printed(tmp_path, capsys):
    path = tmp_path / "explanations.jsonl"
    write(path, [record(1, "cheese\x1b[2J\x1b]0;pwned\x07 wheel")])
    assert cli.main(["search", "--explanations", str(path), "--query", "cheese"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "cheese" in out


def test_the_dashboard_refuses_a_bad_explanations_file_before_any_work(tmp_path, capsys):
    out = tmp_path / "site"
    bad = tmp_path / "explanations.jsonl"
    bad.write_text('{"feature": 1, "explanation": "x"}\n{oops}\n')
    for given, message in ((tmp_path / "missing.jsonl", "No explanations file at"),
                           (bad, "line 2 is not JSON")):
        assert cli.main(["dashboard", "--sae", str(tmp_path / "no_sae"), "--activations",
                         str(tmp_path / "no_cache"), "--out", str(out), "--explanations",
                         str(given)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not out.exists()


def test_concept_candidates_include_the_explained_features(explanations, tmp_path):
    """`saekit concept --explanations`: features explained as the concept join its candidates."""
    import torch

    from saekit.analyse import FeatureStatistics
    from saekit.concept import pool_candidates
    from saekit.concept_run import ConceptConfig, check_explained, explained_features
    from saekit.concept_texts import ConceptError
    from saekit.sae import TopKSAE, sae_config

    config = ConceptConfig(sae="/sae/a", name="cheese", keywords=["dairy*", "cheddar"],
                           out=str(tmp_path / "out"), explanations=str(explanations))
    config.check()
    assert explained_features(config, per_ranking=3) == [1, 2, 4]  # both words, then by score
    assert explained_features(ConceptConfig(name="x"), per_ranking=3) == []
    with pytest.raises(ConceptError, match="--explanations .* does not exist"):
        ConceptConfig(sae="s", name="x", keywords=["x"], out=str(tmp_path / "o"),
                      explanations=str(tmp_path / "missing.jsonl")).check()

    torch.manual_seed(0)
    sae = TopKSAE(sae_config("topk", 16, 8, k=2))
    with pytest.raises(ConceptError, match="explains feature 8, but the SAE has 8 features"):
        check_explained([1, 8], sae, config)
    n = sae.d_sae
    statistics = FeatureStatistics(torch.arange(n), 100, torch.full((n,), 0.1), torch.ones(n),
                                   torch.full((n,), 0.05), torch.zeros(n, 3))
    pooled = pool_candidates(sae, sae.W_dec.detach(), torch.randn(16), torch.randn(4, 16),
                             torch.randn(16), statistics, per_ranking=1, explained=[5, 6])
    sources = {c.feature: c.sources for c in pooled}
    assert sources[5][-1] == sources[6][-1] == "explanation"
    assert len(pooled) == len(sources)  # each feature once


def test_the_dashboard_command_shows_the_sae_s_explanations(small_capture, tmp_path, capsys):
    """`saekit dashboard --explanations`: this SAE's records win over another SAE's."""
    from saekit.sae import SAEMetadata, TopKSAE, sae_config

    sae = TopKSAE(sae_config("topk", 640, 32, k=4, metadata=SAEMetadata(
        model_name="gemma-3-270m", hook_name="blocks.6.hook_resid_post")))
    folder = sae.save(tmp_path / "sae")
    path = tmp_path / "explain" / "explanations.jsonl"
    path.parent.mkdir()
    write(path, [record(1, "this SAE's cheese", 0.8, sae=str(folder.resolve())),
                 record(1, "another SAE's quokka", 0.9, sae="/elsewhere"),
                 record(2, "<script>alert(1)</script>", 0.7, sae=str(folder.resolve()))])
    out = tmp_path / "site"
    assert cli.main(["dashboard", "--sae", str(folder), "--activations", str(small_capture),
                     "--features", "0:3", "--out", str(out), "--n-examples", "2",
                     "--explanations", str(path.parent)]) == 0
    assert "3 features (2 with explanations)" in capsys.readouterr().out
    index = (out / "index.html").read_text()
    assert "this SAE&#x27;s cheese" in index and "quokka" not in index
    assert "<script>alert" not in index and "&lt;script&gt;alert(1)" in index
    assert "No explanation of this feature" in (out / "feature_0.html").read_text()
