"""Concept-steering benchmark: does clamping the SAE feature(s) that ``saekit concept`` picks
make the model talk about a concept, and how does it compare with simpler baselines (AxBench,
arXiv 2501.17148: a mean-difference vector and prompting)?

Per concept (12 the default corpus covers, plus the Golden Gate Bridge), with nothing but its
name and keywords: ``select_concept_features`` retrieves its texts from the cache, ranks and
screens candidate features and validates the best by generation on the *validation* prompts.
Then, on the *evaluation* prompts (never used to choose), each method at each edit strength
(edit norm = strength x the residual stream's typical centred norm, the same grid for all):

- unsteered;
- SAE clamp: the chosen feature(s) clamped (their edits adding up to that norm);
- SAE add: the same values added to the feature(s) instead;
- mean-difference: the concept's mean-difference direction (concept texts minus ordinary text)
  scaled to that norm;
- prompting: "Talk about NAME." prepended to the prompt (perplexity is still scored after the
  bare prompt, like every other method).

Scores per setting: keyword mention rate, perplexity under the unsteered model, and a second
score that is not a keyword list: a logistic-regression probe (``saekit.concept_probe``) on
the unsteered model's mean-pooled activations two thirds of the way through the model (not the
steered layer), fitted on the concept's corpus windows against ordinary windows free of its
keywords; a generation counts when P(concept) >= 0.5. Every sample's text is kept, so results
scored by an earlier probe are scored again when resumed. Reported per method: the best
keyword rate at perplexity <= 3x unsteered, with its probe rate, and keyword-probe agreement. Writes ``steering_benchmark.json``,
``steering_benchmark.png`` (concepts x methods) and ``steering_benchmark_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import common
import torch

from saekit.analyse import feature_statistics
from saekit.cache import ActivationCache, leading_activations
from saekit.concept import ConceptSearch, benchmark_concepts, select_concept_features
from saekit.concept_probe import ConceptProbe, fit_concept_probe, ordinary_windows
from saekit.concept_texts import ConceptTexts, concept_texts
from saekit.formats import load_foreign_sae
from saekit.steer_eval import (extend_within_budget, keyword_pattern, measure_settings,
                               next_token_logprobs, read_prompts)

NAME = "steering_benchmark"
CONCEPTS = benchmark_concepts()  # name -> keywords, saekit/data/benchmark_concepts.json
METHODS = ("sae_clamp", "sae_add", "mean_difference", "prompting")
# The mean-difference vector's grid reaches further: at layer 6 it stays within the perplexity
# budget up to ~0.4x, where the SAE edits are far over it.
DEFAULTS = {"concepts": "", "strengths": [0.1, 0.15, 0.2, 0.3],
            "vector_strengths": [0.2, 0.3, 0.4, 0.5], "extra_strengths": [],
            "extra_vector_strengths": [],
            "prompts": 10, "samples_per_prompt": 3, "validation_samples": 2,
            "max_new_tokens": 32, "temperature": 0.7, "stats_rows": 256, "groups": [1, 3, 10],
            "candidates_per_ranking": 12, "max_perplexity_ratio": 3.0}
FULL = {"samples_per_prompt": 5}
VERSION = 4  # of the measurement: partial results of another version are not resumed
INSTRUCTION = "Talk about {name}. "  # the prompting baseline's prefix
PROBE_METHOD = "logistic probe at 2/3 depth"  # results scored otherwise are scored again


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.make_parser(__doc__.splitlines()[0])
    common.add_concept_args(parser)
    add = parser.add_argument
    add("--concepts", help="comma-separated names from the concept list (default: all)")
    add("--concepts-file", help="JSON file, concept name -> keywords (default: the built-in "
        "list of 13, saekit/data/benchmark_concepts.json)")
    add("--strengths", type=common.floats, help="SAE edit norms relative to the residual scale")
    add("--vector-strengths", type=common.floats, help="mean-difference vector norms relative "
        "to the residual scale")
    add("--extra-strengths", type=common.floats, help="stronger SAE edit norms tried in turn "
        "(in validation and evaluation) while the last one kept perplexity within budget "
        "(default: none)")
    add("--extra-vector-strengths", type=common.floats, help="the same for the mean-difference "
        "vector (default: none)")
    add("--prompts", type=int, help="evaluation prompts (saekit/data/neutral_prompts.txt)")
    add("--samples-per-prompt", type=int, help="generations per evaluation prompt (default 3)")
    add("--validation-samples", type=int, help="per validation prompt (default 2)")
    add("--max-new-tokens", type=int)
    add("--temperature", type=float)
    add("--groups", type=common.ints, help="sizes of the sets of best-screened features "
        "validated together (default 1,3,10)")
    add("--candidates-per-ranking", type=int)
    add("--max-perplexity-ratio", type=float)
    return common.parse(parser, NAME, DEFAULTS, FULL, argv)


def fit_probe(model, tokens, texts: ConceptTexts, seed: int) -> ConceptProbe:
    """The concept's probe: its corpus windows against 3x as many ordinary windows of the
    same mean length that touch no mention (``saekit.concept_probe``)."""
    length = round(sum(len(w) for w in texts.windows) / len(texts.windows))
    ordinary = ordinary_windows(tokens, texts.mentions, 3 * len(texts.windows), length, seed,
                                model.tokenizer.bos_token_id)
    return fit_concept_probe(model, texts.windows, ordinary, seed=seed)


def best_within(points: Sequence[dict], limit: float, key: str = "mention_rate") -> dict | None:
    """The point with the highest ``key`` among those with perplexity <= ``limit``."""
    ok = [p for p in points if p["perplexity"] is not None and p["perplexity"] <= limit]
    return max(ok, key=lambda p: (p[key], -p["perplexity"])) if ok else None


def summarise(point: dict, pattern) -> dict:
    """A measured setting with its samples' prompts and texts (the probe is scored on them by
    ``add_probe_scores``, and can be again)."""
    mentions = [bool(pattern.search(s["text"])) for s in point["samples"]]
    return {"mention_rate": sum(mentions) / len(mentions),
            "perplexity": point["perplexity"], "kl_neutral": point["kl_neutral"],
            "n_generations": point["n_generations"],
            "examples": [s["text"] for s in point["samples"][:3]],
            "samples": [{"prompt": s["prompt"], "text": s["text"]} for s in point["samples"]]}


def add_probe_scores(result: dict, name: str, probe: ConceptProbe, model) -> None:
    """Score every stored sample of a concept's result with ``probe`` (a hit: P >= 0.5), then
    pick each method's best setting again. Prompting's samples are read after the bare prompt,
    like their perplexity, so the instruction does not count."""
    pattern = keyword_pattern(result["keywords"])
    instruction = INSTRUCTION.format(name=name)
    for entry in [result["unsteered"], *(p for m in result["methods"].values() for p in m)]:
        samples = [{"prompt": s["prompt"].removeprefix(instruction), "text": s["text"]}
                   for s in entry["samples"]]
        scores = probe.score_continuations(model, samples)
        mentions = [bool(pattern.search(s["text"])) for s in samples]
        hits = [score >= 0.5 for score in scores]
        entry.update({"probe_rate": sum(hits) / len(hits),
                      "probe_mean": sum(scores) / len(scores), "probe_scores": scores,
                      "labels": [[int(m), int(h)] for m, h in zip(mentions, hits)]})
    result["probe"] = probe.summary() | {"method": PROBE_METHOD}
    result.pop("probe_threshold", None)
    for method, points in result["methods"].items():
        best = best_within(points, result["perplexity_limit"])
        result["best"][method] = None if best is None else {
            k: best[k] for k in ("mention_rate", "probe_rate", "perplexity", "strength")}


def probe_resumed(model, tokens, results: dict, names: Sequence[str], seed: int) -> None:
    """Score with today's probe the resumed concepts an earlier run scored otherwise, where it
    kept their samples."""
    for name in names:
        result = results.get(name)
        if result is None or result.get("probe", {}).get("method") == PROBE_METHOD:
            continue
        if "samples" not in result["unsteered"]:
            result["probe"] = {"method": "projection on the mean-difference direction (samples "
                               "not kept, so not scored again)"}
            continue
        texts = concept_texts(tokens, model.tokenizer, result["keywords"], seed=seed)
        add_probe_scores(result, name, fit_probe(model, tokens, texts, seed), model)


def agreement(labels: Sequence[Sequence[int]]) -> dict:
    """Accuracy and Cohen's kappa of keyword vs probe labels ``[[keyword, probe], ...]``."""
    n = len(labels)
    both = sum(a == b for a, b in labels) / n
    p_keyword = sum(a for a, _ in labels) / n
    p_probe = sum(b for _, b in labels) / n
    chance = p_keyword * p_probe + (1 - p_keyword) * (1 - p_probe)
    kappa = (both - chance) / (1 - chance) if chance < 1 else 1.0
    return {"n": n, "agreement": both, "cohen_kappa": kappa, "keyword_rate": p_keyword,
            "probe_rate": p_probe}


