"""The ``saekit`` sub-commands: each is its config dataclass(es), whose fields are its flags
(``saekit.cli`` builds them), and a function that runs the library on those configs and
prints what it did. The library modules hold the configs and never print or parse flags.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from saekit.capture import CaptureConfig
from saekit.concept import ConceptSearch
from saekit.concept_run import ConceptConfig
from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.dashboard import DashboardConfig
from saekit.demo import DemoConfig, run_demo
from saekit.errors import ConfigError
from saekit.evaluate import EvalConfig
from saekit.explain_run import ExplainConfig
from saekit.generation import SteerConfig
from saekit.search import SearchConfig
from saekit.serve import ServeConfig
from saekit.specialize import SpecializeConfig
from saekit.steer_eval import SteerEvalConfig
from saekit.train import TrainConfig


@dataclass
class CacheOutput:
    """Where ``saekit cache`` writes, and on which device it runs the model."""

    out: str = setting("", "cache folder (resumed if it exists)", required=True)
    device: str | None = setting(None, DEVICE_HELP)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class HooksConfig:
    """What ``saekit hooks`` lists."""

    model: str = setting("gemma-3-270m", "model whose hook names to list")
    grep: str = setting("", "only names containing this")
    device: str | None = setting(None, DEVICE_HELP)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class Command:
    """One sub-command: its flags are the fields of ``configs``; ``run`` gets one built config
    per class, in order."""

    name: str
    help: str
    configs: tuple[type, ...]
    run: Callable[..., None]


def run_cache(config: CaptureConfig, output: CacheOutput) -> None:
    from saekit.cache import ActivationCache
    from saekit.capture import capture_activations

    out = capture_activations(config, output.out, device=output.device)
    cache = ActivationCache.open(out)
    size = sum(e.bytes for e in cache.manifest.shards)
    print(f"wrote {cache.manifest.n_tokens:,} tokens x {len(cache.hooks)} hook(s) "
          f"({', '.join(cache.hooks)}), d_model {cache.d_model}, {cache.n_shards} shards, "
          f"{size / 2**30:.2f} GiB to {out}")


def run_train(config: TrainConfig) -> None:
    from saekit.train import train

    if not config.out:
        raise ConfigError("saekit train needs --out DIR, and --activations DIR (from `saekit "
                          "cache`) or, to train on the fly, --hook (with --model, --dataset).")
    for name, folder in train(config).items():
        summary = json.loads((folder / "train_summary.json").read_text())["held_out"]
        if "fvu" not in summary:  # --holdout-tokens 0
            print(f"{name}: no held-out tokens, nothing evaluated -> {folder}")
            continue
        print(f"{name}: held-out FVU {summary['fvu']:.4f}, L0 {summary['l0']:.1f}, dead "
              f"{100 * summary['dead_fraction_training']:.1f}% -> {folder}")


def run_hooks(config: HooksConfig) -> None:
    from saekit.model import load_model

    model = load_model(config.model, device=config.device)
    print("\n".join(n for n in model.hook_dict if config.grep in n))


def run_eval(config: EvalConfig) -> None:
    from saekit.evaluate import evaluate_sae

    report = evaluate_sae(config.sae, dataset=config.dataset, tokens=config.tokens,
                          context=config.context, out=config.out, seed=config.seed,
                          batch_rows=config.batch_rows, subfolder=config.subfolder,
                          model_name=config.model, hook_name=config.hook, device=config.device,
                          progress=True, hook_out=config.hook_out)
    recovered = report["ce_loss_recovered"]
    where = report["hook_name"] + (f" -> {report['hook_name_out']}" if "hook_name_out" in report
                                   else "")
    kind = "skip transcoder" if report.get("skip_connection") else \
        "transcoder" if "hook_name_out" in report else "SAE"
    print(f"{report['architecture']} {kind} (d_sae {report['d_sae']:,}) at {where} of "
          f"{report['model']}, {report['tokens']:,} tokens of {report['dataset']}:\n"
          f"  CE loss recovered {'n/a' if recovered is None else f'{recovered:.4f}'} (clean "
          f"{report['ce_loss_clean']:.4f}, spliced {report['ce_loss_spliced']:.4f}, zero "
          f"{report['ce_loss_zero']:.4f}; delta LM loss {report['delta_lm_loss']:+.4f}), "
          f"KL {report['kl_div']:.4f}\n"
          f"  FVU {report['fvu']:.4f}, L0 {report['l0']:.1f}, cosine {report['cosine']:.4f}, "
          f"dead {100 * report['dead_fraction']:.1f}%, dense {100 * report['dense_fraction']:.1f}%"
          f"\n  -> {config.out}, {report['density_plot']}")


def run_dashboard(config: DashboardConfig) -> None:
    from saekit.analyse import model_hook
    from saekit.cache import ActivationCache
    from saekit.capture import capture_activations
    from saekit.dashboard import parse_features, write_dashboard
    from saekit.formats import load_foreign_sae
    from saekit.model import DEFAULT_MODEL, load_model
    from saekit.search import by_feature, load_explanations

    explanations = None if config.explanations is None else \
        by_feature(load_explanations(config.explanations), sae=config.sae)  # before any work
    sae = load_foreign_sae(config.sae, device=config.device)
    features = parse_features(config.features, sae.d_sae)
    meta = sae.cfg.metadata
    model = load_model(meta.model_name or DEFAULT_MODEL, device=config.device)
    if config.activations:
        cache = ActivationCache.open(config.activations)
    else:
        capture = CaptureConfig(model=meta.model_name or DEFAULT_MODEL, hooks=[model_hook(sae)],
                                dataset=config.dataset, tokens=config.tokens,
                                context=meta.context_size or 128)
        cache = ActivationCache.open(capture_activations(
            capture, Path(config.out) / ".activations", model=model))
    out = write_dashboard(config.out, model, sae, cache, features, n_examples=config.n_examples,
                          max_rows=config.max_rows, explanations=explanations)
    explained = "" if explanations is None else \
        f" ({sum(f in explanations for f in features)} with explanations)"
    print(f"wrote dashboards of {len(features)} features{explained} to {out / 'index.html'}")


def run_steer(config: SteerConfig) -> None:
    from saekit.generation import generate, load_sae_and_model

    sae, model = load_sae_and_model(config.sae, config.device)
    common = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
              "seed": config.seed, "positions": config.positions}
    steered = generate(model, config.prompt, sae, clamp={config.feature: config.value}, **common)
    edited = sae.cfg.metadata.hook_name_out or sae.cfg.metadata.hook_name  # a transcoder's output
    print(f"=== steered: clamp feature {config.feature} = {config.value:g} at {edited} "
          f"(seed {config.seed}) ===")
    print(config.prompt + steered)
    if config.compare:
        print(f"=== unsteered (seed {config.seed}) ===")
        print(config.prompt + generate(model, config.prompt, **common))


def run_steer_eval(config: SteerEvalConfig) -> None:
    from saekit.generation import load_sae_and_model
    from saekit.steer_eval import RESULT_JSON, RESULT_PNG, read_prompts, steering_curve

    prompts = read_prompts(config.prompts)
    neutral = read_prompts(config.neutral) if config.neutral else None
    concept = [c for c in config.concept.split(",") if c.strip()]
    sae, model = load_sae_and_model(config.sae, config.device)
    result = steering_curve(model, sae, config.feature, config.clamp_values(), prompts, concept,
                            max_new_tokens=config.max_new_tokens,
                            samples_per_prompt=config.samples_per_prompt,
                            temperature=config.temperature, seed=config.seed,
                            neutral_texts=neutral, positions=config.positions, out=config.out)
    print(f"{'clamp':>10} {'mention':>8} {'perplexity':>11} {'KL neutral':>11}")
    rows = ([("unsteered", result["baseline"])] if result["baseline"] else []) + \
        [(f"{row['value']:g}", row) for row in result["curve"]]
    for label, row in rows:
        ppl = f"{row['perplexity']:.2f}" if row["perplexity"] is not None else "-"
        print(f"{label:>10} {row['mention_rate']:>8.2f} {ppl:>11} {row['kl_neutral']:>11.4f}")
    print(f"wrote {Path(config.out) / RESULT_JSON} and {Path(config.out) / RESULT_PNG}")


def run_concept_command(config: ConceptConfig, search: ConceptSearch,
                        special: SpecializeConfig) -> None:
    from saekit.concept_run import RESULT_JSON, result_table, run_concept

    print(result_table(run_concept(config, search, special=special)))
    print(f"wrote {Path(config.out) / RESULT_JSON}")


def scores_line(scores: dict, scorers=("detection", "fuzzing")) -> str:
    """``detection: balanced accuracy 0.61 (at the median P(yes) 0.58), AUROC 0.66; ...`` for
    the scorers present in ``scores`` with a value (``not scored`` when none)."""
    parts = [f"{name}: balanced accuracy {d['balanced_accuracy']:.3f} (at the median P(yes) "
             f"{d['balanced_accuracy_median']:.3f}), AUROC {d['auroc']:.3f}"
             for name in scorers if (d := scores.get(name)) and d.get("auroc") is not None]
    return "; ".join(parts) or "not scored"


def run_explain_command(config: ExplainConfig) -> None:
    from saekit.explain_run import EXPLANATIONS, HYPOTHESIS, SUMMARY, run_explain

    result = run_explain(config)
    out = Path(config.out)
    if config.hypothesis is not None:
        print(f"feature {result['feature']}, hypothesis {result['hypothesis']!r}: "
              f"{scores_line(result)} -> {out / HYPOTHESIS}")
        return
    print(f"{result['n_features']} features explained by {result['explainer']}, mean "
          f"{scores_line(result)} -> {out / EXPLANATIONS}, {out / SUMMARY}")


def run_search(config: SearchConfig) -> None:
    from saekit.search import search_features

    found = search_features(config.explanations, config.query, sae=config.sae)
    if not found:
        print(f"no explanation matches {config.query!r}")
        return
    print(f"{len(found)} features match {config.query!r}"
          + (f", the best {config.top}:" if len(found) > config.top else ":"))
    print(f"{'feature':>8} {'score':>6}  explanation")
    for match in found[:config.top]:
        score = "-" if match.score is None else f"{match.score:.3f}"
        text = "".join(c if c.isprintable() else " " for c in match.explanation)  # no escapes
        print(f"{match.feature:>8} {score:>6}  {text}")


def run_serve(config: ServeConfig) -> None:
    from saekit.serve_app import build_explorer, is_loopback, make_server

    if not is_loopback(config.host):
        print(f"warning: --host {config.host} opens the explorer (and the model behind it) to "
              "the network; it has no authentication. Use --host 127.0.0.1 to keep it local.")
    explorer = build_explorer(config)
    server = make_server(explorer, config.host, config.port)
    listening = server.config.bind_socket()  # bound before the address is printed
    print(f"saekit serve: {explorer.sae.d_sae:,} features at {explorer.hook}, "
          f"{explorer.statistics.n_tokens:,} tokens of {explorer.cache.folder}; cached pages in "
          f"{explorer.folder}\nopen http://{config.host}:{config.port}/ (Ctrl-C stops)")
    server.run(sockets=[listening])


COMMANDS = (
    Command("cache", "capture activations of a model over a corpus",
            (CaptureConfig, CacheOutput), run_cache),
    Command("train", "train SAEs (a sweep) on cached activations or on the fly", (TrainConfig,), run_train),
    Command("hooks", "list a model's hook names", (HooksConfig,), run_hooks),
    Command("eval", "evaluate an SAE: FVU, L0, density, CE loss recovered and KL when spliced",
            (EvalConfig,), run_eval),
    Command("dashboard", "write static HTML feature dashboards", (DashboardConfig,),
            run_dashboard),
    Command("steer", "generate text with one SAE feature clamped", (SteerConfig,), run_steer),
    Command("steer-eval", "measure steering by one feature over clamp values: concept "
            "mentions, perplexity, KL", (SteerEvalConfig,), run_steer_eval),
    Command("concept", "find the SAE feature(s) that steer to a concept given its name and "
            "keywords; validate and measure", (ConceptConfig, ConceptSearch, SpecializeConfig),
            run_concept_command),
    Command("explain", "explain SAE features with a language model and score the "
            "explanations (detection, fuzzing), resumably; or score one --hypothesis",
            (ExplainConfig,), run_explain_command),
    Command("search", "find features by their explanations (from saekit explain), best "
            "match and score first", (SearchConfig,), run_search),
    Command("serve", "a local feature explorer in the browser: features, search by text, "
            "steering playground", (ServeConfig,), run_serve),
    Command("demo", "the main job on the embedded default, end to end (capture, SAE, concept "
            "search, steer, measure)", (DemoConfig,), run_demo),
)
