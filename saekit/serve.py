"""``saekit serve``'s engine: one model and one SAE, and what the explorer's pages ask of them.

``Explorer`` holds the model, the SAE, an activation cache at the SAE's hook and, optionally,
``saekit explain``'s explanations. It answers:

- the features table (density, max and mean activation, explanation, score), filtered, sorted
  and paginated from ``[d_sae]`` tensors, so tens of thousands of features stay fast;
- one feature's dashboard data (top and quantile examples, histogram, logit lens, neighbours,
  map), built the first time from one pass over the cache made at start-up for every feature
  (``scan.safetensors``), and kept as JSON on disk, so the next visit only reads a file;
- a text's tokens, the features firing on each, and the features most specific to the text;
- steering: the unsteered and the steered continuation of a prompt, token by token.

Everything that runs the model goes through one ``ModelWorker`` thread, in arrival order:
steering installs hooks on the shared model, so no request ever sees another's hooks. The
pages and the HTTP layer are in ``saekit.serve_pages`` and ``saekit.serve_app``, the checked
requests in ``saekit.serve_requests``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from saekit import analyse, directions
from saekit.analyse import Example, QuantileBand
from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.files import write_json, write_safetensors
from saekit.dashboard import SAEAndCorpus, check_corpus_source
from saekit.generation import iter_sampled_tokens, stop_token_ids
from saekit.search import FeatureExplanation
from saekit.serve_requests import (FeatureQuery, Limits, ServeError, SteerRequest, SweepRequest,
                                   finite, intervention_of)

T = TypeVar("T")
CACHE_VERSION = "2"  # bump when the cached feature data changes shape
WINDOW = (12, 4)  # tokens shown before and after an example's token
QUANTILE_SAMPLES = 60  # nonzero activations sampled per feature for the quantile bands


@dataclass
class ServeConfig(SAEAndCorpus):
    """What ``saekit serve`` loads and how it listens (its flags are these fields)."""

    explanations: str | None = setting(None, "explanations.jsonl of `saekit explain` (or its "
                                       "folder): explanations, scores and search by explanation")
    cache_dir: str | None = setting(None, "folder for computed statistics and feature pages "
                                    "(default: ACTIVATIONS/.saekit-serve, or "
                                    "$SAEKIT_CACHE/serve with --dataset)")
    max_rows: int | None = setting(None, "read only the first rows of the cache (faster cold "
                                   "feature pages)", ge=1)
    n_examples: int = setting(20, "top-activating examples per feature page", ge=1, le=200)
    host: str = setting("127.0.0.1", "address to listen on; anything but loopback opens the "
                        "explorer to the network")
    port: int = setting(8000, "port to listen on (0: any free port)", ge=0, le=65535)
    max_new_tokens: int = setting(64, "most tokens a steering request may generate", ge=1,
                                  le=4096)
    max_prompt_chars: int = setting(2000, "longest prompt or search text, in characters", ge=1)
    request_timeout: float = setting(120.0, "seconds a request may wait and run", gt=0)
    max_value: float = setting(1000.0, "largest |clamp| or |add| value accepted", gt=0)
    device: str | None = setting(None, DEVICE_HELP)

    def __post_init__(self) -> None:
        check_fields(self)
        check_corpus_source(self, "serve")


# --- the model's one thread --------------------------------------------------------------------

class ModelWorker:
    """Runs jobs on one thread, first come first served, and knows each waiting job's place."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="saekit-model")
        self._lock = threading.Lock()
        self._waiting: list[object] = []
        self._busy = False

    def submit(self, job: Callable[[], T]) -> tuple[Future, object]:
        """``(future, ticket)``: ``job`` queued; ``position(ticket)`` tells its place."""
        ticket = object()
        with self._lock:
            self._waiting.append(ticket)

        def run() -> T:
            with self._lock:
                self._waiting.remove(ticket)
                self._busy = True
            try:
                return job()
            finally:
                with self._lock:
                    self._busy = False

        future = self._executor.submit(run)
        future.add_done_callback(lambda _: self._forget(ticket))  # cancelled before it ran
        return future, ticket

    def _forget(self, ticket: object) -> None:
        with self._lock:
            if ticket in self._waiting:
                self._waiting.remove(ticket)

    def run(self, job: Callable[[], T], timeout: float) -> T:
        """``job``'s result, waiting at most ``timeout`` seconds for it to start and finish."""
        future, _ = self.submit(job)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise ServeError(f"The model was busy for more than {timeout:g} s; try again.",
                             503) from None

    def position(self, ticket: object) -> int | None:
        """Jobs ahead of ``ticket``, the running one included, or None once it has started."""
        with self._lock:
            if ticket not in self._waiting:
                return None
            return self._waiting.index(ticket) + int(self._busy)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        with self._lock:
            return not self._busy and not self._waiting

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._waiting)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def stream_tokens(model, prompt: str, interventions: list, max_new_tokens: int,
                  temperature: float, seed: int, on_token: Callable[[int], bool]) -> None:
    """Sample after ``prompt`` exactly as ``saekit.generate`` does (one row, seeded), calling
    ``on_token(id)`` for each new token; stops at EOS, after ``max_new_tokens``, or when
    ``on_token`` returns False (the steering hooks are removed then). Steered by
    ``interventions`` while it runs."""
    tokens = model.to_tokens(prompt)
    stops = stop_token_ids(model)
    steps = iter_sampled_tokens(model, tokens, interventions, max_new_tokens, temperature, seed)
    try:
        for token in steps:
            if not on_token(int(token[0])) or int(token[0]) in stops:
                return
    finally:
        steps.close()


