"""Feature analysis over a corpus: top and quantile examples, statistics.

Everything that reads the corpus goes through ``scan_features``: one streaming pass over a
cache (shard by shard) or over token rows run through the model (``ModelSource``), keeping
for each feature a running top-k of its activations (a ``torch.topk`` merge of
``[n_features, k]``), a uniform random sample of its nonzero activations (top-k of random
keys, for quantile examples), its firing count, sum, max and a histogram. Memory is bounded
by one chunk of ``[tokens, n_features]``. BOS positions count as activation 0 and are left
out of every statistic: the BOS token carries huge activations unrelated to any feature.

Histograms use fixed log-spaced edges ``HIST_EDGES`` (10 bins per decade), so they can be
filled in the same pass before any feature's maximum is known.

What is computed from decoder/encoder directions and one text (logit lens, neighbours, feature
map, feature search) lives in ``saekit.directions``, which builds on this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saekit.cache import ActivationCache
from saekit.errors import CacheMismatchError, SaekitError
from saekit.model import check_hooks, resolve_model_path

HIST_EDGES = torch.logspace(-4, 5, 91)  # [bins + 1] activation bin edges (log-spaced)
CHUNK_ELEMENTS = 1 << 24  # activations per block (random sample keys are drawn per block)
CHUNK_BLOCKS = 4  # blocks encoded and merged at once (fewer per-chunk merges; same results)


class FeatureIndexError(SaekitError, IndexError):
    """A feature id outside 0 .. d_sae - 1."""

    def __str__(self) -> str:
        return str(self.args[0])


class AnalysisInputError(SaekitError, ValueError):
    """Inputs that do not fit together (e.g. activations of the wrong size for the SAE)."""


class HookMismatchError(CacheMismatchError):
    """The cache does not hold the hook (or the width) the SAE reads."""


@dataclass
class ModelSource:
    """Token rows to run through ``model`` (instead of reading a cache)."""

    model: object  # a TransformerBridge
    tokens: Tensor  # [n_rows, context] int64
    batch_rows: int = 8


@dataclass
class Example:
    """A context window around one token where a feature fires."""

    feature: int
    row: int  # row of the cache / token rows
    position: int  # position of the chosen token in the row
    start: int  # row position of token_ids[0]
    token_ids: list[int]
    tokens: list[str]
    activations: list[float]  # the feature's activation on each token (BOS: 0)
    max_activation: float  # the activation on the chosen token


@dataclass
class QuantileBand:
    """Examples sampled uniformly among activations in [low, high]."""

    low: float
    high: float
    examples: list[Example]


@dataclass
class FeatureStatistics:
    """Per-feature corpus statistics over non-BOS tokens; tensors are ``[n]`` or ``[n, bins]``."""

    features: Tensor  # [n] feature ids
    n_tokens: int
    frequency: Tensor  # fraction of tokens where the feature fires (> 0)
    max_activation: Tensor
    mean_activation: Tensor  # over all tokens, zeros included
    histogram: Tensor  # [n, bins] counts of nonzero activations, edges ``bin_edges``
    bin_edges: Tensor = field(default_factory=lambda: HIST_EDGES.clone())


@dataclass
class FeatureScan:
    """What one pass keeps. ``[n, k]`` tensors are sorted by value (top) or by key (sample);
    ``*_index`` are flat token indices ``row * context + position``; ``*_window`` are the
    feature's activations on ``window`` tokens around each, ``[n, k, before + 1 + after]``."""

    features: Tensor
    tokens: Tensor  # [n_rows, context]
    window: tuple[int, int]
    top_values: Tensor
    top_index: Tensor
    top_window: Tensor
    sample_keys: Tensor
    sample_values: Tensor
    sample_index: Tensor
    sample_window: Tensor
    n_tokens: int
    fire_count: Tensor
    act_sum: Tensor
    max_activation: Tensor
    histogram: Tensor

    def statistics(self) -> FeatureStatistics:
        n = max(self.n_tokens, 1)
        return FeatureStatistics(self.features, self.n_tokens, self.fire_count.double() / n,
                                 self.max_activation.clamp_min(0), (self.act_sum / n).float(),
                                 self.histogram)


