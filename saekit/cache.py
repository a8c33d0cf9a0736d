"""The on-disk activation cache: manifest, shards, and a streaming reader for training.

A cache folder holds::

    manifest.json              settings, d_model, dtype, and one entry per complete shard
    tokens.safetensors         "tokens": [n_rows, context] int32, the text behind every row
    shard_00000.safetensors    one tensor per hook: [shard_rows, context, d_model]

A shard counts as complete only once it is listed in the manifest with its size and
sha256; both are written atomically, the shard first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from saekit.errors import CacheMismatchError, CorruptCacheError, NonFiniteActivationsError
from saekit.files import sha256_file
from saekit.manifest import TOKENS_FILE, CacheManifest, ShardEntry


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def read_manifest(folder: str | Path) -> CacheManifest:
    """The manifest of the cache in ``folder``, checked key by key."""
    return CacheManifest.read(folder)


def check_shard(folder: Path, entry: ShardEntry, verify_checksum: bool) -> None:
    """Raise ``CorruptCacheError`` if a listed shard is missing, truncated or altered."""
    path = folder / entry.file
    fix = "Run the same `saekit cache` command again to recapture it."
    if not path.is_file():
        raise CorruptCacheError(f"Shard {path} is listed in the manifest but missing. {fix}")
    size = path.stat().st_size
    if size != entry.bytes:
        raise CorruptCacheError(
            f"Shard {path} has {size} bytes but the manifest says {entry.bytes}: it is "
            f"truncated or altered. {fix}"
        )
    if verify_checksum and sha256_file(path) != entry.sha256:
        raise CorruptCacheError(f"Shard {path} does not match its sha256 in the manifest. {fix}")


def pick_hook(hooks: list[str], hook: str | None) -> str:
    """``hook``, checked to be one of ``hooks``; None picks the only one."""
    if hook is None:
        if len(hooks) != 1:
            raise CacheMismatchError(
                f"The cache holds several hooks {hooks}; say which one to read."
            )
        return hooks[0]
    if hook not in hooks:
        raise CacheMismatchError(f"The cache holds hooks {hooks}, not {hook!r}.")
    return hook


@dataclass
class ActivationCache:
    """An opened activation cache. Shapes: tokens ``[n_rows, context]``, shard ``[rows, context, d_model]``."""

    folder: Path
    manifest: CacheManifest

    @classmethod
    def open(cls, folder: str | Path, require_complete: bool = True) -> "ActivationCache":
        """Open a cache, checking that every listed shard is there at its listed size."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if require_complete and not manifest.complete:
            done = sum(e.n_rows for e in manifest.shards)
            raise CorruptCacheError(
                f"The cache in {folder} is incomplete ({done} of {manifest.n_rows} rows). "
                "Run the same `saekit cache` command again to finish it."
            )
        for entry in manifest.shards:
            check_shard(folder, entry, verify_checksum=False)
        return cls(folder, manifest)

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest.hooks)

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def context(self) -> int:
        return self.manifest.context

    @property
    def n_shards(self) -> int:
        return len(self.manifest.shards)

    def tokens(self) -> torch.Tensor:
        """Token ids of every row, ``[n_rows, context]`` int64."""
        path = self.folder / TOKENS_FILE
        if not path.exists() or sha256_file(path) != self.manifest.tokens_sha256:
            raise CorruptCacheError(
                f"{path} is missing or does not match its sha256 in the manifest."
            )
        return load_file(path)["tokens"].long()

    def shard_rows(self, index: int) -> tuple[int, int]:
        return self.manifest.shards[index].rows

    @property
    def bos_token_id(self) -> int:
        return self.manifest.bos_token_id

    @property
    def model_name(self) -> str:
        return self.manifest.model

    @property
    def source(self) -> str:
        """Where the activations come from (recorded in a trained SAE's metadata)."""
        return str(self.folder)

    def shard_label(self, index: int) -> str:
        return f"Shard {self.folder / self.manifest.shards[index].file}"

    nonfinite_advice = "Recapture it, e.g. with --dtype float32 if it was float16."

    def check_hook(self, hook: str | None) -> str:
        return pick_hook(self.hooks, hook)

    def load_shard(self, index: int, hook: str | None = None,
                   verify_checksum: bool = True) -> torch.Tensor:
        """Activations of one shard at ``hook``: ``[rows, context, d_model]`` in the stored dtype."""
        hook = self.check_hook(hook)
        entry = self.manifest.shards[index]
        check_shard(self.folder, entry, verify_checksum)
        path = self.folder / entry.file
        try:
            with safe_open(path, framework="pt") as shard:
                acts = shard.get_tensor(hook)
        except Exception as err:  # safetensors raises several kinds for a damaged file
            raise CorruptCacheError(f"Shard {path} could not be read ({err}).") from err
        expected = (entry.n_rows, self.context, self.d_model)
        if tuple(acts.shape) != expected:
            raise CorruptCacheError(
                f"Shard {path} holds {hook} as {tuple(acts.shape)}, but its manifest says "
                f"[rows, context, d_model] = {list(expected)}: the cache is damaged. Capture it "
                "again with `saekit cache`.")
        return acts