def run_concept(model, sae, args, name: str, keywords: list[str], tokens, reference,
                statistics, prompts: list[str], unsteered: dict, neutral: dict) -> dict:
    """Select the concept's features, then measure every method at every strength."""
    started = time.perf_counter()
    search = ConceptSearch(candidates_per_ranking=args.candidates_per_ranking,
                           groups=list(args.groups), strengths=list(args.strengths),
                           max_new_tokens=args.max_new_tokens,
                           samples_per_prompt=args.validation_samples,
                           temperature=args.temperature,
                           max_perplexity_ratio=args.max_perplexity_ratio, seed=args.seed,
                           extra_strengths=list(args.extra_strengths))
    found = select_concept_features(model, sae, tokens, reference, statistics, name, keywords,
                                    search=search, progress=print)
    strengths, vector_strengths = list(args.strengths), list(args.vector_strengths)
    plans = ([found.plan(sae, s, "clamp") for s in strengths]
             + [found.plan(sae, s, "add") for s in strengths]
             + [[found.vector(s)] for s in vector_strengths])
    pattern = keyword_pattern(keywords)
    common_args = dict(pattern=pattern, max_new_tokens=args.max_new_tokens,
                       samples_per_prompt=args.samples_per_prompt,
                       temperature=args.temperature, seed=args.seed + 1, positions="all",
                       **neutral)
    measured = measure_settings(model, plans, prompts, **common_args)
    instructed = [INSTRUCTION.format(name=name) + p for p in prompts]
    measured += measure_settings(model, [[]], instructed, score_prompts=prompts, **common_args)

    n, m = len(strengths), len(vector_strengths)
    lines = {"sae_clamp": list(zip(strengths, measured[:n])),
             "sae_add": list(zip(strengths, measured[n:2 * n])),
             "mean_difference": list(zip(vector_strengths, measured[2 * n:2 * n + m]))}
    base = summarise(unsteered, pattern)
    limit = args.max_perplexity_ratio * base["perplexity"]
    plan_of = {"sae_clamp": lambda s: found.plan(sae, s, "clamp"),
               "sae_add": lambda s: found.plan(sae, s, "add"),
               "mean_difference": lambda s: [found.vector(s)]}

    def measure(keys: list[tuple[str, float]]) -> list[dict]:
        return measure_settings(model, [plan_of[method](s) for method, s in keys], prompts,
                                **common_args)

    # the lists in ``lines`` are extended in place
    extend_within_budget(measure, {k: lines[k] for k in ("sae_clamp", "sae_add")},
                         sorted(args.extra_strengths), limit)
    extend_within_budget(measure, {"mean_difference": lines["mean_difference"]},
                         sorted(args.extra_vector_strengths), limit)
    lines["prompting"] = [(None, measured[2 * n + m])]
    result = {"keywords": keywords, "features": found.choice.features,
              "values": found.choice.values, "chosen_strength": found.choice.strength,
              "validation": {"mention_rate": found.choice.mention_rate,
                             "perplexity": found.choice.perplexity,
                             "within_budget": found.choice.within_budget,
                             "unsteered": {k: found.validation_base[k]
                                           for k in ("mention_rate", "perplexity")},
                             "settings": found.validation},
              "n_mentions_in_cache": found.texts.n_mentions, "unsteered": base,
              "perplexity_limit": limit, "best": {},
              "methods": {method: [summarise(p, pattern) | {"strength": s} for s, p in line]
                          for method, line in lines.items()}}
    add_probe_scores(result, name, fit_probe(model, tokens, found.texts, args.seed), model)
    sae_best = result["best"]["sae_clamp"]
    result["target_met"] = bool(sae_best and sae_best["mention_rate"] >= 0.5
                                and base["mention_rate"] < 0.05)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{name}: features {found.choice.features}; best within {limit:.1f} perplexity: "
          + ", ".join(f"{m} {100 * b['mention_rate']:.0f}%" if b else f"{m} -"
                      for m, b in result["best"].items())
          + f"; unsteered {100 * base['mention_rate']:.0f}% ({result['seconds']:.0f} s)",
          flush=True)
    return result