class Abandoned(ServeError):
    """A job stopped because its client left (or its time ran out)."""

    def __init__(self) -> None:
        super().__init__("The client left; its generation was stopped.", 499)


@contextmanager
def stopping(model, cancelled: threading.Event,
             on_pass: Callable[[], None] = lambda: None) -> Iterator[None]:
    """While open, each forward pass of ``model`` on this thread (one per generated token)
    calls ``on_pass()`` and, once ``cancelled`` is set, raises ``Abandoned`` instead of
    running: a generation or a sweep stops at its next token. The steering hooks go as the
    error passes ``steer``'s exit; this hook goes on exit. Other threads are not checked."""
    owner = threading.get_ident()

    def check(module, args) -> None:
        if threading.get_ident() != owner:
            return
        on_pass()
        if cancelled.is_set():
            raise Abandoned()

    handle = getattr(model, "original_model", model).register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


# --- the explorer ------------------------------------------------------------------------------

@dataclass
class FeatureTable:
    """Per-feature columns of the features list, each ``[d_sae]``; ``score`` NaN where none."""

    frequency: Tensor
    max_activation: Tensor
    mean_activation: Tensor
    score: Tensor
    explanation: list[str] = field(default_factory=list)


class Explorer:
    """The model, the SAE, the cache and the explanations of one ``saekit serve``.

    ``cache``: an ``ActivationCache`` at the SAE's hook; ``cache_dir``: where statistics and
    feature data are kept (one sub-folder per SAE weights, cache and settings).
    """

    def __init__(self, model, sae, cache, cache_dir: str | Path,
                 explanations: Mapping[int, FeatureExplanation] | None = None,
                 limits: Limits = Limits(), max_rows: int | None = None,
                 n_examples: int = 20) -> None:
        self.model, self.sae, self.cache = model, sae, cache
        self.explanations = dict(explanations) if explanations is not None else None
        self.limits, self.max_rows, self.n_examples = limits, max_rows, n_examples
        self.hook = analyse.sae_hook(sae, cache)
        self.folder = Path(cache_dir).expanduser() / self._key()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.worker = ModelWorker()
        self._compute = threading.Lock()
        self.cancelled = 0  # jobs stopped early because their client left (or timed out)
        self.forward_passes = 0  # the model's forward passes in ``guarded`` jobs
        self.scan = self._load_scan()
        self.statistics = self.scan.statistics()
        self.table = self._table()

    def _key(self) -> str:
        """A digest of the SAE weights, the cache and the settings the cached data depend on."""
        digest = hashlib.sha256(CACHE_VERSION.encode())
        for name, tensor in sorted(self.sae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        manifest = self.cache.manifest
        digest.update(json.dumps([manifest.n_tokens, manifest.tokens_sha256, self.hook,
                                  self.max_rows, self.n_examples]).encode())
        return digest.hexdigest()[:16]

    def _load_scan(self) -> analyse.FeatureScan:
        """One pass over the cache for every feature (``analyse.scan_features``: top examples,
        a sample for the quantile bands, statistics), kept in ``scan.safetensors``."""
        path = self.folder / "scan.safetensors"
        tokens = self.cache.tokens()[:self.max_rows]
        if path.is_file():
            from safetensors.torch import load_file

            t = load_file(path)
            return analyse.FeatureScan(tokens=tokens, window=WINDOW, n_tokens=int(t.pop("n_tokens")),
                                       **t)
        scan = analyse.scan_features(self.sae, self.cache, None, self.n_examples,
                                     QUANTILE_SAMPLES, WINDOW, max_rows=self.max_rows)
        kept = {f.name: getattr(scan, f.name) for f in fields(scan)
                if f.name not in ("tokens", "window", "n_tokens")}
        write_safetensors(path, {**kept, "n_tokens": torch.tensor(scan.n_tokens)})
        return scan

    def _table(self) -> FeatureTable:
        n, known = self.sae.d_sae, self.explanations or {}
        score = torch.full((n,), math.nan)
        texts = [""] * n
        for feature, record in known.items():
            if 0 <= feature < n:
                texts[feature] = record.explanation
                score[feature] = math.nan if record.score is None else record.score
        s = self.statistics
        return FeatureTable(s.frequency.float(), s.max_activation.float(),
                            s.mean_activation.float(), score, texts)

    # --- features list --------------------------------------------------------------------

    def features(self, query: FeatureQuery) -> tuple[int, list[dict]]:
        """``(number of matches, the page's rows)``; each row holds id, density, max, mean,
        explanation and score (None where not explained)."""
        t = self.table
        keep = torch.ones(self.sae.d_sae, dtype=torch.bool)
        if query.text.lstrip("#").isdigit():
            feature = int(query.text.lstrip("#"))
            keep &= torch.arange(len(keep)) == feature
        elif query.text:
            words = query.text.lower().split()
            keep &= torch.tensor([all(w in e.lower() for w in words) for e in t.explanation])
        bounds = ((t.frequency, query.min_density, 1), (t.frequency, query.max_density, -1),
                  (t.score, query.min_score, 1))
        for column, bound, sign in bounds:
            if bound is not None:
                keep &= (column >= bound) if sign > 0 else (column <= bound)
        ids = keep.nonzero().flatten()
        column = {"id": ids.double(), "density": t.frequency, "max": t.max_activation,
                  "mean": t.mean_activation, "score": t.score}[query.sort]
        values = column[ids].double() if query.sort != "id" else column
        values = torch.nan_to_num(values, nan=-math.inf if query.descending else math.inf)
        order = ids[values.argsort(descending=query.descending, stable=True)]
        start = (query.page - 1) * query.per_page
        return len(ids), [self.row(f) for f in order[start:start + query.per_page].tolist()]

    def row(self, feature: int) -> dict:
        t = self.table
        score = float(t.score[feature])
        return {"id": feature, "density": float(t.frequency[feature]),
                "max": float(t.max_activation[feature]), "mean": float(t.mean_activation[feature]),
                "explanation": t.explanation[feature] or None,
                "score": None if math.isnan(score) else score}

    def check_feature(self, feature: int) -> int:
        if not 0 <= feature < self.sae.d_sae:
            raise ServeError(f"Feature {feature} is out of range: this SAE has "
                             f"{self.sae.d_sae} features (0 to {self.sae.d_sae - 1}).", 404)
        return feature

    # --- one feature ----------------------------------------------------------------------

    def feature(self, feature: int) -> dict:
        """One feature's dashboard data (see ``feature_data``), from disk when computed before."""
        path = self.folder / f"feature_{self.check_feature(feature)}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        with self._compute:
            if path.is_file():  # computed while this request waited
                return json.loads(path.read_text(encoding="utf-8"))
            data = feature_data(self.model, self.sae, scan_of(self.scan, feature),
                                self.model.tokenizer)
            write_json(path, data)
        return data

    def explanation(self, feature: int) -> FeatureExplanation | None:
        return None if self.explanations is None else self.explanations.get(feature)

    # --- a text ---------------------------------------------------------------------------

    def check_text(self, text: str, what: str = "text") -> str:
        if not text.strip():
            raise ServeError(f"Give a non-empty {what}.")
        if len(text) > self.limits.max_prompt_chars:
            raise ServeError(f"The {what} has {len(text)} characters; this server takes at "
                             f"most {self.limits.max_prompt_chars} (--max-prompt-chars).")
        return text

    def search_text(self, text: str, per_token: int = 8, top: int = 20) -> dict:
        """The text's tokens, the ``per_token`` strongest features on each ``[[id, act], ...]``,
        and the ``top`` features most specific to the whole text (``directions.search_features``)."""
        self.check_text(text)
        acts = self.worker.run(
            lambda: directions.text_activations(self.model, analyse.model_hook(self.sae), [text]),
            self.limits.request_timeout)  # [tokens, d_in], BOS dropped
        with torch.inference_mode():
            latents = self.sae.encode(acts.to(self.sae.W_dec.device)).float().cpu()
        ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        values, index = latents.topk(min(per_token, latents.shape[1]), dim=1)
        firing = [[[f, round(v, 4)] for f, v in zip(i, x) if v > 0]
                  for i, x in zip(index.tolist(), values.tolist())]
        hits = directions.search_features(self.sae, acts, statistics=self.statistics, top=top)
        return {"tokens": analyse.TokenStrings(self.model.tokenizer)(ids), "firing": firing,
                "top": [{"feature": h.feature, "score": h.score, "mean": h.mean_activation,
                         "max": h.max_activation, "activations": [round(a, 4) for a in
                                                                  h.token_activations],
                         "explanation": self.table.explanation[h.feature] or None}
                        for h in hits if h.score > 0]}

    # --- steering -------------------------------------------------------------------------

    def steer(self, request: SteerRequest, emit: Callable[[dict], None] = lambda event: None,
              cancelled: threading.Event | None = None, deadline: float | None = None) -> dict:
        """``{"unsteered": text, "steered": text}``, generated one after the other with the
        same seed; ``emit({"type": "token", "side": ..., "text": text so far})`` after each
        token. Stops early when ``cancelled`` is set (the client left); past ``deadline``
        (``time.monotonic()``) it raises. Call it on the worker thread."""
        plans = [("unsteered", [])]
        if request.edits:
            plans.append(("steered", [intervention_of(self.sae, request.edits)]))
        texts: dict[str, str] = {}
        for side, plan in plans:
            ids: list[int] = []

            def on_token(token: int, side: str = side, ids: list[int] = ids) -> bool:
                ids.append(token)
                emit({"type": "token", "side": side, "text": self.decode(ids)})
                if deadline is not None and time.monotonic() > deadline:
                    raise ServeError(f"The request ran past --request-timeout "
                                     f"{self.limits.request_timeout:g} s.", 504)
                return cancelled is None or not cancelled.is_set()

            stream_tokens(self.model, request.prompt, plan, request.max_new_tokens,
                          request.temperature, request.seed, on_token)
            texts[side] = self.decode(ids)
            if cancelled is not None and cancelled.is_set():
                self.cancelled += 1
                break
        texts.setdefault("steered", texts["unsteered"])
        return texts

    def sweep(self, request: SweepRequest) -> dict:
        """``steer_eval.steering_curve`` of the feature at the request's values on its prompt:
        mention rate of the concept words, perplexity and KL on neutral text per value, and
        the unsteered baseline; NaN as None. Call it on the worker thread."""
        from saekit.steer_eval import steering_curve

        return finite(steering_curve(self.model, self.sae, request.feature, request.values,
                                     [request.prompt], request.concept, request.max_new_tokens,
                                     request.samples, request.temperature, request.seed))

    def guarded(self, job: Callable[[], T], cancelled: threading.Event) -> T | None:
        """``job()`` on this (the worker's) thread, stopped at its next forward pass once
        ``cancelled`` is set (``stopping``), and skipped if it was set while the job waited:
        then None, counted in ``cancelled``. Counts the passes in ``forward_passes``."""
        if not cancelled.is_set():
            try:
                with stopping(self.model, cancelled, self._count_pass):
                    return job()
            except Abandoned:
                pass
        self.cancelled += 1
        return None

    def _count_pass(self) -> None:
        self.forward_passes += 1

    def decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids, skip_special_tokens=True)


