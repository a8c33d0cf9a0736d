"""Find the SAE feature(s) that steer a model to a concept, from its name and keywords only.

1. **retrieve** the concept's texts: windows of the corpus around keyword mentions
   (``saekit.concept_texts``), plus the user's own;
2. **candidates**, pooled from three rankings of every feature:
   - *output*: the first-order effect of adding its decoder direction on the next-token
     log-probability of the concept's words on neutral prompts (the gradient of that
     log-probability at the hook, dotted with each unit decoder direction). Features that fire
     on a concept are not necessarily those that make the model say it (Arad, Mueller &
     Belinkov 2025); this ranks by the output side;
   - *input*: fires on the concept's texts far above its corpus base rate (``search_features``);
   - *alignment*: decoder direction closest to the concept's mean-difference direction;
   - *explanation* (given ``explained``): features whose ``saekit explain`` explanation
     matches the concept's name or keywords (``saekit.search``);
3. **screen** each candidate with forward passes only: its direction added at a few edit sizes
   on the validation prompts; the lift in the log-probability of the concept's words;
4. **validate** by generating from the validation prompts with the best-screened feature
   clamped, and with the best 3 and best 10 clamped together (``groups``; the edit norm split
   evenly), each at every edit size: the highest mention rate at a perplexity (under the
   unsteered model) within ``max_perplexity_ratio`` of the unsteered text's. A single feature
   is preferred when it reaches ``target_rate``. (Measured on wine and cheese at layer 6:
   groups reach at an edit of 0.15x the residual scale what one feature reaches only at
   perplexities far over budget, and stronger edits lower the rate as the text degrades);
5. **evaluate** the choice on the evaluation prompts (never used to choose): ``concept.json``.

Edit sizes are given relative to the residual stream's typical *centred* norm at the hook
(``residual_scale``): most of the raw norm is a constant offset that carries no content.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.analyse import FeatureStatistics, model_hook
from saekit.concept_measure import (decoder_directions, output_gradient, prompt_batch,
                                    residual_scale, screen_directions, window_activations)
from saekit.concept_texts import ConceptError, ConceptTexts
from saekit.config import check_fields, setting
from saekit.directions import search_features
from saekit.steer import Intervention, SteeringVector
from saekit.steer_eval import extend_within_budget, read_prompts, steering_sweep
from saekit.model import loaded_model_name

VALIDATION_PROMPTS = Path(__file__).parent / "data" / "validation_prompts.txt"
BENCHMARK_CONCEPTS = Path(__file__).parent / "data" / "benchmark_concepts.json"


@dataclass
class ConceptSearch:
    """How hard to look. Strengths are edit norms relative to ``residual_scale``."""

    candidates_per_ranking: int = setting(12, "candidate features from each of the three "
                                              "rankings (output, input, alignment)", ge=1)
    groups: list[int] = setting([1, 3, 10], "sizes of the sets of best-screened features "
                                "validated together (1: the best alone)", ge=1)
    # measured on cheese and wine at layer 6: 0.35x already triples perplexity for most features
    strengths: list[float] = setting([0.1, 0.15, 0.2, 0.3], "validated edit norms, x the "
                                     "residual stream's typical centred norm", gt=0)
    extra_strengths: list[float] = setting([], "stronger edit norms tried in turn for each "
                                           "group still within the perplexity budget at its "
                                           "strongest edit so far (e.g. 0.4,0.5,0.6)", gt=0)
    # larger than those validated: screened at 0.15x and 0.2x, the top cheese features never
    # said "cheese" (benchmark v3: 0%); at 0.35x and 0.5x they did (v2: 40%)
    screen_strengths: list[float] = setting([0.35, 0.5], "edit norms of the forward-pass "
                                            "screen, x the residual scale", gt=0)
    max_new_tokens: int = setting(32, "new tokens per generation", ge=1)
    samples_per_prompt: int = setting(2, "generations per validation prompt", ge=1)
    temperature: float = setting(0.7, "sampling temperature (0: greedy)", ge=0)
    max_perplexity_ratio: float = setting(3.0, "perplexity budget: x the unsteered "
                                          "perplexity", gt=0)
    target_rate: float = setting(0.5, "mention rate that counts as success", gt=0, le=1)
    seed: int = setting(0, "seed of the sampling and of the text sample")

    def __post_init__(self) -> None:
        check_fields(self, ConceptError)
        for what in ("groups", "strengths", "screen_strengths"):
            if not getattr(self, what):
                raise ConceptError(f"--{what.replace('_', '-')} needs at least one value.")


@dataclass
class Candidate:
    """A feature considered for the concept, with what each stage measured."""

    feature: int
    sources: list[str]  # rankings that proposed it: output, input, alignment, explanation
    output_score: float  # gradient . unit decoder direction
    direction_norm: float  # raw norm of one unit of activation
    screen_lift: list[float] = field(default_factory=list)  # per screened strength
    screen_kl: list[float] = field(default_factory=list)


@dataclass
class SteeringChoice:
    """The features and clamp values chosen, and what validation measured for them."""

    features: list[int]
    values: list[float]  # clamp values, SAE activation units, one per feature
    strength: float  # edit norm / residual_scale
    mention_rate: float
    perplexity: float | None
    meets_target: bool  # on the validation prompts
    within_budget: bool  # perplexity within max_perplexity_ratio on the validation prompts


# --- the search --------------------------------------------------------------------------------

def pool_candidates(sae, directions: Tensor, gradient: Tensor, concept_acts: Tensor,
                    mean_difference: Tensor, statistics: FeatureStatistics,
                    per_ranking: int, explained: Sequence[int] = ()) -> list[Candidate]:
    """The top ``per_ranking`` features of the output, input and alignment rankings, and the
    ``explained`` ones (explanation ranking), pooled (in that order, each feature once)."""
    norms = directions.norm(dim=-1).clamp_min(1e-12)
    unit = directions / norms[:, None]
    output = unit @ gradient
    alignment = unit @ F.normalize(mean_difference.float(), dim=0)
    hits = search_features(sae, concept_acts, statistics=statistics, top=per_ranking)
    rankings = {
        "output": output.topk(per_ranking).indices.tolist(),
        "input": [h.feature for h in hits if h.score > 0],
        "alignment": alignment.topk(per_ranking).indices.tolist(),
        "explanation": list(explained),
    }
    pooled: dict[int, Candidate] = {}
    for source, features in rankings.items():
        for f in features:
            if f not in pooled:
                pooled[f] = Candidate(f, [], float(output[f]), float(norms[f]))
            pooled[f].sources.append(source)
    return list(pooled.values())


def clamp_plan(sae, features: Sequence[int], directions: Tensor, strength: float,
               scale: float) -> Intervention:
    """Clamp ``features`` together so that their edits add up to norm ``strength * scale``
    (each feature's share ``1/sqrt(n)`` of it)."""
    share = strength * scale / math.sqrt(len(features))
    return Intervention(sae, clamp={f: share / float(directions[f].norm()) for f in features})


def best_setting(points: Sequence[tuple[object, dict]], base_perplexity: float,
                 max_ratio: float) -> tuple[object, dict] | None:
    """The (key, measured point) with the highest mention rate among those whose perplexity is
    at most ``max_ratio`` x ``base_perplexity`` (ties: lower perplexity); None if none is."""
    ok = [(key, p) for key, p in points if p["perplexity"] is not None
          and p["perplexity"] <= max_ratio * base_perplexity]
    if not ok:
        return None
    return max(ok, key=lambda kp: (kp[1]["mention_rate"], -kp[1]["perplexity"]))


def validate_plans(model, plans: dict[object, list], prompts: Sequence[str],
                   keywords: Sequence[str], search: ConceptSearch,
                   neutral_texts: Sequence[str], baseline: bool = True
                   ) -> tuple[dict | None, list[tuple[object, dict]]]:
    """Generate under each plan from ``prompts``: ``(unsteered point, [(key, point), ...])``
    (``baseline`` False: no unsteered point, None)."""
    keys = list(plans)
    sweep = steering_sweep(model, [plans[k] for k in keys], prompts, keywords,
                           search.max_new_tokens, search.samples_per_prompt, search.temperature,
                           search.seed, neutral_texts, baseline=baseline)
    return sweep["baseline"], list(zip(keys, sweep["curve"]))


def choose_steering(model, sae, candidates: list[Candidate], directions: Tensor, scale: float,
                    keywords: Sequence[str], search: ConceptSearch,
                    validation_prompts: Sequence[str], progress=None
                    ) -> tuple[SteeringChoice, dict, list[dict]]:
    """Validate the best-screened candidates by generation, alone and in groups (see the module
    docstring): ``(choice, unsteered point, every validated setting as a dict)``. When no
    setting keeps perplexity within budget, the choice is the gentlest edit with the highest
    rate, marked as not meeting the target."""
    ranked = [c.feature for c in
              sorted(candidates, key=lambda c: -max(c.screen_lift, default=-math.inf))]
    sizes = sorted({min(n, len(ranked)) for n in search.groups if n >= 1})
    if not sizes or not ranked:
        raise ConceptError(f"Nothing to validate: groups {search.groups} (give sizes >= 1, e.g. "
                           f"--groups 1,3,10) and {len(ranked)} candidate features.")
    settings = {(tuple(ranked[:n]), s): [clamp_plan(sae, ranked[:n], directions, s, scale)]
                for n in sizes for s in search.strengths}
    base, points = validate_plans(model, settings, validation_prompts, keywords, search,
                                  validation_prompts)
    if search.extra_strengths:
        def measure(keys: list[tuple[int, float]]) -> list[dict]:
            plans = {(tuple(ranked[:n]), s): [clamp_plan(sae, ranked[:n], directions, s, scale)]
                     for n, s in keys}
            return [p for _, p in validate_plans(model, plans, validation_prompts, keywords,
                                                 search, validation_prompts, False)[1]]
        lines = {n: [(key[1], p) for key, p in points if len(key[0]) == n] for n in sizes}
        measured = {n: len(line) for n, line in lines.items()}
        extend_within_budget(measure, lines, sorted(search.extra_strengths),
                             search.max_perplexity_ratio * base["perplexity"])
        points += [((tuple(ranked[:n]), s), p) for n, line in lines.items()
                   for s, p in line[measured[n]:]]
    if progress:
        progress(f"validated {len(points)} settings of the best {', '.join(map(str, sizes))} "
                 "features")
    log = [_validation_row(list(key[0]), key[1], p) for key, p in points]
    singles = [(key, p) for key, p in points if len(key[0]) == 1]
    best = best_setting(singles, base["perplexity"], search.max_perplexity_ratio)
    if best is None or best[1]["mention_rate"] < search.target_rate:
        best = best_setting(points, base["perplexity"], search.max_perplexity_ratio)
    within_budget = best is not None
    if best is None:  # nothing within the perplexity budget: the gentlest edit of the best
        best = max(points, key=lambda kp: (kp[1]["mention_rate"], -kp[0][1], -len(kp[0][0])))
    (features, strength), point = best
    plan = clamp_plan(sae, features, directions, strength, scale)
    return SteeringChoice(list(features), [plan.clamp[f] for f in features], strength,
                          point["mention_rate"], point["perplexity"],
                          within_budget and point["mention_rate"] >= search.target_rate,
                          within_budget), base, log


def _validation_row(features, strength: float, point: dict) -> dict:
    return {"features": [int(f) for f in features], "strength": strength,
            "mention_rate": point["mention_rate"], "perplexity": point["perplexity"]}


def read_validation_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts features are chosen on: ``path``, or the shipped validation prompts (which
    share none with the shipped evaluation prompts)."""
    return read_prompts(path if path is not None else VALIDATION_PROMPTS)


def benchmark_concepts() -> dict[str, list[str]]:
    """The steering benchmark's concepts: name -> keywords (12 the default corpus covers, and
    the Golden Gate Bridge)."""
    import json

    return json.loads(BENCHMARK_CONCEPTS.read_text())


def concept_activations(model, sae, texts: ConceptTexts) -> Tensor:
    """Activations ``[tokens, d_in]`` at the SAE's hook over the concept's text windows."""
    return window_activations(model, model_hook(sae), texts.windows)


# --- the whole search, its report, and the command line ------------------------------------------

@dataclass
class ConceptSelection:
    """What ``select_concept_features`` found: the choice, and what it was built from."""

    name: str
    keywords: list[str]
    hook: str
    choice: SteeringChoice
    directions: Tensor  # [d_sae, d_in] raw decoder directions
    scale: float  # residual_scale of the reference
    mean_difference: Tensor  # [d_in]
    concept_projection: float  # mean over the concept texts of (x - reference mean) . unit(v)
    reference_mean: Tensor  # [d_in]
    texts: ConceptTexts
    n_texts: int
    token_ids: list[int]
    candidates: list[Candidate]
    validation_base: dict
    validation: list[dict]
    validation_prompts: list[str]

    def plan(self, sae, strength: float, edit: str = "clamp") -> list:
        """The chosen features at edit norm ``strength`` x ``scale``, clamped or added."""
        plan = clamp_plan(sae, self.choice.features, self.directions, strength, self.scale)
        return [plan if edit == "clamp" else Intervention(sae, add=plan.clamp)]

    def vector(self, strength: float) -> SteeringVector:
        """The mean-difference direction at norm ``strength`` x ``scale``."""
        return SteeringVector(F.normalize(self.mean_difference, dim=0) * strength * self.scale,
                              self.hook)


def select_concept_features(model, sae, tokens: Tensor, reference: Tensor,
                            statistics: FeatureStatistics, name: str, keywords: Sequence[str],
                            extra_texts: Sequence[str] = (), search: ConceptSearch | None = None,
                            validation_prompts: Sequence[str] | None = None,
                            progress=None, corpus_texts: ConceptTexts | None = None,
                            explained: Sequence[int] = ()) -> ConceptSelection:
    """Steps 1-4 of the module docstring. ``tokens`` [n_rows, context]: corpus rows searched
    for the keywords (unless ``corpus_texts`` already holds that search's result);
    ``reference`` [tokens, d_in]: activations of ordinary text at the SAE's hook (base of the
    mean-difference direction and of ``residual_scale``); ``statistics``: the SAE's corpus
    statistics (base rates for the input ranking); ``explained``: features whose explanation
    matches the concept, added to the candidates."""
    from saekit.concept_texts import concept_texts, concept_token_ids, text_windows

    search = search or ConceptSearch()
    say = progress or (lambda message: None)
    hook = model_hook(sae)
    texts = corpus_texts or concept_texts(tokens, model.tokenizer, keywords, seed=search.seed,
                                          required=not extra_texts)
    windows = texts.windows + text_windows(model.tokenizer, extra_texts)
    say(f"{name}: {texts.n_mentions} mentions of {list(keywords)} in {texts.n_tokens:,} "
        f"tokens; {len(windows)} concept texts")
    acts = window_activations(model, hook, windows)
    reference_mean = reference.float().mean(0)
    mean_difference = acts.mean(0) - reference_mean
    unit_v = F.normalize(mean_difference, dim=0)
    scale = residual_scale(reference)
    validation = list(validation_prompts or read_validation_prompts())
    token_ids = concept_token_ids(model.tokenizer, keywords)
    prompt_tokens, mask = prompt_batch(model, validation)
    gradient = output_gradient(model, hook, prompt_tokens, mask, token_ids)
    directions = decoder_directions(sae)
    candidates = pool_candidates(sae, directions, gradient, acts, mean_difference, statistics,
                                 search.candidates_per_ranking, explained)
    screen_norms = [s * scale for s in search.screen_strengths]
    unit = torch.stack([directions[c.feature] / c.direction_norm for c in candidates])
    lift, kl = screen_directions(model, hook, unit, screen_norms, prompt_tokens, mask, token_ids)
    for candidate, l, k in zip(candidates, lift.tolist(), kl.tolist()):
        candidate.screen_lift, candidate.screen_kl = l, k
    say(f"{name}: screened {len(candidates)} candidate features")
    choice, base, validated = choose_steering(model, sae, candidates, directions, scale, keywords,
                                              search, validation, progress=say)
    return ConceptSelection(name, list(keywords), hook, choice, directions, scale,
                            mean_difference, float(((acts - reference_mean) @ unit_v).mean()),
                            reference_mean, texts, len(windows), token_ids, candidates, base,
                            validated, validation)


def find_concept_steering(model, sae, tokens: Tensor, reference: Tensor,
                          statistics: FeatureStatistics, name: str, keywords: Sequence[str],
                          extra_texts: Sequence[str] = (), search: ConceptSearch | None = None,
                          validation_prompts: Sequence[str] | None = None,
                          evaluation_prompts: Sequence[str] | None = None,
                          evaluation_samples: int = 3, vector_strengths: Sequence[float] = (),
                          progress=None, corpus_texts: ConceptTexts | None = None,
                          explained: Sequence[int] = ()) -> dict:
    """Select (``select_concept_features``) and measure on the evaluation prompts, which were
    not used to choose: the ``concept.json`` dict. ``vector_strengths``: also measure the
    concept's mean-difference vector at these strengths (the baseline), in the same batch."""
    search = search or ConceptSearch()
    say = progress or (lambda message: None)
    found = select_concept_features(model, sae, tokens, reference, statistics, name, keywords,
                                    extra_texts, search, validation_prompts, progress,
                                    corpus_texts, explained)
    choice = found.choice
    evaluation = list(evaluation_prompts or read_prompts())
    plans = [found.plan(sae, choice.strength)] + [[found.vector(s)] for s in vector_strengths]
    sweep = steering_sweep(model, plans, evaluation, keywords, search.max_new_tokens,
                           evaluation_samples, search.temperature, search.seed + 1)
    unsteered, steered = sweep["baseline"], sweep["curve"][0]
    verdict = concept_verdict(name, choice, unsteered, steered, search)
    say(verdict)
    return {
        "concept": name, "keywords": list(keywords), "hook": found.hook,
        "model": loaded_model_name(model, sae.cfg.metadata.model_name),
        "features": choice.features, "values": choice.values, "strength": choice.strength,
        "residual_scale": found.scale,
        "target_met": _meets(unsteered, steered, search), "verdict": verdict,
        "unsteered": _summary(unsteered), "steered": _summary(steered),
        "n_generations": unsteered["n_generations"],
        "samples": {"unsteered": unsteered["samples"], "steered": steered["samples"]},
        "mean_difference": [_summary(point) | {"strength": s, "samples": point["samples"]}
                            for s, point in zip(vector_strengths, sweep["curve"][1:])],
        "retrieval": {"n_mentions": found.texts.n_mentions,
                      "n_tokens_searched": found.texts.n_tokens, "n_texts": found.n_texts,
                      "examples": found.texts.texts[:5]},
        "concept_token_ids": found.token_ids,
        "candidates": [vars(c) for c in found.candidates],
        "validation": {"unsteered": _summary(found.validation_base),
                       "settings": found.validation, "prompts": found.validation_prompts,
                       "chosen_within_perplexity_budget": choice.within_budget},
        "search": vars(search) | {"evaluation_samples_per_prompt": evaluation_samples,
                                  "evaluation_prompts": evaluation},
        "mean_difference_norm": float(found.mean_difference.norm()),
    }


