"""Feature-density histograms (Anthropic, Towards Monosemanticity: the distribution of log10
firing frequency, with its dead latents, its ultralow-density cluster and its dense latents).

For trained SAEs (``--from DIR``: every SAE folder under DIR, e.g. the frontier's; default: a
TopK and a ReLU SAE trained here), measures each latent's firing frequency on the held-out
tokens (``reconstruction_metrics``) and draws one histogram panel per SAE. Writes
``density.png`` and ``density.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import common
import torch

from saekit.evaluate import DEAD_FREQUENCY, DENSE_FREQUENCY, reconstruction_metrics
from saekit.sae import load_sae

NAME = "density"
DEFAULTS = {"tokens": 200_000, "latents": [4096], "k": [32], "l1": [4.0]}
FULL = {"tokens": 500_000}
BINS = 60  # over log10 frequency in [log10 DEAD_FREQUENCY, 0]
MAX_COLUMNS = 3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--from", dest="from_dir", default=None,
                        help="folder holding trained SAEs (searched recursively) instead of "
                        "training a TopK and a ReLU SAE")
    parser.add_argument("--l1", type=common.floats, help="ReLU L1 coefficient (default 4)")
    return common.parse(parser, NAME, DEFAULTS, FULL, argv)


def sae_folders(args: argparse.Namespace) -> dict:
    if args.from_dir:
        found = common.saved_saes(args.from_dir)
        if not found:
            raise SystemExit(f"No saved SAE (cfg.json) under {args.from_dir}.")
        return found
    return common.train_saes(args, "density", arch=["topk", "relu"], latents=args.latents[:1],
                             k=args.k[:1], l1_coefficient=args.l1[:1])


def density(name: str, folder, args: argparse.Namespace) -> dict:
    """Held-out metrics of one SAE and the histogram of its live latents' log10 frequency."""
    sae = load_sae(folder).eval()
    metrics = reconstruction_metrics(sae, common.holdout_stream(args).in_order())
    frequency = metrics.pop("firing_frequency").double()
    live = frequency[frequency >= DEAD_FREQUENCY].log10()
    edges = torch.linspace(math.log10(DEAD_FREQUENCY), 0, BINS + 1, dtype=torch.float64)
    counts = torch.histogram(live, edges).hist.long() if len(live) else torch.zeros(BINS)
    return {"name": name, "arch": sae.cfg.architecture, "d_sae": sae.d_sae,
            "l0": metrics["l0"], "fvu": metrics["fvu"], "tokens": metrics["tokens"],
            "dead_latents": int((frequency < DEAD_FREQUENCY).sum()),
            "dense_latents": int((frequency > DENSE_FREQUENCY).sum()),
            "median_log10_frequency": float(live.median()) if len(live) else None,
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def plot(panels: list[dict]):
    """One histogram panel per SAE; dead latents (off the log axis) counted in the panel."""
    ncols = min(MAX_COLUMNS, len(panels))
    fig, axes = common.new_figure(ncols=ncols, nrows=math.ceil(len(panels) / ncols),
                                  size=(4.6, 3.4))
    for ax, panel in zip(axes, panels):
        edges, counts = panel["histogram"]["edges"], panel["histogram"]["counts"]
        ax.stairs(counts, edges, fill=True, color="tab:blue")
        ax.axvline(math.log10(DENSE_FREQUENCY), color="tab:red", ls="--", lw=1)
        ax.set(xlim=(edges[0], 0), xlabel="log10 firing frequency", ylabel="latents",
               title=f"{panel['name']}\nL0 {panel['l0']:.1f}, FVU {panel['fvu']:.3f}")
        ax.text(0.02, 0.97, f"dead: {panel['dead_latents']:,}/{panel['d_sae']:,}\n"
                f"dense (>{DENSE_FREQUENCY:g}): {panel['dense_latents']:,}",
                transform=ax.transAxes, va="top", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    panels = [density(name, folder, args) for name, folder in sae_folders(args).items()]
    for p in panels:
        print(f"{p['name']:>28}: dead {p['dead_latents']}, dense {p['dense_latents']}, "
              f"median log10 freq {p['median_log10_frequency']}")
    result = {"experiment": NAME, "settings": common.settings(args),
              "dead_frequency": DEAD_FREQUENCY, "dense_frequency": DENSE_FREQUENCY,
              "saes": panels}
    common.save_results(args.out, NAME, plot(panels), result)
    return result


if __name__ == "__main__":
    main()
