"""Steering evaluation: the keyword matcher, the curve's JSON and PNG, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from saekit.cli import build_parser
from saekit.sae import sae_config, SAEMetadata, TopKSAE
from saekit.steer import Intervention, SteeringError, SteeringVector
from saekit.steer_eval import (RESULT_JSON, RESULT_PNG, keyword_pattern, mention_rate,
                               read_prompts, steering_curve, steering_sweep)

HOOK = "blocks.6.hook_resid_post"
CONCEPT = ["Golden Gate", "San Francisco", "bridge"]
BIG = 2e4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sae(model):
    """A small TopK SAE with b_dec fitted to real activations."""
    _, cache = model.run_with_cache(model.to_tokens("The bridge spans the bay at dusk, I think."),
                                    names_filter=HOOK)
    sae = TopKSAE(sae_config("topk", 640, 512, k=16, metadata=SAEMetadata(hook_name=HOOK)))
    sae.init_from_data(cache[HOOK][0, 1:])
    return sae.requires_grad_(False)


def test_keyword_matcher_is_case_insensitive_and_word_bounded():
    pattern = keyword_pattern(CONCEPT)
    assert pattern.search("I drove over the BRIDGE.")
    assert pattern.search("the golden  gate at night")
    assert pattern.search("San Francisco's fog")
    assert not pattern.search("She studied at Cambridge")
    assert not pattern.search("bridges everywhere")
    assert not pattern.search("a goldengate")
    assert keyword_pattern(["bridge*"]).search("bridges everywhere")
    texts = ["The Golden Gate is red.", "Cambridge in spring", "a BRIDGE!", "nothing here"]
    assert mention_rate(texts, CONCEPT) == 0.5
    with pytest.raises(SteeringError, match="keyword"):
        keyword_pattern([" ", ""])


def test_shipped_neutral_prompts():
    prompts = read_prompts()
    assert len(prompts) >= 10 and "I think that" in prompts


def test_steering_curve_writes_json_and_png(model, sae, tmp_path):
    result = steering_curve(model, sae, 3, [0.0, BIG], ["I think that", "My favourite place is"],
                            CONCEPT, max_new_tokens=4, samples_per_prompt=1,
                            neutral_texts=["Tell me about your weekend."], out=tmp_path)
    written = json.loads((tmp_path / RESULT_JSON).read_text())
    assert written == json.loads(json.dumps(result))
    assert (tmp_path / RESULT_PNG).read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULT_JSON, RESULT_PNG]
    assert written["feature"] == 3 and written["hook"] == HOOK and written["values"] == [0.0, BIG]
    rows = [written["baseline"], *written["curve"]]
    assert [row.get("value") for row in written["curve"]] == [0.0, BIG]
    for row in rows:
        assert {"mention_rate", "perplexity", "kl_neutral", "n_generations", "samples"} <= set(row)
        assert row["n_generations"] == 2 and 0 <= row["mention_rate"] <= 1
        assert row["perplexity"] > 1
        assert row["mention_rate"] == sum(s["mentions"] for s in row["samples"]) / 2
    assert written["baseline"]["kl_neutral"] == 0
    assert written["curve"][1]["kl_neutral"] > written["curve"][0]["kl_neutral"] >= 0
    assert written["curve"][1]["perplexity"] > written["baseline"]["perplexity"]


def test_steering_sweep_measures_vectors_and_features_alike(model, sae):
    prompts = ["I think that", "My favourite place is"]
    vector = SteeringVector(torch.linspace(-1, 1, 640), HOOK)
    plans = [[SteeringVector(vector.vector, HOOK, 0.0)], [SteeringVector(vector.vector, HOOK, 1e3)],
             [Intervention(sae, clamp={3: 0.0})]]
    sweep = steering_sweep(model, plans, prompts, CONCEPT, max_new_tokens=4, samples_per_prompt=2,
                           neutral_texts=["Tell me about your weekend."])
    base, (zero, strong, clamp0) = sweep["baseline"], sweep["curve"]
    assert [s["text"] for s in zero["samples"]] == [s["text"] for s in base["samples"]]
    assert zero["kl_neutral"] == 0 and strong["kl_neutral"] > 0.1 and clamp0["kl_neutral"] >= 0
    assert [s["prompt"] for s in strong["samples"]] == [p for p in prompts for _ in range(2)]
    assert all(row["n_generations"] == 4 for row in sweep["curve"])
    with pytest.raises(SteeringError, match="at least one steering setting"):
        steering_sweep(model, [], prompts, CONCEPT)


def test_cli_values_relative_needs_max_activation(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["steer-eval", "--sae", "unused", "--feature", "3", "--concept",
                              "bridge", "--values=-1,2", "--values-relative", "--out",
                              str(tmp_path)])
    assert args.values == [-1.0, 2.0]
    with pytest.raises(SteeringError, match="--max-activation"):
        args.run(args)


def test_extend_within_budget_goes_on_only_while_the_last_edit_is_fluent():
    """Each line gets the next extra strength while its strongest point so far is within the
    perplexity limit; lines are measured together, one call per extra strength."""
    from saekit.steer_eval import extend_within_budget

    calls = []

    def measure(keys):
        calls.append(keys)
        return [{"perplexity": 10 * s if key == "steep" else 2 * s} for key, s in keys]

    lines = {"steep": [(1.0, {"perplexity": 10.0})], "gentle": [(1.0, {"perplexity": 2.0})],
             "broken": [(1.0, {"perplexity": None})]}
    extend_within_budget(measure, lines, [2.0, 3.0, 4.0], limit=20.0)
    assert [s for s, _ in lines["steep"]] == [1.0, 2.0, 3.0]  # 20 at 2: still within
    assert [s for s, _ in lines["gentle"]] == [1.0, 2.0, 3.0, 4.0]
    assert [s for s, _ in lines["broken"]] == [1.0]
    assert calls == [[("steep", 2.0), ("gentle", 2.0)], [("steep", 3.0), ("gentle", 3.0)],
                     [("gentle", 4.0)]]
    extend_within_budget(measure, lines, [0.5], limit=100.0)  # weaker than measured: skipped
    assert len(calls) == 3
    unordered = {"a": [(2.0, {"perplexity": 1.0}), (1.0, {"perplexity": 99.0})]}
    extend_within_budget(measure, unordered, [3.0], limit=20.0)  # judged by its strongest
    assert [s for s, _ in unordered["a"]] == [2.0, 1.0, 3.0]
