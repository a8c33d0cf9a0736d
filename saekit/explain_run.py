"""``saekit explain``: explain and score many features, resumably; or score one hypothesis.

``explain_features`` appends one JSON line per feature to ``OUT/explanations.jsonl`` (a whole
line, flushed and fsynced, after the feature is explained and scored). Killed at any point, the
same call continues: on start a torn last line is cut off, and features already stored for the
same (SAE, explainer model, prompt version) are skipped, so each feature is stored exactly once.
The explainer is greedy and the corpus scan seeded, so a resumed run stores what an
uninterrupted one would. ``OUT/explanations_summary.json`` (written atomically) sums it up.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.dashboard import check_corpus_source
from saekit.errors import ConfigError
from saekit.explain import (PROMPT_VERSION, DetectionScore, ExplainError, FeatureMaterial,
                            clean_explanation, example_id, example_text, explanation_prompt,
                            feature_material, score_explanation)
from saekit.explainer_model import DEFAULT_EXPLAINER
from saekit.files import output_lock, write_json

EXPLANATIONS = "explanations.jsonl"
SUMMARY = "explanations_summary.json"
HYPOTHESIS = "hypothesis.json"


@dataclass
class ExplainConfig:
    """What ``saekit explain`` reads, explains and scores (its flags are these fields)."""

    sae: str = setting("", "SAE folder (or file) to explain", required=True)
    activations: str | None = setting(None, "activation cache at the SAE's hook (or --dataset)")
    dataset: str | None = setting(None, "corpus to capture into OUT/.activations: 'default', "
                                  "a local file or a dataset name (or --activations)")
    tokens: int = setting(200_000, "tokens to capture with --dataset", ge=1)
    features: str = setting("0:100", "feature ids and ranges, e.g. 0:500,512 ('all': every one)")
    out: str = setting("", "folder for explanations.jsonl and its summary", required=True)
    score: str = setting("detection", "scorers to run ('none': explain only)",
                         choices=["detection", "none"])
    feature: int | None = setting(None, "with --hypothesis: the feature to test", ge=0)
    hypothesis: str | None = setting(None, "score this label of --feature instead of "
                                     "explaining (writes OUT/hypothesis.json)")
    explainer: str = setting(DEFAULT_EXPLAINER, "explainer/judge model: the offline default or "
                             "a local chat-model folder")
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
        if (self.hypothesis is None) != (self.feature is None):
            raise ConfigError("--hypothesis TEXT and --feature N go together.")
        if self.hypothesis is not None and not self.hypothesis.strip():
            raise ConfigError("--hypothesis is empty.")


# --- the resumable store -----------------------------------------------------------------------

def record_key(record: dict) -> tuple:
    """What must match for a stored explanation to be reused: SAE, explainer, prompt version."""
    return record.get("sae"), record.get("explainer"), record.get("prompt_version")


def read_explanations(path: Path) -> list[dict]:
    """The records in ``path`` (none if missing), after cutting off a torn last line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "rb+") as file:
            file.truncate(len(whole))
            os.fsync(file.fileno())
    records = []
    for number, line in enumerate(whole.decode("utf-8", "replace").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ExplainError(f"{path} line {number} is not JSON ({err}); move the file "
                               "away to start over.") from None
    return records


def append_record(path: Path, record: dict) -> None:
    """Append ``record`` as one JSON line, flushed and fsynced before returning."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record, ensure_ascii=False) + "\n")
        file.flush()
        os.fsync(file.fileno())


# --- explaining --------------------------------------------------------------------------------

def _record(material: FeatureMaterial, reply: str, score: DetectionScore | None, key: tuple):
    sae_id, explainer_id, version = key
    return {"feature": material.feature, "explanation": clean_explanation(reply),
            "scores": {"detection": score.summary()} if score else {},
            "examples": {"shown": [example_id(e) for e in material.shown],
                         "activating": [example_id(e) for e in material.activating],
                         "non_activating": [example_id(e) for e in material.non_activating]},
            "logit_lens": material.promoted, "sae": sae_id, "explainer": explainer_id,
            "prompt_version": version}


def _score(judge, explanation: str, material: FeatureMaterial) -> DetectionScore | None:
    activating = [example_text(e) for e in material.activating or material.shown]
    silent = [example_text(e) for e in material.non_activating]
    if not explanation or not activating or not silent:
        return None
    return score_explanation(judge, explanation, activating, silent)


def explain_features(sae, source, features: list[int], out: str | Path, explainer, tokenizer,
                     sae_id: str, model=None, score: bool = True, progress: bool = False,
                     batch_features: int = 8, max_new_tokens: int = 24,
                     **material_options) -> dict:
    """Explain (and with ``score`` detection-score) ``features`` of ``sae`` from ``source``,
    appending to ``OUT/explanations.jsonl`` and skipping features already there; returns the
    summary (also written to ``OUT/explanations_summary.json``). ``explainer``: a
    ``LocalExplainer`` (it also judges); ``tokenizer``: the SAE model's; ``material_options``
    go to ``feature_material``."""
    if not features:
        raise ExplainError("No features to explain: the feature list is empty.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / EXPLANATIONS
    key = (sae_id, explainer.model_id, PROMPT_VERSION)
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
        replies = explainer.generate([explanation_prompt(materials[f]) for f in group],
                                     max_new_tokens)
        for feature, reply in zip(group, replies):
            if feature in done:
                continue
            material = materials[feature]
            detection = _score(explainer, clean_explanation(reply), material) if score else None
            append_record(path, _record(material, reply, detection, key))
            bar.update()
            bar.set_postfix(per_min=f"{bar.n * 60 / max(time.monotonic() - started, 1e-9):.1f}")
    bar.close()
    return write_summary(out, features, key, len(todo), time.monotonic() - started)


def write_summary(out: Path, features: list[int], key: tuple, n_new: int, seconds: float) -> dict:
    """Mean detection scores over the requested features' stored records, and the speed."""
    wanted = set(features)
    records = [r for r in read_explanations(out / EXPLANATIONS)
               if record_key(r) == key and r["feature"] in wanted]
    scored = [r["scores"]["detection"] for r in records if "detection" in r["scores"]]

    def mean(name: str) -> float | None:
        return sum(s[name] for s in scored) / len(scored) if scored else None

    summary = {"sae": key[0], "explainer": key[1], "prompt_version": key[2],
               "n_features": len(records), "n_scored": len(scored),
               "n_empty_explanations": sum(not r["explanation"] for r in records),
               "detection": {name: mean(name) for name in
                             ("balanced_accuracy", "balanced_accuracy_median", "auroc")},
               "explained_this_run": n_new,
               "features_per_minute": n_new * 60 / seconds if n_new and seconds else None}
    write_json(out / SUMMARY, summary)
    return summary


def score_hypothesis(sae, source, feature: int, hypothesis: str, judge, tokenizer,
                     **material_options) -> tuple[DetectionScore, FeatureMaterial]:
    """Detection score of a researcher's label of ``feature``, on its activating examples (top
    and across quantile bands) and non-activating corpus texts."""
    material = feature_material(sae, source, [feature], tokenizer, **material_options)[feature]
    activating = [example_text(e) for e in material.shown + material.activating]
    silent = [example_text(e) for e in material.non_activating]
    if not activating:
        raise ExplainError(f"Feature {feature} never fires on this corpus: nothing to test "
                           "the hypothesis on.")
    return score_explanation(judge, hypothesis, activating, silent), material


# --- the command -------------------------------------------------------------------------------

def explain_source(config: ExplainConfig, sae, model):
    """The activation cache to read: ``--activations``, or ``--dataset`` captured into
    ``OUT/.activations`` (resumed if there)."""
    from saekit.analyse import model_hook
    from saekit.cache import ActivationCache
    from saekit.capture import CaptureConfig, capture_activations

    if config.activations:
        return ActivationCache.open(config.activations)
    meta = sae.cfg.metadata
    capture = CaptureConfig(model=model.saekit_model_name, hooks=[model_hook(sae)],
                            dataset=config.dataset, tokens=config.tokens,
                            context=meta.context_size or 128)
    return ActivationCache.open(capture_activations(capture, Path(config.out) / ".activations",
                                                    model=model))


def run_explain(config: ExplainConfig, progress: bool = True) -> dict:
    """Run ``saekit explain``: the summary of ``explain_features``, or with ``--hypothesis``
    the hypothesis' score (also written to ``OUT/hypothesis.json``)."""
    from transformers import AutoTokenizer

    from saekit.dashboard import parse_features
    from saekit.explainer_model import load_explainer
    from saekit.formats import load_foreign_sae
    from saekit.model import DEFAULT_MODEL, load_model, resolve_model_path

    sae = load_foreign_sae(config.sae, device=config.device)
    features = parse_features(config.features if config.feature is None else str(config.feature),
                              sae.d_sae)
    explainer = load_explainer(config.explainer, config.device)
    model_name = sae.cfg.metadata.model_name or DEFAULT_MODEL
    model = load_model(model_name, config.device) if config.logit_lens or config.dataset \
        else None
    source = explain_source(config, sae, model)
    tokenizer = model.tokenizer if model is not None else \
        AutoTokenizer.from_pretrained(resolve_model_path(source.manifest["model"]))
    options = dict(n_shown=config.n_shown, n_bands=config.n_bands, per_band=config.per_band,
                   n_non_activating=config.n_non_activating, max_rows=config.max_rows,
                   seed=config.seed)
    if config.hypothesis is not None:
        score, material = score_hypothesis(sae, source, features[0], config.hypothesis,
                                           explainer, tokenizer, **options)
        result = {"feature": features[0], "hypothesis": config.hypothesis,
                  "detection": score.summary(), "explainer": explainer.model_id,
                  "prompt_version": PROMPT_VERSION,
                  "p_yes_activating": score.p_yes_activating,
                  "p_yes_non_activating": score.p_yes_non_activating}
        write_json(Path(config.out) / HYPOTHESIS, result)
        return result
    sae_path = Path(config.sae).expanduser()
    sae_id = str(sae_path.resolve()) if sae_path.exists() else config.sae
    with output_lock(config.out, "explain"):
        return explain_features(sae, source, features, config.out, explainer, tokenizer,
                                sae_id, model=model, score=config.score == "detection",
                                progress=progress, batch_features=config.batch_features,
                                max_new_tokens=config.max_new_tokens, **options)
