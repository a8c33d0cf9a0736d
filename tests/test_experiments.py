"""The paper-figure scripts in experiments/, each run as a subprocess at CI size on a tiny cache
(96 rows × 64 tokens of blocks.6) with tiny SAEs: they must write their PNG and JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
TINY = ["--tokens", "4096", "--batch-size", "64", "--holdout-tokens", "1024"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread (far faster than two spinning ones on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_cache(model, tmp_path_factory) -> Path:
    """96 rows × 64 tokens of blocks.6.hook_resid_post in 16-row shards (one held out)."""
    from saekit import CaptureConfig, capture_activations

    config = CaptureConfig(hooks=["blocks.6.hook_resid_post"], tokens=96 * 64, context=64,
                           batch_rows=8, shard_rows=16)
    with one_thread():
        return capture_activations(config, tmp_path_factory.mktemp("experiments") / "acts",
                                   model=model)


@pytest.fixture(scope="module")
def tiny_sae(tiny_cache, tmp_path_factory) -> Path:
    """A TopK SAE (128 latents, k 8) trained on the tiny cache."""
    from saekit.train import train, train_config

    out = tmp_path_factory.mktemp("tiny_sae")
    with one_thread():
        saved = train(train_config(activations=str(tiny_cache), out=str(out), latents=[128],
                                  k=[8], tokens=4096, batch_size=64, holdout_tokens=1024))
    return saved["topk_w128_k8"]


def run_script(name: str, out: Path, *args: str) -> None:
    """Run experiments/NAME.py with ``args`` (one torch thread: the CI CPU is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), *args,
                           "--out", str(out)], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def outputs(out: Path, name: str) -> dict:
    """The JSON a script wrote, after checking its PNG is there."""
    png = out / f"{name}.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / f"{name}.json").read_text())


def test_frontier_has_a_point_per_sae(tiny_cache, tmp_path):
    run_script("frontier", tmp_path, "--activations", str(tiny_cache), *TINY, "--latents",
               "128", "--k", "8", "--l1", "2", "--l0", "0.03", "--ce-rows", "2",
               "--ce-context", "32")
    result = outputs(tmp_path, "frontier")
    assert sorted(p["arch"] for p in result["points"]) == ["batchtopk", "jumprelu", "relu",
                                                          "topk"]
    for point in result["points"]:
        assert math.isfinite(point["fvu"]) and point["l0"] > 0
        assert math.isfinite(point["ce_loss_recovered"])
    assert result["ce_eval"]["rows"] == 2


def test_scaling_has_one_fvu_per_width(tiny_cache, tmp_path):
    run_script("scaling", tmp_path, "--activations", str(tiny_cache), *TINY,
               "--latents", "64,128,256", "--k", "8")
    result = outputs(tmp_path, "scaling")
    assert [p["latents"] for p in result["points"]] == [64, 128, 256]
    assert all(math.isfinite(p["fvu"]) for p in result["points"])
    assert math.isfinite(result["fit"]["exponent"]) and result["k"] == 8


def test_dead_latents_compares_auxk_on_and_off(tiny_cache, tmp_path):
    run_script("dead_latents", tmp_path, "--activations", str(tiny_cache), *TINY,
               "--latents", "256", "--k", "8", "--dead-tokens", "512")
    result = outputs(tmp_path, "dead_latents")
    assert [r["aux_coefficient"] for r in result["runs"]] == [1 / 32, 0.0]
    assert result["dead_tokens"] == 512 and "window" in result["note"]
    for run in result["runs"]:
        assert len(run["tokens"]) == len(run["dead_fraction"]) > 1
        assert run["tokens"][-1] == 4096 and 0 <= run["final_dead_fraction"] <= 1


def test_density_trains_or_reads_saes(tiny_cache, tiny_sae, tmp_path):
    run_script("density", tmp_path / "trained", "--activations", str(tiny_cache), *TINY,
               "--latents", "128", "--k", "8", "--l1", "2")
    trained = outputs(tmp_path / "trained", "density")
    assert sorted(s["arch"] for s in trained["saes"]) == ["relu", "topk"]
    for sae in trained["saes"]:
        assert sum(sae["histogram"]["counts"]) + sae["dead_latents"] == sae["d_sae"] == 128
    run_script("density", tmp_path / "read", "--activations", str(tiny_cache), *TINY,
               "--from", str(tiny_sae.parent))
    read = outputs(tmp_path / "read", "density")
    assert [s["name"] for s in read["saes"]] == ["topk_w128_k8"]


