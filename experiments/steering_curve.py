"""Golden Gate steering curve (Anthropic, Scaling Monosemanticity: clamping the Golden Gate
Bridge feature to a multiple of its maximum makes the model bring the bridge up, at a cost in
fluency that grows with the clamp).

Loads a TopK SAE (``--sae``; default the demo's, else one trained here), finds the feature most
selective for a few Golden Gate sentences, takes its max activation over the corpus, clamps it
to multiples of that max on neutral prompts and measures the keyword mention rate and the
perplexity (under the unsteered model) of the generations. Writes ``steering_curve.png`` and
``steering_curve.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import common

from saekit.steer_eval import read_prompts, steering_curve, write_report

NAME = "steering_curve"
DEFAULTS = {"tokens": 300_000, "latents": [4096], "multiples": [0.0, 1.0, 2.0, 4.0, 8.0],
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
    result = steering_curve(model, sae, concept["feature"], [m * peak for m in args.multiples],
                            read_prompts()[:args.prompts], keywords,
                            max_new_tokens=args.max_new_tokens,
                            samples_per_prompt=args.samples_per_prompt,
                            temperature=args.temperature, seed=args.seed)
    for row, multiple in zip(result["curve"], args.multiples):
        row["multiple_of_max"] = multiple
        print(f"clamp {multiple:g} x max = {row['value']:.2f}: mentions {row['mention_rate']:.2f}, "
              f"perplexity {row['perplexity']}")
    result.update({"experiment": NAME, "sae": str(folder), "concept": concept,
                   "multiples": args.multiples, "max_activation": peak,
                   "run_settings": common.settings(args)})
    write_report(common.json_safe(result), args.out)
    print(f"wrote {args.out}/steering_curve.json and steering_curve.png")
    return result


if __name__ == "__main__":
    main()
