"""Activations computed by the model as training reads them: a cache's reading interface,
with no disk.

``ModelActivations`` holds the token rows of a corpus cut into shards, as a cache made from
the same rows with the same ``shard_rows`` would, and runs the model over a shard when one is
read. ``ActivationStream`` reads it like a cache, so training on the fly sees the batches that
training on that cache sees (the same seeded shard order and shuffle), memory stays at one
shuffle group whatever the token count, and a run restarted at batch ``b`` recomputes the
group holding ``b``: the data position (the step) is the whole state of the buffer.

Under torchrun each rank runs the model over its share of a shard's rows and the shares are
gathered, so every rank holds the shard, as it would after reading a cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from saekit.cache import pick_hook
from saekit.capture import MODEL_DTYPES, ModelReading, capture_shard, check_model, corpus_rows
from saekit.model import load_model


@dataclass
class ModelActivations:
    """Activations of ``rows`` ``[n_rows, context]`` at ``hooks``, computed by ``model``
    a shard (``shard_size`` rows, the last one possibly shorter) at a time."""

    model: object
    hooks: list[str]
    rows: torch.Tensor
    shard_size: int
    batch_rows: int
    model_name: str
    source: str
    stop_at_layer: int | None = None
    rank: int = 0
    world: int = 1
    _last: tuple[int, dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def context(self) -> int:
        return int(self.rows.shape[1])

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.rows) / self.shard_size)

    @property
    def bos_token_id(self) -> int:
        return int(self.model.tokenizer.bos_token_id)

    def tokens(self) -> torch.Tensor:
        """Token ids of every row, ``[n_rows, context]`` int64."""
        return self.rows

    def shard_rows(self, index: int) -> tuple[int, int]:
        start = index * self.shard_size
        return start, min(start + self.shard_size, len(self.rows))

    def shard_label(self, index: int) -> str:
        start, end = self.shard_rows(index)
        return f"Rows {start}-{end} of {self.source} read by {self.model_name}"

    nonfinite_advice = ("The model's forward gave them: try --model-dtype float32, or check "
                        "the model's weights.")

    def check_hook(self, hook: str | None) -> str:
        return pick_hook(self.hooks, hook)

    def load_shard(self, index: int, hook: str | None = None,
                   verify_checksum: bool = True) -> torch.Tensor:
        """Activations of one shard at ``hook``: ``[rows, context, d_model]`` float32 on the
        model's device. Every hook of a shard comes from one forward pass."""
        hook = self.check_hook(hook)
        if self._last is None or self._last[0] != index:
            self._last = None  # free the previous shard before computing the next
            start, end = self.shard_rows(index)
            self._last = (index, self._forward(self.rows[start:end]))
        return self._last[1][hook]

    def _forward(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        mine = rows[self.rank::self.world]
        acts = capture_shard(self.model, mine, self.hooks, self.stop_at_layer, self.batch_rows,
                             torch.float32, out_device=device)
        if self.world == 1:
            return acts
        return {hook: gather_rows(part, len(rows), self.world) for hook, part in acts.items()}


def gather_rows(mine: torch.Tensor, n_rows: int, world: int) -> torch.Tensor:
    """The rows ``[n_rows, ...]`` of which each rank holds rows ``rank::world`` (``mine``),
    gathered on every rank."""
    share = math.ceil(n_rows / world)
    padded = mine.new_zeros(share, *mine.shape[1:])
    padded[:len(mine)] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = mine.new_empty(n_rows, *mine.shape[1:])
    for rank, part in enumerate(parts):
        count = len(range(rank, n_rows, world))
        out[rank::world] = part[:count]
    return out


def rows_to_read(tokens: int, holdout_tokens: int, context: int, shard_rows: int
                 ) -> tuple[int, int]:
    """(training rows, held-out rows), whole shards: enough rows for ``tokens`` usable
    (non-BOS) tokens, and the held-out shards ``saekit.train.open_stream`` will pick for
    ``holdout_tokens`` (it counts whole rows of ``context``)."""
    def whole_shards(rows: int) -> int:
        return math.ceil(rows / shard_rows) * shard_rows
    return (whole_shards(math.ceil(tokens / (context - 1))),
            whole_shards(math.ceil(holdout_tokens / context)) if holdout_tokens else 0)


def open_model_activations(config: ModelReading, hooks: list[str], n_rows: int, seed: int,
                           shard_rows: int, device: torch.device, model=None, rank: int = 0,
                           world: int = 1) -> ModelActivations:
    """The first ``n_rows`` rows of ``config.dataset`` (shuffled by ``seed``) read by
    ``config.model`` (loaded here unless ``model`` is given) at ``hooks``."""
    if model is None:
        model = load_model(config.model, device=device, dtype=MODEL_DTYPES[config.model_dtype])
    stop_at_layer = check_model(model, config, hooks)
    rows = corpus_rows(config, model.tokenizer, n_rows, seed)
    return ModelActivations(model=model, hooks=list(hooks), rows=rows, shard_size=shard_rows,
                            batch_rows=config.batch_rows, model_name=config.model,
                            source=config.dataset, stop_at_layer=stop_at_layer, rank=rank,
                            world=world)
