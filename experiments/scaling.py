"""FVU against the number of latents at fixed k (OpenAI, Scaling and evaluating sparse
autoencoders: at fixed k, reconstruction error falls as a power law in the number of latents).

Trains TopK SAEs of several widths, same k and same tokens, in one sweep; plots held-out FVU
against width on log-log axes with a power-law fit ``FVU = c * n ** exponent``. Writes
``scaling.png`` and ``scaling.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import common
import numpy as np

NAME = "scaling"
DEFAULTS = {"tokens": 400_000, "latents": [512, 1024, 2048, 4096], "k": [32]}
FULL = {"tokens": 1_000_000, "latents": [512, 1024, 2048, 4096, 8192, 16384]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.make_parser(__doc__.splitlines()[0])
    return common.parse(parser, NAME, DEFAULTS, FULL, argv)


def power_law(widths: Sequence[float], values: Sequence[float]) -> dict:
    """Least-squares fit of log(value) = log(c) + exponent * log(width); r2 in log space."""
    x, y = np.log(np.asarray(widths, float)), np.log(np.asarray(values, float))
    if len(x) < 2:
        return {"exponent": math.nan, "coefficient": math.nan, "r2": math.nan}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1 - (residual ** 2).sum() / total if total > 0 else math.nan
    return {"exponent": float(slope), "coefficient": float(math.exp(intercept)), "r2": float(r2)}


def plot(points: list[dict], fit: dict, k: int):
    fig, (ax,) = common.new_figure()
    widths = [p["latents"] for p in points]
    ax.plot(widths, [p["fvu"] for p in points], "o", color="tab:blue", label="TopK SAEs")
    if math.isfinite(fit["exponent"]):
        grid = np.geomspace(min(widths), max(widths), 50)
        ax.plot(grid, fit["coefficient"] * grid ** fit["exponent"], "--", color="tab:red",
                label=f"fit: FVU ∝ n^{fit['exponent']:.3f} (r²={fit['r2']:.3f})")
    ax.set(xscale="log", yscale="log", xlabel="number of latents n",
           ylabel="FVU (held-out)", title=f"Scaling the number of latents at k = {k}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    k = args.k[0]
    saved = common.train_saes(args, "widths", arch=["topk"], latents=args.latents, k=[k])
    points = []
    for name, folder in saved.items():
        info = common.summary(folder)
        held = info["held_out"]
        width = int(name.split("_w")[1].split("_")[0])
        points.append({"name": name, "latents": width, "fvu": held["fvu"], "l0": held["l0"],
                       "dead_fraction": held["dead_fraction"], "tokens": info["tokens"]})
    points.sort(key=lambda p: p["latents"])
    fit = power_law([p["latents"] for p in points], [p["fvu"] for p in points])
    print(f"power law: FVU = {fit['coefficient']:.4g} * n^{fit['exponent']:.4f} "
          f"(r2 {fit['r2']:.4f}) over {len(points)} widths")
    result = {"experiment": NAME, "settings": common.settings(args), "k": k, "points": points,
              "fit": fit}
    common.save_results(args.out, NAME, plot(points, fit, k), result)
    return result


if __name__ == "__main__":
    main()