# --- checks and sources ------------------------------------------------------------------------

def check_features(sae, features) -> Tensor:
    """``features`` (int, list, range or tensor; None: all) as a ``[n]`` long tensor."""
    if features is None:
        return torch.arange(sae.d_sae)
    if isinstance(features, Tensor):
        ids = features.detach().long().flatten().cpu()
    else:
        ids = torch.as_tensor([features] if isinstance(features, int) else list(features),
                              dtype=torch.long).flatten()
    bad = ids[(ids < 0) | (ids >= sae.d_sae)]
    if len(bad):
        raise FeatureIndexError(f"Feature {int(bad[0])} is out of range: this SAE has d_sae = "
                                f"{sae.d_sae} features (0 to {sae.d_sae - 1}).")
    return ids


def sae_hook(sae, cache: ActivationCache) -> str:
    """The cache hook the SAE reads; raises ``HookMismatchError`` if absent or of another width."""
    hook = sae.cfg.metadata.hook_name
    if hook is None:
        hook = cache.check_hook(None)
    elif hook not in cache.hooks:
        raise HookMismatchError(f"The cache in {cache.folder} holds hooks {cache.hooks}, but the "
                                f"SAE reads {hook!r}. Capture that hook with `saekit cache`.")
    if cache.d_model != sae.d_in:
        raise HookMismatchError(f"The cache in {cache.folder} has d_model = {cache.d_model}, but "
                                f"the SAE takes d_in = {sae.d_in}.")
    return hook


def open_source(source) -> ActivationCache | ModelSource:
    if isinstance(source, (str, Path)):
        return ActivationCache.open(source)
    if not isinstance(source, (ActivationCache, ModelSource)):
        raise AnalysisInputError(f"Pass an activation cache (or its folder) or a ModelSource, "
                                 f"not {type(source).__name__}.")
    return source


def model_hook(sae) -> str:
    hook = sae.cfg.metadata.hook_name
    if hook is None:
        raise AnalysisInputError("The SAE's metadata names no hook_name, so saekit cannot tell "
                                 "where in the model to read activations.")
    return hook


@torch.inference_mode()
def model_activations(model, hook: str, tokens: Tensor) -> Tensor:
    """Activations at ``hook`` of ``tokens`` ``[rows, context]``: ``[rows, context, d_model]``."""

    stop_at_layer = check_hooks(model, [hook])
    store: dict[str, Tensor] = {}

    def record(act: Tensor, hook) -> Tensor:
        store["act"] = act.detach()
        return act

    device = next(model.parameters()).device
    model.run_with_hooks(tokens.to(device), fwd_hooks=[(hook, record)], stop_at_layer=stop_at_layer)
    return store["act"]


@torch.inference_mode()
def feature_activation_rows(model, sae, tokens: Tensor, features=None,
                            batch_rows: int = 8) -> Iterator[Tensor]:
    """Run ``model`` over ``tokens`` ``[n_rows, context]`` up to the SAE's hook; yield the
    activations of ``features`` batch by batch: ``[rows, context, n_features]``."""
    ids = check_features(sae, features).to(sae.W_dec.device)
    hook = model_hook(sae)
    for start in range(0, len(tokens), batch_rows):
        acts = model_activations(model, hook, tokens[start:start + batch_rows])
        yield sae.encode(acts.to(sae.W_dec.device))[..., ids]


@torch.inference_mode()
def _chunks(sae, source, ids: Tensor, max_rows: int | None) -> Iterator[tuple[int, Tensor]]:
    """``(first row, activations [rows, context, n])`` of ``ids``, in row order."""
    device = sae.W_dec.device
    if isinstance(source, ModelSource):
        tokens = source.tokens[:max_rows]
        for i, acts in enumerate(feature_activation_rows(source.model, sae, tokens, ids,
                                                         source.batch_rows)):
            yield i * source.batch_rows, acts
        return
    hook = sae_hook(sae, source)
    rows_per_chunk = _block_rows(sae, source, len(ids)) * CHUNK_BLOCKS
    limit = max_rows if max_rows is not None else source.manifest.n_rows
    every = torch.equal(ids.cpu(), torch.arange(sae.d_sae))  # all features: no copy
    for shard in range(source.n_shards):
        start, _ = source.shard_rows(shard)
        if start >= limit:
            return
        x = source.load_shard(shard, hook)[:limit - start]
        for sub in range(0, len(x), rows_per_chunk):
            acts = sae.encode(x[sub:sub + rows_per_chunk].to(device, sae.W_dec.dtype))
            yield start + sub, (acts if every else acts[..., ids.to(device)]).float()


