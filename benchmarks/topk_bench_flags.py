"""The training-benchmark flags that benchmarks/train.py and benchmarks/train_saelens.py share,
so both scripts train at the same sizes by default. Plain argparse: train_saelens.py runs in
the SAELens venv, where saekit is not installed."""

from __future__ import annotations

import argparse


def add_topk_bench_flags(parser: argparse.ArgumentParser) -> None:
    """Cache, SAE size, batch, token budget and learning rate of the TopK training benchmark."""
    parser.add_argument("--activations", default="runs/demo/activations")
    parser.add_argument("--latents", type=int, default=10_240)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096 * 40)
    parser.add_argument("--lr", type=float, default=1e-3)
