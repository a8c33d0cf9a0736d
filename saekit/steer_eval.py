"""Measure steering by one SAE feature over a range of clamp values.

Per clamp value: how often generations mention the concept, what it costs in fluency
(perplexity under the unsteered model) and how far it moves next-token predictions on neutral
text (KL). ``steering_curve`` returns the numbers and, given ``out``, writes
``steering_curve.json`` and ``steering_curve.png`` there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.config import setting
from saekit.files import atomic_path, check_writable, write_json
from saekit.formats import SAE_HELP
from saekit.sae import SAE
from saekit.generation import (GenerationConfig, sample_tokens,
                               stop_token_ids)
from saekit.steer import Intervention, OnRows, Positions, SteeringError, steer
from saekit.model import loaded_model_name

NEUTRAL_PROMPTS = Path(__file__).parent / "data" / "neutral_prompts.txt"
RESULT_JSON = "steering_curve.json"
RESULT_PNG = "steering_curve.png"


def read_prompts(path: str | Path | None = None) -> list[str]:
    """Non-empty lines of ``path`` (one prompt each); the shipped neutral prompts by default."""
    path = Path(path) if path is not None else NEUTRAL_PROMPTS
    if not path.is_file():
        raise SteeringError(f"Prompt file {path} does not exist (one prompt per line).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SteeringError(f"Prompt file {path} is not UTF-8 text ({err}): give one prompt "
                            "per line.") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SteeringError(f"Prompt file {path} holds no prompts (one per line).")
    return prompts


def keyword_pattern(keywords: Sequence[str]) -> re.Pattern:
    """A case-insensitive regex matching any keyword as a whole word or phrase.

    Why keywords: they are cheap, deterministic and transparent, and need no judge model
    (none runs offline on a CPU in reasonable time). They count explicit mentions only, so the
    rate is a lower bound on the concept's presence. Word boundaries keep "bridge" from
    matching "Cambridge"; spaces inside a keyword match any whitespace ("Golden  Gate"); a
    trailing ``*`` matches any word ending ("bridge*" also matches "bridges").
    """
    parts = []
    for keyword in keywords:
        words = keyword.strip().rstrip("*").split()
        if not words:
            continue
        body = r"\s+".join(re.escape(word) for word in words)
        tail = r"\w*" if keyword.strip().endswith("*") else r"(?!\w)"
        parts.append(rf"(?<!\w){body}{tail}")
    if not parts:
        raise SteeringError("Give at least one concept keyword, e.g. 'Golden Gate,bridge'.")
    return re.compile("|".join(parts), re.IGNORECASE)


def mention_rate(texts: Sequence[str], keywords: Sequence[str]) -> float:
    """Fraction of ``texts`` that mention any of ``keywords`` (see ``keyword_pattern``)."""
    if not texts:
        raise SteeringError("mention_rate needs at least one text.")
    pattern = keyword_pattern(keywords)
    return sum(bool(pattern.search(text)) for text in texts) / len(texts)


def continuation_lengths(new: Tensor, stop_ids: set[int]) -> list[int]:
    """Per row of ``new`` [n, T]: tokens up to and including the first stop token."""
    lengths = []
    for row in new.tolist():
        stops = [i for i, token in enumerate(row) if token in stop_ids]
        lengths.append(stops[0] + 1 if stops else len(row))
    return lengths


@torch.no_grad()
def continuation_nll(model, prompt: Tensor, new: Tensor, lengths: Sequence[int],
                     max_rows: int = 16) -> list[float]:
    """Mean NLL per row of continuation ``new`` [n, T] after ``prompt`` [1, P], under ``model``
    as it runs now (call it outside ``steer`` for the unsteered model); NaN for empty rows.
    Only the continuation's logits are computed, ``max_rows`` rows at a time."""
    out: list[float] = []
    for start in range(0, len(new), max_rows):
        part = new[start:start + max_rows]
        tokens = torch.cat([prompt.to(part.device).expand(len(part), -1), part], dim=1)
        logits = model(tokens, return_type="logits", logits_to_keep=part.shape[1] + 1)
        logits = logits[:, :-1].float()
        nll = -logits.log_softmax(-1).gather(-1, part[..., None].to(logits.device)).squeeze(-1)
        out += [float(row[:n].mean()) if n else math.nan
                for row, n in zip(nll.cpu(), lengths[start:start + max_rows])]
    return out


