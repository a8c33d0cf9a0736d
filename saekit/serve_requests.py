"""Requests to ``saekit serve``, checked: the features table's query, steering and sweep
requests, and the server's limits. Each parser turns URL parameters or a JSON body into a
frozen dataclass or raises ``ServeError`` (a 4xx) saying what was wrong."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from saekit.errors import SaekitError
from saekit.steer import Intervention

SORT_KEYS = ("id", "density", "max", "mean", "score")
EDIT_MODES = ("clamp", "add", "ablate")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_new_tokens: int = 64
    max_prompt_chars: int = 2000
    request_timeout: float = 120.0
    max_value: float = 1000.0

    @classmethod
    def of(cls, config) -> Limits:
        """The limits a ``ServeConfig`` sets."""
        return cls(config.max_new_tokens, config.max_prompt_chars, config.request_timeout,
                   config.max_value)


class ServeError(SaekitError, ValueError):
    """A request the explorer refuses; ``status`` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --- requests ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureQuery:
    """The features table's filter, sort and page. ``text``: a feature id, or words looked for
    in the explanations; densities are fractions of tokens."""

    text: str = ""
    min_density: float | None = None
    max_density: float | None = None
    min_score: float | None = None
    sort: str = "id"
    descending: bool = False
    page: int = 1
    per_page: int = 50


@dataclass(frozen=True)
class Edit:
    """One steering edit: ``mode`` clamp, add or ablate (value unused) on ``feature``."""

    feature: int
    mode: str
    value: float = 0.0


@dataclass(frozen=True)
class SteerRequest:
    prompt: str
    edits: tuple[Edit, ...]
    max_new_tokens: int = 32
    temperature: float = 0.7
    seed: int = 0


@dataclass(frozen=True)
class SweepRequest:
    """One feature clamped at each of ``values``, measured as ``saekit steer-eval`` does."""

    prompt: str
    feature: int
    values: tuple[float, ...]
    concept: tuple[str, ...]
    max_new_tokens: int = 32
    temperature: float = 0.7
    seed: int = 0
    samples: int = 4


def number_of(data: Mapping, key: str, default: Any, kind: type = float,
              low: float | None = None, high: float | None = None) -> Any:
    """``data[key]`` as a finite ``kind`` in [low, high] (``default`` when absent or empty), or
    ``ServeError`` naming the key."""
    value = data.get(key)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value) if kind is float else int(str(value))
    except (TypeError, ValueError, OverflowError):
        raise ServeError(f"{key} must be a {'whole ' if kind is int else ''}number, got "
                         f"{value!r}.") from None
    if kind is float and not math.isfinite(number):
        raise ServeError(f"{key} must be a finite number, got {value!r}.")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ServeError(f"{key} must be between {low:g} and {high:g}, got {number:g}.")
    return number


def feature_query(params: Mapping[str, Any]) -> FeatureQuery:
    """A ``FeatureQuery`` from URL parameters (``sort=-score`` sorts descending)."""
    sort = str(params.get("sort") or "id")
    key = sort.lstrip("-")
    if key not in SORT_KEYS:
        raise ServeError(f"sort must be one of {', '.join(SORT_KEYS)} (a leading - sorts "
                         f"descending), got {sort!r}.")
    return FeatureQuery(str(params.get("q") or "").strip()[:200],
                        number_of(params, "min_density", None, low=0, high=1),
                        number_of(params, "max_density", None, low=0, high=1),
                        number_of(params, "min_score", None, low=0, high=1), key,
                        sort.startswith("-"), number_of(params, "page", 1, int, 1, 1e9),
                        number_of(params, "per_page", 50, int, 1, 500))


def steer_request(data: object, limits: Limits, d_sae: int) -> SteerRequest:
    """A ``SteerRequest`` from a request's JSON body; ``ServeError`` says what is wrong."""
    if not isinstance(data, dict):
        raise ServeError("The steering request must be a JSON object with a prompt and edits.")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ServeError("prompt must be non-empty text.")
    if len(prompt) > limits.max_prompt_chars:
        raise ServeError(f"The prompt has {len(prompt)} characters; this server takes at most "
                         f"{limits.max_prompt_chars} (--max-prompt-chars).")
    edits = data.get("edits", [])
    if not isinstance(edits, list) or len(edits) > 64:
        raise ServeError("edits must be a list of at most 64 {feature, mode, value} objects.")
    parsed = tuple(edit_of(e, limits, d_sae) for e in edits)
    seen = [(e.feature, e.mode) for e in parsed]
    if len(set(seen)) < len(seen):
        raise ServeError("A feature is listed twice with the same mode; give each once.")
    return SteerRequest(prompt, parsed,
                        number_of(data, "max_new_tokens", 32, int, 1, limits.max_new_tokens),
                        number_of(data, "temperature", 0.7, float, 0, 5),
                        number_of(data, "seed", 0, int, 0, 2**63 - 1))


def sweep_request(data: object, limits: Limits, d_sae: int) -> SweepRequest:
    """A ``SweepRequest`` from a request's JSON body: ``feature``, ``values`` (at most 8),
    ``concept`` words (``fish*,salmon``), ``samples`` per value, and the steering settings."""
    base = steer_request(data, limits, d_sae)  # prompt, lengths, temperature, seed
    feature = edit_of({"feature": data.get("feature"), "value": 0}, limits, d_sae).feature
    values = data.get("values")
    if not isinstance(values, list) or not 1 <= len(values) <= 8:
        raise ServeError("values must be a list of 1 to 8 clamp values.")
    values = tuple(number_of({"value": v}, "value", None, float, -limits.max_value,
                             limits.max_value) for v in values)
    concept = data.get("concept")
    words = tuple(w.strip() for w in concept.split(",") if w.strip()) \
        if isinstance(concept, str) else ()
    if not words or len(",".join(words)) > 200:
        raise ServeError("concept must name the words a steered text should mention, e.g. "
                         "'fish*,salmon' (a * matches any ending).")
    return SweepRequest(base.prompt, feature, values, words, base.max_new_tokens,
                        base.temperature, base.seed, number_of(data, "samples", 4, int, 1, 8))


def finite(data: Any) -> Any:
    """``data`` with NaN and inf floats (which JSON lacks) replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def edit_of(data: object, limits: Limits, d_sae: int) -> Edit:
    if not isinstance(data, dict):
        raise ServeError("Each edit is an object {feature, mode, value}.")
    feature = number_of(data, "feature", None, int)
    if feature is None or not 0 <= feature < d_sae:
        raise ServeError(f"Edit feature {data.get('feature')!r} is not a feature of this SAE "
                         f"(0 to {d_sae - 1}).")
    mode = data.get("mode", "clamp")
    if mode not in EDIT_MODES:
        raise ServeError(f"Edit mode must be one of {', '.join(EDIT_MODES)}, got {mode!r}.")
    value = number_of(data, "value", 0.0, float, -limits.max_value, limits.max_value)
    return Edit(feature, mode, value)


def intervention_of(sae, edits: tuple[Edit, ...]) -> Intervention:
    return Intervention(sae, clamp={e.feature: e.value for e in edits if e.mode == "clamp"},
                        add={e.feature: e.value for e in edits if e.mode == "add"},
                        ablate=[e.feature for e in edits if e.mode == "ablate"])
