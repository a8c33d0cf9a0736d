"""What the paper-figure scripts share: flags, the activation cache, training SAEs, the
held-out split, the model, finding the Golden Gate feature and writing PNG + JSON atomically.

Every script is ``python experiments/NAME.py [flags]``; flags left unset take the script's
default size, or its bigger size with ``--full``. Trained SAEs go under ``OUT/saes/TAG-HASH``
(the hash covers every training setting), so a second run with the same flags reuses them.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib

matplotlib.use("Agg")
import torch
from matplotlib.figure import Figure

from saekit.analyse import feature_statistics
from saekit.cache import ActivationCache, ActivationStream
from saekit.directions import search_features
from saekit.files import atomic_path, write_json
from saekit.sae import SAE, SAEMetadata, settings_of
from saekit.train import (CHECKPOINT, TrainConfig, open_stream, sweep_configs, train,
                          train_config as make_train_config)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ACTIVATIONS = str(ROOT / "runs" / "demo" / "activations")
DEFAULT_HOOK = "blocks.6.hook_resid_post"
DEMO_SAE = "runs/demo/sae/topk_w4096_k32"
CHECKPOINT_EVERY = 1000  # steps; train() also writes one at the end (deleted once saved)

GOLDEN_GATE_TEXTS = [
    ("The Golden Gate Bridge is a suspension bridge spanning the Golden Gate strait, the "
     "entrance to San Francisco Bay."),
    ("We drove north across the Golden Gate Bridge into Marin County, the fog rolling in "
     "over San Francisco behind us."),
    ("Painted in International Orange, the Golden Gate Bridge opened in 1937 and was then "
     "the longest suspension bridge in the world."),
    "Tourists walked across the Golden Gate Bridge to photograph its towers and cables.",
]
GOLDEN_GATE_KEYWORDS = ["Golden Gate", "San Francisco", "bridge"]

COMMON_DEFAULTS: dict[str, Any] = {
    "activations": DEFAULT_ACTIVATIONS, "capture_tokens": 300_000, "latents": [4096],
    "k": [32], "batch_size": 1024, "holdout_tokens": 65_536, "seed": 0,
}


def ints(text: str) -> list[int]:
    """``"512,1024"`` → [512, 1024]."""
    return [int(v) for v in text.split(",") if v.strip()]


def floats(text: str) -> list[float]:
    """``"1,2.5"`` → [1.0, 2.5]."""
    return [float(v) for v in text.split(",") if v.strip()]


def make_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every script takes (all default to None: see ``parse``)."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--activations", help="activation cache (default runs/demo/activations, the one "
        "`make demo` writes; captured there if missing)")
    add("--capture-tokens", type=int, help="tokens to capture when the cache is missing "
        "(default 300000)")
    add("--hook", help="hook to read from the cache (default: its only hook)")
    add("--out", help="output folder (default experiments/out/SCRIPT)")
    add("--tokens", type=int, help="training tokens per SAE")
    add("--latents", type=ints, help="SAE width(s), comma-separated")
    add("--k", type=ints, help="TopK / BatchTopK k value(s), comma-separated")
    add("--batch-size", type=int, help="training batch (default 1024)")
    add("--holdout-tokens", type=int, help="cache tokens kept for evaluation (default 65536)")
    add("--seed", type=int)
    add("--device", default=None, help="cpu, cuda, ... (default: auto)")
    add("--full", action="store_true", help="the bigger run (more tokens / widths)")
    return parser


def parse(parser: argparse.ArgumentParser, name: str, defaults: dict[str, Any],
          full: dict[str, Any], argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; unset flags take ``full`` (with --full), else ``defaults``, else
    ``COMMON_DEFAULTS``. ``--out`` defaults to experiments/out/``name``."""
    args = parser.parse_args(argv)
    chosen = {**COMMON_DEFAULTS, **defaults, **(full if args.full else {}),
              "out": str(ROOT / "experiments" / "out" / name)}
    for key, value in chosen.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


@functools.lru_cache(maxsize=1)
def get_model(device: str | None = None):
    """The embedded model, loaded once per process."""
    from saekit.model import load_model

    return load_model(device=device)


def get_cache(args: argparse.Namespace) -> Path:
    """``args.activations``, captured first (``args.capture_tokens`` tokens) if not complete."""
    folder = Path(args.activations)
    if (folder / "manifest.json").exists() and \
            ActivationCache.open(folder, require_complete=False).manifest.complete:
        return folder
    from saekit.capture import CaptureConfig, capture_activations

    print(f"{folder} holds no complete cache: capturing {args.capture_tokens:,} tokens")
    config = CaptureConfig(hooks=[args.hook or DEFAULT_HOOK], tokens=args.capture_tokens)
    return capture_activations(config, folder, model=get_model(args.device))


def train_config(args: argparse.Namespace, **fields: Any) -> TrainConfig:
    """A TrainConfig from the common flags; ``fields`` override (arch, latents, k, ...)."""
    base = {"activations": str(get_cache(args)), "latents": args.latents, "k": args.k,
            "tokens": args.tokens, "batch_size": args.batch_size,
            "holdout_tokens": args.holdout_tokens, "hook": args.hook, "seed": args.seed,
            "device": args.device, "checkpoint_every": CHECKPOINT_EVERY}
    settings = {**base, **fields}
    if "k" not in fields and "k" not in settings_of(settings.get("arch", TrainConfig().arch)):
        del settings["k"]  # the common --k applies only where a trained architecture takes it
    return make_train_config(**settings)


def canonical_path(path: str | None) -> str | None:
    """``path`` spelt one way however it was given (``runs/x``, ``./runs/x/``,
    ``/abs/repo/runs/x``): relative to the repository, symlinks kept. For resume keys."""
    if not path:
        return path
    return os.path.relpath(os.path.abspath(os.path.expanduser(path)), ROOT)


