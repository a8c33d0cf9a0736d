"""Dead latents over training, with and without the AuxK loss (OpenAI, Scaling and evaluating
sparse autoencoders: AuxK keeps the dead fraction low; without it many latents die).

Trains the same TopK SAE twice (``aux_coefficient`` 1/32 and 0) and plots the dead fraction
(latents idle for ``--dead-tokens`` tokens) against training tokens from ``metrics.jsonl``.
Writes ``dead_latents.png`` and ``dead_latents.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import common

NAME = "dead_latents"
DEFAULTS = {"tokens": 300_000, "latents": [8192], "k": [32], "dead_tokens": 20_000,
            "aux_coefficient": 1 / 32}
FULL = {"tokens": 1_000_000, "latents": [16384], "dead_tokens": 50_000}
NOTE = ("dead = no activation in the last dead_tokens training tokens. OpenAI use 10M tokens; "
        "at this scale (a few hundred thousand tokens) a window that long would never be "
        "reached, so a smaller window is used; the held-out dead fraction counts latents that "
        "never fire on the held-out tokens.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--dead-tokens", type=int,
                        help="idle tokens after which a latent counts as dead (default 20000)")
    parser.add_argument("--aux-coefficient", type=float,
                        help="AuxK coefficient of the 'with AuxK' run (default 1/32)")
    return common.parse(parser, NAME, DEFAULTS, FULL, argv)


def run(args: argparse.Namespace, aux_coefficient: float) -> dict:
    """Train one TopK SAE; its dead-fraction curve and held-out summary."""
    tag = f"aux{aux_coefficient:g}"
    (name, folder), = common.train_saes(
        args, tag, arch=["topk"], latents=args.latents[:1], k=args.k[:1],
        dead_tokens=args.dead_tokens, aux_coefficient=aux_coefficient).items()
    log = common.metrics_log(folder)
    held = common.summary(folder)["held_out"]
    return {"name": name, "aux_coefficient": aux_coefficient,
            "tokens": [line["tokens"] for line in log],
            "dead_fraction": [line["dead_fraction"] for line in log],
            "final_dead_fraction": log[-1]["dead_fraction"],
            "held_out_fvu": held["fvu"], "held_out_dead_fraction": held["dead_fraction"]}


def plot(runs: list[dict], args: argparse.Namespace):
    fig, (ax,) = common.new_figure()
    for series, color in zip(runs, ("tab:blue", "tab:red")):
        label = (f"AuxK α={series['aux_coefficient']:.4g}" if series["aux_coefficient"]
                 else "no AuxK")
        ax.plot(series["tokens"], [100 * v for v in series["dead_fraction"]], color=color,
                label=f"{label} (held-out FVU {series['held_out_fvu']:.3f})")
    ax.set(xlabel="training tokens", ylabel=f"dead latents, % (idle ≥ {args.dead_tokens:,} tokens)",
           title=f"TopK n={args.latents[0]}, k={args.k[0]}: dead latents over training")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = [run(args, args.aux_coefficient), run(args, 0.0)]
    for series in runs:
        print(f"aux {series['aux_coefficient']:.4g}: final dead {series['final_dead_fraction']:.3%}"
              f", held-out dead {series['held_out_dead_fraction']:.3%}, "
              f"FVU {series['held_out_fvu']:.4f}")
    result = {"experiment": NAME, "settings": common.settings(args),
              "dead_tokens": args.dead_tokens, "note": NOTE, "runs": runs}
    common.save_results(args.out, NAME, plot(runs, args), result)
    return result


if __name__ == "__main__":
    main()
