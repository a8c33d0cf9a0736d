"""TopK training speed and quality against a plain PyTorch loop, measured in one run.

Both read the same batches from the same cache (d_in 640, 10,240 latents, k 32,
batch 4,096, fp32 by default) for the same number of tokens, and are evaluated on the
same held-out shard. The plain loop is what a researcher writes in 40 lines: autograd
through the dense encoder matmul, top-k, embedding-bag decode, Adam, unit-norm decoder.
saekit adds AuxK, LR schedule, dead-latent tracking and checkpoints, and trains with a
sparse encoder backward. Target: saekit >= 1.5x the plain loop's tokens/s at equal or
better FVU. saekit is run twice: with its default schedule (5% warm-up, linear decay over
the last 20%) and with the plain loop's constant LR, which isolates the implementation.

    python benchmarks/train.py --activations runs/demo/activations
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from topk_bench_flags import add_topk_bench_flags

from saekit.evaluate import reconstruction_metrics
from saekit.sae import TopKSAE, sae_config
from saekit.train import TrainConfig, open_stream, train


def plain_topk_loop(stream, steps: int, d_sae: int, k: int, lr: float, seed: int,
                    device: str = "cpu") -> tuple[TopKSAE, float]:
    """The baseline: returns the trained weights (as a TopKSAE, for evaluation) and tokens/s."""
    torch.manual_seed(seed)
    batches = stream.batches()
    first = next(batches).to(device)
    d_in = first.shape[1]
    scale = (d_in / first.pow(2).sum(-1).mean()).sqrt()
    W_dec = torch.randn(d_sae, d_in).to(device)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec = W_dec.requires_grad_()
    W_enc = W_dec.detach().t().clone().requires_grad_()
    b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
    b_dec = (first * scale).mean(0).requires_grad_()
    optimizer = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        x = (first if step == 0 else next(batches).to(device)) * scale
        pre = (x - b_dec) @ W_enc + b_enc
        values, indices = pre.topk(k, dim=-1)
        x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=values.relu(),
                                mode="sum") + b_dec
        loss = (x - x_hat).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    if W_dec.is_cuda:
        torch.cuda.synchronize()
    rate = steps * len(first) / (time.perf_counter() - start)
    sae = TopKSAE(sae_config("topk", d_in, d_sae, k=k, activation_scale=float(scale),
                             normalize_activations="expected_average_only_in"))
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value)
    return sae, rate


def rate_after_first_step(metrics: Path, batch_size: int) -> float:
    """saekit's tokens/s over steps 2..N, from the cumulative rates logged every step: like the
    plain loop, whose clock starts after its first batch (and shard group) is loaded."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    first, last = lines[0], lines[-1]
    seconds = [line["step"] * batch_size / line["tokens_per_s"] for line in (first, last)]
    return (last["step"] - first["step"]) * batch_size / (seconds[1] - seconds[0])


def time_saekit(config: TrainConfig) -> tuple[float, float]:
    """saekit's training tokens/s (from step 2) and held-out FVU for ``config``."""
    with tempfile.TemporaryDirectory() as tmp:
        (folder,) = train(replace(config, out=tmp)).values()
        rate = rate_after_first_step(folder / "metrics.jsonl", config.batch_size)
        fvu = json.loads((folder / "train_summary.json").read_text())["held_out"]["fvu"]
    return rate, fvu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_topk_bench_flags(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (both loops)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    config = TrainConfig(activations=args.activations, latents=[args.latents],
                         options={"k": [args.k]}, device=args.device,
                         batch_size=args.batch_size, tokens=args.tokens, lr=args.lr,
                         checkpoint_every=10**9, log_every=1)
    saekit_rate, saekit_fvu = time_saekit(config)
    # the same with the plain loop's constant LR: separates the kernels from the LR schedule
    constant_rate, constant_fvu = time_saekit(replace(config, lr_warmup_fraction=0.0,
                                                      lr_decay_fraction=0.0))
    _, stream, holdout = open_stream(config)
    plain, plain_rate = plain_topk_loop(stream, config.steps, args.latents, args.k, args.lr,
                                        config.seed, args.device)
    held_out = type(stream)(stream.cache, args.batch_size, stream.hook, shards=holdout)
    plain_fvu = reconstruction_metrics(plain, held_out.in_order())["fvu"]
    figures = {
        "threads": torch.get_num_threads(), "device": args.device,
        "d_in": stream.cache.d_model, "latents": args.latents, "k": args.k,
        "batch_size": args.batch_size, "tokens": config.steps * args.batch_size,
        "saekit_topk_tokens_per_s": round(saekit_rate),
        "plain_loop_tokens_per_s": round(plain_rate),
        "speed_ratio": round(saekit_rate / plain_rate, 3),
        "saekit_held_out_fvu": round(saekit_fvu, 4),
        "saekit_constant_lr_tokens_per_s": round(constant_rate),
        "saekit_constant_lr_held_out_fvu": round(constant_fvu, 4),
        "plain_loop_held_out_fvu": round(plain_fvu, 4),
    }
    for name, value in figures.items():
        print(f"{name:32s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
