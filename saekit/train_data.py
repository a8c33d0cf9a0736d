"""What a training run reads: its cache, or the model reading the corpus on the fly
(``saekit.model_stream``); the shuffled training stream and the held-out shards."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from saekit.cache import ActivationCache, ActivationStream
from saekit.errors import ConfigError, NonFiniteActivationsError, TrainingError
from saekit.model import default_device
from saekit.model_stream import ModelActivations, open_model_activations, rows_to_read
from saekit.train_runs import Distributed

if TYPE_CHECKING:
    from saekit.train import TrainConfig


def open_source(config: TrainConfig, device: torch.device | None = None,
                ranks: Distributed | None = None, model=None
                ) -> ActivationCache | ModelActivations:
    """The run's activations: its cache, or the model reading the corpus on the fly (the
    training rows, then the held-out rows)."""
    if config.activations:
        return ActivationCache.open(config.activations)
    if not config.hook:
        raise ConfigError("Training on the fly (no --activations) needs the hook(s) to read: "
                          "--hook blocks.6.hook_resid_post, for instance (`saekit hooks` lists "
                          "them), or --activations CACHE to train on a cache.")
    ranks = ranks or Distributed()
    train_rows, held_rows = rows_to_read(config.tokens, config.holdout_tokens, config.context,
                                         config.shard_rows)
    # spare rows for the BOS between documents and the < 1 batch each shuffle group drops
    groups = math.ceil(train_rows * config.context / config.buffer_tokens) + 1
    spare = math.ceil(train_rows / 50) + groups * math.ceil(config.batch_size / config.context)
    hooks = [*config.hook, *([config.hook_out] if config.hook_out else [])]
    source = open_model_activations(config, hooks, train_rows + spare + held_rows, config.seed,
                                    config.shard_rows, device or default_device(config.device),
                                    model, ranks.rank, ranks.world)
    return fit_training_rows(source, config, train_rows // config.shard_rows, held_rows)


def fit_training_rows(source: ModelActivations, config: TrainConfig, n_train: int,
                      held_rows: int) -> ModelActivations:
    """``source`` cut to its first training shards (``n_train`` or more: as many as give
    ``config.steps`` batches in one epoch, so the run never re-reads a row) and then
    ``held_rows`` held-out rows."""
    shard = config.shard_rows
    available = (len(source.rows) - held_rows) // shard
    if available < 1:
        return source  # too short a corpus: open_stream says so

    def epoch_batches(n: int) -> int:
        return ActivationStream(source, config.batch_size, config.hook[0], config.seed,
                                config.buffer_tokens, shards=list(range(n))).batches_per_epoch()

    n_train = min(max(1, n_train), available)
    while n_train < available and epoch_batches(n_train) < config.steps:
        n_train += 1
    if epoch_batches(n_train) < config.steps:
        tqdm.write(f"saekit: {source.source} gives {n_train * shard} rows for training, "
                   f"{epoch_batches(n_train) * config.batch_size:,} tokens, fewer than --tokens "
                   f"{config.tokens:,}: training reads them more than once.")
    source.rows = source.rows[:n_train * shard + held_rows]
    return source


def open_stream(config: TrainConfig, device: torch.device | None = None,
                ranks: Distributed | None = None, model=None
                ) -> tuple[ActivationCache | ModelActivations, ActivationStream, list[int]]:
    """The run's source, its shuffled training stream, and the held-out shards (the last
    ones, at least ``holdout_tokens``). ``model``: a loaded model for training on the fly."""
    cache = open_source(config, device, ranks, model)
    holdout, held = 0, 0
    while held < config.holdout_tokens and holdout < cache.n_shards - 1:
        start, end = cache.shard_rows(cache.n_shards - 1 - holdout)
        held += (end - start) * cache.context
        holdout += 1
    if config.holdout_tokens > 0 and holdout == 0:
        raise TrainingError(
            f"{cache.source} has {cache.n_shards} shard, so none can be held "
            f"out for evaluation (--holdout-tokens {config.holdout_tokens}): capture more tokens "
            "or smaller shards (--shard-rows), or pass --holdout-tokens 0 to skip "
            "the held-out evaluation.")
    train_shards = list(range(cache.n_shards - holdout))
    stream = ActivationStream(cache, config.batch_size, (config.hook or [None])[0], config.seed,
                              config.buffer_tokens, shards=train_shards,
                              target_hook=config.hook_out, extra_hooks=config.hook[1:])
    if stream.tokens_per_epoch < config.batch_size:
        raise TrainingError(f"{cache.source} has {stream.tokens_per_epoch} training tokens, fewer than "
                            f"one batch of {config.batch_size}.")
    return cache, stream, list(range(cache.n_shards - holdout, cache.n_shards))


def next_batch(batches: Iterator[torch.Tensor], step: int) -> torch.Tensor:
    """The next batch, with the step named if its shard holds NaN or inf."""
    try:
        return next(batches)
    except NonFiniteActivationsError as err:
        raise NonFiniteActivationsError(f"At step {step}: {err}") from err


def replay_then(first: list[torch.Tensor], rest: Iterator[torch.Tensor]
                ) -> Iterator[torch.Tensor]:
    """The batches of ``first`` (emptied as they are read, so that none outlives its step
    and keeps its shuffle group alive), then those of ``rest``."""
    while first:
        yield first.pop(0)
    yield from rest
