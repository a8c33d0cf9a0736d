"""Golden Gate steering curve (Anthropic, Scaling Monosemanticity: clamping the Golden Gate
Bridge feature to a multiple of its maximum makes the model bring the bridge up, at a cost in
fluency that grows with the clamp).

Loads a TopK SAE (``--sae``; default the demo's, else one trained here), finds the feature most
selective for a few Golden Gate sentences, takes its max activation over the corpus, clamps it
to multiples of that max on neutral prompts and measures the keyword mention rate and the
perplexity (under the unsteered model) of the generations. For comparison it steers with the
concept's mean-difference vector v (mean activation on the Golden Gate sentences minus the
corpus mean, no SAE) at multiples of v: does the model take the concept at this layer at all?
Writes ``steering_curve.png`` (left: the feature, right: v) and ``steering_curve.json`` into
``--out``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import common

from saekit.cache import ActivationCache, leading_activations
from saekit.directions import mean_difference_direction
from saekit.steer import SteeringVector
from saekit.steer_eval import read_prompts, steering_curve, steering_sweep

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
        "(default 'Golden Gate,San Francisco,bridge')")
    return common.parse(parser, NAME, DEFAULTS, FULL, argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cache, model, folder, sae, concept = common.concept_setup(args)
    peak = concept["max_activation"]
    print(f"feature {concept['feature']} (score {concept['score']:.3f}), max activation {peak:.3f}")
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
    prompts = read_prompts()[:args.prompts]
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                  "samples_per_prompt": args.samples_per_prompt, "seed": args.seed}
    result = steering_curve(model, sae, concept["feature"], [m * peak for m in args.multiples],
                            prompts, keywords, **generation)
    for row, multiple in zip(result["curve"], args.multiples):
        row["multiple_of_max"] = multiple
        print(f"clamp {multiple:g} x max = {row['value']:.2f}: mentions {row['mention_rate']:.2f}, "
              f"perplexity {row['perplexity']}")
    hook = result["hook"]
    reference = leading_activations(ActivationCache.open(cache), hook=hook)
    direction = mean_difference_direction(model, hook, concept["texts"], reference)
    vectors = steering_sweep(model, [[SteeringVector(direction, hook, scale)]
                                     for scale in args.vector_scales],
                             prompts, keywords, baseline=False, **generation)["curve"]
    for row, scale in zip(vectors, args.vector_scales):
        row["scale"] = scale
        print(f"add {scale:g} v: mentions {row['mention_rate']:.2f}, perplexity {row['perplexity']}")
    result.update({"experiment": NAME, "sae": str(folder), "concept": concept,
                   "multiples": args.multiples, "max_activation": peak,
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
    panels = [(left, result["curve"], "multiple_of_max",
               f"clamp feature {result['feature']} (x its max activation)"),
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
    fig.suptitle(f"Golden Gate steering at {result['hook']}")
    return fig


if __name__ == "__main__":
    main()
