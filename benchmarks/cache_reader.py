"""A saekit activation cache read with torch and safetensors alone, for the competitors'
training benchmarks (benchmarks/train_saelens.py, benchmarks/train_sparsify.py), which run in
venvs without saekit: the same non-BOS tokens, training/held-out shard split and shuffle
buffer as saekit's trainer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

HOLDOUT_TOKENS = 65_536  # saekit TrainConfig.holdout_tokens
BUFFER_TOKENS = 1 << 18  # saekit TrainConfig.buffer_tokens: tokens shuffled together


class Cache:
    """A saekit activation cache read directly: manifest.json, tokens.safetensors, shards."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        (self.hook,) = self.manifest["hooks"]
        tokens = load_file(self.folder / self.manifest["tokens_file"])["tokens"]
        self.keep = tokens.flatten() != self.manifest["bos_token_id"]  # non-BOS positions
        shards = self.manifest["shards"]
        held, n = 0, 0
        while held < HOLDOUT_TOKENS and n < len(shards) - 1:
            start, end = shards[-1 - n]["rows"]
            held, n = held + (end - start) * self.manifest["context"], n + 1
        self.train_shards = list(range(len(shards) - n))
        self.holdout_shards = list(range(len(shards) - n, len(shards)))

    def load(self, index: int) -> torch.Tensor:
        """Non-BOS activations of one shard, [tokens, d_model] fp32."""
        entry = self.manifest["shards"][index]
        with safe_open(self.folder / entry["file"], framework="pt") as shard:
            acts = shard.get_tensor(self.hook).reshape(-1, self.manifest["d_model"])
        context = self.manifest["context"]
        keep = self.keep[entry["rows"][0] * context:entry["rows"][1] * context]
        return acts[keep].float()

    def batches(self, batch_size: int, seed: int = 0):
        """Shuffled batches forever: shards in a random order, groups of them shuffled together."""
        generator = torch.Generator().manual_seed(seed)
        context = self.manifest["context"]
        per_shard = max(int(self.keep[s * context:e * context].sum())
                        for s, e in (self.manifest["shards"][i]["rows"] for i in self.train_shards))
        per_group = max(1, BUFFER_TOKENS // per_shard)
        while True:
            order = [self.train_shards[i] for i in
                     torch.randperm(len(self.train_shards), generator=generator).tolist()]
            for i in range(0, len(order), per_group):
                acts = torch.cat([self.load(s) for s in order[i:i + per_group]])
                acts = acts[torch.randperm(len(acts), generator=generator)]
                for b in range(len(acts) // batch_size):
                    yield acts[b * batch_size:(b + 1) * batch_size]


@torch.no_grad()
def held_out_fvu(reconstruct: Callable[[torch.Tensor], torch.Tensor], cache: Cache,
                 device: str = "cpu", chunk: int = 4096) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the held-out shards' non-BOS tokens, as
    saekit.evaluate.reconstruction_metrics; ``reconstruct`` maps x [n, d] on ``device`` to x_hat."""
    n, sum_x, sum_sq_x, sum_err = 0, 0.0, 0.0, 0.0
    for index in cache.holdout_shards:
        for x in cache.load(index).split(chunk):
            x_hat = reconstruct(x.to(device)).float().cpu()
            sum_x = sum_x + x.double().sum(0)
            sum_sq_x += float(x.double().pow(2).sum())
            sum_err += float((x - x_hat).double().pow(2).sum())
            n += len(x)
    return sum_err / (sum_sq_x - float(sum_x.pow(2).sum()) / n)


def compare_with_saekit(figures: dict, compare: Path | None, batch_size: int, rate: float,
                        other_name: str) -> None:
    """Add ``saekit_over_<other>`` and ``plain_loop_over_<other>`` to ``figures`` from a
    benchmarks/train.py ``--json`` file (``compare``), warning when its run differs."""
    if not compare:
        return
    saekit = json.loads(compare.read_text())
    if saekit["tokens"] != figures["tokens"] or saekit["batch_size"] != batch_size:
        print(f"warning: {compare} is for {saekit['tokens']} tokens in batches of "
              f"{saekit['batch_size']}")
    figures[f"saekit_over_{other_name}"] = round(saekit["saekit_topk_tokens_per_s"] / rate, 3)
    figures[f"plain_loop_over_{other_name}"] = round(saekit["plain_loop_tokens_per_s"] / rate, 3)