def _summary(point: dict | None) -> dict | None:
    if point is None:
        return None
    return {k: point[k] for k in ("mention_rate", "perplexity", "kl_neutral", "n_generations")}


def _meets(unsteered: dict, steered: dict | None, search: ConceptSearch) -> bool:
    return bool(steered and steered["mention_rate"] >= search.target_rate
                and unsteered["mention_rate"] < 0.05 and steered["perplexity"] is not None
                and steered["perplexity"] <= search.max_perplexity_ratio
                * unsteered["perplexity"])


def concept_verdict(name: str, choice: SteeringChoice | None, unsteered: dict,
                    steered: dict | None, search: ConceptSearch) -> str:
    """One sentence: which features steer to ``name``, how well, or that none does."""
    base = (f"unsteered {100 * unsteered['mention_rate']:.0f}% at perplexity "
            f"{unsteered['perplexity']:.1f}")
    if choice is None or steered is None:
        return (f"{name}: no candidate feature kept perplexity within "
                f"{search.max_perplexity_ratio:g}x the unsteered text's on the validation "
                f"prompts; nothing to clamp ({base}).")
    what = ("feature " if len(choice.features) == 1 else "features ") + \
        ", ".join(map(str, choice.features))
    met = _meets(unsteered, steered, search)
    return (f"{name}: {'target met' if met else 'target missed'}: clamping {what} "
            f"(edit {choice.strength:g}x the residual scale) gives "
            f"{100 * steered['mention_rate']:.0f}% mentions at perplexity "
            f"{steered['perplexity']:.1f} ({base}; target >= "
            f"{100 * search.target_rate:.0f}% at <= {search.max_perplexity_ratio:g}x).")
