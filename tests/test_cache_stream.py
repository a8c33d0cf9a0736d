"""The streaming reader: every non-BOS token once per epoch, shuffled, restartable."""

from __future__ import annotations

import gc
import itertools
import weakref
from collections import Counter

import torch

from saekit import ActivationCache, ActivationStream
from saekit.train_data import replay_then

HOOK = "blocks.6.hook_resid_post"


def _all_tokens(cache: ActivationCache) -> torch.Tensor:
    acts = torch.cat([cache.load_shard(i, HOOK) for i in range(cache.n_shards)])
    keep = cache.tokens().flatten() != cache.manifest.bos_token_id
    return acts.reshape(-1, cache.d_model)[keep]


def _row_counts(x: torch.Tensor) -> Counter:
    """The rows of `x` [n, d] as a multiset (identical rows occur: same token at the same position)."""
    return Counter(row.numpy().tobytes() for row in x)


def test_one_epoch_is_a_shuffle_of_the_non_bos_tokens(small_capture):
    cache = ActivationCache.open(small_capture)
    expected = _all_tokens(cache)
    stream = ActivationStream(cache, batch_size=32, hook=HOOK, buffer_tokens=10**9)
    epoch = torch.cat(list(itertools.islice(stream.batches(), stream.batches_per_epoch())))
    assert len(expected) - 32 < len(epoch) <= len(expected)
    assert not torch.equal(epoch, expected[:len(epoch)])  # shuffled
    # with one group holding the whole cache, only the remainder is dropped
    epoch_rows, expected_rows = _row_counts(epoch), _row_counts(expected)
    assert not epoch_rows - expected_rows  # every row it yields is a cached row, none twice
    assert (expected_rows - epoch_rows).total() == len(expected) - len(epoch)
    # BOS rows (norms in the tens of thousands) never come out
    assert epoch.norm(dim=-1).max() < 20_000


def test_restart_at_any_batch_sees_the_same_batches(small_capture):
    cache = ActivationCache.open(small_capture)
    stream = ActivationStream(cache, batch_size=48, hook=HOOK, buffer_tokens=64 * 16, seed=3)
    assert stream.shards_per_group == 2  # memory bounded to two shards at a time
    n = stream.batches_per_epoch() * 2 + 3  # spans epochs
    full = list(itertools.islice(stream.batches(), n))
    for start in (1, 5, stream.batches_per_epoch(), n - 1):
        resumed = list(itertools.islice(stream.batches(start_batch=start), n - start))
        assert all(torch.equal(a, b) for a, b in zip(full[start:], resumed))
    other_seed = ActivationStream(cache, batch_size=48, hook=HOOK, buffer_tokens=64 * 16, seed=4)
    assert not torch.equal(next(iter(other_seed)), full[0])


def test_a_read_group_is_freed_before_the_next_one_loads(small_capture, monkeypatch):
    """Memory stays at one shuffle group: neither the reader, holding the batch it read last,
    nor the stream keeps the previous group alive while the next one loads (a training run
    would otherwise hold two groups, or every group it had read)."""
    cache = ActivationCache.open(small_capture)
    stream = ActivationStream(cache, batch_size=48, hook=HOOK, buffer_tokens=64 * 16, seed=3)
    groups, alive_at_load = [], []
    load_group = ActivationStream._load_group

    def recording(self, *args):
        gc.collect()
        alive_at_load.append([ref() is not None for ref in groups])
        group = load_group(self, *args)
        groups.append(weakref.ref(group))
        return group

    monkeypatch.setattr(ActivationStream, "_load_group", recording)
    batches = stream.batches()
    batch = next(batches)  # the reader holds one batch at a time, as training does
    for _ in range(stream.batches_per_epoch() + 3):
        batch = next(batches)
    del batch
    assert len(alive_at_load) >= 4
    assert all(not any(alive) for alive in alive_at_load), alive_at_load


def test_replayed_batches_are_released_as_they_are_read():
    first = [torch.ones(4, 2), torch.ones(4, 2)]
    refs = [weakref.ref(t) for t in first]
    batches = replay_then(first, iter([torch.zeros(4, 2)]))
    del first
    for _ in range(3):
        batch = next(batches)
    assert refs[0]() is None and refs[1]() is None and batch.sum() == 0
