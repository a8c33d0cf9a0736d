"""A concept's example texts, retrieved from the corpus by keyword, and its vocabulary.

Used by ``saekit.concept`` to find features that steer to a concept given only its name and
keywords: the rows of a token cache (or of the corpus, tokenised) are searched for the
keywords, and the tokens before and around each mention become the concept's texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from bisect import bisect_right

import torch
from torch import Tensor

from saekit.analyse import TokenStrings
from saekit.errors import ConfigError
from saekit.steer_eval import keyword_pattern


class ConceptError(ConfigError):
    """A concept saekit cannot work with: no keywords, or keywords the corpus never mentions."""


@dataclass
class ConceptTexts:
    """Token windows around keyword mentions; ``windows[i]`` is a 1-D token-id tensor (no BOS)."""

    windows: list[Tensor]
    texts: list[str]
    n_mentions: int  # mentions found in the rows searched (windows holds at most max_texts)
    n_rows: int  # rows searched
    n_tokens: int  # tokens searched
    mention_rows: list[int]  # rows with at least one mention
    mentions: list[tuple[int, int, int]] = field(default_factory=list)  # (row, first, last)


def keyword_list(keywords: str | Sequence[str]) -> list[str]:
    """``"cheese, cheddar"`` or ``["cheese", "cheddar"]`` → ``["cheese", "cheddar"]``."""
    items = keywords.split(",") if isinstance(keywords, str) else list(keywords)
    items = [str(k).strip() for k in items if str(k).strip()]
    if not items:
        raise ConceptError("Give at least one keyword for the concept, e.g. "
                           "--keywords 'volcano,volcanic,lava'.")
    return items


def find_mentions(tokens: Tensor, tokenizer, keywords: Sequence[str],
                  bos_token_id: int | None = None) -> list[tuple[int, int, int]]:
    """``(row, first token, last token)`` of every keyword mention in ``tokens`` [n_rows, ctx].

    Matching is on the decoded text (whole words, case-insensitive, as ``keyword_pattern``),
    so it does not depend on how the tokenizer splits a word.
    """
    pattern = keyword_pattern(keywords)
    strings = TokenStrings(tokenizer)
    found = []
    for row, ids in enumerate(tokens.tolist()):
        pieces = ["" if t == bos_token_id else s for t, s in zip(ids, strings(ids))]
        text = "".join(pieces)
        if not pattern.search(text):
            continue
        ends = list(accumulate(len(p) for p in pieces))  # token j covers [ends[j-1], ends[j])
        for match in pattern.finditer(text):
            first = bisect_right(ends, match.start())
            last = bisect_right(ends, max(match.end() - 1, match.start()))
            found.append((row, first, min(last, len(ids) - 1)))
    return found


def concept_texts(tokens: Tensor, tokenizer, keywords: Sequence[str], max_texts: int = 64,
                  before: int = 48, after: int = 8, seed: int = 0,
                  required: bool = True) -> ConceptTexts:
    """Windows of ``before`` tokens before to ``after`` after each mention (cut at document
    boundaries, i.e. BOS), from a seeded sample of at most ``max_texts`` mentions, one per row.

    Raises ``ConceptError`` naming the count when the keywords occur nowhere (when not
    ``required``: returns no texts).
    """
    bos = tokenizer.bos_token_id
    mentions = find_mentions(tokens, tokenizer, keywords, bos)
    n_rows, context = tokens.shape
    if not mentions and not required:
        return ConceptTexts([], [], 0, n_rows, n_rows * context, [])
    if not mentions:
        raise ConceptError(
            f"The keywords {list(keywords)} occur 0 times in the {n_rows * context:,} tokens "
            f"searched ({n_rows:,} rows). Give keywords the corpus uses, more tokens "
            "(--tokens), a corpus that covers the concept (--dataset), or your own texts "
            "(--texts FILE).")
    first_per_row: dict[int, tuple[int, int]] = {}
    for row, first, last in mentions:
        first_per_row.setdefault(row, (first, last))
    rows = sorted(first_per_row)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = sorted(rows[i] for i in order[:max_texts])
    windows = []
    for row in chosen:
        first, last = first_per_row[row]
        ids = tokens[row]
        start, end = max(1, first - before), min(len(ids), last + 1 + after)
        boundaries = (ids[start:first] == bos).nonzero().flatten()
        if len(boundaries):
            start += int(boundaries[-1]) + 1
        tail = (ids[last + 1:end] == bos).nonzero().flatten()
        if len(tail):
            end = last + 1 + int(tail[0])
        windows.append(ids[start:end].clone())
    texts = tokenizer.batch_decode([w.tolist() for w in windows], skip_special_tokens=True)
    return ConceptTexts(windows, texts, len(mentions), n_rows, n_rows * context, rows, mentions)


def text_windows(tokenizer, texts: Sequence[str], max_tokens: int = 128) -> list[Tensor]:
    """User-given concept texts as token windows (no BOS), each cut to ``max_tokens``."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if ids:
            out.append(torch.tensor(ids, dtype=torch.int64))
    return out


def concept_token_ids(tokenizer, keywords: Sequence[str], min_chars: int = 3) -> list[int]:
    """Token ids that start a keyword as a text would write it: with and without a leading
    space, lower-case, capitalised and as given (``bridge*`` → ``bridge``). A first token that
    covers fewer than ``min_chars`` letters of a longer keyword (" S" of " Sahara") is left
    out, since it starts too many other words."""
    ids: set[int] = set()
    for keyword in keywords:
        word = keyword.strip().rstrip("*").strip()
        if not word:
            continue
        for form in {word, word.lower(), word[:1].upper() + word[1:]}:
            for text in (" " + form, form):
                pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
                if not pieces:
                    continue
                covered = tokenizer.decode(pieces[:1]).strip()
                if len(pieces) == 1 or len(covered) >= min(min_chars, len(form)):
                    ids.add(pieces[0])
    if not ids:
        raise ConceptError(f"The keywords {list(keywords)} give no tokens.")
    return sorted(ids)
