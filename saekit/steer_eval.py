"""Measure steering by one SAE feature over a range of clamp values.

Per clamp value: how often generations mention the concept, what it costs in fluency
(perplexity under the unsteered model) and how far it moves next-token predictions on neutral
text (KL). ``steering_curve`` returns the numbers and, given ``out``, writes
``steering_curve.json`` and ``steering_curve.png`` there.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.files import atomic_path, write_json
from saekit.sae import SAE
from saekit.steer import (Intervention, Positions, SteeringError, add_generation_arguments,
                          load_sae_and_model, sample_tokens, steer)

NEUTRAL_PROMPTS = Path(__file__).parent / "data" / "neutral_prompts.txt"
RESULT_JSON = "steering_curve.json"
RESULT_PNG = "steering_curve.png"


def read_prompts(path: str | Path | None = None) -> list[str]:
    """Non-empty lines of ``path`` (one prompt each); the shipped neutral prompts by default."""
    path = Path(path) if path is not None else NEUTRAL_PROMPTS
    if not path.is_file():
        raise SteeringError(f"Prompt file {path} does not exist (one prompt per line).")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
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


def stop_token_ids(model) -> set[int]:
    """The token ids ``model.generate`` stops at (and pads finished rows with)."""
    ids = getattr(model.cfg, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    eos = getattr(model.tokenizer, "eos_token_id", None)
    return set(ids) | ({eos} if eos is not None else set())


def continuation_lengths(new: Tensor, stop_ids: set[int]) -> list[int]:
    """Per row of ``new`` [n, T]: tokens up to and including the first stop token."""
    lengths = []
    for row in new.tolist():
        stops = [i for i, token in enumerate(row) if token in stop_ids]
        lengths.append(stops[0] + 1 if stops else len(row))
    return lengths


@torch.no_grad()
def continuation_nll(model, prompt: Tensor, new: Tensor, lengths: Sequence[int]) -> list[float]:
    """Mean NLL per row of continuation ``new`` [n, T] after ``prompt`` [1, P], under ``model``
    as it runs now (call it outside ``steer`` for the unsteered model); NaN for empty rows."""
    width = prompt.shape[1]
    tokens = torch.cat([prompt.to(new.device).expand(len(new), -1), new], dim=1)
    logits = model(tokens, return_type="logits")[:, width - 1:-1].float()
    nll = -logits.log_softmax(-1).gather(-1, new[..., None].to(logits.device)).squeeze(-1)
    return [float(row[:n].mean()) if n else math.nan for row, n in zip(nll.cpu(), lengths)]


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
def measure_setting(model, interventions: Sequence[Any], prompts: Sequence[str],
                    pattern: re.Pattern, neutral_tokens: Sequence[Tensor],
                    neutral_base: Sequence[Tensor], max_new_tokens: int,
                    samples_per_prompt: int, temperature: float, seed: int,
                    positions: Positions) -> dict:
    """Mention rate, perplexity and neutral KL of one steering setting (no edits: unsteered).

    All generations (``samples_per_prompt`` per prompt) are sampled as one left-padded batch.
    """
    stop_ids = stop_token_ids(model)
    batch = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    new = sample_tokens(model, batch, interventions, max_new_tokens, temperature, seed, positions)
    lengths = continuation_lengths(new, stop_ids)
    samples, nlls = [], []
    for index, prompt in enumerate(prompts):
        rows = slice(index * samples_per_prompt, (index + 1) * samples_per_prompt)
        row_nll = continuation_nll(model, model.to_tokens(prompt), new[rows], lengths[rows])
        for row, n, nll in zip(new[rows].tolist(), lengths[rows], row_nll):
            text = model.tokenizer.decode(row[:n], skip_special_tokens=True)
            samples.append({"prompt": prompt, "text": text, "mentions": bool(pattern.search(text)),
                            "perplexity": None if math.isnan(nll) else math.exp(nll)})
            nlls.append(nll)
    steered = neutral_base
    if any(not iv.is_empty for iv in interventions):
        with steer(model, *interventions, positions="all"):
            steered = [next_token_logprobs(model, tokens) for tokens in neutral_tokens]
    perplexities = [math.exp(v) for v in nlls if not math.isnan(v)]
    return {
        "mention_rate": sum(s["mentions"] for s in samples) / len(samples),
        "perplexity": _mean(perplexities),
        "mean_token_nll": _mean(nlls),
        "kl_neutral": mean_kl(neutral_base, steered) if neutral_tokens else None,
        "n_generations": len(samples),
        "samples": samples,
    }


def steering_sweep(model, plans: Sequence[Sequence[Any]], prompts: Sequence[str],
                   concept_keywords: Sequence[str], max_new_tokens: int = 30,
                   samples_per_prompt: int = 4, temperature: float = 0.7, seed: int = 0,
                   neutral_texts: Sequence[str] | None = None, positions: Positions = "all",
                   baseline: bool = True) -> dict:
    """``measure_setting`` for each plan (a list of ``Intervention`` / ``SteeringVector``):
    ``{"settings": ..., "baseline": unsteered or None, "curve": [one dict per plan]}``.

    Every setting samples with the same ``seed``, so settings differ only by the steering.
    """
    if not plans:
        raise SteeringError("Give at least one steering setting.")
    if not prompts:
        raise SteeringError("Give at least one prompt.")
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
    return {
        "settings": {"max_new_tokens": max_new_tokens, "samples_per_prompt": samples_per_prompt,
                     "temperature": temperature, "seed": seed, "positions": positions,
                     "prompts": list(prompts), "neutral_texts": neutral},
        "baseline": measure_setting(model, [], **common) if baseline else None,
        "curve": [measure_setting(model, plan, **common) for plan in plans],
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
    plans = [[Intervention(sae, clamp={feature: value})] for value in values]
    sweep = steering_sweep(model, plans, prompts, concept_keywords, max_new_tokens,
                           samples_per_prompt, temperature, seed, neutral_texts, positions,
                           baseline)
    result = {
        "feature": int(feature),
        "hook": plans[0][0].hook_name,
        "model": getattr(model, "saekit_model_name", None) or sae.cfg.metadata.model_name,
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


# --- command line ----------------------------------------------------------------------------

def parse_floats(text: str) -> list[float]:
    """``"0,2,4.5"`` → [0.0, 2.0, 4.5]."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def run_steer_eval(args: argparse.Namespace) -> None:
    values = args.values
    if args.values_relative:
        if args.max_activation is None or not args.max_activation > 0:
            raise SteeringError("--values-relative needs --max-activation A > 0 (the feature's "
                                "max activation): values are then multiples of A.")
        values = [v * args.max_activation for v in values]
    prompts = read_prompts(args.prompts)
    neutral = read_prompts(args.neutral) if args.neutral else None
    concept = [c for c in args.concept.split(",") if c.strip()]
    sae, model = load_sae_and_model(args.sae, args.device)
    result = steering_curve(model, sae, args.feature, values, prompts, concept,
                            max_new_tokens=args.max_new_tokens,
                            samples_per_prompt=args.samples_per_prompt,
                            temperature=args.temperature, seed=args.seed, neutral_texts=neutral,
                            positions=args.positions, out=args.out)
    print(f"{'clamp':>10} {'mention':>8} {'perplexity':>11} {'KL neutral':>11}")
    rows = ([("unsteered", result["baseline"])] if result["baseline"] else []) + \
        [(f"{row['value']:g}", row) for row in result["curve"]]
    for label, row in rows:
        ppl = f"{row['perplexity']:.2f}" if row["perplexity"] is not None else "-"
        print(f"{label:>10} {row['mention_rate']:>8.2f} {ppl:>11} {row['kl_neutral']:>11.4f}")
    print(f"wrote {Path(args.out) / RESULT_JSON} and {Path(args.out) / RESULT_PNG}")


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``saekit steer-eval`` to the CLI's sub-parsers."""
    parser = subparsers.add_parser("steer-eval", help="measure steering by one feature over "
                                   "clamp values: concept mentions, perplexity, KL")
    parser.add_argument("--sae", required=True, help="saved SAE folder")
    parser.add_argument("--feature", type=int, required=True, help="latent index")
    parser.add_argument("--concept", required=True,
                        help="comma-separated keywords, e.g. 'Golden Gate,San Francisco,bridge*'")
    parser.add_argument("--values", type=parse_floats, required=True,
                        help="comma-separated clamp values (negative: --values=-4,0,4)")
    parser.add_argument("--values-relative", action="store_true",
                        help="values are multiples of --max-activation")
    parser.add_argument("--max-activation", type=float, default=None,
                        help="the feature's max activation (for --values-relative)")
    parser.add_argument("--prompts", default=None,
                        help="file with one prompt per line (default: shipped neutral prompts)")
    parser.add_argument("--neutral", default=None,
                        help="file of neutral texts for the KL (default: shipped neutral prompts)")
    parser.add_argument("--out", required=True, help="folder for the JSON and PNG")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    add_generation_arguments(parser)
    parser.set_defaults(run=run_steer_eval)
    return parser