@torch.no_grad()
def next_token_logprobs(model, tokens: Tensor) -> Tensor:
    """Log-probabilities [pos - 1, d_vocab] of ``tokens`` [1, pos], BOS position left out."""
    return model(tokens, return_type="logits")[0, 1:].float().log_softmax(-1)


def mean_kl(base: Sequence[Tensor], steered: Sequence[Tensor]) -> float:
    """Mean over positions of KL(base || steered), each [pos, d_vocab] of log-probabilities
    (per-position values clipped at 0 against float rounding)."""
    kls = [(b.exp() * (b - s)).sum(-1).clamp_min(0) for b, s in zip(base, steered)]
    return float(torch.cat(kls).mean()) if kls else math.nan


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else None


@torch.no_grad()
def neutral_kl(model, plans: Sequence[Sequence[Any]], neutral_tokens: Sequence[Tensor],
               neutral_base: Sequence[Tensor]) -> list[float | None]:
    """Per plan: mean KL(unsteered || steered) over the non-BOS positions of the neutral texts,
    every plan steering its own row of one batch per text."""
    if not neutral_tokens:
        return [None] * len(plans)
    rows = [OnRows(iv, i, i + 1) for i, plan in enumerate(plans) for iv in plan]
    steered: list[list[Tensor]] = [[] for _ in plans]
    with steer(model, *rows, positions="all"):
        for tokens in neutral_tokens:
            logits = model(tokens.expand(len(plans), -1), return_type="logits")
            for i, row in enumerate(logits[:, 1:].float().log_softmax(-1)):
                steered[i].append(row)
    return [mean_kl(neutral_base, s) if any(not iv.is_empty for iv in plan) else 0.0
            for plan, s in zip(plans, steered)]


