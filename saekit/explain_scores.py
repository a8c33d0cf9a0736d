"""Scorers of a feature explanation besides detection (``saekit.explain``): fuzzing, and the
one entry point ``score_examples`` that runs the scorers ``saekit explain --score`` names.

Fuzzing (as in EleutherAI's delphi and OpenAI's explainer work): the judge scores the
explanation against an activating text with some tokens marked ``<<like this>>`` (the marking
the explainer reads, ``marked_text``): are the marked tokens where the feature fires? Each held-out activating example is shown twice: correctly marked (the tokens where the
feature fires) and wrongly marked (as many marks moved to random tokens where it is 0). P(yes)
comes from the judge (``saekit.explain_judges``); the score is the balanced accuracy and AUROC
of correctly vs wrongly marked (``DetectionScore``: "activating" = correctly marked). Unlike
detection, fuzzing asks whether the explanation points at the right *tokens* of texts that all
come from the feature.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from saekit.analyse import Example
from saekit.explain import (DetectionScore, ExplainError, clean_text, example_text,
                            judge_texts, marked_text, score_explanation)

SCORERS = ("detection", "fuzzing")
FUZZ_QUESTION = ("The marked tokens <<like this>> are meant to be where a feature fires. The "
                 "feature detects: {explanation}. Are the marked tokens what it detects? "
                 "Yes or no?")


def parse_scorers(text: str) -> list[str]:
    """The scorers of a ``--score`` value: a comma list of ``SCORERS``, or ``none`` (``[]``)."""
    names = [n.strip() for n in text.split(",")]
    if names == ["none"]:
        return []
    wrong = [n for n in names if n not in SCORERS]
    if wrong or not names:
        raise ExplainError(f"--score takes a comma list of {', '.join(SCORERS)} or 'none', "
                           f"got {text!r}.")
    return list(dict.fromkeys(names))


def misplaced(example: Example, rng: random.Random) -> Example | None:
    """``example`` with its marks (tokens where it fires) moved to as many random visible tokens
    where it is 0; None when there are too few such tokens."""
    marks = sum(a > 0 for a in example.activations)
    free = [i for i, (t, a) in enumerate(zip(example.tokens, example.activations))
            if a <= 0 and t.strip() and i + example.start > 0]  # never BOS
    if marks == 0 or len(free) < marks:
        return None
    chosen = set(rng.sample(free, marks))
    return replace(example, activations=[1.0 if i in chosen else 0.0
                                         for i in range(len(example.tokens))])


def fuzz_texts(examples: list[Example], seed: str | int = 0) -> tuple[list[str], list[str]]:
    """Correctly and wrongly marked texts of the ``examples`` that can be misplaced (equal
    counts, same order)."""
    rng = random.Random(seed)
    pairs = [(e, misplaced(e, rng)) for e in examples]
    kept = [(e, m) for e, m in pairs if m is not None]
    return [marked_text(e) for e, _ in kept], [marked_text(m) for _, m in kept]


def fuzzing_prompt(explanation: str, marked: str) -> list[dict[str, str]]:
    """The judge's yes/no question: are ``marked``'s ``<<marks>>`` where the feature fires?
    (``marked`` keeps its marks; it must come from ``marked_text``.)"""
    question = FUZZ_QUESTION.format(explanation=clean_text(explanation))
    return [{"role": "user", "content": f"{marked}\n\n{question}"}]


def score_fuzzing(judge, explanation: str, correct: list[str], wrong: list[str]) -> DetectionScore:
    """Fuzzing score of ``explanation`` on correctly and wrongly marked texts (``judge``:
    ``saekit.explain_judges``)."""
    return judge_texts(judge, "fuzzing", explanation, correct, wrong,
                       "Fuzzing needs correctly and wrongly marked texts")


def score_examples(judge, explanation: str, activating: list[Example],
                   non_activating: list[Example], scorers: Sequence[str],
                   seed: str | int = 0) -> dict[str, DetectionScore]:
    """Each of ``scorers`` (see ``SCORERS``) run on held-out ``activating`` and
    ``non_activating`` examples; a scorer whose texts are missing (or an empty explanation) is
    left out. ``seed`` picks the wrong marks of fuzzing."""
    out = {}
    if not explanation.strip() or not activating:
        return out
    if "detection" in scorers and non_activating:
        out["detection"] = score_explanation(judge, explanation,
                                             [example_text(e) for e in activating],
                                             [example_text(e) for e in non_activating])
    correct, wrong = fuzz_texts(activating, seed) if "fuzzing" in scorers else ([], [])
    if correct:
        out["fuzzing"] = score_fuzzing(judge, explanation, correct, wrong)
    return out
