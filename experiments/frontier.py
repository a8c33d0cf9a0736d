"""Sparsity–fidelity frontier (OpenAI, Scaling and evaluating sparse autoencoders, Fig. 2 style).

Trains ReLU+L1 (several L1 coefficients), TopK and BatchTopK (several k) and JumpReLU (several
L0 coefficients) in one sweep, then plots held-out L0 against FVU (``train_summary.json``) and
against CE-loss recovered when the SAE is spliced into the model on a few held-out rows.
Writes ``frontier.png`` and ``frontier.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import common
from matplotlib.ticker import NullFormatter

from saekit.evaluate import downstream_metrics
from saekit.sae import load_sae

NAME = "frontier"
DEFAULTS = {"tokens": 150_000, "latents": [2048], "k": [16, 32, 64],
            "l1": [1.0, 2.0, 4.0, 8.0], "l0": [0.003, 0.01, 0.03, 0.1],
            "ce_rows": 8, "ce_context": 128}
FULL = {"tokens": 500_000, "latents": [4096], "k": [8, 16, 32, 64, 128],
        "l1": [0.5, 1.0, 2.0, 4.0, 8.0], "l0": [0.001, 0.003, 0.01, 0.03, 0.1], "ce_rows": 32}
ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]
STYLE = {"relu": ("tab:gray", "o"), "topk": ("tab:blue", "s"),
         "batchtopk": ("tab:green", "^"), "jumprelu": ("tab:red", "D")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--arch", type=lambda s: s.split(","), default=None,
                        help=f"architectures (default {','.join(ARCHS)})")
    parser.add_argument("--l1", type=common.floats, help="ReLU L1 coefficients")
    parser.add_argument("--l0", type=common.floats, help="JumpReLU L0 coefficients")
    parser.add_argument("--ce-rows", type=int, help="held-out rows for CE-loss recovered")
    parser.add_argument("--ce-context", type=int, help="tokens per row for CE-loss recovered")
    return common.parse(parser, NAME, {**DEFAULTS, "arch": ARCHS}, FULL, argv)


def measure(saved: dict[str, Path], args: argparse.Namespace) -> list[dict]:
    """One point per SAE: held-out L0/FVU from its summary, CE-loss recovered spliced."""
    model = common.get_model(args.device)
    rows = common.holdout_rows(args, args.ce_rows, args.ce_context)
    points = []
    for name, folder in saved.items():
        sae = load_sae(folder).eval()
        held = common.summary(folder)["held_out"]
        spliced = downstream_metrics(model, sae, rows, batch_rows=4)
        points.append({"name": name, "arch": sae.cfg.architecture,
                       "k": getattr(sae.cfg.options, "k", None),
                       "l0": held["l0"], "fvu": held["fvu"],
                       "dead_fraction": held["dead_fraction"],
                       "ce_loss_recovered": spliced["ce_loss_recovered"],
                       "delta_lm_loss": spliced["delta_lm_loss"], "kl_div": spliced["kl_div"],
                       "ce_l0": spliced["l0"], "ce_scored_predictions":
                       spliced["scored_predictions"]})
        print(f"{name:>28}: L0 {held['l0']:7.1f}  FVU {held['fvu']:.4f}  "
              f"CE recovered {spliced['ce_loss_recovered']:.4f}")
    return points


def plot(points: list[dict]):
    """Two panels, log-scale L0: FVU and CE-loss recovered, one series per architecture."""
    fig, (left, right) = common.new_figure(ncols=2)
    for arch in ARCHS:
        mine = sorted((p for p in points if p["arch"] == arch), key=lambda p: p["l0"])
        if not mine:
            continue
        color, marker = STYLE[arch]
        l0 = [p["l0"] for p in mine]
        left.plot(l0, [p["fvu"] for p in mine], marker=marker, color=color, label=arch)
        right.plot(l0, [p["ce_loss_recovered"] for p in mine], marker=marker, color=color,
                   label=arch)
    left.set(xscale="log", yscale="log", xlabel="L0 (held-out)",
             ylabel="FVU (normalised MSE, held-out)", title="Sparsity vs reconstruction")
    right.set(xscale="log", xlabel="L0 (held-out)", ylabel="CE-loss recovered",
              title="Sparsity vs downstream loss")
    for ax in (left, right):
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short range
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    saved = common.train_saes(args, "sweep", arch=args.arch, latents=args.latents[:1],
                              k=args.k, l1_coefficient=args.l1, l0_coefficient=args.l0)
    points = measure(saved, args)
    result = {"experiment": NAME, "settings": common.settings(args), "points": points,
              "ce_eval": {"rows": args.ce_rows, "context": args.ce_context,
                          "split": "first held-out rows of the cache"}}
    common.save_results(args.out, NAME, plot(points), result)
    return result


if __name__ == "__main__":
    main()