def _block_rows(sae, source, n: int) -> int:
    """Rows per block of ``n`` features: a chunk of ``_chunks`` is whole blocks (but the
    last of a shard), and ``scan_features`` draws its random keys block by block, so its
    result does not depend on ``CHUNK_BLOCKS``."""
    if isinstance(source, ModelSource):
        return source.batch_rows
    return max(1, CHUNK_ELEMENTS // (source.context * max(n, sae.d_sae // 4)))


def _spans(rows: int, block_rows: int, context: int) -> list[tuple[int, int]]:
    """``(start, end)`` token spans of the blocks of a chunk of ``rows`` rows."""
    step = block_rows * context
    return [(a, min(a + step, rows * context)) for a in range(0, rows * context, step)]


def _source_tokens(source, max_rows: int | None) -> tuple[Tensor, int]:
    if isinstance(source, ModelSource):
        return source.tokens[:max_rows].long().cpu(), int(source.model.tokenizer.bos_token_id)
    return source.tokens()[:max_rows], source.manifest.bos_token_id


# --- the pass ----------------------------------------------------------------------------------

def _merge(keys: Tensor, new_keys: Tensor, k: int, *pairs: tuple[Tensor, Tensor]):
    """Keep the ``k`` largest keys per row of ``cat(keys, new_keys)`` and the matching entries
    of each ``(old, new)`` pair (``[n, m]`` or ``[n, m, w]``)."""
    keys = torch.cat([keys, new_keys], 1)
    top = keys.topk(min(k, keys.shape[1]), dim=1)
    kept = []
    for old, new in pairs:
        both = torch.cat([old, new], 1)
        index = top.indices if both.ndim == 2 else \
            top.indices[..., None].expand(-1, -1, both.shape[2])
        kept.append(both.gather(1, index))
    return top.values, *kept


def _windows(flat: Tensor, index: Tensor, context: int, window: tuple[int, int]) -> Tensor:
    """Activations ``[n, m, w]`` around flat positions ``index`` ``[n, m]`` of ``flat``
    ``[n, rows * context]``, within each row (0 outside it)."""
    before, after = window
    width = context + before + after  # each row padded with zeros on both sides
    padded = torch.nn.functional.pad(flat.view(len(flat), -1, context), (before, after))
    start = index // context * width + index % context  # the window's first slot, padded
    where = start[..., None] + torch.arange(before + after + 1, device=flat.device)
    return padded.view(len(flat), -1).gather(1, where.flatten(1)).view(*where.shape)


@dataclass
class KeptEntries:
    """Per feature, the ``k`` entries with the largest keys seen so far: ``keys``, activation
    ``values`` and flat token ``index`` ``[n, k]``, activation ``window`` ``[n, k, w]``."""

    k: int
    keys: Tensor
    values: Tensor
    index: Tensor
    window: Tensor

    @classmethod
    def empty(cls, k: int, n: int, width: int, device: torch.device) -> KeptEntries:
        none = torch.empty(n, 0, device=device)
        return cls(k, none, none, none.long(), none[..., None].expand(-1, -1, width))

    def add(self, keys: Tensor, values: Tensor, index: Tensor, window: Tensor) -> None:
        """Merge new candidates ``[n, m]`` (``window`` ``[n, m, w]``), keeping the top ``k``."""
        self.keys, self.values, self.index, self.window = _merge(
            self.keys, keys, self.k, (self.values, values), (self.index, index),
            (self.window, window))


@dataclass
class RunningStatistics:
    """Per-feature counts over the usable tokens seen so far (each ``[n]``; ``histogram``
    ``[n * bins]`` of nonzero activations over ``HIST_EDGES``)."""

    fire_count: Tensor
    act_sum: Tensor
    max_activation: Tensor
    histogram: Tensor
    n_tokens: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> RunningStatistics:
        bins = len(HIST_EDGES) - 1
        return cls(torch.zeros(n, dtype=torch.long, device=device),
                   torch.zeros(n, dtype=torch.float64, device=device),
                   torch.full((n,), -math.inf, device=device),
                   torch.zeros(n * bins, dtype=torch.long, device=device))

    def add(self, flat: Tensor, usable: Tensor) -> None:
        """Count activations ``flat`` ``[n, T]`` (0 where not ``usable`` ``[T]``)."""
        fired = flat > 0
        self.n_tokens += int(usable.sum())
        self.fire_count += fired.sum(1)
        self.act_sum += flat.sum(1).double()
        self.max_activation = torch.maximum(
            self.max_activation, flat.masked_fill(~usable, -math.inf).max(1).values)
        which, pos = fired.nonzero(as_tuple=True)
        slot = torch.bucketize(flat[which, pos], HIST_EDGES[1:-1].to(flat.device))
        bins = len(HIST_EDGES) - 1
        self.histogram.index_add_(0, which * bins + slot, torch.ones_like(slot))


@torch.inference_mode()
def scan_features(sae, source, features=None, n_examples: int = 20, n_samples: int = 0,
                  window: tuple[int, int] = (12, 4), seed: int = 0,
                  max_rows: int | None = None) -> FeatureScan:
    """One streaming pass over ``source`` (cache, its folder, or ``ModelSource``) for
    ``features`` (None: all): top ``n_examples``, a uniform sample of ``n_samples`` nonzero
    activations, and statistics, over the first ``max_rows`` rows (None: all)."""
    source = open_source(source)
    ids = check_features(sae, features)
    tokens, bos = _source_tokens(source, max_rows)
    context = tokens.shape[1]
    device, n, width = sae.W_dec.device, len(ids), sum(window) + 1
    generator = torch.Generator(device=device).manual_seed(seed)
    top = KeptEntries.empty(n_examples, n, width, device)
    sample = KeptEntries.empty(n_samples, n, width, device)
    stats = RunningStatistics.zeros(n, device)
    block_rows = _block_rows(sae, source, n)
    for row, acts in _chunks(sae, source, ids, max_rows):
        usable = (tokens[row:row + len(acts)] != bos).flatten().to(device)  # [T]
        flat = (acts.reshape(-1, n) * usable[:, None]).T.contiguous()  # [n, T], BOS -> 0
        base, spans = row * context, _spans(len(acts), block_rows, context)
        for a, b in spans:
            stats.add(flat[:, a:b], usable[a:b])
        if n_examples:
            v, i = flat.masked_fill(~usable, -1.0).topk(min(n_examples, flat.shape[1]), dim=1)
            top.add(v, v, i + base, _windows(flat, i, context, window))
        if n_samples:
            keys = torch.cat([torch.rand(n, b - a, generator=generator, device=device)
                              for a, b in spans], 1)
            k, i = keys.masked_fill(flat <= 0, -1).topk(min(n_samples, flat.shape[1]), dim=1)
            sample.add(k, flat.gather(1, i), i + base, _windows(flat, i, context, window))
    return FeatureScan(
        features=ids, tokens=tokens, window=window, top_values=top.keys.cpu(),
        top_index=top.index.cpu(), top_window=top.window.cpu(), sample_keys=sample.keys.cpu(),
        sample_values=sample.values.cpu(), sample_index=sample.index.cpu(),
        sample_window=sample.window.cpu(), n_tokens=stats.n_tokens,
        fire_count=stats.fire_count.cpu(), act_sum=stats.act_sum.cpu(),
        max_activation=stats.max_activation.cpu(),
        histogram=stats.histogram.view(n, -1).cpu())


# --- examples ----------------------------------------------------------------------------------

class TokenStrings:
    """Decoded strings of single token ids, memoised."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.known = tokenizer, {}

    def __call__(self, ids: list[int]) -> list[str]:
        new = sorted({i for i in ids if i not in self.known})  # not set - keys(): O(|known|)
        if new:
            self.known.update(zip(new, self.tokenizer.batch_decode([[i] for i in new])))
        return [self.known[i] for i in ids]


def _example(scan: FeatureScan, strings: TokenStrings, feature: int, index: int, value: float,
             window_acts: Tensor) -> Example:
    context = scan.tokens.shape[1]
    row, position = divmod(index, context)
    before, after = scan.window
    start, end = max(0, position - before), min(context, position + after + 1)
    ids = scan.tokens[row, start:end].tolist()
    acts = window_acts[start - position + before:end - position + before].tolist()
    return Example(feature, row, position, start, ids, strings(ids), acts, value)


def source_tokenizer(source, tokenizer=None):
    """``tokenizer`` if given, else the tokenizer of the model behind ``source`` (a
    ``ModelSource``'s model, or the model a cache's manifest names)."""
    if tokenizer is not None:
        return tokenizer
    if isinstance(source, ModelSource):
        return source.model.tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(source.manifest.model))


def examples_from_scan(scan: FeatureScan, tokenizer) -> dict[int, list[Example]]:
    """Top examples of each scanned feature, largest first (only tokens where it fires)."""
    strings = TokenStrings(tokenizer)
    out = {}
    for j, feature in enumerate(scan.features.tolist()):
        keep = scan.top_values[j] > 0
        out[feature] = [_example(scan, strings, feature, int(i), float(v), w) for v, i, w in
                        zip(scan.top_values[j][keep], scan.top_index[j][keep],
                            scan.top_window[j][keep])]
    return out


def bands_from_scan(scan: FeatureScan, tokenizer, n_bands: int = 10,
                    per_band: int = 3) -> dict[int, list[QuantileBand]]:
    """Quantile bands of each feature's sampled nonzero activations (equal counts, lowest
    first), with ``per_band`` random examples from each."""
    strings = TokenStrings(tokenizer)
    out = {}
    for j, feature in enumerate(scan.features.tolist()):
        keep = scan.sample_keys[j] >= 0
        values, index, windows = (scan.sample_values[j][keep], scan.sample_index[j][keep],
                                  scan.sample_window[j][keep])
        band = torch.empty(len(values), dtype=torch.long)
        band[values.argsort()] = torch.arange(len(values)) * n_bands // max(len(values), 1)
        out[feature] = []
        for b in range(n_bands):
            members = (band == b).nonzero().flatten()  # in random-key order
            if len(members) == 0:
                continue
            picked = members[:per_band]
            examples = [_example(scan, strings, feature, int(index[m]), float(values[m]),
                                 windows[m]) for m in picked]
            examples.sort(key=lambda e: -e.max_activation)
            out[feature].append(QuantileBand(float(values[members].min()),
                                             float(values[members].max()), examples))
    return out


def top_activating_examples(sae, cache_or_source, features, n_examples: int = 20,
                            window: tuple[int, int] = (12, 4), tokenizer=None,
                            max_rows: int | None = None) -> dict[int, list[Example]]:
    """The ``n_examples`` tokens where each feature is largest (BOS excluded), as examples."""
    source = open_source(cache_or_source)
    scan = scan_features(sae, source, features, n_examples, 0, window, max_rows=max_rows)
    return examples_from_scan(scan, source_tokenizer(source, tokenizer))


def quantile_examples(sae, cache_or_source, features, n_bands: int = 10, per_band: int = 3,
                      n_samples: int = 400, window: tuple[int, int] = (12, 4), tokenizer=None,
                      seed: int = 0, max_rows: int | None = None) -> dict[int, list[QuantileBand]]:
    """Examples from ``n_bands`` quantile bands of each feature's nonzero activations, estimated
    from a uniform sample of ``n_samples`` of them."""
    source = open_source(cache_or_source)
    scan = scan_features(sae, source, features, 0, n_samples, window, seed, max_rows)
    return bands_from_scan(scan, source_tokenizer(source, tokenizer), n_bands, per_band)


def feature_statistics(sae, cache_or_source, features=None,
                       max_rows: int | None = None) -> FeatureStatistics:
    """Firing frequency, max, mean and histogram of ``features`` (None: all) over the corpus."""
    return scan_features(sae, cache_or_source, features, 0, 0, max_rows=max_rows).statistics()
