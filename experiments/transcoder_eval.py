"""Evaluate trained transcoders of one MLP on held-out text: FVU, L0, dead latents, and the
CE loss recovered when the transcoder's output replaces the MLP's; a few latents' top examples
and logit-lens tokens as a look at what they encode.

    python experiments/transcoder_eval.py --activations runs/transcoder/acts \\
        --sae runs/transcoder/tc/topk_w4096_k32 --sae runs/transcoder/skip/topk_w4096_k32 \\
        --eval-rows 32 --out docs/transcoder_eval.json

FVU, L0 and dead % are over the cache's last shard (held out by ``saekit train``); the spliced
CE loss is over the first ``--eval-rows`` rows of that shard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from saekit.analyse import top_activating_examples
from saekit.cache import ActivationCache, ActivationStream
from saekit.directions import logit_lens
from saekit.evaluate import downstream_metrics, reconstruction_metrics
from saekit.files import write_json
from saekit.model import load_model
from saekit.sae import load_sae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--activations", default="runs/transcoder/acts")
    parser.add_argument("--sae", action="append", required=True, help="repeatable")
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--features", type=int, default=3, help="latents to show examples of")
    parser.add_argument("--examples-rows", type=int, default=64,
                        help="cache rows scanned for top examples")
    parser.add_argument("--out", default="docs/transcoder_eval.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the results of other SAEs already in --out")
    return parser.parse_args(argv)


def held_out_shard(cache: ActivationCache) -> int:
    return cache.n_shards - 1


def evaluate(folder: Path, model, cache: ActivationCache, eval_rows: int,
             n_features: int, examples_rows: int) -> dict:
    """One transcoder's held-out reconstruction, spliced CE loss and a few latents' examples."""
    sae = load_sae(folder)
    meta = sae.cfg.metadata
    shard = held_out_shard(cache)
    stream = ActivationStream(cache, 1024, meta.hook_name, shards=[shard],
                              target_hook=meta.hook_name_out)
    started = time.perf_counter()
    recon = reconstruction_metrics(sae, stream.in_order())
    frequency = recon.pop("firing_frequency")
    start, _ = cache.shard_rows(shard)
    rows = cache.tokens()[start:start + eval_rows]
    spliced = downstream_metrics(model, sae, rows, batch_rows=4)
    spliced.pop("firing_frequency")
    live = frequency.argsort(descending=True)[:n_features].tolist()
    examples = top_activating_examples(sae, cache, live, n_examples=3,
                                       max_rows=examples_rows)
    looks = {feature: {"frequency": float(frequency[feature]),
                       "top_examples": [str(e) for e in examples[feature]],
                       "logit_lens_top": [t for t, _ in logit_lens(model, sae, feature, k=8)[0]]}
             for feature in live}
    return {
        "sae": str(folder), "architecture": sae.cfg.architecture, "d_sae": sae.d_sae,
        "k": sae.cfg.options.k, "skip_connection": sae.cfg.skip_connection,
        "hook_in": meta.hook_name, "hook_out": meta.hook_name_out,
        "train_summary": json.loads((folder / "train_summary.json").read_text()),
        "held_out": {"tokens": recon["tokens"], "fvu": recon["fvu"], "l0": recon["l0"],
                     "dead_fraction": recon["dead_fraction"], "cosine": recon["cosine"]},
        "spliced": {key: spliced[key] for key in (
            "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero", "ce_loss_recovered",
            "delta_lm_loss", "kl_div", "scored_predictions", "rows", "context")},
        "most_frequent_latents": looks,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    cache = ActivationCache.open(args.activations)
    model = load_model(cache.manifest.model)
    results = [evaluate(Path(folder), model, cache, args.eval_rows, args.features,
                        args.examples_rows) for folder in args.sae]
    if args.append and Path(args.out).exists():
        done = {r["sae"] for r in results}
        results = [r for r in json.loads(Path(args.out).read_text())["transcoders"]
                   if r["sae"] not in done] + results
    report = {"command": "python experiments/transcoder_eval.py " + " ".join(sys.argv[1:]),
              "eval_rows": args.eval_rows,
              "cache": {"folder": args.activations, "hooks": cache.hooks,
                        "tokens": sum(e - s for s, e in map(cache.shard_rows,
                                                            range(cache.n_shards))) * cache.context,
                        "held_out_shard": held_out_shard(cache),
                        "note": cache.manifest.extra.get("note")},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
                         f"{torch.__version__}", "transcoders": results}
    write_json(args.out, report)
    for r in results[-len(args.sae):]:
        print(f"{r['sae']}: held-out FVU {r['held_out']['fvu']:.4f}, L0 {r['held_out']['l0']:.1f}, "
              f"dead {100 * r['held_out']['dead_fraction']:.1f}%, CE loss recovered "
              f"{r['spliced']['ce_loss_recovered']:.4f} (clean {r['spliced']['ce_loss_clean']:.3f}, "
              f"spliced {r['spliced']['ce_loss_spliced']:.3f}, zero {r['spliced']['ce_loss_zero']:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