def train_saes(args: argparse.Namespace, tag: str, **fields: Any) -> dict[str, Path]:
    """Train (or reuse, if already trained with the same settings) the sweep ``fields``
    describes, under ``OUT/saes/TAG-HASH``; returns name → SAE folder."""
    config = train_config(args, **fields)
    key = json.dumps(config.resume_key() | {"activations": canonical_path(config.activations)},
                     sort_keys=True, default=str)
    config.out = str(Path(args.out) / "saes" / f"{tag}-{hashlib.sha1(key.encode()).hexdigest()[:8]}")
    d_model = ActivationCache.open(config.activations).d_model
    names = sweep_configs(config, d_model, SAEMetadata())
    folders = {name: Path(config.out) / name for name in names}
    if all((f / "train_summary.json").exists() for f in folders.values()):
        print(f"reusing the SAEs in {config.out}")
        return folders
    saved = train(config)
    (Path(config.out) / CHECKPOINT).unlink(missing_ok=True)
    return saved


def summary(folder: Path) -> dict:
    """The ``train_summary.json`` of a trained SAE."""
    return json.loads((Path(folder) / "train_summary.json").read_text())


def metrics_log(folder: Path) -> list[dict]:
    """The lines of a trained SAE's ``metrics.jsonl``."""
    text = (Path(folder) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def holdout_stream(args: argparse.Namespace) -> ActivationStream:
    """The held-out shards (the same ones ``train`` evaluates on), read in order."""
    cache, stream, holdout = open_stream(train_config(args))
    return ActivationStream(cache, args.batch_size, stream.hook, shards=holdout)


def holdout_rows(args: argparse.Namespace, n_rows: int, context: int) -> torch.Tensor:
    """The first ``n_rows`` held-out token rows, cut to ``context`` tokens: ``[n, context]``."""
    stream = holdout_stream(args)
    start, _ = stream.cache.shard_rows(stream.shards[0])
    return stream.cache.tokens()[start:start + n_rows, :context]


def saved_saes(folder: str | Path) -> dict[str, Path]:
    """name (path under ``folder``) → folder of every saved SAE (a ``cfg.json``) under it."""
    found = sorted(Path(folder).rglob("cfg.json"))
    return {str(p.parent.relative_to(folder)) if p.parent != Path(folder) else p.parent.name:
            p.parent for p in found}


def concept_setup(args: argparse.Namespace):
    """``(cache, model, sae folder, sae, concept)``: ``concept_sae`` and its Golden Gate feature."""
    from saekit.formats import load_foreign_sae

    cache = get_cache(args)
    folder = concept_sae(args)
    model = get_model(args.device)
    sae = load_foreign_sae(folder).eval()
    return cache, model, folder, sae, find_concept_feature(sae, model, cache, args.stats_rows)


def concept_sae(args: argparse.Namespace) -> Path:
    """``--sae``, else the demo's TopK SAE if present, else a TopK SAE trained here."""
    if args.sae:
        return Path(args.sae)
    if (ROOT / DEMO_SAE / "cfg.json").exists() and args.activations == DEFAULT_ACTIVATIONS:
        return ROOT / DEMO_SAE
    saved = train_saes(args, "topk", arch=["topk"], latents=args.latents[:1], k=args.k[:1])
    return next(iter(saved.values()))


def add_concept_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the scripts that look for the Golden Gate feature."""
    parser.add_argument("--sae", help=f"SAE folder in any layout saekit.formats reads (default "
                        f"{DEMO_SAE} if present, else a TopK SAE trained on --activations)")
    parser.add_argument("--stats-rows", type=int, help="cache rows for the corpus statistics "
                        "(base rates, max activation; default 512)")


def find_concept_feature(sae: SAE, model, cache: Path, max_rows: int,
                         texts: Sequence[str] = GOLDEN_GATE_TEXTS, top: int = 5) -> dict:
    """The feature most selective for ``texts`` (``search_features`` against corpus base rates
    over ``max_rows`` cache rows) and its max activation (corpus max; the texts' max if it
    never fires in those rows)."""
    statistics = feature_statistics(sae, cache, max_rows=max_rows)
    hits = search_features(sae, model, text=" ".join(texts), statistics=statistics,
                                      top=top)
    best = hits[0]
    corpus_max = float(statistics.max_activation[best.feature])
    return {"feature": best.feature, "score": best.score,
            "max_activation": corpus_max if corpus_max > 0 else best.max_activation,
            "corpus_max_activation": corpus_max, "text_max_activation": best.max_activation,
            "corpus_frequency": best.frequency, "statistics_tokens": statistics.n_tokens,
            "texts": list(texts),
            "candidates": [{"feature": h.feature, "score": h.score,
                            "text_mean_activation": h.mean_activation,
                            "corpus_frequency": h.frequency} for h in hits]}


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.2, 4.0)
               ) -> tuple[Figure, list]:
    """A figure of ``nrows × ncols`` panels (a flat list of axes), no pyplot state."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None, tensors as lists, paths as strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_results(out: str | Path, name: str, fig: Figure | None, data: dict) -> Path:
    """Write ``OUT/NAME.png`` (if ``fig``) and ``OUT/NAME.json``, each atomically."""
    out = Path(out)
    if fig is not None:
        with atomic_path(out / f"{name}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    write_json(out / f"{name}.json", json_safe(data))
    print(f"wrote {out / name}.json" + (f" and {name}.png" if fig is not None else ""))
    return out / f"{name}.json"


def settings(args: argparse.Namespace) -> dict:
    """The run's flags, for the JSON."""
    return json_safe({k: v for k, v in vars(args).items()})
