"""Auto-interpretability: explain a feature with a language model and score the explanation.

For each feature, ``feature_material`` gathers from one corpus scan (``saekit.analyse``):

- ``shown``: its top-activating examples, activating tokens marked ``<<like this>>``, which the
  explainer reads (with the feature's logit-lens tokens, ``saekit.directions``);
- ``activating``: held-out examples drawn across quantile bands of its nonzero activations;
- ``non_activating``: corpus windows where it is 0 on every token.

``explanation_prompt`` is a few-shot ChatML prompt; ``clean_explanation`` keeps the reply's
first line, printable and bounded, so a corpus text cannot change the stored record's shape.

Detection scoring (as in EleutherAI's delphi): for each held-out text, the judge
(``saekit.explain_judges``) gives P(yes) that the text matches the explanation, from token
probabilities, never parsed from free text. ``score_explanation``
returns the balanced accuracy at P(yes) = 0.5, the balanced accuracy at the median P(yes) (a
small judge's probabilities are badly calibrated; the texts are half activating by design), and
the AUROC of P(yes) against the truth. Fuzzing and ``--score`` are in ``saekit.explain_scores``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from saekit.analyse import (Example, FeatureScan, _chunks, bands_from_scan, examples_from_scan,
                            scan_features)
from saekit.errors import SaekitError

PROMPT_VERSION = "explain-v2"  # v2: a reply copying a few-shot answer is asked again without it
MAX_EXPLANATION_CHARS = 120
EXPLAIN_SYSTEM = ("You explain what a feature of a language model detects. You read texts where "
                  "it fires, with the tokens where it fires most marked <<like this>>, and the "
                  "tokens it makes more likely next. Answer with one short phrase, nothing else.")
FEW_SHOT = (
    (["the recipe calls for grated <<cheese>> and", "a plate of <<ched>><<dar>> and crackers",
      "she put <<cheese>> on the pizza"], ["cheese", " mozzarella", " slices"],
     "cheese and other dairy foods"),
    (["he was born <<in>> 1850 and", "the war ended <<in>> 1945 after", "built <<in>> the 1920s"],
     [" 18", " 19", " the"], "the word 'in' before a year or date"),
)
JUDGE_QUESTION = "Does the text above match this description: {explanation}? Yes or no?"


class ExplainError(SaekitError, ValueError):
    """Inputs ``saekit explain`` cannot use (no examples, an empty explanation, ...)."""


@dataclass
class FeatureMaterial:
    """What the explainer reads and the judge is tested on, for one feature."""

    feature: int
    shown: list[Example]  # top-activating, for the explainer
    activating: list[Example]  # held out, across quantile bands
    non_activating: list[Example]  # corpus windows where the feature is 0
    promoted: list[str]  # logit-lens tokens (empty without a model)


@dataclass
class DetectionScore:
    """How well an explanation tells the feature's texts from others (see module doc)."""

    balanced_accuracy: float  # at P(yes) = 0.5
    balanced_accuracy_median: float  # at the median P(yes) of these texts
    auroc: float
    n_activating: int
    n_non_activating: int
    p_yes_activating: list[float]
    p_yes_non_activating: list[float]

    def summary(self) -> dict:
        """The three scores and counts, without the per-text probabilities."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("p_yes")}


# --- texts and prompts -------------------------------------------------------------------------

def clean_text(text: str) -> str:
    """``text`` on one line, without control characters or the ``<<``/``>>`` markers."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).replace("<<", "< <").replace(">>", "> >")
    return re.sub(r" {2,}", " ", text)


def example_text(example: Example) -> str:
    """The example's window as plain text."""
    return clean_text("".join(example.tokens)).strip()


def marked_text(example: Example) -> str:
    """The example's window with each token where the feature fires marked ``<<token>>``."""
    parts = [f"<<{clean_text(t)}>>" if a > 0 else clean_text(t)
             for t, a in zip(example.tokens, example.activations)]
    return "".join(parts).strip()


def example_id(example: Example) -> str:
    """``"row:position"`` of the example's chosen token (non-activating: its window start)."""
    return f"{example.row}:{example.position}"


def _explain_request(texts: list[str], promoted: list[str]) -> str:
    lines = [f"{i}. {text}" for i, text in enumerate(texts, 1)]
    tokens = ", ".join(repr(clean_text(t)) for t in promoted) or "(unknown)"
    return ("Texts where the feature fires:\n" + "\n".join(lines) +
            f"\nTokens it makes more likely next: {tokens}\nWhat does the feature detect?")