def plot(results: dict):
    """(concepts x methods heatmap of the best rate within budget, per-concept curves)."""
    names = list(results)
    heat, axes = common.new_figure(1, 1, (1.6 + 1.3 * len(METHODS), 0.9 + 0.42 * len(names)))
    ax = axes[0]
    grid = [[(results[c]["best"][m] or {}).get("mention_rate", math.nan) for m in METHODS]
            for c in names]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, "-" if math.isnan(value) else f"{100 * value:.0f}%", ha="center",
                    va="center", color="white" if not value > 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(METHODS)), [m.replace("_", " ") for m in METHODS])
    ax.set_yticks(range(len(names)), names)
    ax.set_title("best concept mention rate at perplexity <= 3x unsteered")
    heat.colorbar(image, ax=ax, shrink=0.8)
    cols = 4
    curves, axes = common.new_figure(cols, -(-len(names) // cols), (3.6, 2.9))
    for ax, name in zip(axes, names):
        result = results[name]
        for method in METHODS:
            points = [p for p in result["methods"][method] if p["perplexity"] is not None]
            ax.plot([p["perplexity"] for p in points], [p["mention_rate"] for p in points],
                    "o-" if method != "prompting" else "*", label=method.replace("_", " "))
        base = result["unsteered"]
        ax.plot([base["perplexity"]], [base["mention_rate"]], "ks", label="unsteered")
        ax.axvline(result["perplexity_limit"], color="grey", ls="--", lw=0.8)
        ax.set(xscale="log", ylim=(-0.03, 1.03), title=name, xlabel="perplexity",
               ylabel="mention rate")
    for ax in axes[len(names):]:
        ax.axis("off")
    axes[0].legend(fontsize="x-small")
    return heat, curves


def resumable_settings(args: argparse.Namespace) -> dict:
    """The flags a concept's result depends on (not which concepts, nor where to write), and
    the version of the measurement."""
    settings = {k: v for k, v in common.settings(args).items() if k not in ("concepts", "out")}
    for extra in ("extra_strengths", "extra_vector_strengths"):  # none: as before these flags
        if not settings.get(extra):
            settings.pop(extra, None)
    for path in ("activations", "sae", "concepts_file"):  # however they were spelt
        settings[path] = common.canonical_path(settings.get(path))
    return settings | {"version": VERSION}


def finished_concepts(args: argparse.Namespace) -> dict:
    """Concepts an interrupted run with the same settings already measured (resume)."""
    path = Path(args.out) / f"{NAME}_partial.json"
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return saved["concepts"] if saved.get("settings") == resumable_settings(args) else {}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    concepts = json.loads(Path(args.concepts_file).read_text()) if args.concepts_file \
        else CONCEPTS
    names = [c.strip() for c in args.concepts.split(",") if c.strip()] or list(concepts)
    unknown = [n for n in names if n not in concepts]
    if unknown:
        raise SystemExit(f"unknown concepts {unknown}; choose from {list(concepts)}")
    cache = ActivationCache.open(common.get_cache(args))
    sae = load_foreign_sae(common.concept_sae(args)).eval()
    model = common.get_model(args.device)
    hook = sae.cfg.metadata.hook_name
    statistics = feature_statistics(sae, cache, max_rows=args.stats_rows)
    reference = leading_activations(cache, args.stats_rows * (cache.context - 1), hook=hook)
    prompts = read_prompts()[:args.prompts]
    neutral_texts = read_prompts()
    neutral_tokens = [model.to_tokens(t) for t in neutral_texts]
    neutral = {"neutral_tokens": neutral_tokens,
               "neutral_base": [next_token_logprobs(model, t) for t in neutral_tokens]}
    (unsteered,) = measure_settings(model, [[]], prompts, pattern=keyword_pattern(["x"]),
                                    max_new_tokens=args.max_new_tokens,
                                    samples_per_prompt=args.samples_per_prompt,
                                    temperature=args.temperature, seed=args.seed + 1,
                                    positions="all", **neutral)
    tokens = cache.tokens()
    results = finished_concepts(args)
    probe_resumed(model, tokens, results, names, args.seed)
    for name in names:
        if name in results:
            print(f"{name}: measured by an earlier run with the same settings")
            continue
        keywords = concepts[name]
        results[name] = run_concept(model, sae, args, name, keywords, tokens, reference,
                                    statistics, prompts, unsteered, neutral)
        common.save_results(args.out, NAME + "_partial", None,
                            {"settings": resumable_settings(args), "concepts": results})
    results = {name: results[name] for name in names}
    probed = [r for r in results.values() if r["probe"]["method"] == PROBE_METHOD]
    labels = [label for r in probed for m in r["methods"].values() for p in m
              for label in p["labels"]]
    rates = [(p["mention_rate"], p["probe_rate"]) for r in probed
             for m in r["methods"].values() for p in m]
    corpus = [n for n in names if n != "the Golden Gate Bridge"]
    summary = {
        "concepts_meeting_target": [n for n in corpus if results[n]["target_met"]],
        "n_corpus_concepts": len(corpus),
        "probe": {"method": PROBE_METHOD, "concepts": [n for n in names
                                                       if results[n] in probed],
                  "held_out_accuracy_mean": _mean([r["probe"]["held_out_accuracy"]
                                                   for r in probed]),
                  "unsteered_rate_mean": _mean([r["unsteered"]["probe_rate"] for r in probed])},
        "keyword_probe_agreement": agreement(labels) if labels else None,
        "keyword_probe_rate_correlation": _pearson(rates),
        "methods_best_mean": {m: _mean([(results[n]["best"][m] or {}).get("mention_rate", 0.0)
                                        for n in corpus]) for m in METHODS},
    }
    heat, curves = plot(results)
    data = {"settings": common.settings(args), "sae": str(common.concept_sae(args)),
            "hook": hook, "prompts": prompts, "summary": summary, "concepts": results,
            "seconds": round(time.perf_counter() - started, 1)}
    common.save_results(args.out, NAME + "_curves", curves, {"see": NAME + ".json"})
    common.save_results(args.out, NAME, heat, data)
    print(f"target met (>= 50% at <= {args.max_perplexity_ratio:g}x perplexity, unsteered "
          f"< 5%) for {len(summary['concepts_meeting_target'])} of {len(corpus)} corpus "
          f"concepts: {summary['concepts_meeting_target']}")
    print(markdown_table(results))
    print(f"keyword vs probe: {summary['keyword_probe_agreement']}, rate correlation "
          f"{summary['keyword_probe_rate_correlation']:.2f}")
    return data


def markdown_table(results: dict) -> str:
    """One row per concept: each method's best mention rate within the perplexity budget (the
    probe rate of that setting in brackets, starred where an earlier probe scored it), and the
    features the SAE methods used."""
    head = ("| concept | unsteered | SAE clamp | SAE add | mean-difference | prompting | "
            "features (chosen automatically) |")
    lines = [head, "|" + "---|" * 7]
    for name, result in results.items():
        cells = []
        for method in METHODS:
            best = result["best"][method]
            probe = (best or {}).get("probe_rate")
            old = result["probe"].get("method") != PROBE_METHOD  # an earlier, other probe
            cells.append("none" if best is None else f"{100 * best['mention_rate']:.0f}%"
                         + ("" if probe is None else f" ({100 * probe:.0f}%{'*' * old})"))
        base = result["unsteered"]
        features = result["features"]
        shown = ", ".join(map(str, features[:3])) + (f", ... ({len(features)})"
                                                      if len(features) > 3 else "")
        lines.append(f"| {name} | {100 * base['mention_rate']:.0f}% | " + " | ".join(cells)
                     + f" | {shown} |")
    return "\n".join(lines)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _pearson(pairs: Sequence[tuple[float, float]]) -> float:
    if len(pairs) < 2:
        return math.nan
    x = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    y = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan


if __name__ == "__main__":
    main()
