"""Training on the fly against capture-then-train, measured in one run; bf16 activations' cost.

Every step runs as its own ``saekit`` process (its wall time and peak RSS are its own), on the
same corpus rows, hook and SAE settings (TopK, d_in 640, ``--latents``, k 32, batch 4,096):

1. sequential: ``saekit cache`` the rows (fp32), then ``saekit train --activations`` on them;
2. on the fly, fp32: ``saekit train`` without ``--activations`` (the model reads the rows as
   training goes); its SAE should equal (1)'s bit for bit;
3. on the fly, bf16: the same with ``--model-dtype bfloat16``;
4. on the fly, fp32, ``--rss-tokens`` training tokens: peak RSS against (2)'s, to show memory
   is flat in the token count.

Then both SAEs of (2) and (3) are evaluated on the same fp32 activations — (1)'s held-out
shards — (FVU) and spliced into the fp32 model on ``--eval-rows`` held-out rows (CE loss
recovered). Targets: (2) >= 0.9x (1)'s end-to-end tokens/s; bf16's held-out FVU within
0.005 of fp32's.

    python benchmarks/train_on_the_fly.py --json docs/train_on_the_fly.json
    python benchmarks/train_on_the_fly.py --tokens 40960 --rss-tokens 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from saekit import load_model
from saekit.cache import ActivationCache, ActivationStream
from saekit.evaluate import downstream_metrics, reconstruction_metrics
from saekit.model_stream import rows_to_read
from saekit.sae import load_sae

CHILD = ("import json, resource, sys; from saekit.cli import main; code = main(sys.argv[1:]); "
         "print(json.dumps({'rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss "
         "/ 2**20}), file=sys.stderr); sys.exit(code)")


def run_saekit(args: list[str]) -> tuple[float, float]:
    """Run ``saekit ARGS`` in a process of its own: (wall seconds, its peak RSS in GiB)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"saekit {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    rss = json.loads(done.stderr.strip().splitlines()[-1])["rss_gib"]
    return seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens")
    parser.add_argument("--rss-tokens", type=int, default=1_000_000,
                        help="training tokens of the on-the-fly run whose peak RSS is compared "
                             "(0: skip)")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--holdout-tokens", type=int, default=32_768)
    parser.add_argument("--eval-rows", type=int, default=64,
                        help="held-out rows spliced into the model for CE loss recovered")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    shard_rows, context = 64, 128
    sae_flags = ["--hook", args.hook, "--latents", str(args.latents), "--k", "32",
                 "--batch-size", "4096", "--holdout-tokens", str(args.holdout_tokens),
                 "--shard-rows", str(shard_rows), "--context", str(context)]
    train_rows, held_rows = rows_to_read(args.tokens, args.holdout_tokens, context, shard_rows)
    figures: dict = {"hook": args.hook, "training_tokens": args.tokens,
                     "rows_read": train_rows + held_rows, "latents": args.latents}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        capture_s, capture_rss = run_saekit(
            ["cache", "--hook", args.hook, "--tokens", str((train_rows + held_rows) * context),
             "--context", str(context), "--shard-rows", str(shard_rows), "--out",
             str(root / "cache")])
        train_s, train_rss = run_saekit(["train", "--activations", str(root / "cache"),
                                         "--out", str(root / "cached"), "--tokens",
                                         str(args.tokens), *sae_flags])
        fly_s, fly_rss = run_saekit(["train", "--out", str(root / "fp32"), "--tokens",
                                     str(args.tokens), *sae_flags])
        bf16_s, bf16_rss = run_saekit(["train", "--out", str(root / "bf16"), "--tokens",
                                       str(args.tokens), "--model-dtype", "bfloat16",
                                       *sae_flags])
        sequential = args.tokens / (capture_s + train_s)
        figures["seconds"] = {"capture": capture_s, "train_from_cache": train_s,
                              "on_the_fly_fp32": fly_s, "on_the_fly_bf16": bf16_s}
        figures["tokens_per_s"] = {"capture_then_train": sequential,
                                   "on_the_fly_fp32": args.tokens / fly_s,
                                   "on_the_fly_bf16": args.tokens / bf16_s}
        figures["on_the_fly_vs_sequential"] = args.tokens / fly_s / sequential
        figures["peak_rss_gib"] = {"capture": capture_rss, "train_from_cache": train_rss,
                                   f"on_the_fly_{args.tokens}": fly_rss,
                                   "on_the_fly_bf16": bf16_rss}
        if args.rss_tokens:
            seconds, rss = run_saekit(["train", "--out", str(root / "long"), "--tokens",
                                       str(args.rss_tokens), *sae_flags])
            figures["peak_rss_gib"][f"on_the_fly_{args.rss_tokens}"] = rss
            figures["tokens_per_s"][f"on_the_fly_fp32_{args.rss_tokens}"] = args.rss_tokens / seconds
        name = f"topk_w{args.latents}_k32"
        cached, fp32, bf16 = (load_sae(root / run / name) for run in ("cached", "fp32", "bf16"))
        figures["on_the_fly_equals_cache_training"] = all(
            torch.equal(a, b) for a, b in zip(cached.state_dict().values(),
                                              fp32.state_dict().values()))
        figures["held_out"] = evaluate_pair(root / "cache", {"fp32": fp32, "bf16": bf16},
                                            args.hook, args.eval_rows)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


def evaluate_pair(cache_dir: Path, saes: dict, hook: str, eval_rows: int) -> dict:
    """FVU of each SAE on the cache's last shard (fp32 activations, held out by every run) and
    CE loss recovered when spliced into the fp32 model on that shard's first rows."""
    cache = ActivationCache.open(cache_dir)
    last = cache.n_shards - 1
    model = load_model()
    start, _ = cache.shard_rows(last)
    rows = cache.tokens()[start:start + eval_rows]
    out = {}
    for label, sae in saes.items():
        held = ActivationStream(cache, 4096, hook, shards=[last])
        metrics = reconstruction_metrics(sae, held.in_order())
        spliced = downstream_metrics(model, sae, rows, hook_name=hook)
        out[label] = {"fvu": metrics["fvu"], "l0": metrics["l0"],
                      "ce_loss_recovered": spliced["ce_loss_recovered"],
                      "delta_lm_loss": spliced["delta_lm_loss"]}
    out["fvu_bf16_minus_fp32"] = out["bf16"]["fvu"] - out["fp32"]["fvu"]
    return out


if __name__ == "__main__":
    main()
