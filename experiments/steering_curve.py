"""Steering curve (Anthropic, Scaling Monosemanticity: clamping the Golden Gate Bridge feature
to a multiple of its maximum makes the model bring the bridge up, at a cost in fluency that
grows with the clamp).

Two ways to pick what is clamped:

- default: loads a TopK SAE (``--sae``; default the demo's, else one trained here), finds the
  feature most selective for a few Golden Gate sentences and clamps it to multiples of its max
  activation over the corpus;
- ``--concept NAME --concept-result FILE``: the feature(s) ``saekit concept`` chose for a
  concept (FILE: its ``concept.json``, or the steering benchmark's JSON, which holds one entry
  per concept), clamped to multiples of the chosen clamp values; the concept's texts are its
  keyword windows in the cache.

On neutral prompts it measures the keyword mention rate and the perplexity (under the
unsteered model) of the generations. For comparison it steers with the concept's
mean-difference vector v (mean activation on the concept's texts minus the corpus mean, no
SAE) at multiples of v. Writes ``steering_curve.png`` (left: the SAE, right: v) and
``steering_curve.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import common

from saekit.cache import ActivationCache, leading_activations
from saekit.concept import window_activations
from saekit.concept_texts import concept_texts
from saekit.directions import mean_difference_direction
from saekit.formats import load_foreign_sae
from saekit.steer import Intervention, SteeringVector
from saekit.steer_eval import read_prompts, steering_sweep

NAME = "steering_curve"
DEFAULTS = {"tokens": 300_000, "latents": [4096], "multiples": [0.0, 1.0, 2.0, 4.0, 8.0],
            "vector_scales": [1.0, 2.0, 3.0, 4.0],
            "prompts": 10, "samples_per_prompt": 1, "max_new_tokens": 20,
            "temperature": 0.7, "stats_rows": 512,
            "keywords": ",".join(common.GOLDEN_GATE_KEYWORDS)}
FULL = {"multiples": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0], "samples_per_prompt": 4,
        "max_new_tokens": 30, "stats_rows": 2048}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.make_parser(__doc__.splitlines()[0])
    common.add_concept_args(parser)
    add = parser.add_argument
    add("--multiples", type=common.floats, help="clamp values as multiples of the feature's "
        "max activation (default 0,1,2,4,8)")
    add("--vector-scales", type=common.floats, help="multiples of the mean-difference vector "
        "steered for comparison (default 1,2,3,4)")
    add("--prompts", type=int, help="how many neutral prompts (saekit/data/neutral_prompts.txt)")
    add("--samples-per-prompt", type=int, help="generations per prompt and value (default 1)")
    add("--max-new-tokens", type=int, help="tokens per generation (default 20)")
    add("--temperature", type=float, help="sampling temperature (default 0.7; 0: greedy)")
    add("--keywords", help="comma-separated concept keywords "
        "(default 'Golden Gate,San Francisco,bridge'; with --concept: the result's)")
    add("--concept", help="a concept from --concept-result: clamp the features saekit concept "
        "chose for it (multiples of their chosen clamp values) instead of the Golden Gate search")
    add("--concept-result", help="a saekit concept concept.json, or the steering benchmark's "
        "JSON (docs/steering_benchmark.json)")
    return common.parse(parser, NAME, DEFAULTS, FULL, argv)


def chosen_features(path: str, name: str) -> dict:
    """``{"name", "keywords", "features", "values", "sae"}`` of ``name`` in a ``concept.json``
    or a steering benchmark JSON."""
    result = json.loads(Path(path).read_text())
    if "concepts" in result:  # the benchmark: one entry per concept
        if name not in result["concepts"]:
            raise SystemExit(f"{path} has no concept {name!r}; it has "
                             f"{', '.join(result['concepts'])}.")
        entry = result["concepts"][name] | {"sae": result["sae"]}
    elif result.get("concept") == name:
        entry = result
    else:
        raise SystemExit(f"{path} is the result for {result.get('concept')!r}, not {name!r}.")
    if not entry.get("features"):
        raise SystemExit(f"{path}: no features were chosen for {name!r}.")
    return {"name": name, "keywords": entry["keywords"], "features": entry["features"],
            "values": entry["values"], "sae": entry["sae"]}


def concept_setup(args):
    """``(cache, model, sae folder, sae, concept)`` for ``--concept``: the chosen features and
    the concept's keyword windows in the cache."""
    chosen = chosen_features(args.concept_result, args.concept)
    folder = Path(args.sae or chosen["sae"])
    cache = ActivationCache.open(common.get_cache(args))
    model = common.get_model(args.device)
    sae = load_foreign_sae(folder).eval()
    texts = concept_texts(cache.tokens(), model.tokenizer, chosen["keywords"], seed=args.seed)
    return cache, model, folder, sae, chosen | {"windows": texts.windows,
                                                "n_mentions": texts.n_mentions}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.concept:
        cache, model, folder, sae, concept = concept_setup(args)
        keywords, base_values = concept["keywords"], concept["values"]
        print(f"{concept['name']}: features {concept['features']}, chosen clamp values "
              f"{', '.join(f'{v:.3g}' for v in base_values)}")
    else:
        cache, model, folder, sae, concept = common.concept_setup(args)
        concept |= {"name": "the Golden Gate Bridge", "features": [concept["feature"]]}
        keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
        base_values = [concept["max_activation"]]
        print(f"feature {concept['feature']} (score {concept['score']:.3f}), max activation "
              f"{base_values[0]:.3f}")
    prompts = read_prompts()[:args.prompts]
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                  "samples_per_prompt": args.samples_per_prompt, "seed": args.seed}
    plans = [[Intervention(sae, clamp={f: m * v for f, v in zip(concept["features"],
                                                                  base_values)})]
             for m in args.multiples]
    result = steering_sweep(model, plans, prompts, keywords, **generation)
    for row, multiple in zip(result["curve"], args.multiples):
        row |= {"multiple": multiple, "values": [multiple * v for v in base_values]}
        row["value"] = row["values"][0] if len(base_values) == 1 else None
        print(f"clamp {multiple:g} x: mentions {row['mention_rate']:.2f}, "
              f"perplexity {row['perplexity']}")
    hook = sae.cfg.metadata.hook_name
    reference = leading_activations(ActivationCache.open(cache.folder if args.concept else cache),
                                    hook=hook)
    if args.concept:
        direction = window_activations(model, hook, concept.pop("windows")).float().mean(0) \
            - reference.reshape(-1, reference.shape[-1]).float().mean(0)
    else:
        direction = mean_difference_direction(model, hook, concept["texts"], reference)
    vectors = steering_sweep(model, [[SteeringVector(direction, hook, scale)]
                                     for scale in args.vector_scales],
                             prompts, keywords, baseline=False, **generation)["curve"]
    for row, scale in zip(vectors, args.vector_scales):
        row["scale"] = scale
        print(f"add {scale:g} v: mentions {row['mention_rate']:.2f}, perplexity {row['perplexity']}")
    result.update({"experiment": NAME, "sae": str(folder), "hook": hook, "concept": concept,
                   "feature": concept["features"][0] if len(base_values) == 1 else None,
                   "max_activation": concept.get("max_activation"),
                   "concept_keywords": keywords, "multiples": args.multiples,
                   "base_values": base_values, "multiple_of": "clamp values chosen by saekit "
                   "concept" if args.concept else "the feature's max activation",
                   "mean_difference": {"norm": float(direction.norm()),
                                       "reference_norm": float(reference.norm(dim=-1).mean()),
                                       "curve": vectors},
                   "run_settings": common.settings(args)})
    common.save_results(args.out, NAME, plot(result), result)
    return result


