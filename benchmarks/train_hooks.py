"""Several hooks in one training run against one run per hook, measured in one run.

Trains the same TopK SAE at each of two hooks of one cache, (a) in one run (``--hook A
--hook B``: each batch is read once, at both hooks) and (b) as two one-hook runs, and prints
wall-clock seconds and SAE-tokens/s (tokens x hooks / s) of each, end to end (reading shards,
training, held-out evaluation, saving). The one-hook runs go before and after the two-hook
run, so drift in the machine's speed during the run falls on both sides.

Without ``--activations`` the runs train on the fly (the model reads the corpus; the
two-hook run's one forward serves both hooks, where one-hook runs each run their own); the
model is loaded once, before timing.

    python benchmarks/train_hooks.py --hook blocks.3.hook_resid_post \\
        --hook blocks.6.hook_resid_post --tokens 32768

    saekit cache --hook blocks.3.hook_resid_post --hook blocks.6.hook_resid_post \\
        --tokens 65536 --shard-rows 64 --out runs/acts_3_6
    python benchmarks/train_hooks.py --activations runs/acts_3_6 --tokens 32768
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from saekit.cache import ActivationCache
from saekit.model import load_model
from saekit.train import TrainConfig, train


def timed_train(config: TrainConfig, model=None) -> tuple[float, dict[str, float]]:
    """Seconds of one ``train`` call and each SAE's held-out FVU."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        saved = train(replace(config, out=tmp), model=model)
        seconds = time.perf_counter() - start
        fvu = {name: json.loads((folder / "train_summary.json").read_text())["held_out"]["fvu"]
               for name, folder in saved.items()}
    return seconds, fvu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--activations", help="a cache holding >= 2 hooks (default: train "
                        "on the fly, the default model reading the default corpus)")
    parser.add_argument("--hook", action="append", help="two hooks (default: the cache's first two)")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--holdout-tokens", type=int, default=8192)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    if not args.activations and len(args.hook or []) != 2:
        parser.error("on the fly (no --activations) give the two hooks: --hook A --hook B")
    hooks = args.hook or ActivationCache.open(args.activations).hooks[:2]
    config = TrainConfig(activations=args.activations or "", hook=hooks, latents=[args.latents],
                         options={"k": [args.k]}, batch_size=args.batch_size,
                         tokens=args.tokens, holdout_tokens=args.holdout_tokens,
                         checkpoint_every=10**9, log_every=10**9)
    model = None if args.activations else load_model(config.model, device="cpu")
    first, first_fvu = timed_train(replace(config, hook=hooks[:1]), model)
    both, both_fvu = timed_train(config, model)
    second, second_fvu = timed_train(replace(config, hook=hooks[1:]), model)
    sae_tokens = config.steps * config.batch_size * len(hooks)
    figures = {
        "threads": torch.get_num_threads(), "source": args.activations or "on the fly",
        "hooks": hooks, "latents": args.latents,
        "k": args.k, "batch_size": args.batch_size, "tokens_per_hook": sae_tokens // len(hooks),
        "two_hook_run_s": round(both, 2),
        "two_one_hook_runs_s": round(first + second, 2),
        "two_hook_run_sae_tokens_per_s": round(sae_tokens / both),
        "two_one_hook_runs_sae_tokens_per_s": round(sae_tokens / (first + second)),
        "speedup": round((first + second) / both, 3),
        "same_held_out_fvu": sorted(both_fvu.values()) == sorted([*first_fvu.values(),
                                                                  *second_fvu.values()]),
    }
    for name, value in figures.items():
        print(f"{name:36s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
