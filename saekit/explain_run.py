"""``saekit explain``: explain and score many features, resumably; or score one hypothesis.

``explain_features`` appends one JSON line per feature to ``OUT/explanations.jsonl`` (a whole
line, flushed and fsynced, after the feature is explained and scored). Killed at any point, the
same call continues: on start a torn last line is cut off, and features already stored for the
same (SAE, explainer model, prompt version, judge method) are skipped, so each feature is
stored exactly once. The explainer is greedy and the corpus scan seeded, so a resumed run stores what an
uninterrupted one would. ``OUT/explanations_summary.json`` (written atomically) sums it up.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.dashboard import SAEAndCorpus, check_corpus_source
from saekit.errors import ConfigError
from saekit.explain import (PROMPT_VERSION, DetectionScore, ExplainError, FeatureMaterial,
                            clean_explanation, example_id, explain_without_copies,
                            feature_material, parse_json_lines, split_torn_line)
from saekit.explain_judges import JUDGES, make_judge
from saekit.explain_scores import SCORERS, parse_scorers, score_examples
from saekit.explainer_model import DEFAULT_EXPLAINER
from saekit.explainer_openai import DEFAULT_KEY_ENV, check_endpoint_options, endpoint_options
from saekit.files import output_lock, write_json

EXPLANATIONS = "explanations.jsonl"
SUMMARY = "explanations_summary.json"
HYPOTHESIS = "hypothesis.json"


@dataclass
class ExplainConfig(SAEAndCorpus):
    """What ``saekit explain`` reads, explains and scores (its flags are these fields)."""

    features: str = setting("0:100", "feature ids and ranges, e.g. 0:500,512 ('all': every one)")
    out: str = setting("", "folder for explanations.jsonl and its summary", required=True)
    score: str = setting("detection,fuzzing", "comma list of scorers to run: detection, "
                         "fuzzing ('none': explain only)")
    feature: int | None = setting(None, "with --hypothesis: the feature to test", ge=0)
    hypothesis: str | None = setting(None, "score this label of --feature instead of "
                                     "explaining (writes OUT/hypothesis.json)")
    explainer: str = setting(DEFAULT_EXPLAINER, "explainer/judge model: the offline default, "
                             "a local chat-model folder, or 'openai': an OpenAI-compatible "
                             "endpoint (--model, --base-url)")
    judge: str = setting("auto", "how the judge scores a label: 'likelihood' (does the label "
                         "make the text more likely; local models), 'question' (P(yes) of a "
                         "yes/no question), 'auto' (likelihood, or question for an endpoint)",
                         choices=list(JUDGES))
    model: str | None = setting(None, "with --explainer openai: the model the endpoint serves")
    base_url: str | None = setting(None, "with --explainer openai: the API root, e.g. "
                                   "http://127.0.0.1:8000/v1 (default: OpenAI's)")
    api_key_env: str = setting(DEFAULT_KEY_ENV, "with --explainer openai: the environment "
                               "variable holding the API key (unset: no key is sent)")
    request_timeout: float = setting(60.0, "with --explainer openai: seconds per request", gt=0)
    max_retries: int = setting(2, "with --explainer openai: retries of a failed request",
                               ge=0, le=10)
    requests_per_minute: float | None = setting(None, "with --explainer openai: most requests "
                                                "a minute (default: no limit)", gt=0)
    parallel_requests: int = setting(4, "with --explainer openai: requests in flight at once",
                                     ge=1, le=64)
    n_shown: int = setting(10, "top-activating examples the explainer reads", ge=1)
    n_bands: int = setting(5, "quantile bands the held-out activating texts come from", ge=1)
    per_band: int = setting(2, "held-out activating texts per band", ge=1)
    n_non_activating: int = setting(10, "non-activating texts per feature", ge=1)
    max_rows: int | None = setting(None, "scan only the first rows of the cache", ge=1)
    batch_features: int = setting(8, "features explained per generation batch", ge=1)
    max_new_tokens: int = setting(24, "longest explanation, in tokens", ge=1, le=256)
    logit_lens: bool = setting(True, "show the explainer the feature's logit-lens tokens "
                               "(loads the SAE's model)")
    seed: int = setting(0, "seed of the example sampling", ge=0)
    device: str | None = setting(None, DEVICE_HELP)

    def __post_init__(self) -> None:
        check_fields(self)
        check_corpus_source(self, "explain")
        check_endpoint_options(self)
        if self.judge == "likelihood" and self.explainer == "openai":
            raise ConfigError("--judge likelihood reads the log-probabilities of given texts, "
                              "which an OpenAI-compatible endpoint does not return: use --judge "
                              "question (or auto) with --explainer openai.")
        if (self.hypothesis is None) != (self.feature is None):
            raise ConfigError("--hypothesis TEXT and --feature N go together.")
        if self.hypothesis is not None and not self.hypothesis.strip():
            raise ConfigError("--hypothesis is empty.")
        try:
            scorers = parse_scorers(self.score)
        except ExplainError as err:
            raise ConfigError(str(err)) from None
        if self.hypothesis is not None and not scorers:
            raise ConfigError("--hypothesis needs a scorer: give --score detection, fuzzing "
                              "or both, not 'none'.")


# --- the resumable store -----------------------------------------------------------------------

def record_key(record: dict) -> tuple:
    """What must match for a stored explanation to be reused: SAE, explainer, prompt version,
    judge method."""
    return (record.get("sae"), record.get("explainer"), record.get("prompt_version"),
            record.get("judge"))


def read_explanations(path: Path) -> list[dict]:
    """The records in ``path`` (none if missing), after cutting off a torn last line."""
    if not path.exists():
        return []
    whole, torn = split_torn_line(path.read_bytes())
    if torn:
        with open(path, "rb+") as file:
            file.truncate(len(whole))
            os.fsync(file.fileno())
    return [record for _, record in parse_json_lines(whole, path)]


def append_record(path: Path, record: dict) -> None:
    """Append ``record`` as one JSON line, flushed and fsynced before returning."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record, ensure_ascii=False) + "\n")
        file.flush()
        os.fsync(file.fileno())


