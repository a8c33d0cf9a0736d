"""Feature absorption at equal L0 (Chanin et al. 2024, "A is for Absorption", 2409.14507; the
Matryoshka comparison of Bussmann et al. 2025, 2503.17547).

Trains TopK, BatchTopK and Matryoshka BatchTopK SAEs of one width and k on the cache, reads
the first-letter spelling task at the cache's hook (``--words`` single-token words of the
model's vocabulary, each after a few-shot spelling prompt; kept in OUT/spelling-*.pt), fits
one probe per letter on the train words and measures each SAE's absorption rate per letter on
the held-out words (``saekit.absorption``). Each SAE's held-out FVU, L0 and dead fraction
(its frontier point) go into the JSON too. Writes ``absorption.png`` + ``absorption.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import common
import torch

from saekit.absorption import (LETTERS, LetterProbes, SpellingData, f1_scores,
                               fit_letter_probes, letter_labels, measure_absorption,
                               spelling_data, spelling_prompt)
from saekit.cache import ActivationCache
from saekit.sae import load_sae

NAME = "absorption"
DEFAULTS = {"tokens": 500_000, "latents": [4096], "k": [32], "words": 5000,
            "test_fraction": 0.3}
FULL = {"words": 10_000}
ARCHS = ["topk", "batchtopk", "matryoshka"]
COLORS = {"topk": "tab:blue", "batchtopk": "tab:green", "matryoshka": "tab:purple"}
PAPER = ("Bussmann et al. 2025 (Matryoshka SAEs) report lower first-letter absorption for "
         "Matryoshka BatchTopK than for BatchTopK and TopK at similar L0 (SAEBench).")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--arch", type=lambda s: s.split(","), default=None,
                        help=f"architectures (default {','.join(ARCHS)})")
    parser.add_argument("--words", type=int, help="single-token words drawn from the "
                        "vocabulary (default 5000)")
    parser.add_argument("--test-fraction", type=float, help="share of the words held out "
                        "(default 0.3)")
    return common.parse(parser, NAME, {**DEFAULTS, "arch": ARCHS}, FULL, argv)


def spelling(args: argparse.Namespace, hook: str) -> SpellingData:
    """The spelling task's words and activations, read once and kept in OUT."""
    path = Path(args.out) / f"spelling-{hook}-{args.words}-{args.test_fraction}-{args.seed}.pt"
    if path.exists():
        print(f"reusing the spelling activations in {path}")
        return SpellingData(**torch.load(path))
    print(f"reading {args.words} words at {hook}")
    data = spelling_data(common.get_model(args.device), hook, args.words, args.test_fraction,
                         args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vars(data), path)
    return data


def measure(saved: dict[str, Path], data: SpellingData, probes: LetterProbes) -> list[dict]:
    """One row per SAE: its held-out frontier point and its absorption per letter."""
    rows = []
    for name, folder in saved.items():
        sae = load_sae(folder).eval()
        held = common.summary(folder)["held_out"]
        result = measure_absorption(sae, data, probes)
        rows.append({"name": name, "arch": sae.cfg.architecture,
                     "k": getattr(sae.cfg.options, "k", None), "latents": sae.d_sae,
                     "fvu": held["fvu"], "l0": held["l0"],
                     "dead_fraction": held["dead_fraction"], **result.summary()})
        print(f"{name:>24}: mean absorption {result.mean_absorption_rate:.3f} over "
              f"{len(result.covered)} letters  FVU {held['fvu']:.4f}  L0 {held['l0']:.1f}  "
              f"dead {100 * held['dead_fraction']:.1f}%")
    return rows


def probe_summary(data: SpellingData, probes: LetterProbes) -> dict:
    """The probes' held-out F1 per letter and the split sizes."""
    test = data.test
    f1 = f1_scores((probes.logits(data.activations[test]) > 0).T,
                   letter_labels(data.letters[test]))
    return {"hook": data.hook, "words": len(data.words), "held_out_words": int(test.sum()),
            "prompt_prefix": spelling_prompt(), "probe_held_out_f1": dict(zip(LETTERS,
                                                                           f1.tolist()))}


def plot(rows: list[dict]):
    """Left: absorption rate per covered letter and SAE; right: each SAE's mean rate."""
    fig, (left, right) = common.new_figure(ncols=2, size=(6.5, 4.0))
    covered = sorted({letter["letter"] for row in rows for letter in row["letters"]
                      if letter["covered"]})
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        rates = {letter["letter"]: letter["absorption_rate"] for letter in row["letters"]
                 if letter["covered"]}
        left.bar([j + i * width for j in range(len(covered))],
                 [rates.get(letter, float("nan")) for letter in covered], width,
                 color=COLORS.get(row["arch"]), label=row["arch"])
        right.bar(i, row["mean_absorption_rate"], color=COLORS.get(row["arch"]))
        right.annotate(f"FVU {row['fvu']:.3f}\nL0 {row['l0']:.0f}",
                       (i, row["mean_absorption_rate"]), ha="center", va="bottom", fontsize=8)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(covered))], covered)
    left.set(xlabel="first letter (covered letters)", ylabel="absorption rate (held-out)",
             title="Absorption per letter")
    left.legend()
    right.set_xticks(range(len(rows)), [row["arch"] for row in rows])
    right.set(ylabel="mean absorption rate", title="Mean over covered letters")
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    saved = common.train_saes(args, "absorption", arch=args.arch, latents=args.latents[:1],
                              k=args.k[:1])
    hook = args.hook or ActivationCache.open(common.get_cache(args)).hooks[0]
    data = spelling(args, hook)
    probes = fit_letter_probes(data)
    rows = measure(saved, data, probes)
    result = {"experiment": NAME, "settings": common.settings(args),
              "spelling": probe_summary(data, probes), "saes": rows, "paper": PAPER}
    common.save_results(args.out, NAME, plot(rows), result)
    return result


if __name__ == "__main__":
    main()
