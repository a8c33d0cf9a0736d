"""The activation cache's ``manifest.json`` as typed dataclasses, checked when read.

``CacheManifest.read(folder)`` names the file and the key when the manifest is missing, not
JSON, of another format, or has a key missing or of the wrong type; ``to_dict()`` is what is
written back (keys saekit does not know, e.g. a note someone added, are kept).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from saekit.errors import CorruptCacheError

MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.safetensors"
CACHE_FORMAT = "saekit-activations/1"


@dataclass
class ShardEntry:
    """One complete shard: its file, the token rows ``[start, end)`` it holds, size and hash."""

    file: str
    rows: tuple[int, int]
    bytes: int
    sha256: str

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass
class CacheManifest:
    """What a cache holds: capture settings, shapes, the token rows' hash and its shards."""

    settings: dict[str, Any]
    model: str
    hooks: list[str]
    d_model: int
    n_layers: int
    dtype: str
    context: int
    n_rows: int
    n_tokens: int
    shard_rows: int
    bos_token_id: int
    tokens_sha256: str
    tokens_file: str = TOKENS_FILE
    shards: list[ShardEntry] = field(default_factory=list)
    complete: bool = False
    format: str = CACHE_FORMAT
    saekit_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # keys saekit does not read

    @property
    def rows_done(self) -> int:
        """Rows captured so far: where the last listed shard ends."""
        return self.shards[-1].rows[1] if self.shards else 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data["shards"] = [dict(e, rows=list(e["rows"])) for e in data["shards"]]
        return data | extra

    @classmethod
    def from_dict(cls, data: Any, path: Path | str = MANIFEST) -> CacheManifest:
        """Check ``data`` (parsed JSON) key by key; ``CorruptCacheError`` names what is wrong."""
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise CorruptCacheError(f"{path} is not a {CACHE_FORMAT} manifest.")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: _checked(path, k, data.get(k), k in data) for k in known
                  if k in data or k in REQUIRED}
        values["shards"] = [_shard(path, i, e) for i, e in enumerate(data.get("shards", []))]
        manifest = cls(**values, extra={k: v for k, v in data.items() if k not in known})
        manifest.check_rows(path)
        return manifest

    def check_rows(self, path: Path | str = MANIFEST) -> None:
        """Shards must cover rows 0.. contiguously, a complete cache all ``n_rows``, and
        ``n_tokens`` be ``n_rows * context``."""
        ends = [0] + [e.rows[1] for e in self.shards]
        gaps = [e.file for e, end in zip(self.shards, ends) if e.rows[0] != end]
        problem = (f"shard {gaps[0]} does not start where the one before ends" if gaps
                   else f"n_tokens {self.n_tokens} is not n_rows {self.n_rows} x context "
                   f"{self.context}" if self.n_tokens != self.n_rows * self.context
                   else f"its shards hold {self.rows_done} rows, not n_rows {self.n_rows}"
                   if self.rows_done > self.n_rows or self.complete and
                   self.rows_done != self.n_rows else None)
        if problem:
            raise CorruptCacheError(f"{path}: {problem}. The manifest is damaged: capture the "
                                    "cache again with `saekit cache`.")

    @classmethod
    def read(cls, folder: str | Path) -> CacheManifest:
        """The manifest of the cache in ``folder``."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise CorruptCacheError(f"{folder} is not an activation cache (no {MANIFEST}). Make "
                                    "one with `saekit cache`.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptCacheError(f"{path} is not valid JSON ({err}).") from err
        return cls.from_dict(data, path)


TYPES: dict[str, type | tuple[type, ...]] = {
    "settings": dict, "model": str, "hooks": list, "d_model": int, "n_layers": int,
    "dtype": str, "context": int, "n_rows": int, "n_tokens": int, "shard_rows": int,
    "bos_token_id": int, "tokens_sha256": str, "tokens_file": str, "shards": list,
    "complete": bool, "format": str, "saekit_version": str}
REQUIRED = {"model", "hooks", "d_model", "context", "n_rows", "n_tokens", "bos_token_id",
            "tokens_sha256", "shards", "complete", "settings", "n_layers", "dtype", "shard_rows"}
POSITIVE = {"d_model", "n_layers", "context", "n_rows", "n_tokens", "shard_rows"}


def _checked(path: Path | str, key: str, value: Any, present: bool) -> Any:
    if not present:
        raise CorruptCacheError(f"{path} has no {key!r}: it is damaged or not a saekit cache. "
                                "Capture it again with `saekit cache`.")
    wanted = TYPES[key]
    if isinstance(value, bool) and wanted is not bool or not isinstance(value, wanted) \
            or (key in POSITIVE and value < 1) or (key == "hooks" and not value):
        raise CorruptCacheError(f"{path}: {key!r} is {value!r}, not a valid {key}. The manifest "
                                "is damaged: capture the cache again with `saekit cache`.")
    return value


def _shard(path: Path | str, index: int, entry: Any) -> ShardEntry:
    ok = (isinstance(entry, dict) and isinstance(entry.get("file"), str)
          and "/" not in entry["file"] and isinstance(entry.get("sha256"), str)
          and isinstance(entry.get("bytes"), int) and isinstance(entry.get("rows"), list)
          and len(entry["rows"]) == 2 and all(isinstance(r, int) for r in entry["rows"])
          and 0 <= entry["rows"][0] < entry["rows"][1])
    if not ok:
        raise CorruptCacheError(f"{path}: shard entry {index} ({entry!r}) is damaged. Capture "
                                "the cache again with `saekit cache`.")
    return ShardEntry(entry["file"], tuple(entry["rows"]), entry["bytes"], entry["sha256"])