# --- explaining --------------------------------------------------------------------------------

def _record(material: FeatureMaterial, reply: str, scores: dict[str, DetectionScore],
            key: tuple):
    sae_id, explainer_id, version, judge = key
    return {"feature": material.feature, "explanation": clean_explanation(reply),
            "scores": {name: score.summary() for name, score in scores.items()},
            "examples": {"shown": [example_id(e) for e in material.shown],
                         "activating": [example_id(e) for e in material.activating],
                         "non_activating": [example_id(e) for e in material.non_activating]},
            "logit_lens": material.promoted, "sae": sae_id, "explainer": explainer_id,
            "prompt_version": version, "judge": judge}


def score_material(judge, explanation: str, material: FeatureMaterial,
                   scorers: Sequence[str], seed: int = 0) -> dict[str, DetectionScore]:
    """``scorers`` run on the held-out examples (the shown ones if none are held out); the
    wrong marks of fuzzing are seeded by ``seed`` and the feature."""
    return score_examples(judge, explanation, material.activating or material.shown,
                          material.non_activating, scorers, f"{seed}:{material.feature}")


def explain_features(sae, source, features: list[int], out: str | Path, explainer, tokenizer,
                     sae_id: str, model=None, scorers: Sequence[str] = SCORERS,
                     judge=None, progress: bool = False,
                     batch_features: int = 8, max_new_tokens: int = 24,
                     **material_options) -> dict:
    """Explain ``features`` of ``sae`` from ``source`` and score them with ``scorers``,
    appending to ``OUT/explanations.jsonl`` and skipping features already there; returns the
    summary (also written to ``OUT/explanations_summary.json``). ``explainer``: a
    ``LocalExplainer`` or ``OpenAIExplainer``; ``judge``: ``saekit.explain_judges`` (default:
    ``make_judge(explainer)``); ``tokenizer``: the SAE model's; ``material_options`` go to
    ``feature_material``."""
    if not features:
        raise ExplainError("No features to explain: the feature list is empty.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / EXPLANATIONS
    judge = judge if judge is not None else make_judge(explainer)
    key = (sae_id, explainer.model_id, PROMPT_VERSION, judge.method)
    done = {r["feature"] for r in read_explanations(path) if record_key(r) == key}
    features = list(dict.fromkeys(features))
    todo = [f for f in features if f not in done]
    started = time.monotonic()
    bar = tqdm(total=len(features), initial=len(features) - len(todo), unit="feature",
               desc="explain", disable=not progress)
    # fixed groups of the requested list, each sampled and generated whole (done features
    # too), so that a resumed run stores what an uninterrupted one would
    for start in range(0, len(features), batch_features):
        group = features[start:start + batch_features]
        if all(f in done for f in group):
            continue
        materials = feature_material(sae, source, group, tokenizer, model, **material_options)
        replies = explain_without_copies(lambda chats: explainer.generate(chats, max_new_tokens),
                                         [materials[f] for f in group])
        for feature, reply in zip(group, replies):
            if feature in done:
                continue
            material = materials[feature]
            scores = score_material(judge, clean_explanation(reply), material, scorers,
                                    material_options.get("seed", 0))
            append_record(path, _record(material, reply, scores, key))
            bar.update()
            bar.set_postfix(per_min=f"{bar.n * 60 / max(time.monotonic() - started, 1e-9):.1f}")
    bar.close()
    return write_summary(out, features, key, len(todo), time.monotonic() - started)


def write_summary(out: Path, features: list[int], key: tuple, n_new: int, seconds: float) -> dict:
    """Mean scores (each scorer: its records' means, None if none has it) over the requested
    features' stored records, and the speed."""
    wanted = set(features)
    records = [r for r in read_explanations(out / EXPLANATIONS)
               if record_key(r) == key and r["feature"] in wanted]
    summary = {"sae": key[0], "explainer": key[1], "prompt_version": key[2], "judge": key[3],
               "n_features": len(records),
               "n_scored": sum(bool(r["scores"]) for r in records),
               "n_empty_explanations": sum(not r["explanation"] for r in records),
               **{name: mean_scores([r["scores"][name] for r in records
                                     if name in r["scores"]]) for name in SCORERS},
               "n_scored_by": {name: sum(name in r["scores"] for r in records)
                               for name in SCORERS},
               "explained_this_run": n_new,
               "features_per_minute": n_new * 60 / seconds if n_new and seconds else None}
    write_json(out / SUMMARY, summary)
    return summary


def mean_scores(scores: list[dict]) -> dict[str, float | None]:
    """The mean balanced accuracies and AUROC of ``DetectionScore.summary()`` dicts."""
    return {name: sum(s[name] for s in scores) / len(scores) if scores else None
            for name in ("balanced_accuracy", "balanced_accuracy_median", "auroc")}


def score_hypothesis(sae, source, feature: int, hypothesis: str, judge, tokenizer,
                     scorers: Sequence[str] = SCORERS, **material_options
                     ) -> tuple[dict[str, DetectionScore], FeatureMaterial]:
    """``scorers``' scores of a researcher's label of ``feature``, on its activating examples
    (top and across quantile bands) and non-activating corpus texts."""
    material = feature_material(sae, source, [feature], tokenizer, **material_options)[feature]
    if not material.shown:
        raise ExplainError(f"Feature {feature} never fires on this corpus: nothing to test "
                           "the hypothesis on.")
    scores = score_examples(judge, hypothesis, material.shown + material.activating,
                            material.non_activating, scorers,
                            f"{material_options.get('seed', 0)}:{feature}")
    return scores, material


# --- the command -------------------------------------------------------------------------------

def explain_source(config: ExplainConfig, sae, model):
    """The activation cache to read: ``--activations``, or ``--dataset`` captured into
    ``OUT/.activations`` (resumed if there)."""
    from saekit.analyse import model_hook
    from saekit.cache import ActivationCache
    from saekit.capture import CaptureConfig, capture_activations
    from saekit.model import loaded_model_name

    if config.activations:
        return ActivationCache.open(config.activations)
    meta = sae.cfg.metadata
    capture = CaptureConfig(model=loaded_model_name(model), hooks=[model_hook(sae)],
                            dataset=config.dataset, tokens=config.tokens,
                            context=meta.context_size or 128)
    return ActivationCache.open(capture_activations(capture, Path(config.out) / ".activations",
                                                    model=model))


def run_explain(config: ExplainConfig, progress: bool = True) -> dict:
    """Run ``saekit explain``: the summary of ``explain_features``, or with ``--hypothesis``
    the hypothesis' score (also written to ``OUT/hypothesis.json``)."""
    from saekit.analyse import source_tokenizer
    from saekit.dashboard import parse_features
    from saekit.explainer_model import load_explainer
    from saekit.formats import load_foreign_sae
    from saekit.model import DEFAULT_MODEL, load_model

    sae = load_foreign_sae(config.sae, device=config.device)
    features = parse_features(config.features if config.feature is None else str(config.feature),
                              sae.d_sae)
    explainer = load_explainer(config.explainer, config.device, **endpoint_options(config))
    judge = make_judge(explainer, config.judge)
    model_name = sae.cfg.metadata.model_name or DEFAULT_MODEL
    model = load_model(model_name, config.device) if config.logit_lens or config.dataset \
        else None
    source = explain_source(config, sae, model)
    tokenizer = source_tokenizer(source, model.tokenizer if model is not None else None)
    options = dict(n_shown=config.n_shown, n_bands=config.n_bands, per_band=config.per_band,
                   n_non_activating=config.n_non_activating, max_rows=config.max_rows,
                   seed=config.seed)
    scorers = parse_scorers(config.score)
    if config.hypothesis is not None:
        scores, _ = score_hypothesis(sae, source, features[0], config.hypothesis, judge,
                                     tokenizer, scorers, **options)
        result = {"feature": features[0], "hypothesis": config.hypothesis,
                  **{name: s.summary() for name, s in scores.items()},
                  "explainer": explainer.model_id, "prompt_version": PROMPT_VERSION,
                  "judge": judge.method, "p_yes": {name: {"activating": s.p_yes_activating,
                                   "non_activating": s.p_yes_non_activating}
                            for name, s in scores.items()}}
        write_json(Path(config.out) / HYPOTHESIS, result)
        return result
    sae_path = Path(config.sae).expanduser()
    sae_id = str(sae_path.resolve()) if sae_path.exists() else config.sae
    with output_lock(config.out, "explain"):
        return explain_features(sae, source, features, config.out, explainer, tokenizer,
                                sae_id, model=model, scorers=scorers, judge=judge,
                                progress=progress, batch_features=config.batch_features,
                                max_new_tokens=config.max_new_tokens, **options)