def test_steering_curve_at_multiples_of_the_max(tiny_cache, tiny_sae, tmp_path):
    run_script("steering_curve", tmp_path, "--activations", str(tiny_cache), *TINY,
               "--sae", str(tiny_sae), "--prompts", "2", "--max-new-tokens", "3",
               "--multiples", "0,4", "--vector-scales", "0,3", "--stats-rows", "32")
    result = outputs(tmp_path, "steering_curve")
    vectors = result["mean_difference"]["curve"]
    assert [row["scale"] for row in vectors] == [0, 3] and result["mean_difference"]["norm"] > 0
    assert vectors[0]["kl_neutral"] == 0 < vectors[1]["kl_neutral"]
    peak = result["max_activation"]
    assert peak > 0 and result["feature"] == result["concept"]["feature"]
    assert [row["value"] for row in result["curve"]] == pytest.approx([0.0, 4 * peak])
    assert all(row["n_generations"] == 2 for row in result["curve"])
    assert result["concept_keywords"] == ["Golden Gate", "San Francisco", "bridge"]


def test_steering_curve_of_the_features_saekit_concept_chose(tiny_cache, tiny_sae, tmp_path):
    """--concept: the chosen features are clamped together at multiples of their chosen
    values, and v comes from the concept's keyword windows in the cache."""
    chosen = tmp_path / "benchmark.json"
    chosen.write_text(json.dumps({"sae": str(tiny_sae), "concepts": {"articles": {
        "keywords": ["the", "a"], "features": [3, 5], "values": [1.5, 2.0]}}}))
    run_script("steering_curve", tmp_path, "--activations", str(tiny_cache), *TINY,
               "--concept", "articles", "--concept-result", str(chosen), "--prompts", "2",
               "--max-new-tokens", "3", "--multiples", "0,2", "--vector-scales", "1")
    result = outputs(tmp_path, "steering_curve")
    assert result["sae"] == str(tiny_sae) and result["concept"]["features"] == [3, 5]
    assert [row["values"] for row in result["curve"]] == [[0, 0], [3.0, 4.0]]
    assert result["feature"] is None and result["concept_keywords"] == ["the", "a"]
    assert result["concept"]["n_mentions"] > 0 and result["mean_difference"]["norm"] > 0
    assert result["curve"][1]["kl_neutral"] > 0


def test_feature_map_around_the_concept(tiny_cache, tiny_sae, tmp_path):
    run_script("feature_map", tmp_path, "--activations", str(tiny_cache), *TINY,
               "--sae", str(tiny_sae), "--neighbours", "8", "--stats-rows", "32",
               "--topic-summaries", "3", "--agreement-k", "3")
    result = outputs(tmp_path, "feature_map")
    points = result["points"]
    assert len(points) == 9 and points[0]["feature"] == result["concept"]["feature"]
    assert points[0]["rank"] == 0 and points[0]["cosine"] == 1.0
    assert all(isinstance(p["logit_token"], str) and math.isfinite(p["x"]) for p in points)
    agreement = result["topic_agreement"]
    assert len(agreement["topics"]) == 11 and "Uncategorized" not in agreement["topics"]
    assert 0 <= agreement["neighbour_agreement"] <= 1 and 0 <= agreement["random_agreement"] <= 1
    assert 3 < agreement["n_labelled_features"] <= 128 and agreement["k"] == 3
    assert all(p["wikipedia_topic"] in agreement["topics"] + [None] for p in points)


def test_neighbour_label_agreement_against_planted_groups():
    """Decoder rows in 4 tight clusters labelled by cluster: neighbours always agree, random
    features about a quarter of the time."""
    from saekit.directions import neighbour_label_agreement
    from saekit.sae import sae_config, TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(sae_config("topk", 32, 400, k=4))
    centres = torch.randn(4, 32)
    labels = torch.arange(400) % 4
    with torch.no_grad():
        sae.W_dec.copy_(centres[labels] + 0.05 * torch.randn(400, 32))
    labels[:40] = -1  # unlabelled features take no part
    result = neighbour_label_agreement(sae, labels, k=5)
    assert result["neighbour_agreement"] == 1.0 and result["n_labelled_features"] == 360
    assert 0.15 < result["random_agreement"] < 0.35 and result["ratio"] > 2.5


def test_power_law_fit_and_full_defaults():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import scaling
    finally:
        sys.path.remove(str(EXPERIMENTS))
    fit = scaling.power_law([512, 1024, 2048], [0.3 * n ** -0.25 for n in (512, 1024, 2048)])
    assert fit["exponent"] == pytest.approx(-0.25) and fit["coefficient"] == pytest.approx(0.3)
    assert scaling.parse_args([]).latents == [512, 1024, 2048, 4096]
    full = scaling.parse_args(["--full", "--k", "16"])
    assert full.latents[-1] == 16384 and full.k == [16] and full.out.endswith("out/scaling")


