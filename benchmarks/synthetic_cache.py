"""Write a saekit activation cache of synthetic activations, for when no model is at hand.

Used by benchmarks/gpu.sh on a GPU machine that cannot load the embedded model (its wheels
are 245 MB) and by tests/test_gpu.py. Each token's activation is a sparse positive mix of a
hidden dictionary of unit directions (about 24 active of 8,192, heavy-tailed magnitudes)
plus a shared offset and a little Gaussian noise, at residual-stream-like norms, so an SAE
has something real to learn (its FVU falls) and latents die and revive as on real data.
Token ids are random, with BOS (id 2) starting each row, which the readers drop.

    python benchmarks/synthetic_cache.py --out out/gpu/synthetic --tokens 524288
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from saekit import __version__
from saekit.cache import shard_name
from saekit.files import sha256_file, write_json, write_safetensors
from saekit.manifest import MANIFEST, TOKENS_FILE, CacheManifest, ShardEntry

BOS = 2


def synthetic_activations(n: int, d_model: int, generator: torch.Generator,
                          directions: torch.Tensor, offset: torch.Tensor,
                          active: int = 24) -> torch.Tensor:
    """[n, d_model] float32 activations: sparse mixes of ``directions`` + ``offset`` + noise."""
    # a Zipf-like prior over features, so some are common and many rare
    prior = 1.0 / torch.arange(1, len(directions) + 1, dtype=torch.float32) ** 0.6
    cdf = (prior.cumsum(0) / prior.sum()).contiguous()
    chosen = torch.searchsorted(cdf, torch.rand(n, active, generator=generator))
    chosen = chosen.clamp_max(len(directions) - 1)
    magnitude = torch.empty(n, active).exponential_(generator=generator) * 20.0
    acts = F.embedding_bag(chosen, directions, per_sample_weights=magnitude, mode="sum")
    return acts + offset + torch.randn(n, d_model, generator=generator)


def write_synthetic_cache(out: str | Path, tokens: int, d_model: int = 640,
                          hook: str = "blocks.6.hook_resid_post", context: int = 128,
                          shard_rows: int = 256, seed: int = 0,
                          n_features: int = 8192) -> Path:
    """A complete cache at ``out`` (overwritten if it holds another one) with ``tokens`` tokens
    (whole rows of ``context``) at ``hook``, float32, in shards of ``shard_rows`` rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_model, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    offset = 30.0 * torch.randn(d_model, generator=generator)
    n_rows = max(1, tokens // context)
    ids = torch.randint(3, 30_000, (n_rows, context), generator=generator, dtype=torch.int32)
    ids[:, 0] = BOS
    write_safetensors(out / TOKENS_FILE, {"tokens": ids})
    settings = {"synthetic": True, "seed": seed, "tokens": tokens, "context": context,
                "hooks": [hook], "n_features": n_features}
    manifest = CacheManifest(
        settings=settings, model="synthetic", hooks=[hook], d_model=d_model, n_layers=1,
        dtype="float32", context=context, n_rows=n_rows, n_tokens=n_rows * context,
        shard_rows=shard_rows, bos_token_id=BOS, tokens_sha256=sha256_file(out / TOKENS_FILE),
        saekit_version=__version__)
    for index, start in enumerate(range(0, n_rows, shard_rows)):
        end = min(start + shard_rows, n_rows)
        acts = synthetic_activations((end - start) * context, d_model, generator, directions,
                                     offset)
        path = out / shard_name(index)
        write_safetensors(path, {hook: acts.reshape(end - start, context, d_model)})
        manifest.shards.append(ShardEntry(path.name, (start, end), path.stat().st_size,
                                          sha256_file(path)))
    manifest.complete = True
    write_json(out / MANIFEST, manifest.to_dict())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tokens", type=int, default=524_288)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = write_synthetic_cache(args.out, args.tokens, args.d_model, args.hook, seed=args.seed)
    print(f"synthetic cache: {folder} ({args.tokens} tokens, d_model {args.d_model})")


if __name__ == "__main__":
    main()
