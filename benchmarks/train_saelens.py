"""SAELens's TopK trainer on the same cached activations as benchmarks/train.py.

Trains sae_lens's TopKTrainingSAE with sae_lens's own SAETrainer (fed an iterator of
activation batches, no model) at the sizes of benchmarks/train.py: d_in 640, 10,240
latents, k 32, batch 4,096, fp32, LR 1e-3 with 5 % linear warm-up and linear decay over
the last 20 %, AuxK on latents idle for 50,000 tokens. Everything else is SAELens's
default (decoder-norm rescaled top-k, AuxK coefficient 1, grad-norm clipping at 1,
input scaled to E||x|| = sqrt(d_in), estimated on the first 16,384 tokens), except that
b_dec starts at the mean of those tokens, as in the plain loop (saekit: their geometric
median). SAELens starts it at zero, which on this cache leaves the held-out FVU above 6
after 20 steps; --zero-b-dec keeps that.

tokens/s times SAELens's training loop (SAETrainer.fit) only: the first shard group and
the scale estimate are done before the clock starts, as for the plain loop in
benchmarks/train.py; later shard groups load inside the loop, as for both loops there.
Held-out FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the non-BOS tokens of the
cache's last shards (those holding the last 65,536 token positions), as in
saekit.evaluate.reconstruction_metrics. It needs SAELens, not saekit, in its own venv:

    make bench-saelens    # builds .venv-saelens, runs benchmarks/train.py, then this
    HF_HUB_OFFLINE=1 .venv-saelens/bin/python benchmarks/train_saelens.py \\
        --activations runs/demo/activations [--compare saekit.json]

``--compare`` reads the JSON that ``benchmarks/train.py --json`` writes and prints the
saekit / SAELens and plain-loop / SAELens tokens/s ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import sae_lens
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from cache_reader import Cache, compare_with_saekit, held_out_fvu
from topk_bench_flags import add_topk_bench_flags

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_topk_bench_flags(parser)
    parser.add_argument("--dead-tokens", type=int, default=50_000)
    parser.add_argument("--zero-b-dec", action="store_true",
                        help="keep SAELens's zero b_dec init instead of the sample mean")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--autocast", action="store_true",
                        help="SAELens's bf16 autocast of the training forward (CUDA)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--compare", type=Path, help="JSON from benchmarks/train.py --json")
    args = parser.parse_args()

    torch.manual_seed(0)
    cache = Cache(args.activations)
    steps = args.tokens // args.batch_size
    warm_up = int(0.05 * steps)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=int(cache.manifest["d_model"]), d_sae=args.latents, k=args.k, dtype="float32",
        device=args.device, normalize_activations="expected_average_only_in"))
    batches = cache.batches(args.batch_size)
    sample = [next(batches) for _ in range(max(1, 16_384 // args.batch_size))]
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=steps * args.batch_size,
            train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr,
            lr_warm_up_steps=warm_up if warm_up > 1 else 0, lr_decay_steps=int(0.2 * steps),
            dead_feature_window=args.dead_tokens // args.batch_size, device=args.device,
            autocast=args.autocast),
        sae, data_provider=itertools.chain(sample, batches))  # trains on the sample too
    trainer.activation_scaler.estimate_scaling_factor(sae.cfg.d_in, iter(sample), len(sample))
    if not args.zero_b_dec:
        mean = torch.cat(sample).mean(0) * trainer.activation_scaler.scaling_factor
        sae.b_dec.data = mean.to(args.device)

    start = time.perf_counter()
    trainer.fit()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    rate = steps * args.batch_size / (time.perf_counter() - start)
    figures = {
        "sae_lens_version": sae_lens.__version__,
        "threads": torch.get_num_threads(),
        "d_in": sae.cfg.d_in, "latents": args.latents, "k": args.k,
        "batch_size": args.batch_size, "tokens": steps * args.batch_size,
        "b_dec_init": "zero" if args.zero_b_dec else "mean",
        "device": args.device, "autocast": args.autocast,
        "saelens_topk_tokens_per_s": round(rate),
        "saelens_held_out_fvu": round(held_out_fvu(sae.eval(), cache, args.device), 4),
    }
    compare_with_saekit(figures, args.compare, args.batch_size, rate, "saelens")
    for name, value in figures.items():
        print(f"{name:28s} {value}")
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
