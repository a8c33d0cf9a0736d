"""Features found by their explanations: read ``saekit explain``'s ``explanations.jsonl``, keep
one record per feature, and match a text query against the explanations.

Matching is plain and case-insensitive: the query's words (short common words like "and" left
out) are looked for as prefixes of the explanation's words ("cheese" finds "cheeses"). Matches
rank by whether the whole query appears as a phrase, then by how many query words they hold,
then by score: the mean balanced accuracy of the feature's scorers (detection, fuzzing, ...).

The file is only read, never repaired: a torn last line (a run killed mid-write) is skipped, a
corrupt line elsewhere is an error naming it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from saekit.config import check_fields, setting
from saekit.errors import ConfigError
from saekit.explain import ExplainError, parse_json_lines, split_torn_line

EXPLANATIONS_FILE = "explanations.jsonl"
STOPWORDS = frozenset("a an and are as at by for from in is it of on or the to with".split())


@dataclass
class SearchConfig:
    """What ``saekit search`` looks for (its flags are these fields)."""

    explanations: str = setting("", "explanations.jsonl of `saekit explain`, or its --out "
                                "folder", required=True)
    query: str = setting("", "words to find in the explanations, e.g. 'cheese'", required=True)
    top: int = setting(20, "show at most this many features", ge=1)
    sae: str | None = setting(None, "only this SAE's explanations, when the file holds several "
                              "SAEs' (the --sae given to saekit explain)")

    def __post_init__(self) -> None:
        check_fields(self)
        if not words(self.query):
            raise ConfigError(f"--query {self.query!r} has no words: give text to look for in "
                              "the explanations, e.g. --query cheese.")


@dataclass(frozen=True)
class FeatureExplanation:
    """One feature's stored explanation and its scores (scorer name → its summary)."""

    feature: int
    explanation: str
    scores: dict[str, dict] = field(default_factory=dict)
    sae: str | None = None
    explainer: str | None = None
    prompt_version: str | None = None
    judge: str | None = None  # how the scores were judged (saekit.explain_judges)

    @property
    def score(self) -> float | None:
        """Mean balanced accuracy over the scorers that have one (None: not scored)."""
        values = [v for v in map(balanced_accuracy, self.scores.values()) if v is not None]
        return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class FeatureMatch:
    """A feature whose explanation matches a query: the query words found, and the record."""

    feature: int
    explanation: str
    score: float | None
    matched: tuple[str, ...]
    phrase: bool  # the whole query appears in the explanation
    record: FeatureExplanation


def balanced_accuracy(summary: object) -> float | None:
    """A scorer summary's finite ``balanced_accuracy``, else None."""
    value = summary.get("balanced_accuracy") if isinstance(summary, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def explanations_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/explanations.jsonl`` when it is a folder (an explain --out)."""
    path = Path(path).expanduser()
    return path / EXPLANATIONS_FILE if path.is_dir() else path


def _record(data: object, where: str) -> FeatureExplanation:
    """``data`` (one parsed line) as a record; ``where`` names the line in errors."""
    data = data if isinstance(data, dict) else {}
    feature = data.get("feature")
    if isinstance(feature, bool) or not isinstance(feature, int) or feature < 0 or \
            not isinstance(data.get("explanation"), str):
        raise ExplainError(f"{where} is not an explanation record (it needs a feature "
                           "number >= 0 and a text 'explanation'); write the file with "
                           "`saekit explain`.")
    scores = data.get("scores") if isinstance(data.get("scores"), dict) else {}
    text = {k: data.get(k) if isinstance(data.get(k), str) else None
            for k in ("sae", "explainer", "prompt_version", "judge")}
    return FeatureExplanation(data["feature"], data["explanation"],
                              {str(k): v for k, v in scores.items() if isinstance(v, dict)}, **text)


def load_explanations(path: str | Path) -> list[FeatureExplanation]:
    """The records of an explanations file (or of the one in folder ``path``), in file order."""
    path = explanations_path(path)
    if not path.is_file():
        raise ExplainError(f"No explanations file at {path}: run `saekit explain --out DIR` "
                           f"first and give DIR or DIR/{EXPLANATIONS_FILE}.")
    try:
        whole, torn = split_torn_line(path.read_bytes())
    except OSError as err:
        raise ExplainError(f"Cannot read {path} ({err}).") from None
    lines = whole.count(b"\n")
    records = [_record(data, f"{path} line {number}")
               for number, data in parse_json_lines(whole, path)]
    try:
        records.append(_record(json.loads(torn), f"{path} line {lines + 1}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass  # torn by a killed run (read, never repaired: `saekit explain` resumes it)
    return records


def by_feature(records: Iterable[FeatureExplanation], sae: str | Path | None = None
               ) -> dict[int, FeatureExplanation]:
    """One record per feature, the last one stored; with ``sae`` (the SAE given to ``saekit
    explain``) only that SAE's records, when there are any."""
    records = list(records)
    wanted = sae_id(sae) if sae is not None else None
    if wanted is not None and any(r.sae == wanted for r in records):
        records = [r for r in records if r.sae == wanted]
    return {r.feature: r for r in records}


def sae_id(sae: str | Path) -> str:
    """How ``saekit explain`` names an SAE: its resolved path, or the name given."""
    path = Path(sae).expanduser()
    return str(path.resolve()) if path.exists() else str(sae)


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def query_terms(query: str) -> list[str]:
    """The query's words without common short ones (all of them if that leaves none)."""
    found = words(query) if isinstance(query, str) else []
    if not found:
        raise ConfigError(f"The search query {query!r} has no words: give text to look for in "
                          "the explanations, e.g. 'cheese'.")
    return list(dict.fromkeys([w for w in found if w not in STOPWORDS] or found))


def match(record: FeatureExplanation, query: str) -> FeatureMatch | None:
    """``record`` as a match of ``query``, or None if it holds none of the query's words."""
    have = words(record.explanation)
    matched = tuple(t for t in query_terms(query) if any(w.startswith(t) for w in have))
    if not matched:
        return None
    phrase = f" {' '.join(words(query))} " in f" {' '.join(have)} "
    return FeatureMatch(record.feature, record.explanation, record.score, matched, phrase, record)


def search_features(explanations: str | Path | Iterable[FeatureExplanation], query: str,
                    top: int | None = None, sae: str | Path | None = None
                    ) -> list[FeatureMatch]:
    """Features whose explanation matches ``query``, best first (see the module doc).

    ``explanations``: an ``explanations.jsonl`` file, the ``saekit explain --out`` folder
    holding one, or records from ``load_explanations``; ``sae``: keep that SAE's records when
    the file has several SAEs'; ``top``: at most this many (None: all)."""
    query_terms(query)  # an empty query is refused before the file is read
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ConfigError(f"top must be a whole number >= 1 or None, got {top!r}.")
    records = load_explanations(explanations) if isinstance(explanations, (str, Path)) \
        else explanations
    found = [m for r in by_feature(records, sae).values() if (m := match(r, query))]
    found.sort(key=lambda m: (not m.phrase, -len(m.matched),
                              -m.score if m.score is not None else math.inf, m.feature))
    return found[:top]
