"""Detection and fuzzing scores of ``saekit explain``'s explanations against two baselines, on
the same texts.

Reads ``OUT/explanations.jsonl`` of a finished ``saekit explain`` run and, with the same
material (the scan is seeded and done in the run's feature groups, so the held-out texts are the
ones the run scored), scores:

(a) the stored explanations (their stored scores when the record's example ids match the
    material rebuilt here, else re-scored);
(b) the same explanations shuffled across features (a derangement: the chance baseline);
(c) the non-LLM baseline ``fires on: <top tokens>`` from each feature's top-activating tokens.

The features to explain are picked without hand-picking by ``--pick N``: a seeded random sample
of the features that fire on at least ``--min-count`` tokens of the first ``--max-rows`` rows
(printed as a comma list for ``saekit explain --features``)::

    python benchmarks/explain_baselines.py --sae DIR --activations CACHE --max-rows 600 --pick 210
    saekit explain --sae DIR --activations CACHE --features LIST --out OUT --max-rows 600 ...
    python benchmarks/explain_baselines.py --sae DIR --activations CACHE --explanations OUT \\
        --max-rows 600 ... --json docs/explain_scores.json

The material flags (``--max-rows``, ``--n-shown``, ``--n-bands``, ``--per-band``,
``--n-non-activating``, ``--batch-features``, ``--seed``) must be those of the run.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from saekit.analyse import feature_statistics
from saekit.explain import example_id, feature_material, top_tokens_explanation
from saekit.explain_judges import JUDGES, make_judge
from saekit.explain_run import (EXPLANATIONS, SUMMARY, mean_scores, read_explanations,
                                score_material)
from saekit.explain_scores import SCORERS
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


def pick_live(sae, cache: str, n: int, max_rows: int | None, min_count: int,
              seed: int) -> list[int]:
    """``n`` features (sorted) drawn at random (``seed``) from those firing on at least
    ``min_count`` tokens of the first ``max_rows`` rows of ``cache``."""
    stats = feature_statistics(sae, cache, max_rows=max_rows)
    count = (stats.frequency * stats.n_tokens).round()
    live = stats.features[count >= min_count].tolist()
    print(f"{len(live)} of {sae.d_sae} features fire on >= {min_count} tokens")
    return sorted(random.Random(seed).sample(live, min(n, len(live))))


def material_ids(material) -> dict[str, list[str]]:
    return {"shown": [example_id(e) for e in material.shown],
            "activating": [example_id(e) for e in material.activating],
            "non_activating": [example_id(e) for e in material.non_activating]}


def materials_in_groups(sae, cache, features, tokenizer, model, group: int, **options) -> dict:
    """``feature_material`` of ``features`` scanned in the groups ``saekit explain`` used."""
    out = {}
    for start in range(0, len(features), group):
        out.update(feature_material(sae, cache, features[start:start + group], tokenizer,
                                    model, **options))
    return out


def summarise(rows: list[dict], label: str) -> dict:
    return {scorer: {**mean_scores([r["scores"][label][scorer] for r in rows
                                    if scorer in r["scores"][label]]),
                     "n": sum(scorer in r["scores"][label] for r in rows)}
            for scorer in SCORERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", required=True)
    parser.add_argument("--activations", required=True)
    parser.add_argument("--explanations", help="the saekit explain --out folder")
    parser.add_argument("--pick", type=int, help="print this many live features and stop")
    parser.add_argument("--min-count", type=int, default=20)
    parser.add_argument("--batch-features", type=int, default=8)
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--n-shown", type=int, default=10)
    parser.add_argument("--n-bands", type=int, default=5)
    parser.add_argument("--per-band", type=int, default=2)
    parser.add_argument("--n-non-activating", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", help="the saekit explain --features list, in its "
                        "order (default: the stored records' order)")
    parser.add_argument("--labels", default="explanation,shuffled,top_tokens",
                        help="which of (a), (b), (c) to score here")
    parser.add_argument("--merge", help="earlier --json files (comma list) of the same "
                        "material: their scores are reused")
    parser.add_argument("--judge", default="auto", choices=JUDGES,
                        help="the judge method (saekit explain --judge)")
    parser.add_argument("--json")
    args = parser.parse_args()

    sae = load_foreign_sae(args.sae, device="cpu")
    if args.pick:
        print(",".join(map(str, pick_live(sae, args.activations, args.pick, args.max_rows,
                                          args.min_count, args.seed))))
        return
    if not args.explanations or not args.json:
        parser.error("--explanations and --json are needed (or --pick)")
    run = Path(args.explanations)
    records = {r["feature"]: r for r in read_explanations(run / EXPLANATIONS)}
    features = ([int(f) for f in args.features.split(",")] if args.features
                else list(records))
    explained = [f for f in features if records.get(f, {}).get("explanation")]
    order = derangement(len(explained), args.seed) if len(explained) > 1 else []
    shuffled = dict(zip(explained, (explained[i] for i in order)))
    model = load_model(sae.cfg.metadata.model_name, device="cpu")
    explainer = load_explainer()
    judge = make_judge(explainer, args.judge)
    merged: dict[int, dict] = {}
    for path in args.merge.split(",") if args.merge else []:
        earlier = json.loads(Path(path).read_text())
        if earlier.get("judge", "question") != judge.method:
            parser.error(f"--merge {path} was judged by {earlier.get('judge', 'question')}, "
                         f"not {judge.method}")
        for row in earlier["features"]:
            merged.setdefault(row["feature"], {"examples": row["examples"], "labels": {},
                                               "scores": {}})
            if merged[row["feature"]]["examples"] == row["examples"]:
                merged[row["feature"]]["labels"].update(row["labels"])
                merged[row["feature"]]["scores"].update(row["scores"])
    torch.set_num_threads(1)
    material = materials_in_groups(
        sae, args.activations, features, model.tokenizer, model, args.batch_features,
        n_shown=args.n_shown, n_bands=args.n_bands, per_band=args.per_band,
        n_non_activating=args.n_non_activating, max_rows=args.max_rows, seed=args.seed)
    rows, rescored, started = [], 0, time.monotonic()
    for feature in features:
        m, record = material[feature], records.get(feature)
        row = {"feature": feature, "examples": material_ids(m), "labels": {}, "scores": {}}
        old = merged.get(feature, {})
        if old.get("examples") == row["examples"]:  # same texts: reuse its scores
            row["labels"].update(old["labels"])
            row["scores"].update(old["scores"])
        labels = {"top_tokens": top_tokens_explanation(m)}
        if feature in shuffled:
            labels.update(explanation=record["explanation"],
                          shuffled=records[shuffled[feature]]["explanation"])
            if record["examples"] == row["examples"] and record.get("judge") == judge.method:
                row["labels"]["explanation"] = record["explanation"]
                row["scores"]["explanation"] = record["scores"]  # as stored by the run
        for name, text in labels.items():
            if name not in args.labels.split(",") or row["labels"].get(name) == text:
                continue
            rescored += name == "explanation"
            row["labels"][name] = text
            row["scores"][name] = {k: v.summary() for k, v in
                                   score_material(judge, text, m, SCORERS, args.seed).items()}
        rows.append(row)
    summary_path = run / SUMMARY
    run_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    result = {"sae": args.sae, "activations": args.activations, "explainer": explainer.model_id,
              "judge": judge.method,
              "n_features": len(features), "n_explained": len(explained),
              "explanations_rescored": rescored,
              "material": {k: getattr(args, k) for k in (
                  "max_rows", "n_shown", "n_bands", "per_band", "n_non_activating",
                  "batch_features", "seed", "min_count")},
              "mean": {label: summarise([r for r in rows if label in r["scores"]], label)
                       for label in ("explanation", "shuffled", "top_tokens")},
              "features_per_minute": run_summary.get("features_per_minute"),
              "baseline_judge_seconds": time.monotonic() - started,
              "features": rows}
    write_json(args.json, result)
    print(json.dumps({k: result[k] for k in ("mean", "features_per_minute")}, indent=2))


if __name__ == "__main__":
    main()
