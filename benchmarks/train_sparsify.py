"""EleutherAI sparsify's TopK SAE trained on the same cached activations as benchmarks/train.py.

sparsify's ``Trainer`` only trains from a model it hooks (its batches are token ids), so this
script runs the body of that trainer's step itself on batches read from a saekit cache,
with sparsify's own pieces: its ``SparseCoder`` (fused top-k encoder with an index_add
backward; decode through its Triton embedding-bag kernel when Triton is there, else
``embedding_bag``; forward under bf16 autocast on a CUDA device that supports it), and its
default optimiser (``signum``: ``ScheduleFreeWrapper(SignSGD)``, momentum 0.95, LR 5e-3 /
sqrt(latents / 2^14)) or ``--optimizer adam`` (torch Adam at ``--lr``, sparsify's linear
warm-up/decay schedule). As sparsify's trainer does: fp32 matmuls may use TF32, b_dec starts at
the first batch's mean, decoder rows are renormalised before each forward and the gradient
along them removed before each step, and latents idle for ``--dead-tokens`` get its AuxK loss
(weight ``--auxk-alpha``; sparsify's default is 0, 1/32 matches saekit). Inputs are raw
activations: sparsify does not normalise them.

tokens/s counts steps 2..N (the first step, which compiles Triton kernels, is left out, as
benchmarks/train.py leaves out saekit's). Held-out FVU as in benchmarks/train_saelens.py, with
the schedule-free optimiser's averaged weights (``optimizer.eval()``, as sparsify saves).
Runs in its own venv (eai-sparsify; saekit need not be installed):

    .venv-sparsify/bin/python benchmarks/train_sparsify.py --activations runs/demo/activations \\
        --latents 16384 --device cuda [--compare out/bench-train.json]

On a CPU, sparsify works without Triton (eager decode), so this also runs there.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import sparsify
import torch
from cache_reader import Cache, compare_with_saekit, held_out_fvu
from schedulefree import ScheduleFreeWrapper
from sparsify import SaeConfig, SparseCoder
from sparsify.sign_sgd import SignSGD
from sparsify.utils import decoder_impl
from topk_bench_flags import add_topk_bench_flags
from transformers import get_linear_schedule_with_warmup


def make_optimizer(sae: SparseCoder, name: str, lr: float, steps: int):
    """``(optimizer, scheduler or None)`` as sparsify's Trainer builds them for one SAE."""
    if name == "signum":
        lr = 5e-3 / math.sqrt(sae.num_latents / 2**14)
        optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]),
                                        momentum=0.95)
        optimizer.train()
        return optimizer, None
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    return optimizer, get_linear_schedule_with_warmup(optimizer, max(1, steps // 20), steps)


def train_step(sae: SparseCoder, optimizer, scheduler, x: torch.Tensor,
               tokens_since_fired: torch.Tensor, dead_tokens: int, auxk_alpha: float) -> float:
    """One step of sparsify's Trainer (loss_fn fvu, no accumulation) on a batch ``x``."""
    sae.set_decoder_norm_to_unit_norm()
    dead_mask = tokens_since_fired > dead_tokens if auxk_alpha > 0 else None
    total_variance = (x - x.mean(0)).pow(2).sum()
    out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
    did_fire = torch.zeros_like(tokens_since_fired, dtype=torch.bool)
    did_fire[out.latent_indices.flatten()] = True
    fvu = float(out.fvu.detach())  # sparsify's trainer reads it every step for its logs
    (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad()
    if scheduler is not None:
        scheduler.step()
    with torch.no_grad():
        tokens_since_fired += len(x)
        tokens_since_fired[did_fire] = 0
    return fvu


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_topk_bench_flags(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optimizer", choices=["signum", "adam"], default="signum",
                        help="sparsify's default signum, or Adam at --lr")
    parser.add_argument("--auxk-alpha", type=float, default=1 / 32)
    parser.add_argument("--dead-tokens", type=int, default=50_000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--compare", type=Path, help="JSON from benchmarks/train.py --json")
    args = parser.parse_args()

    torch.set_float32_matmul_precision("high")  # as sparsify's Trainer.fit
    torch.manual_seed(0)
    cache = Cache(args.activations)
    steps = args.tokens // args.batch_size
    if steps < 2:
        parser.error("--tokens must give at least two batches (the first is not timed)")
    sae = SparseCoder(int(cache.manifest["d_model"]),
                      SaeConfig(num_latents=args.latents, k=args.k), args.device,
                      dtype=torch.float32)
    optimizer, scheduler = make_optimizer(sae, args.optimizer, args.lr, steps)
    tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=args.device)
    batches = cache.batches(args.batch_size)
    x = next(batches).to(args.device)
    sae.b_dec.data = x.mean(0)  # sparsify: the first batch's mean
    fvus = [train_step(sae, optimizer, scheduler, x, tokens_since_fired, args.dead_tokens,
                       args.auxk_alpha)]
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(steps - 1):
        x = next(batches).to(args.device)
        fvus.append(train_step(sae, optimizer, scheduler, x, tokens_since_fired,
                               args.dead_tokens, args.auxk_alpha))
    synchronize(args.device)
    rate = (steps - 1) * args.batch_size / (time.perf_counter() - start)
    if isinstance(optimizer, ScheduleFreeWrapper):
        optimizer.eval()  # the averaged weights, which sparsify saves
    figures = {
        "sparsify_version": sparsify.__version__,
        "device": args.device, "threads": torch.get_num_threads(),
        "decoder": decoder_impl.__name__,
        "autocast_bf16": args.device.startswith("cuda") and torch.cuda.is_bf16_supported(),
        "optimizer": args.optimizer,
        "d_in": sae.d_in, "latents": args.latents, "k": args.k,
        "batch_size": args.batch_size, "tokens": steps * args.batch_size,
        "sparsify_topk_tokens_per_s": round(rate),
        "sparsify_last_train_fvu": round(fvus[-1], 4),
        "sparsify_held_out_fvu": round(held_out_fvu(lambda v: sae(v).sae_out, cache,
                                                    args.device), 4),
        "dead_fraction": round(float((tokens_since_fired > args.dead_tokens).float().mean()), 4),
    }
    compare_with_saekit(figures, args.compare, args.batch_size, rate, "sparsify")
    for name, value in figures.items():
        print(f"{name:28s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
