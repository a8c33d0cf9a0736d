"""Which layer steers best? A concept's mean-difference vector at several residual-stream
layers, measured like the steering benchmark (keyword mention rate and perplexity under the
unsteered model, best rate within 3x the unsteered perplexity).

This needs no SAE: it asks whether another layer would give an SAE more to work with, since an
SAE feature's decoder direction is a direction at its layer too. Per concept (its corpus
windows from the cache's token rows, as ``saekit concept`` finds them) and layer: the mean
activation over the concept's windows minus that over ordinary windows free of its keywords,
added at every position with norm = strength x that layer's typical centred norm (the
residual scale of the ordinary windows). Writes ``steering_layers.json`` and a concepts x
layers heatmap ``steering_layers.png``; saves after each concept and resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import common
import torch.nn.functional as F

from saekit.cache import ActivationCache
from saekit.concept import benchmark_concepts, residual_scale, window_activations
from saekit.concept_probe import ordinary_windows
from saekit.concept_texts import concept_texts
from saekit.steer import SteeringVector
from saekit.steer_eval import keyword_pattern, measure_settings, next_token_logprobs, read_prompts

NAME = "steering_layers"
DEFAULTS = {"layers": [3, 6, 9, 12], "vector_strengths": [0.25, 0.4, 0.6], "concepts": "",
            "concepts_file": "",
            "prompts": 10, "samples_per_prompt": 3, "max_new_tokens": 32, "temperature": 0.7,
            "ordinary_windows": 192, "max_perplexity_ratio": 3.0}


def parse_args(argv: Sequence[str] | None = None):
    parser = common.make_parser(__doc__.splitlines()[0])
    add = parser.add_argument
    add("--layers", type=common.ints, help="residual-stream layers (default 3,6,9,12)")
    add("--vector-strengths", type=common.floats, help="edit norms, x each layer's residual "
        "scale (default 0.25,0.4,0.6)")
    add("--concepts", help="comma-separated names of saekit/data/benchmark_concepts.json "
        "(default: all)")
    add("--concepts-file", help="JSON file, concept name -> keywords (default: "
        "saekit/data/benchmark_concepts.json)")
    add("--prompts", type=int, help="evaluation prompts (saekit/data/neutral_prompts.txt)")
    add("--samples-per-prompt", type=int)
    add("--max-new-tokens", type=int)
    add("--temperature", type=float)
    add("--ordinary-windows", type=int, help="windows of ordinary text (default 192)")
    add("--max-perplexity-ratio", type=float)
    return common.parse(parser, NAME, DEFAULTS, {}, argv)


def layer_vectors(model, tokens, keywords: list[str], layers: Sequence[int], n_ordinary: int,
                  seed: int) -> tuple[dict[int, tuple], int]:
    """Per layer ``(hook, unit mean-difference vector [d_model], residual scale)``, and the
    number of keyword mentions found."""
    texts = concept_texts(tokens, model.tokenizer, keywords, seed=seed)
    ordinary = ordinary_windows(tokens, texts.mentions, n_ordinary, 64, seed=seed,
                                bos_token_id=model.tokenizer.bos_token_id)
    out = {}
    for layer in layers:
        hook = f"blocks.{layer}.hook_resid_post"
        concept = window_activations(model, hook, texts.windows)
        reference = window_activations(model, hook, ordinary)
        out[layer] = (hook, F.normalize(concept.mean(0) - reference.mean(0), dim=0),
                      residual_scale(reference))
    return out, texts.n_mentions


def plot(results: dict, layers: Sequence[int]):
    names = list(results)
    fig, (ax,) = common.new_figure(1, 1, (1.5 + 0.9 * len(layers), 0.9 + 0.42 * len(names)))
    grid = [[100 * (results[n]["best_by_layer"].get(str(layer)) or 0) for layer in layers]
            for n in names]
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center",
                    color="white" if value < 60 else "black")
    ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_yticks(range(len(names)), names)
    ax.set_title("mean-difference vector: best mention rate (%) within the perplexity budget")
    fig.colorbar(image, ax=ax)
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    concepts = json.loads(Path(args.concepts_file).read_text()) if args.concepts_file \
        else benchmark_concepts()
    names = [c.strip() for c in args.concepts.split(",") if c.strip()] or list(concepts)
    unknown = [n for n in names if n not in concepts]
    if unknown:
        raise SystemExit(f"unknown concepts {unknown}; choose from {list(concepts)}")
    tokens = ActivationCache.open(common.get_cache(args)).tokens()
    model = common.get_model(args.device)
    prompts = read_prompts()[:args.prompts]
    neutral = [model.to_tokens(t) for t in read_prompts()]
    measure = dict(max_new_tokens=args.max_new_tokens, samples_per_prompt=args.samples_per_prompt,
                   temperature=args.temperature, seed=args.seed + 1, positions="all",
                   neutral_tokens=neutral,
                   neutral_base=[next_token_logprobs(model, t) for t in neutral])
    (unsteered,) = measure_settings(model, [[]], prompts, pattern=keyword_pattern(["x"]),
                                    **measure)
    limit = args.max_perplexity_ratio * unsteered["perplexity"]
    settings = {k: v for k, v in common.settings(args).items()
                if k not in ("concepts", "out", "device")}
    for path in ("activations", "concepts_file"):  # however they were spelt
        settings[path] = common.canonical_path(settings.get(path))
    partial = Path(args.out) / f"{NAME}.json"
    saved = json.loads(partial.read_text()) if partial.exists() else {}
    results = saved.get("concepts", {}) if saved.get("settings") == settings else {}
    for name in names:
        if name in results:
            continue
        started = time.perf_counter()
        keywords = concepts[name]
        vectors, n_mentions = layer_vectors(model, tokens, keywords, args.layers,
                                            args.ordinary_windows, args.seed)
        plans = [[SteeringVector(unit * s * scale, hook)] for hook, unit, scale in vectors.values()
                 for s in args.vector_strengths]
        points = measure_settings(model, plans, prompts, pattern=keyword_pattern(keywords),
                                  **measure)
        rows = [{"layer": layer, "strength": s, "residual_scale": vectors[layer][2]}
                | {k: p[k] for k in ("mention_rate", "perplexity", "kl_neutral")}
                for (layer, s), p in zip([(layer, s) for layer in vectors
                                          for s in args.vector_strengths], points)]
        best = {str(layer): max((r["mention_rate"] for r in rows if r["layer"] == layer
                                 and r["perplexity"] is not None and r["perplexity"] <= limit),
                                default=None) for layer in args.layers}
        results[name] = {"keywords": keywords, "n_mentions": n_mentions, "points": rows,
                         "best_by_layer": best,
                         "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name}: best within {limit:.1f} perplexity by layer "
              + ", ".join(f"{layer}: " + ("-" if b is None else f"{100 * b:.0f}%")
                          for layer, b in best.items()), flush=True)
        save(args, settings, unsteered["perplexity"], limit, results)
    return save(args, settings, unsteered["perplexity"], limit, results)


def save(args, settings: dict, perplexity: float, limit: float, results: dict) -> dict:
    data = {"settings": settings, "unsteered_perplexity": perplexity, "perplexity_limit": limit,
            "concepts": results}
    common.save_results(args.out, NAME, plot(results, args.layers), data)
    return data


if __name__ == "__main__":
    main()
