"""The concept probe (the steering benchmark's second score) on the real model."""

from __future__ import annotations

import pytest
import torch

from saekit.concept_probe import fit_concept_probe, ordinary_windows
from saekit.concept_texts import ConceptError

CHEESE = ["The cheddar was aged for two years in a cave.", "She grated parmesan over the pasta.",
          "Brie and camembert are soft cheeses from France.", "Melt the mozzarella on the pizza.",
          "A wheel of gouda sat on the dairy counter.", "Blue cheese has veins of mould.",
          "The cheesemonger sliced some gruyere for us.", "Goat cheese crumbles over a salad.",
          "Swiss cheese is known for its holes.", "He ate crackers with a slice of cheddar."]
ENGINES = ["The engine needs new spark plugs.", "Change the oil every five thousand miles.",
           "The mechanic replaced the brake pads.", "A turbocharger forces more air in.",
           "The gearbox shifted smoothly into fourth.", "Check the tyre pressure before a trip.",
           "The radiator leaked coolant on the road.", "Diesel engines compress air to ignite.",
           "The clutch slipped when the car climbed.", "Torque rises with the engine's speed."]


def _windows(model, texts):
    return [torch.tensor(model.tokenizer(t, add_special_tokens=False)["input_ids"])
            for t in texts]


def test_probe_separates_a_concept_and_scores_new_text(model):
    probe = fit_concept_probe(model, _windows(model, CHEESE), _windows(model, ENGINES))
    assert probe.hook == "blocks.12.hook_resid_post" and probe.held_out_accuracy >= 0.75
    scores = probe.score_continuations(model, [
        {"prompt": "For lunch I had", "text": " a plate of aged cheddar and some brie."},
        {"prompt": "For lunch I had", "text": " to fix the car's engine and its brakes."},
        {"prompt": "For lunch I had", "text": ""}])
    assert scores[0] > 0.5 > scores[1] and scores[2] == 0.0


def test_ordinary_windows_avoid_mentions_and_bos():
    tokens = torch.arange(2 * 40).reshape(2, 40)
    tokens[:, 0] = -1  # BOS
    mentions = [(0, 10, 12), (1, 30, 30)]
    windows = ordinary_windows(tokens, mentions, 20, 8, seed=3, bos_token_id=-1, min_length=4)
    assert len(windows) == 20
    for window in windows:
        values = set(window.tolist())
        assert -1 not in values and not values & {10, 11, 12, 70} and len(window) >= 4
    with pytest.raises(ConceptError, match="free of the concept's keywords"):
        ordinary_windows(tokens, [(0, 1, 39), (1, 1, 39)], 5, 8, bos_token_id=-1)