def test_steering_benchmark_measures_every_method_and_resumes(tiny_cache, tiny_sae, tmp_path):
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"kings": ["king*", "the"], "rivers": ["river*", "a"]}))
    args = ["--activations", str(tiny_cache), "--sae", str(tiny_sae), "--concepts-file",
            str(concepts), "--strengths", "0.2,0.5", "--vector-strengths", "0.5", "--prompts", "2",
            "--samples-per-prompt", "1", "--validation-samples", "1", "--max-new-tokens", "4",
            "--groups", "1,2", "--candidates-per-ranking", "2", "--stats-rows", "16",
            # a budget nothing exceeds: every method is extended to the extra strength
            "--extra-strengths", "0.8", "--extra-vector-strengths", "0.8",
            "--max-perplexity-ratio", "1e12"]
    run_script("steering_benchmark", tmp_path, *args, "--concepts", "kings")
    first = outputs(tmp_path, "steering_benchmark")
    kings = first["concepts"]["kings"]
    assert set(kings["methods"]) == {"sae_clamp", "sae_add", "mean_difference", "prompting"}
    grid = {"sae_clamp": [0.2, 0.5, 0.8], "sae_add": [0.2, 0.5, 0.8],
            "mean_difference": [0.5, 0.8], "prompting": [None]}  # the vector has its own
    for method, points in kings["methods"].items():
        assert [p["strength"] for p in points] == grid[method]
        for point in points:
            assert point["n_generations"] == 2 and 0 <= point["mention_rate"] <= 1
            assert len(point["probe_scores"]) == 2 and point["perplexity"] > 1
    assert kings["features"] and kings["unsteered"]["n_generations"] == 2
    validated = [(len(v["features"]), v["strength"]) for v in kings["validation"]["settings"]]
    assert sorted(validated) == [(n, s) for n in (1, 2) for s in (0.2, 0.5, 0.8)]
    assert kings["methods"]["mean_difference"][0]["kl_neutral"] > 0
    assert first["summary"]["n_corpus_concepts"] == 1
    assert 0 <= first["summary"]["keyword_probe_agreement"]["agreement"] <= 1
    assert kings["probe"]["hook"] == "blocks.12.hook_resid_post"
    assert 0 <= kings["probe"]["held_out_accuracy"] <= 1 and kings["probe"]["n_ordinary"] > 0
    assert all(0 <= score <= 1 for score in kings["unsteered"]["probe_scores"])
    # a second run with the same settings measures only the concept it has not measured yet,
    # however its paths are spelt
    respelt = [f"{a}/." if a in (str(tiny_cache), str(tiny_sae)) else a for a in args]
    run_script("steering_benchmark", tmp_path, *respelt)
    second = outputs(tmp_path, "steering_benchmark")
    assert list(second["concepts"]) == ["kings", "rivers"]
    assert second["concepts"]["kings"] == kings
    assert (tmp_path / "steering_benchmark_curves.png").is_file()


def test_benchmark_settings_without_extra_strengths_are_those_of_earlier_runs():
    """Without --extra-strengths the resumable settings hold no such key, so partial results
    written before the flags existed still resume."""
    script = subprocess.run(
        [sys.executable, "-c", "import steering_benchmark as b; import json; print(json.dumps("
         "b.resumable_settings(b.parse_args(('--sae', 'x', '--activations', 'y')))))"],
        cwd=EXPERIMENTS, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    settings = json.loads(script.stdout)
    assert "extra_strengths" not in settings and "extra_vector_strengths" not in settings
    assert settings["strengths"] == [0.1, 0.15, 0.2, 0.3] and settings["version"] == 4


def test_steering_layers_measures_each_layer_and_resumes(tiny_cache, tmp_path):
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"kings": ["king*", "the"]}))
    args = ["--activations", str(tiny_cache), "--concepts-file", str(concepts), "--layers", "2,6", "--vector-strengths", "0,0.5",
            "--prompts", "2", "--samples-per-prompt", "1", "--max-new-tokens", "3",
            "--ordinary-windows", "4"]
    run_script("steering_layers", tmp_path, *args)
    result = outputs(tmp_path, "steering_layers")
    points = result["concepts"]["kings"]["points"]
    assert [(p["layer"], p["strength"]) for p in points] == [(2, 0), (2, 0.5), (6, 0), (6, 0.5)]
    assert all(p["residual_scale"] > 0 and p["perplexity"] > 1 for p in points)
    assert points[0]["kl_neutral"] == pytest.approx(0, abs=1e-6)  # strength 0: no edit
    assert points[1]["kl_neutral"] > 1e-4
    assert set(result["concepts"]["kings"]["best_by_layer"]) == {"2", "6"}
    first = result["concepts"]["kings"]["seconds"]
    run_script("steering_layers", tmp_path, *args)  # resumed: measured once
    assert outputs(tmp_path, "steering_layers")["concepts"]["kings"]["seconds"] == first