def explanation_prompt(material: FeatureMaterial,
                       without: frozenset[int] = frozenset()) -> list[dict[str, str]]:
    """The few-shot ChatML messages asking for ``material``'s explanation (``without``: indices
    of ``FEW_SHOT`` examples left out)."""
    messages = [{"role": "system", "content": EXPLAIN_SYSTEM}]
    for i, (texts, promoted, answer) in enumerate(FEW_SHOT):
        if i in without:
            continue
        messages += [{"role": "user", "content": _explain_request(texts, promoted)},
                     {"role": "assistant", "content": answer}]
    texts = [marked_text(e) for e in material.shown]
    messages.append({"role": "user", "content": _explain_request(texts, material.promoted)})
    return messages


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def copied_few_shot(explanation: str) -> int | None:
    """The index of the ``FEW_SHOT`` answer ``explanation`` repeats (case, quotes and
    punctuation ignored), or None. A small explainer often copies the last example's answer
    whatever the texts (86 of 210 replies of SmolLM2-135M with prompt explain-v1)."""
    answers = [_normalised(answer) for _, _, answer in FEW_SHOT]
    said = _normalised(explanation)
    return answers.index(said) if said in answers else None


def explain_without_copies(generate: Callable[[list[list[dict[str, str]]]], list[str]],
                           materials: list[FeatureMaterial]) -> list[str]:
    """``generate``'s reply to each material's ``explanation_prompt``; a reply that copies a
    few-shot answer is asked for again with that example left out, until none is copied (at
    most ``len(FEW_SHOT)`` more rounds; with no example left there is nothing to copy)."""
    without = [frozenset() for _ in materials]
    replies = generate([explanation_prompt(m) for m in materials])
    for _ in FEW_SHOT:
        copied = {i: example for i, reply in enumerate(replies)
                  if (example := copied_few_shot(clean_explanation(reply))) is not None}
        if not copied:
            break
        again = list(copied)
        for i, example in copied.items():
            without[i] |= {example}
        for i, reply in zip(again, generate([explanation_prompt(materials[i], without[i])
                                             for i in again])):
            replies[i] = reply
    return replies


def clean_explanation(reply: str) -> str:
    """The reply's first non-empty line, printable, without quotes or a leading "The feature
    detects", at most ``MAX_EXPLANATION_CHARS`` characters ("" if nothing is left)."""
    line = next((ln for ln in reply.splitlines() if ln.strip()), "")
    line = clean_text(line).replace("<", "").replace(">", "")
    line = re.sub(r"^\W*(the )?feature (detects|fires on|is)\s*:?\s*", "", line, flags=re.I)
    line = "".join(c for c in line if c.isprintable())
    if line.count('"') % 2:  # a quote left open by the token limit
        line = line.replace('"', "")
    line = line.strip(" '*.:-")
    return line[:MAX_EXPLANATION_CHARS].strip()


def top_tokens_explanation(material: FeatureMaterial, n: int = 5) -> str:
    """The non-LLM baseline: ``fires on: <the most frequent tokens where it fires most>``."""
    counts: dict[str, int] = {}
    for example in material.shown:
        token = example.tokens[example.position - example.start].strip()
        counts[token] = counts.get(token, 0) + 1
    top = sorted(counts, key=lambda t: -counts[t])[:n]
    return "fires on: " + ", ".join(repr(clean_text(t)) for t in top if t)


def detection_prompt(explanation: str, text: str) -> list[dict[str, str]]:
    """The judge's yes/no question: does ``text`` match ``explanation``?"""
    question = JUDGE_QUESTION.format(explanation=clean_text(explanation))
    return [{"role": "user", "content": f"{clean_text(text)}\n\n{question}"}]


# --- scores ------------------------------------------------------------------------------------

def balanced_accuracy(p_yes: torch.Tensor, truth: torch.Tensor, threshold: float) -> float:
    """Mean of the true-positive and true-negative rates of ``p_yes > threshold``."""
    said = p_yes > threshold
    return 0.5 * (float(said[truth].float().mean()) + float((~said[~truth]).float().mean()))


def auroc(p_yes: torch.Tensor, truth: torch.Tensor) -> float:
    """P(a random activating text gets more P(yes) than a random other one), ties half."""
    pos, neg = p_yes[truth], p_yes[~truth]
    wins = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    return float(wins.mean())


def score_explanation(judge, explanation: str, activating: list[str],
                      non_activating: list[str]) -> DetectionScore:
    """Detection score of ``explanation`` on texts where the feature fires and where it does not
    (``judge``: ``saekit.explain_judges``)."""
    return judge_texts(judge, "detection", explanation, activating, non_activating,
                       "Detection needs activating and non-activating texts")


