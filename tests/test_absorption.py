"""Feature absorption: a synthetic dictionary whose absorption is known by construction, and
the spelling task on the real model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saekit.absorption import (LETTERS, AbsorptionError, SpellingData, absorbing_latent,
                               fit_letter_probes, measure_absorption, spelling_data, word_tokens)
from saekit.sae import ARCHITECTURES, sae_config

ABSORBERS = 20  # latents each absorbing "a" for its own 1.5% of the a-words
WORDS_PER_ABSORBER = 3
DIM = 3 + ABSORBERS + 3
A_WORDS, B_WORDS, C_WORDS = 200, 150, 150


def synthetic_case(seed: int = 0) -> tuple[SpellingData, torch.nn.Module, torch.Tensor]:
    """Words starting with a, b or c in a DIM-dimensional space (dims 0-2: the letters, then
    one marker per absorber, then 3 of noise) and a ReLU dictionary: latent 0 reads "a" but is
    shut off by any marker, latents 1 and 2 read "b" and "c", latent 3 + m fires on marker m
    and writes "a" + marker m. So every marked a-word is absorbed and no other word is.
    Returns the data, the SAE and the marked-word mask [n]."""
    generator = torch.Generator().manual_seed(seed)
    letters = torch.tensor([0] * A_WORDS + [1] * B_WORDS + [2] * C_WORDS)
    x = 0.02 * torch.randn(len(letters), DIM, generator=generator)
    x[torch.arange(len(letters)), letters] += 1.0
    marked = torch.zeros(len(letters), dtype=torch.bool)
    for m in range(ABSORBERS):
        rows = torch.arange(m * WORDS_PER_ABSORBER, (m + 1) * WORDS_PER_ABSORBER)
        x[rows, 3 + m] += 1.0
        marked[rows] = True
    test = torch.rand(len(letters), generator=generator) < 0.5
    data = SpellingData("hook", [LETTERS[i] + "x" for i in letters.tolist()], letters, x, test)

    sae = ARCHITECTURES["relu"](sae_config("relu", DIM, 3 + ABSORBERS)).eval()
    encoder = torch.zeros(DIM, 3 + ABSORBERS)
    decoder = torch.zeros(3 + ABSORBERS, DIM)
    for letter in range(3):
        encoder[letter, letter] = decoder[letter, letter] = 1.0
    encoder[3:3 + ABSORBERS, 0] = -2.0
    for m in range(ABSORBERS):
        encoder[3 + m, 3 + m] = 1.0
        decoder[3 + m, [0, 3 + m]] = 2 ** -0.5
    with torch.no_grad():
        sae.W_enc.copy_(encoder)
        sae.W_dec.copy_(decoder)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return data, sae, marked


def test_synthetic_absorption_rate_is_the_marked_share():
    data, sae, marked = synthetic_case()
    result = measure_absorption(sae, data, min_true_positives=5)
    by_letter = {letter.letter: letter for letter in result.letters}
    a = by_letter["a"]
    held_a = data.test & (data.letters == 0)
    assert a.true_positives == int(held_a.sum())  # the probe gets every held-out a-word
    assert a.main_latents == [0]
    assert a.absorption_rate == pytest.approx(float(marked[held_a].float().mean()))
    assert 0.2 < a.absorption_rate < 0.4
    assert sum(a.absorbing_latents.values()) == a.absorbed
    assert set(a.absorbing_latents) <= set(range(3, 3 + ABSORBERS))
    assert by_letter["b"].absorption_rate == 0 and by_letter["c"].absorption_rate == 0
    assert [letter.letter for letter in result.covered] == ["a", "b", "c"]
    assert math.isnan(by_letter["z"].absorption_rate) and not by_letter["z"].covered
    assert result.mean_absorption_rate == pytest.approx(a.absorption_rate / 3)


def test_absorption_needs_a_latent_aligned_with_the_probe():
    acts = torch.tensor([[0.0, 2.0], [0.0, 2.0], [1.0, 2.0]])
    along, cosine = torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5])
    assert absorbing_latent(acts, along, cosine, [0]).tolist() == [1, 1, -1]
    assert absorbing_latent(acts, along, torch.tensor([1.0, 0.01]), [0]).tolist() == [-1] * 3
    assert absorbing_latent(acts, torch.tensor([1.0, -0.5]), cosine, [0]).tolist() == [-1] * 3


def test_bad_input_is_a_clear_error():
    data, sae, _ = synthetic_case()
    with pytest.raises(AbsorptionError, match=f"{DIM}-dimensional"):
        measure_absorption(ARCHITECTURES["relu"](sae_config("relu", 8, 4)), data)
    with pytest.raises(AbsorptionError, match="held-out"):
        SpellingData("hook", data.words, data.letters, data.activations,
                     torch.zeros(len(data.words), dtype=torch.bool))


def test_spelling_task_on_the_real_model(model):
    words, ids = word_tokens(model.tokenizer)
    assert len(words) > 5000 and all(w.isalpha() and w.islower() for w in words[:100])
    assert model.tokenizer.decode([ids[0]]) == " " + words[0]
    data = spelling_data(model, "blocks.6.hook_resid_post", max_words=48, test_fraction=0.25)
    assert data.activations.shape == (48, model.cfg.d_model)
    assert torch.isfinite(data.activations).all() and int(data.test.sum()) == 12
    assert all(LETTERS[i] == w[0] for i, w in zip(data.letters.tolist(), data.words))
    probes = fit_letter_probes(data)
    assert probes.weight.shape == (26, model.cfg.d_model)
    sae = ARCHITECTURES["topk"](sae_config("topk", model.cfg.d_model, 64, k=8)).eval()
    result = measure_absorption(sae, data, probes, min_true_positives=1)
    assert len(result.letters) == 26
    for letter in result.letters:
        assert 0 <= letter.absorbed <= letter.main_silent <= letter.true_positives


@pytest.mark.slow
def test_experiment_writes_a_row_per_architecture(small_capture, tmp_path):
    """experiments/absorption.py at CI size (one torch thread: the CI CPU is shared)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(root / "experiments" / "absorption.py"), "--activations",
         str(small_capture), "--hook", "blocks.6.hook_resid_post", "--tokens", "2048",
         "--batch-size", "64", "--holdout-tokens", "512", "--latents", "128", "--k", "8",
         "--words", "120", "--out", str(tmp_path)],
        check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "absorption.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "absorption.json").read_text())
    assert sorted(row["arch"] for row in result["saes"]) == ["batchtopk", "matryoshka", "topk"]
    for row in result["saes"]:
        assert len(row["letters"]) == 26 and 0 <= row["fvu"] and row["l0"] > 0
    assert result["spelling"]["held_out_words"] == 36