def scan_of(scan: analyse.FeatureScan, feature: int) -> analyse.FeatureScan:
    """The part of ``scan`` (of every feature) that is about ``feature``."""
    j = feature
    if int(scan.features[j]) != feature:
        j = int((scan.features == feature).nonzero()[0])
    rows = {f.name: getattr(scan, f.name)[j:j + 1] for f in fields(scan)
            if f.name not in ("tokens", "window", "n_tokens")}
    return replace(scan, **rows)


def feature_data(model, sae, scan: analyse.FeatureScan, tokenizer, n_neighbours: int = 10,
                 map_neighbours: int = 30) -> dict:
    """What a feature page shows, as JSON-ready data: statistics, ``histogram`` counts on
    ``analyse.HIST_EDGES``, top ``examples`` and quantile ``bands`` (``Example`` fields),
    logit ``lens``, decoder ``neighbours`` and the ``map``. ``scan``: a scan of this one
    feature (``scan_of``)."""
    (feature,) = scan.features.tolist()
    stats = scan.statistics()
    promoted, suppressed = directions.logit_lens(model, sae, feature)
    ids, coords = directions.feature_map(sae, feature, map_neighbours)
    return {"feature": feature, "n_tokens": stats.n_tokens,
            "frequency": float(stats.frequency[0]), "max": float(stats.max_activation[0]),
            "mean": float(stats.mean_activation[0]), "histogram": stats.histogram[0].tolist(),
            "examples": [asdict(e) for e in analyse.examples_from_scan(scan, tokenizer)[feature]],
            "bands": [asdict(b) for b in analyse.bands_from_scan(scan, tokenizer)[feature]],
            "lens": {"promoted": promoted, "suppressed": suppressed},
            "neighbours": directions.nearest_features(sae, feature, n_neighbours),
            "map": {"ids": ids.tolist(), "coords": coords.tolist()}}


def examples_of(data: dict) -> tuple[list[Example], list[QuantileBand]]:
    """The ``Example`` and ``QuantileBand`` objects of ``feature_data``'s JSON."""
    bands = [QuantileBand(b["low"], b["high"], [Example(**e) for e in b["examples"]])
             for b in data["bands"]]
    return [Example(**e) for e in data["examples"]], bands