def judge_texts(judge, scorer: str, explanation: str, positive: list[str], negative: list[str],
                needs: str) -> DetectionScore:
    """The scores of ``judge``'s P(yes) that the ``positive`` texts (which should get yes) and
    the ``negative`` ones fit ``explanation`` (``scorer``: detection or fuzzing);
    ``ExplainError`` (``needs`` ...) if either list is empty, or if the explanation is."""
    if not positive or not negative:
        raise ExplainError(f"{needs}, got {len(positive)} and {len(negative)}.")
    if not explanation.strip():
        raise ExplainError("The explanation to score is empty.")
    p_yes = judge.p_yes(scorer, explanation, positive + negative).float()  # [n]
    truth = torch.arange(len(p_yes)) < len(positive)
    return DetectionScore(balanced_accuracy(p_yes, truth, 0.5),
                          balanced_accuracy(p_yes, truth, float(p_yes.median())),
                          auroc(p_yes, truth), len(positive), len(negative),
                          p_yes[truth].tolist(), p_yes[~truth].tolist())


def split_torn_line(data: bytes) -> tuple[bytes, bytes]:
    """``(whole lines, the rest)`` of a JSON-lines file's bytes: the rest is a last line cut
    mid-write by a killed run (or ``b""``)."""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


def parse_json_lines(whole: bytes, path) -> list[tuple[int, object]]:
    """``(line number, JSON value)`` of each non-blank line of ``whole`` (whole lines of
    ``path``); a line that is not JSON is an ``ExplainError`` naming it."""
    try:
        text = whole.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ExplainError(f"Cannot read {path} as UTF-8 text ({err}).") from None
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ExplainError(f"{path} line {number} is not JSON ({err}); fix or remove that "
                               "line, or move the file away to start over.") from None
    return records


# --- material from the corpus ------------------------------------------------------------------

def non_activating_examples(sae, source, scan: FeatureScan, tokenizer, n: int, rows: int,
                            seed: int = 0) -> dict[int, list[Example]]:
    """Up to ``n`` windows (the scan's window size) per feature from the first ``rows`` rows of
    ``source``, where the feature is 0 on every token; BOS (position 0) left out."""
    from saekit.analyse import TokenStrings

    before, after = scan.window
    width = before + after + 1
    rows = min(rows, len(scan.tokens))  # no further than the scan read (--max-rows)
    generator = torch.Generator().manual_seed(seed)
    acts = torch.cat([a.cpu() for _, a in _chunks(sae, source, scan.features, rows)])
    strings = TokenStrings(tokenizer)
    out = {}
    for j, feature in enumerate(scan.features.tolist()):
        silent = acts[..., j].unfold(1, width, 1).amax(-1) <= 0  # [rows, context - width + 1]
        silent[:, 0] = False
        where = silent.nonzero()
        picked = where[torch.randperm(len(where), generator=generator)[:n]]
        out[feature] = []
        for row, start in picked.tolist():
            ids = scan.tokens[row, start:start + width].tolist()
            out[feature].append(Example(feature, row, start, start, ids, strings(ids),
                                        [0.0] * width, 0.0))
    return out


def feature_material(sae, source, features, tokenizer, model=None, n_shown: int = 10,
                     n_bands: int = 5, per_band: int = 2, n_non_activating: int = 10,
                     non_activating_rows: int = 64, max_rows: int | None = None,
                     window: tuple[int, int] = (12, 4), seed: int = 0) -> dict[int, FeatureMaterial]:
    """``FeatureMaterial`` of each feature from one scan of ``source`` (a cache or
    ``ModelSource``); ``model`` (the SAE's model) gives the logit-lens tokens."""
    from saekit.analyse import open_source
    from saekit.directions import logit_lens_batch

    source = open_source(source)
    scan = scan_features(sae, source, features, n_shown, 40 * n_bands, window, seed, max_rows)
    top = examples_from_scan(scan, tokenizer)
    bands = bands_from_scan(scan, tokenizer, n_bands, per_band)
    silent = non_activating_examples(sae, source, scan, tokenizer, n_non_activating,
                                     non_activating_rows, seed)
    ids = scan.features.tolist()
    lens = logit_lens_batch(model, sae, ids) if model is not None else [([], [])] * len(ids)
    out = {}
    for feature, (promoted, _) in zip(ids, lens):
        shown = {example_id(e) for e in top[feature]}
        held_out = [e for band in bands[feature] for e in band.examples
                    if example_id(e) not in shown]
        out[feature] = FeatureMaterial(feature, top[feature], held_out, silent[feature],
                                       [t for t, _ in promoted])
    return out