def plot(result: dict):
    """Mention rate and perplexity against the steering strength: the feature, then v."""
    fig, (left, right) = common.new_figure(ncols=2)
    base = result["baseline"]
    features = result["concept"]["features"]
    what = f"feature {features[0]}" if len(features) == 1 else f"{len(features)} features"
    unit = "chosen clamp" if result["multiple_of"].startswith("clamp") else "its max activation"
    panels = [(left, result["curve"], "multiple", f"clamp {what} (x {unit})"),
              (right, result["mean_difference"]["curve"], "scale",
               "add the mean-difference vector v (x v)")]
    for ax, rows, key, label in panels:
        xs = [row[key] for row in rows]
        ax.plot(xs, [row["mention_rate"] for row in rows], "o-", color="tab:blue",
                label="mention rate")
        ax.axhline(base["mention_rate"], color="tab:blue", ls="--", lw=1, label="unsteered")
        ax.set(xlabel=label, ylabel="concept mention rate", ylim=(-0.02, 1.02))
        twin = ax.twinx()
        twin.plot(xs, [row["perplexity"] or float("nan") for row in rows], "s-", color="tab:red",
                  label="perplexity")
        twin.axhline(base["perplexity"], color="tab:red", ls="--", lw=1)
        twin.set(yscale="log", ylabel="perplexity (unsteered model)")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="center left", fontsize="small")
    fig.suptitle(f"Steering towards {result['concept']['name']} at {result['hook']}")
    return fig


if __name__ == "__main__":
    main()
