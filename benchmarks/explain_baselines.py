"""Detection scores of ``saekit explain``'s explanations against two baselines, on the same texts.

Reads ``OUT/explanations.jsonl`` of a finished ``saekit explain`` run and, with the same
material (the scan is seeded, so the held-out texts are the ones the run scored), scores:

(a) the stored explanations (re-scored here, so all three share one run of the judge);
(b) the same explanations shuffled across features (a derangement: the chance baseline);
(c) the non-LLM baseline ``fires on: <top tokens>`` from each feature's top-activating tokens.

    python benchmarks/explain_baselines.py --sae DIR --activations CACHE --explanations OUT \\
        --max-rows 400 --n-bands 3 --per-band 2 --n-non-activating 6 --json docs/explain_sample.json

The material flags must be those of the ``saekit explain`` run.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from saekit.explain import (example_text, feature_material, score_explanation,
                            top_tokens_explanation)
from saekit.explain_run import EXPLANATIONS, read_explanations
from saekit.explainer_model import load_explainer
from saekit.files import write_json
from saekit.formats import load_foreign_sae
from saekit.model import load_model


def derangement(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` with no fixed point (n >= 2)."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def mean_scores(scores: list) -> dict:
    return {name: sum(getattr(s, name) for s in scores) / len(scores)
            for name in ("balanced_accuracy", "balanced_accuracy_median", "auroc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", required=True)
    parser.add_argument("--activations", required=True)
    parser.add_argument("--explanations", required=True, help="the saekit explain --out folder")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--n-shown", type=int, default=10)
    parser.add_argument("--n-bands", type=int, default=5)
    parser.add_argument("--per-band", type=int, default=2)
    parser.add_argument("--n-non-activating", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    records = [r for r in read_explanations(Path(args.explanations) / EXPLANATIONS)
               if r["explanation"]]
    sae = load_foreign_sae(args.sae, device="cpu")
    model = load_model(sae.cfg.metadata.model_name, device="cpu")
    judge = load_explainer()
    features = [r["feature"] for r in records]
    material = feature_material(sae, args.activations, features, model.tokenizer, model,
                                n_shown=args.n_shown, n_bands=args.n_bands,
                                per_band=args.per_band, n_non_activating=args.n_non_activating,
                                max_rows=args.max_rows, seed=args.seed)
    shuffled = derangement(len(records), args.seed)
    rows, started = [], time.monotonic()
    for i, record in enumerate(records):
        m = material[record["feature"]]
        activating = [example_text(e) for e in m.activating or m.shown]
        silent = [example_text(e) for e in m.non_activating]
        labels = {"explanation": record["explanation"],
                  "shuffled": records[shuffled[i]]["explanation"],
                  "top_tokens": top_tokens_explanation(m)}
        scores = {name: score_explanation(judge, text, activating, silent)
                  for name, text in labels.items()}
        rows.append({"feature": record["feature"], "labels": labels,
                     "scores": {name: s.summary() for name, s in scores.items()},
                     "shown": [example_text(e) for e in m.shown[:3]], "_scores": scores})
    result = {"sae": args.sae, "activations": args.activations,
              "explainer": judge.model_id, "n_features": len(rows),
              "material": {k: getattr(args, k) for k in ("max_rows", "n_shown", "n_bands",
                                                         "per_band", "n_non_activating", "seed")},
              "mean": {name: mean_scores([r["_scores"][name] for r in rows])
                       for name in ("explanation", "shuffled", "top_tokens")},
              "judge_seconds": time.monotonic() - started,
              "features": [{k: v for k, v in r.items() if k != "_scores"} for r in rows]}
    write_json(args.json, result)
    print(json.dumps(result["mean"], indent=2))


if __name__ == "__main__":
    main()