@dataclass
class ActivationStream:
    """Shuffled batches of single-token activations ``[batch, d_model]`` from a cache (or a
    ``saekit.model_stream.ModelActivations``, which computes each shard when it is read).

    Each epoch visits the shards in a seeded random order, a group of shards at a time
    (as many as fit ``buffer_tokens``); a group's tokens are shuffled together and cut
    into batches, its remainder (< one batch) dropped. Memory stays at one group
    whatever the cache size. Batches are a pure function of (seed, batch index), so a
    run can restart at any batch (``start_batch``) and see what it would have seen.
    Positions holding BOS are skipped unless ``keep_bos``. With ``target_hook`` (for
    transcoders) each row is the two hooks' activations at one token side by side,
    ``[d_model of hook | d_model of target_hook]``, shuffled together; ``extra_hooks`` are
    read the same way, after them (``hooks`` lists the inputs, ``per_hook`` splits a batch),
    so every hook sees the same tokens in the same order as a stream of that hook alone.
    """

    cache: ActivationCache  # or ModelActivations: the same reading interface
    batch_size: int
    hook: str | None = None
    seed: int = 0
    buffer_tokens: int = 1 << 18
    keep_bos: bool = False
    verify_checksums: bool = True
    dtype: torch.dtype = torch.float32
    shards: list[int] | None = None  # a subset of the cache's shards (e.g. a held-out split)
    target_hook: str | None = None  # a transcoder's output hook, read beside ``hook``
    extra_hooks: list[str] = field(default_factory=list)  # further inputs, after ``hook``'s

    def __post_init__(self) -> None:
        self.hook = self.cache.check_hook(self.hook)
        if self.target_hook is not None:
            self.target_hook = self.cache.check_hook(self.target_hook)
        self.extra_hooks = [self.cache.check_hook(h) for h in self.extra_hooks]
        if self.extra_hooks and self.target_hook is not None:
            raise CacheMismatchError("A stream reads either a transcoder's pair (hook, "
                                     "target_hook) or several input hooks, not both.")
        if self.shards is None:
            self.shards = list(range(self.cache.n_shards))
        if not self.shards:
            raise CorruptCacheError(f"No shards to read from {self.cache.source}.")
        tokens = self.cache.tokens()
        bos = self.cache.bos_token_id
        self._masks = {}
        for index in self.shards:
            start, end = self.cache.shard_rows(index)
            rows = tokens[start:end].flatten()
            self._masks[index] = torch.ones_like(rows, dtype=torch.bool) if self.keep_bos \
                else rows != bos
        self._counts = {i: int(m.sum()) for i, m in self._masks.items()}
        per_shard = max(1, max(self._counts.values(), default=1))
        self.shards_per_group = max(1, self.buffer_tokens // per_shard)

    @property
    def tokens_per_epoch(self) -> int:
        return sum(self._counts.values())

    def _epoch_groups(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = [self.shards[i] for i in
                 torch.randperm(len(self.shards), generator=generator).tolist()]
        size = self.shards_per_group
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _group_batches(self, group: list[int]) -> int:
        return sum(self._counts[i] for i in group) // self.batch_size

    def batches_per_epoch(self) -> int:
        return sum(self._group_batches(g) for g in self._epoch_groups(0))

    @property
    def hooks(self) -> list[str]:
        """The input hooks, in the order ``per_hook`` returns their columns."""
        return [self.hook, *self.extra_hooks]

    def per_hook(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """``rows`` [n, width] read from this stream cut into one contiguous block per hook of
        ``hooks`` (a single hook's, with its target beside it, is ``rows`` itself)."""
        if not self.extra_hooks:
            return [rows]
        return [part.contiguous() for part in rows.split(self.cache.d_model, dim=-1)]

    def load_tokens(self, index: int) -> torch.Tensor:
        """Non-BOS activations of one shard, ``[tokens, d_model]``, or the hooks' side by side
        (``[tokens, 2 * d_model]`` with a ``target_hook``), checked to be finite."""
        read = [self.hook, *([self.target_hook] if self.target_hook else []), *self.extra_hooks]
        parts = [self._hook_tokens(index, hook) for hook in read]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _hook_tokens(self, index: int, hook: str) -> torch.Tensor:
        acts = self.cache.load_shard(index, hook, self.verify_checksums)
        acts = acts.reshape(-1, self.cache.d_model)[self._masks[index].to(acts.device)]
        acts = acts.to(self.dtype)
        finite = torch.isfinite(acts).all(dim=-1)
        if not finite.all():
            position = int((~finite).nonzero()[0])
            raise NonFiniteActivationsError(
                f"{self.cache.shard_label(index)} holds "
                f"NaN or inf activations at {hook} ({int((~finite).sum())} tokens, the first at "
                f"usable token {position}). {self.cache.nonfinite_advice}"
            )
        return acts

    def in_order(self) -> Iterator[torch.Tensor]:
        """Each shard's non-BOS tokens once, in shard order, unshuffled (for evaluation)."""
        for index in self.shards:
            yield self.load_tokens(index)

    def _load_group(self, group: list[int], epoch: int, group_index: int) -> torch.Tensor:
        """The group's tokens ``[n, width]`` in a seeded random order: ``cat(shards)[perm]``,
        built by placing each shard's tokens where ``perm`` sends them, so that only the
        group and one shard are held at a time."""
        n = sum(self._counts[i] for i in group)
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + epoch) * 100_003 + group_index)
        perm = torch.randperm(n, generator=generator)
        place = torch.empty_like(perm)
        place[perm] = torch.arange(n)  # where the i-th token of cat(shards) goes
        out, offset = None, 0
        for index in group:
            part = self.load_tokens(index)
            if out is None:
                out, place = part.new_empty(n, part.shape[1]), place.to(part.device)
            out[place[offset:offset + len(part)]] = part
            offset += len(part)
            del part
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches()

    def batches(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Yield batches forever (epoch after epoch), starting at batch ``start_batch``."""
        if self.batches_per_epoch() == 0:
            raise CorruptCacheError(
                f"{self.cache.source} has {self.tokens_per_epoch} usable tokens, "
                f"fewer than one batch of {self.batch_size}."
            )
        per_epoch = self.batches_per_epoch()
        epoch, skip = divmod(start_batch, per_epoch)
        while True:
            for group_index, group in enumerate(self._epoch_groups(epoch)):
                n_batches = self._group_batches(group)
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                acts = self._load_group(group, epoch, group_index)
                for b in range(skip, n_batches):
                    rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
                    # the last batch is a copy and no name here holds a view, so neither the
                    # reader nor this frame keeps the group alive while the next one loads
                    yield acts[rows].clone() if b == n_batches - 1 else acts[rows]
                del acts
                skip = 0
            epoch += 1



def leading_activations(cache: ActivationCache, n_tokens: int = 8192,
                        hook: str | None = None) -> torch.Tensor:
    """The first ``n_tokens`` non-BOS activations of the cache, in order, ``[n, d_model]``
    float32: a sample of ordinary text (the corpus is shuffled at capture), e.g. the
    reference of a mean-difference direction."""
    parts, have = [], 0
    for acts in ActivationStream(cache, batch_size=1, hook=hook).in_order():
        parts.append(acts[:n_tokens - have])
        have += len(parts[-1])
        if have >= n_tokens:
            break
    return torch.cat(parts)
