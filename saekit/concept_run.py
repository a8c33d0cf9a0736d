"""``saekit concept``: find, validate and measure the SAE feature(s) that steer to a concept.

    saekit concept --sae DIR --name volcano --keywords "volcano,volcanic,lava,eruption" \\
        [--activations CACHE | --dataset default --tokens N] [--texts FILE] [--prompts FILE] \\
        --out DIR

writes ``OUT/concept.json`` (see ``saekit.concept.find_concept_steering``) and prints a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from saekit.concept import ConceptSearch, find_concept_steering
from saekit.concept_texts import ConceptError, keyword_list
from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.corpus import DEFAULT_CORPUS
from saekit.files import check_writable
from saekit.specialize import SpecializeConfig
from saekit.model import check_hooks

RESULT_JSON = "concept.json"


@dataclass
class ConceptConfig:
    """What ``saekit concept`` runs. Its flags are these fields (and ``ConceptSearch``'s)."""

    sae: str = setting("", "SAE folder or hub id, any layout saekit.formats reads",
                       required=True)
    name: str = setting("", "the concept's name, e.g. volcano", required=True)
    keywords: list[str] = setting([], "words that mention it (whole words; a trailing * "
                                  "matches a prefix)", required=True)
    out: str = setting("", "folder for concept.json", required=True)
    activations: str = setting("", "activation cache to search (else --dataset and --tokens)")
    dataset: str = setting(DEFAULT_CORPUS, "corpus read when no --activations is given")
    tokens: int = setting(1_000_000, "tokens of --dataset searched for the keywords", ge=1)
    texts: str = setting("", "file of extra concept texts, one per line")
    prompts: str = setting("", "evaluation prompts file (default: the shipped neutral prompts)")
    validation_prompts: str = setting("", "prompts features are chosen on (default: shipped)")
    evaluation_samples: int = setting(3, "generations per evaluation prompt", ge=1)
    statistics_rows: int = setting(256, "corpus rows for base rates and the reference "
                                   "activations", ge=1)
    explanations: str = setting("", "explanations.jsonl of `saekit explain` (or its folder): "
                                "features explained as the name or keywords become candidates")
    specialize: bool = setting(False, "fine-tune the SAE on the concept's texts first (rare "
                               "concepts)")
    device: str = setting("", DEVICE_HELP)

    def __post_init__(self) -> None:
        check_fields(self, ConceptError)

    def check(self) -> None:
        """Raise ``ConceptError`` for settings that cannot work, before any work starts."""
        for what in ("sae", "name", "out"):
            if not getattr(self, what):
                raise ConceptError(f"saekit concept needs --{what}.")
        self.keywords = keyword_list(self.keywords)
        for what in ("activations", "texts", "prompts", "validation_prompts", "explanations"):
            path = getattr(self, what)
            if path and not Path(path).exists():
                raise ConceptError(f"--{what.replace('_', '-')} {path} does not exist.")
        check_writable(self.out, folder=True)


def explained_features(config: ConceptConfig, per_ranking: int) -> list[int]:
    """The best ``per_ranking`` features whose ``--explanations`` explanation matches the
    concept's name or keywords (none without the flag)."""
    from saekit.search import search_features

    if not config.explanations:
        return []
    query = " ".join([config.name, *config.keywords])
    return [m.feature for m in search_features(config.explanations, query, top=per_ranking,
                                               sae=config.sae)]


def check_explained(features: list[int], sae, config: ConceptConfig) -> None:
    """Refuse explained features beyond the SAE (explanations of another SAE)."""
    beyond = [f for f in features if f >= sae.d_sae]
    if beyond:
        raise ConceptError(f"--explanations {config.explanations} explains feature {beyond[0]}, "
                           f"but the SAE has {sae.d_sae} features: give the explanations of "
                           f"--sae {config.sae}.")


def corpus_source(model, sae, config: ConceptConfig):
    """``(tokens [rows, ctx], reference [tokens, d_in], statistics_of)`` from the cache or,
    without one, from ``config.tokens`` tokens of ``config.dataset`` run through the model;
    ``statistics_of(sae)`` gives an SAE's corpus statistics over the same rows."""
    from saekit.analyse import ModelSource, feature_statistics, model_hook
    from saekit.cache import ActivationCache, leading_activations
    from saekit.concept import window_activations
    from saekit.corpus import load_corpus, pack_token_rows

    hook = model_hook(sae)
    if config.activations:
        cache = ActivationCache.open(config.activations)
        cache.check_hook(hook)
        reference = leading_activations(cache, config.statistics_rows * (cache.context - 1),
                                        hook=hook)
        return cache.tokens(), reference, lambda s: feature_statistics(
            s, cache, max_rows=config.statistics_rows)
    context = 128
    tokens = pack_token_rows(load_corpus(config.dataset), model.tokenizer,
                             max(1, config.tokens // context), context)
    sample = tokens[:config.statistics_rows]
    reference = window_activations(model, hook, [row[1:] for row in sample])
    return tokens, reference, lambda s: feature_statistics(s, ModelSource(model, sample))


def specialized_sae(model, sae, config: ConceptConfig, special: SpecializeConfig,
                    search: ConceptSearch, tokens, reference, extra: list[str], progress
                    ) -> tuple[object, list[str], object, dict]:
    """``(SAE fine-tuned on the concept, the texts it used besides the corpus's, the corpus
    windows found, report)``: the corpus windows around the keywords, ``extra`` and
    ``special.generations`` continuations of prompts naming the concept
    (``saekit.specialize``). Saves the SAE to ``OUT/specialized_sae``."""
    from saekit.concept import window_activations
    from saekit.concept_texts import concept_texts, text_windows
    from saekit.files import write_json
    from saekit.specialize import concept_generations, most_changed_features, specialize_sae

    generated = concept_generations(model, config.name, special.generations,
                                    special.generation_tokens, search.seed)
    texts = extra + generated
    found = concept_texts(tokens, model.tokenizer, config.keywords, seed=search.seed,
                          required=not texts)
    windows = found.windows + text_windows(model.tokenizer, texts)
    progress(f"{config.name}: specialising the SAE on {len(windows)} concept texts "
             f"({found.n_mentions} corpus mentions, {len(generated)} model continuations)")
    acts = window_activations(model, sae.cfg.metadata.hook_name, windows)
    tuned, report = specialize_sae(sae, acts, reference, special, search.seed, progress)
    report |= {"settings": vars(special), "corpus_mentions": found.n_mentions,
               "generated_texts": generated,
               "features_rising_most": most_changed_features(sae, tuned, acts)}
    folder = tuned.save(Path(config.out) / "specialized_sae")
    write_json(folder / "specialize.json", report)
    progress(f"{config.name}: FVU on concept texts {report['fvu_concept_before']:.3f} -> "
             f"{report['fvu_concept_after']:.3f}, on ordinary text "
             f"{report['fvu_ordinary_before']:.3f} -> {report['fvu_ordinary_after']:.3f}")
    return tuned, texts, found, report | {"folder": str(folder)}


def run_concept(config: ConceptConfig, search: ConceptSearch | None = None,
                progress=print, special: SpecializeConfig | None = None) -> dict:
    """Run the search on ``config`` and write ``OUT/concept.json``; returns its dict.
    With ``config.specialize``, the search runs on the SAE fine-tuned by ``specialized_sae``."""
    from saekit.files import write_json
    from saekit.generation import load_sae_and_model
    from saekit.steer_eval import read_prompts

    search = search or ConceptSearch()
    special = special or SpecializeConfig()
    config.check()
    explained = explained_features(config, search.candidates_per_ranking)
    sae, model = load_sae_and_model(config.sae, config.device or None)
    check_hooks(model, [sae.cfg.metadata.hook_name or ""])
    check_explained(explained, sae, config)
    extra = read_prompts(config.texts) if config.texts else []
    tokens, reference, statistics_of = corpus_source(model, sae, config)
    specialization = corpus_texts = None
    if config.specialize:
        sae, extra, corpus_texts, specialization = specialized_sae(
            model, sae, config, special, search, tokens, reference, extra, progress)
    result = find_concept_steering(
        model, sae, tokens, reference, statistics_of(sae), config.name, config.keywords, extra,
        search,
        validation_prompts=read_prompts(config.validation_prompts)
        if config.validation_prompts else None,
        evaluation_prompts=read_prompts(config.prompts) if config.prompts else None,
        evaluation_samples=config.evaluation_samples, progress=progress,
        corpus_texts=corpus_texts, explained=explained)
    result["sae"] = config.sae if specialization is None else specialization["folder"]
    if specialization is not None:
        result["specialization"] = {k: v for k, v in specialization.items()
                                    if k != "generated_texts"}
    write_json(Path(config.out) / RESULT_JSON, result)
    return result


def result_table(result: dict) -> str:
    """``concept.json`` as a few readable lines."""
    lines = [f"concept {result['concept']!r} (keywords {', '.join(result['keywords'])}) at "
             f"{result['hook']}: features {result['features'] or 'none'}, clamp values "
             f"{', '.join(f'{v:.3g}' for v in result['values']) or '-'}",
             f"{'':12}{'mention rate':>14}{'perplexity':>12}{'KL neutral':>12}"]
    for label in ("unsteered", "steered"):
        point = result[label]
        if point is not None:
            lines.append(f"{label:12}{100 * point['mention_rate']:>13.1f}%"
                         f"{point['perplexity']:>12.2f}{point['kl_neutral']:>12.3f}")
    lines.append(f"over {result['n_generations']} generations each; {result['verdict']}")
    return "\n".join(lines)