@torch.no_grad()
def measure_settings(model, plans: Sequence[Sequence[Any]], prompts: Sequence[str],
                     pattern: re.Pattern, neutral_tokens: Sequence[Tensor],
                     neutral_base: Sequence[Tensor], max_new_tokens: int,
                     samples_per_prompt: int, temperature: float, seed: int,
                     positions: Positions, max_batch_rows: int = 160,
                     score_prompts: Sequence[str] | None = None) -> list[dict]:
    """Mention rate, perplexity and neutral KL of each steering setting (a plan with no
    edits: unsteered).

    Settings are generated together, ``samples_per_prompt`` rows per prompt each, as few
    left-padded batches of at most ``max_batch_rows`` rows as fit (each setting steers only its
    own rows, ``OnRows``); every setting draws the same random numbers, so settings differ only
    by their steering, and a setting gives the same samples whatever else is in its batch.
    Perplexity is that of the continuation after ``score_prompts[i]`` (default: the prompt it
    was generated from), e.g. the neutral prompt when an instruction was prepended to it.
    """
    score_prompts = list(score_prompts) if score_prompts is not None else list(prompts)
    if len(score_prompts) != len(prompts):
        raise SteeringError("score_prompts needs one prompt per prompt.")
    stop_ids = stop_token_ids(model)
    batch = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    n = len(batch)
    per_chunk = max(1, max_batch_rows // n)
    results: list[dict] = []
    for first in range(0, len(plans), per_chunk):
        chunk = plans[first:first + per_chunk]
        rows = [OnRows(iv, i * n, (i + 1) * n) for i, plan in enumerate(chunk) for iv in plan]
        new = sample_tokens(model, batch * len(chunk), rows, max_new_tokens, temperature, seed,
                            positions, noise_period=n)
        lengths = continuation_lengths(new, stop_ids)
        nll = [math.nan] * len(new)
        for index in range(len(prompts)):
            mine = [i * n + index * samples_per_prompt + j for i in range(len(chunk))
                    for j in range(samples_per_prompt)]
            values = continuation_nll(model, model.to_tokens(score_prompts[index]), new[mine],
                                      [lengths[r] for r in mine])
            for r, v in zip(mine, values):
                nll[r] = v
        kls = neutral_kl(model, chunk, neutral_tokens, neutral_base)
        for i, kl in enumerate(kls):
            samples, nlls = [], []
            for r in range(i * n, (i + 1) * n):
                text = model.tokenizer.decode(new[r, :lengths[r]].tolist(),
                                              skip_special_tokens=True)
                samples.append({"prompt": batch[r - i * n], "text": text,
                                "mentions": bool(pattern.search(text)),
                                "perplexity": None if math.isnan(nll[r]) else math.exp(nll[r])})
                nlls.append(nll[r])
            perplexities = [math.exp(v) for v in nlls if not math.isnan(v)]
            results.append({
                "mention_rate": sum(s["mentions"] for s in samples) / len(samples),
                "perplexity": _mean(perplexities),
                "mean_token_nll": _mean(nlls),
                "kl_neutral": kl,
                "n_generations": len(samples),
                "samples": samples,
            })
    return results


def extend_within_budget(measure: Callable[[list[tuple[Hashable, float]]], list[dict]],
                         lines: dict[Hashable, list[tuple[float, dict]]],
                         extra: Sequence[float], limit: float) -> None:
    """Stronger edits for each line of (strength, point)s, while they stay fluent: for each of
    ``extra`` in turn, the lines whose strongest point so far (in any order) has perplexity
    <= ``limit`` get
    a point at that strength, all measured by one ``measure([(key, strength), ...])`` call
    (points in the same order); the lines are extended in place. A fixed grid stops where it
    stops: a gentle direction may still be within budget at its largest strength."""
    def fluent_below(points: list[tuple[float, dict]], strength: float) -> bool:
        if not points:
            return False
        strongest, point = max(points, key=lambda sp: sp[0])
        return strength > strongest and point["perplexity"] is not None \
            and point["perplexity"] <= limit

    for strength in extra:
        keys = [key for key, points in lines.items() if fluent_below(points, strength)]
        if not keys:
            return
        for key, point in zip(keys, measure([(key, strength) for key in keys])):
            lines[key].append((strength, point))


def check_texts(texts: Any, what: str) -> None:
    """``texts`` must be a non-empty list of strings (a bare string would be read letter by
    letter)."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise SteeringError(f"{what} takes a non-empty list of strings, got {texts!r}"
                            + (f"; write [{texts!r}]" if isinstance(texts, str) else "") + ".")


def steering_sweep(model, plans: Sequence[Sequence[Any]], prompts: Sequence[str],
                   concept_keywords: Sequence[str], max_new_tokens: int = 30,
                   samples_per_prompt: int = 4, temperature: float = 0.7, seed: int = 0,
                   neutral_texts: Sequence[str] | None = None, positions: Positions = "all",
                   baseline: bool = True) -> dict:
    """``measure_settings`` of each plan (a list of ``Intervention`` / ``SteeringVector``):
    ``{"settings": ..., "baseline": unsteered or None, "curve": [one dict per plan]}``.

    Every setting samples with the same ``seed``, so settings differ only by the steering.
    """
    if not plans:
        raise SteeringError("Give at least one steering setting.")
    check_texts(prompts, "prompts")
    check_texts(concept_keywords, "concept_keywords")
    if neutral_texts is not None:
        check_texts(neutral_texts, "neutral_texts")
    if samples_per_prompt < 1:
        raise SteeringError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}.")
    for plan in plans:
        for intervention in plan:
            intervention.check(model)
    neutral = list(neutral_texts) if neutral_texts is not None else read_prompts()
    neutral_tokens = [model.to_tokens(text) for text in neutral]
    neutral_base = [next_token_logprobs(model, tokens) for tokens in neutral_tokens]
    common = {"prompts": prompts, "pattern": keyword_pattern(concept_keywords),
              "neutral_tokens": neutral_tokens, "neutral_base": neutral_base,
              "max_new_tokens": max_new_tokens, "samples_per_prompt": samples_per_prompt,
              "temperature": temperature, "seed": seed, "positions": positions}
    measured = measure_settings(model, ([[]] if baseline else []) + [list(p) for p in plans],
                                **common)
    return {
        "settings": {"max_new_tokens": max_new_tokens, "samples_per_prompt": samples_per_prompt,
                     "temperature": temperature, "seed": seed, "positions": positions,
                     "prompts": list(prompts), "neutral_texts": neutral},
        "baseline": measured[0] if baseline else None,
        "curve": measured[1:] if baseline else measured,
    }


def steering_curve(model, sae: SAE, feature: int, values: Sequence[float],
                   prompts: Sequence[str], concept_keywords: Sequence[str],
                   max_new_tokens: int = 30, samples_per_prompt: int = 4,
                   temperature: float = 0.7, seed: int = 0,
                   neutral_texts: Sequence[str] | None = None, positions: Positions = "all",
                   baseline: bool = True, out: str | Path | None = None) -> dict:
    """Clamp ``feature`` to each of ``values`` (SAE activation units) and measure, per value:

    - ``mention_rate``: fraction of generations (``samples_per_prompt`` per prompt, one seeded
      batch, the same seed at every value) mentioning any of ``concept_keywords``;
    - ``perplexity``: mean over generations of the continuation's perplexity under the
      unsteered model (prompt + continuation scored, loss on the continuation only);
    - ``kl_neutral``: mean KL(unsteered || steered) of next-token distributions over the
      non-BOS positions of ``neutral_texts`` (default: the shipped neutral prompts), with the
      clamp applied at all non-BOS positions.

    ``baseline`` also measures the unsteered model (``result["baseline"]``). With ``out`` the
    result is written as JSON and a PNG curve there (see ``write_report``).
    """
    if not values:
        raise SteeringError("Give at least one clamp value.")
    if out is not None:
        check_writable(out, folder=True)  # before the work, not at the final write
    plans = [[Intervention(sae, clamp={feature: value})] for value in values]
    sweep = steering_sweep(model, plans, prompts, concept_keywords, max_new_tokens,
                           samples_per_prompt, temperature, seed, neutral_texts, positions,
                           baseline)
    result = {
        "feature": int(feature),
        "hook": plans[0][0].hook_name,
        "model": loaded_model_name(model, sae.cfg.metadata.model_name),
        "d_sae": sae.d_sae,
        "concept_keywords": list(concept_keywords),
        "values": [float(v) for v in values],
        "settings": sweep["settings"],
        "baseline": sweep["baseline"],
        "curve": [{"value": float(value), **point} for value, point in zip(values, sweep["curve"])],
    }
    if out is not None:
        write_report(result, out)
    return result


def write_report(result: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``steering_curve.json`` and ``steering_curve.png`` into ``out``, atomically."""
    out = Path(out)
    write_json(out / RESULT_JSON, result)
    with atomic_path(out / RESULT_PNG) as tmp:
        plot_curve(result, tmp)
    return out / RESULT_JSON, out / RESULT_PNG


def plot_curve(result: dict, path: str | Path) -> None:
    """Mention rate (left axis) and perplexity (right axis) against the clamp value, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    curve = result["curve"]
    values = [row["value"] for row in curve]
    nan = float("nan")
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    left = fig.add_subplot()
    right = left.twinx()
    left.plot(values, [row["mention_rate"] for row in curve], "o-", color="tab:blue",
              label="mention rate")
    right.plot(values, [row["perplexity"] if row["perplexity"] is not None else nan
                        for row in curve], "s-", color="tab:red", label="perplexity")
    base = result.get("baseline")
    if base:
        left.axhline(base["mention_rate"], color="tab:blue", ls="--", lw=1,
                     label="mention rate, unsteered")
        if base["perplexity"] is not None:
            right.axhline(base["perplexity"], color="tab:red", ls="--", lw=1,
                          label="perplexity, unsteered")
    left.set(xlabel="clamp value (SAE activation units)", ylabel="concept mention rate",
             ylim=(-0.02, 1.02),
             title=f"Steering feature {result['feature']} at {result['hook']}")
    right.set_ylabel("perplexity under the unsteered model (log scale)")
    right.set_yscale("log")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="best", fontsize="small")
    fig.savefig(path, format="png", dpi=120)


@dataclass
class SteerEvalConfig(GenerationConfig):
    """What ``saekit steer-eval`` measures: one feature's steering curve over clamp values."""

    sae: str = setting("", SAE_HELP, required=True)
    feature: int = setting(None, "latent index", required=True, ge=0)
    concept: str = setting("", "comma-separated keywords, e.g. 'Golden Gate,San Francisco,"
                           "bridge*'", required=True)
    values: list[float] = setting([], "clamp values (negative: --values=-4,0,4)",
                                  required=True)
    values_relative: bool = setting(False, "values are multiples of --max-activation")
    max_activation: float | None = setting(None, "the feature's max activation (for "
                                           "--values-relative)")
    prompts: str | None = setting(None, "file with one prompt per line (default: the shipped "
                                  "neutral prompts)")
    neutral: str | None = setting(None, "file of neutral texts for the KL (default: the "
                                  "shipped neutral prompts)")
    out: str = setting("", "folder for the JSON and PNG", required=True)
    samples_per_prompt: int = setting(4, "generations per prompt", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.values_relative and not (self.max_activation or 0) > 0:
            raise SteeringError("--values-relative needs --max-activation A > 0 (the feature's "
                                "max activation): values are then multiples of A.")

    def clamp_values(self) -> list[float]:
        """``values`` in activation units."""
        scale = self.max_activation if self.values_relative else 1.0
        return [v * scale for v in self.values]

