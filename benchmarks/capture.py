"""Capture speed and memory against baselines measured in the same run.

Prints tokens/s of (1) ``saekit`` capture end to end (tokenising, hooks, shard
writing, checksums), (2) a bare transformers forward truncated after the hooked
layer, (3) a full-model TransformerLens ``run_with_cache``; the two ratios; and
the peak RSS of a ``saekit cache`` subprocess capturing ``--rss-tokens`` tokens.
Targets: (1)/(2) >= 0.95, (1)/(3) >= 3, peak RSS < 4 GiB for 1M tokens.

    python benchmarks/capture.py                       # 256k tokens timed, 1M for RSS
    python benchmarks/capture.py --rss-tokens 0        # skip the RSS run
    python benchmarks/capture.py --model-dtype bfloat16  # capture in bf16 vs both bare forwards

With ``--model-dtype bfloat16`` saekit captures with a bfloat16 model, and the bare forward
is timed in float32 (the baseline) and in bfloat16 (saekit's own overhead).

(1) includes reading the corpus and tokenising it up front (a cost (2) does not pay); it is
also timed on its own and printed. (2) runs on the same rows just before and just after (1)
(harmonic mean of the two), so drift in the machine's speed during the run cancels.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from saekit import CaptureConfig, capture_activations, load_model
from saekit.capture import MODEL_DTYPES
from saekit.cache import ActivationCache
from saekit.model import hook_layer
from saekit.corpus import load_corpus, pack_token_rows


def tokens_per_second(run, n_tokens: int) -> float:
    start = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def bare_truncated_forward(hf_model, rows: torch.Tensor, n_layers: int, batch_rows: int) -> None:
    """transformers' own decoder, cut after ``n_layers`` blocks, no hooks, nothing kept."""
    decoder = hf_model.model
    all_layers = decoder.layers
    decoder.layers = all_layers[:n_layers]
    try:
        for start in range(0, len(rows), batch_rows):
            decoder(rows[start:start + batch_rows].to(hf_model.device))
    finally:
        decoder.layers = all_layers


@torch.inference_mode()
def full_run_with_cache(model, rows: torch.Tensor, batch_rows: int) -> None:
    for start in range(0, len(rows), batch_rows):
        model.run_with_cache(rows[start:start + batch_rows].to(model.cfg.device))


def peak_rss_of_capture(tokens: int, hook: str, out: Path, model_dtype: str,
                        device: str | None) -> float:
    """GiB of peak resident memory of ``saekit cache`` capturing ``tokens`` tokens."""
    subprocess.run([sys.executable, "-m", "saekit", "cache", "--hook", hook, "--tokens",
                    str(tokens), "--model-dtype", model_dtype, "--out", str(out),
                    *(["--device", device] if device else [])], check=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--full-tokens", type=int, default=8_192,
                        help="tokens for the (slow) full-model run_with_cache")
    parser.add_argument("--rss-tokens", type=int, default=1_000_000)
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--model-dtype", choices=sorted(MODEL_DTYPES), default="float32",
                        help="dtype of saekit's capture forward")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    model = load_model(device=args.device)
    low = args.model_dtype != "float32"
    capture_model = load_model(device=args.device, dtype=MODEL_DTYPES[args.model_dtype]) \
        if low else model
    config = CaptureConfig(hooks=[args.hook], tokens=args.tokens, model_dtype=args.model_dtype)
    n_blocks = hook_layer(args.hook) + 1

    def bare(bridge=model) -> float:
        return tokens_per_second(lambda: bare_truncated_forward(
            bridge.original_model, rows, n_blocks, config.batch_rows), rows.numel())

    with tempfile.TemporaryDirectory() as tmp:
        capture_activations(replace(config, tokens=2048, shard_rows=16), Path(tmp) / "warm",
                            model=capture_model)
        start = time.perf_counter()
        rows = pack_token_rows(load_corpus(config.dataset, seed=config.seed), model.tokenizer,
                               config.n_rows, config.context)
        prepare_s = time.perf_counter() - start
        for bridge in {model, capture_model}:  # first forwards page weights in: not timed
            bare_truncated_forward(bridge.original_model, rows[:config.batch_rows], n_blocks,
                                   config.batch_rows)
        bare_before = bare()  # the bare forward runs before and after saekit: drift cancels
        low_before = bare(capture_model) if low else None
        saekit_tps = tokens_per_second(
            lambda: capture_activations(config, Path(tmp) / "acts", model=capture_model),
            args.tokens)
        assert torch.equal(ActivationCache.open(Path(tmp) / "acts").tokens(), rows.long())
    low_tps = 2 / (1 / low_before + 1 / bare(capture_model)) if low else None
    bare_tps = 2 / (1 / bare_before + 1 / bare())
    full_rows = rows[: max(1, args.full_tokens // config.context)]
    full_tps = tokens_per_second(lambda: full_run_with_cache(model, full_rows, config.batch_rows),
                                 full_rows.numel())
    figures = {
        "threads": torch.get_num_threads(), "device": str(model.cfg.device),
        "model_dtype": args.model_dtype,
        "tokens_timed": args.tokens,
        "saekit_capture_tokens_per_s": round(saekit_tps),
        "of_which_corpus_read_and_tokenise_s": round(prepare_s, 2),
        "bare_truncated_forward_tokens_per_s": round(bare_tps),
        "full_run_with_cache_tokens_per_s": round(full_tps),
        "ratio_vs_bare_truncated": round(saekit_tps / bare_tps, 3),
        "ratio_vs_full_run_with_cache": round(saekit_tps / full_tps, 2),
    }
    if low:
        figures[f"bare_truncated_forward_{args.model_dtype}_tokens_per_s"] = round(low_tps)
        figures[f"ratio_vs_bare_truncated_{args.model_dtype}"] = round(saekit_tps / low_tps, 3)
    for name, value in figures.items():
        print(f"{name:40s} {value}")
    if args.rss_tokens:
        with tempfile.TemporaryDirectory() as tmp:
            rss = peak_rss_of_capture(args.rss_tokens, args.hook, Path(tmp) / "rss",
                                      args.model_dtype, args.device)
        figures[f"peak_rss_gib_capturing_{args.rss_tokens}_tokens"] = round(rss, 2)
        print(f"{'peak RSS (GiB), ' + str(args.rss_tokens) + ' tokens':40s} {rss:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
