"""``make demo``: the whole story on the embedded default, end to end.

capture (reused if cached) → the SAE (the one shipped with saekit, or ``--retrain`` its recipe
on the capture) → ``saekit concept`` for the headline concept (the one that steers best in the
steering benchmark, ``docs/steering_benchmark.json``): its texts retrieved from the capture,
candidate features ranked, screened and validated by generation → the chosen feature's
top-activating texts, logit lens and dashboard → neutral prompts unsteered vs clamped, and the
concept's mean-difference vector (no SAE) for comparison → the same search for the Golden Gate
Bridge → measured rates. Selections are kept in ``OUT/concepts/`` and reused.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from saekit.analyse import feature_statistics, top_activating_examples
from saekit.cache import ActivationCache, leading_activations
from saekit.capture import CaptureConfig, capture_activations
from saekit.concept import ConceptSearch, benchmark_concepts, find_concept_steering
from saekit.concept_texts import ConceptError
from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.errors import ConfigError
from saekit.dashboard import write_dashboard
from saekit.directions import logit_lens
from saekit.files import write_json
from saekit.model import load_model
from saekit.formats import load_foreign_sae
from saekit.train import READING_FIELDS, TrainConfig, train

SHIPPED_SAE = Path(__file__).parent / "data" / "sae" / "gemma-3-270m-blocks.6-topk-16k"
BENCHMARK_RESULT = Path(__file__).resolve().parent.parent / "docs" / "steering_benchmark.json"
GOLDEN_GATE = "the Golden Gate Bridge"
FALLBACK_CONCEPT = "cheese"


@dataclass
class DemoConfig:
    """What ``saekit demo`` runs. The CLI's ``saekit demo`` flags are these fields."""

    out: str = setting("runs/demo", "folder for everything the demo writes")
    tokens: int = setting(600_000, "tokens captured; searched for the concepts' texts", ge=1)
    shard_rows: int = setting(512, "rows of 128 tokens per cache shard", ge=1)
    sae: str = setting("", "SAE to steer with (default: the shipped one)")
    retrain: bool = setting(False, "train the shipped SAE's recipe on the capture (use "
                            "--tokens 1200000)")
    train_tokens: int = setting(1_130_000, "training tokens of --retrain", ge=1)
    holdout_tokens: int = setting(65_536, "held-out tokens of --retrain", ge=0)
    batch_size: int = setting(1024, "training batch of --retrain", ge=1)
    latents: int = setting(16384, "latents of --retrain", ge=1)
    k: int = setting(32, "active latents per token of --retrain", ge=1)
    concept: str = setting("", "headline concept (default: the benchmark's best)")
    keywords: list[str] = setting([], "its keywords (default: the benchmark's)")
    statistics_rows: int = setting(256, "cache rows for base rates and the reference "
                                   "activations", ge=1)
    samples_per_prompt: int = setting(3, "evaluation generations per neutral prompt", ge=1)
    groups: list[int] = setting([1, 3, 10], "sizes of the sets of best features validated "
                                "together", ge=1)
    validation_samples: int = setting(2, "generations per validation prompt", ge=1)
    max_new_tokens: int = setting(32, "new tokens per generation", ge=1)
    shown_prompts: int = setting(3, "neutral prompts whose texts are printed", ge=0)
    seed: int = setting(0, "seed of capture, training and sampling")
    device: str | None = setting(None, DEVICE_HELP)

    def __post_init__(self) -> None:
        check_fields(self)


def shipped_train_config(activations: str, out: str, config: DemoConfig) -> TrainConfig:
    """The recipe of the shipped SAE (``--retrain`` runs it): TopK, 16,384 latents, k 32."""
    return TrainConfig(activations=activations, out=out, arch=["topk"], latents=[config.latents],
                       options={"k": [config.k]}, tokens=config.train_tokens,
                       holdout_tokens=config.holdout_tokens, batch_size=config.batch_size,
                       seed=config.seed, device=config.device)


RETRAIN_COMMAND = "saekit demo --retrain --tokens 1200000"


def recipe(config: DemoConfig) -> dict:
    """The training settings ``--retrain`` uses, without the run's folders."""
    train_config = shipped_train_config("", "", config)
    # trained from the demo's capture: the on-the-fly reading settings do not apply
    left_out = {"activations", "out", "device", "options", *READING_FIELDS}
    if not train_config.hook_out:  # an SAE, not a transcoder: as recipes before transcoders
        left_out |= {"hook_out", "skip_connection"}
    settings = asdict(train_config)
    key = train_config.resume_key()  # the hook keyed as one name (or none), as recipes had it
    return {k: v for k, v in settings.items() if k not in left_out} \
        | {"hook": key["hook"], "sweep": key["sweep"]}


def ship_sae(trained: str | Path, dest: str | Path = SHIPPED_SAE) -> Path:
    """Copy a trained SAE into ``dest`` with its weights stored as bfloat16 (loaded back as
    float32: its cfg.json says so), its train summary and the recipe that trained it."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from saekit.files import sha256_file, write_safetensors
    from saekit.sae.base import CFG_FILENAME, WEIGHTS_FILENAME, WEIGHTS_SHA256

    trained, dest = Path(trained), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    weights = load_file(trained / WEIGHTS_FILENAME)
    write_safetensors(dest / WEIGHTS_FILENAME, {k: v.to(torch.bfloat16) for k, v in
                                                weights.items()})
    shutil.copyfile(trained / "train_summary.json", dest / "train_summary.json")
    cfg = json.loads((trained / CFG_FILENAME).read_text())
    cfg[WEIGHTS_SHA256] = sha256_file(dest / WEIGHTS_FILENAME)  # of the bfloat16 copy
    write_json(dest / CFG_FILENAME, cfg)
    write_json(dest / "recipe.json", {"command": RETRAIN_COMMAND,
                                      "train": recipe(DemoConfig())})
    return dest


def section(title: str, started: float) -> None:
    """A section header, with the seconds since ``started`` (a ``time.perf_counter()``)."""
    elapsed = f" [{time.perf_counter() - started:.0f} s]"
    print(f"\n=== {title} " + "=" * max(0, 64 - len(title)) + elapsed, flush=True)


def demo_sae(config: DemoConfig, activations: Path) -> Path:
    """``--sae``, the shipped SAE, or (``--retrain``) the shipped recipe trained on the capture
    (reused once trained)."""
    if config.sae:
        return Path(config.sae)
    if not config.retrain:
        return SHIPPED_SAE
    folder = Path(config.out) / "sae" / f"topk_w{config.latents}_k{config.k}"
    if not (folder / "train_summary.json").exists():
        train(shipped_train_config(str(activations), str(folder.parent), config))
    return folder


def headline_concept(config: DemoConfig) -> tuple[str, list[str]]:
    """The concept to show: ``--concept``, else the benchmark's best corpus concept by its own
    measure (SAE clamp rate within the perplexity budget), else cheese."""
    concepts = benchmark_concepts()
    name = config.concept
    if not name and BENCHMARK_RESULT.is_file():
        results = json.loads(BENCHMARK_RESULT.read_text())["concepts"]
        rated = [(r["best"]["sae_clamp"]["mention_rate"], n) for n, r in results.items()
                 if n != GOLDEN_GATE and r["best"]["sae_clamp"]]
        name = max(rated)[1] if rated else ""
    name = name or FALLBACK_CONCEPT
    keywords = config.keywords or concepts.get(name)
    if not keywords:
        raise ConfigError(f"Give --keywords for the concept {name!r}.")
    return name, keywords


def show_example(example) -> str:
    """One example as text, the max token in [[ ]]."""
    parts = [f"[[{t}]]" if example.start + i == example.position else t
             for i, t in enumerate(example.tokens)]
    return "".join(parts).replace("\n", " ").strip()


def concept_result(model, sae, sae_dir: Path, cache: ActivationCache, name: str,
                   keywords: list[str], config: DemoConfig, statistics, reference) -> dict:
    """``find_concept_steering`` for the concept, kept in ``OUT/concepts/`` and reused when the
    SAE, cache and settings are the same."""
    key = {"sae": str(sae_dir), "cache": str(cache.folder), "n_tokens":
           cache.manifest.n_tokens, "keywords": keywords, "seed": config.seed,
           "samples": config.samples_per_prompt, "max_new_tokens": config.max_new_tokens,
           "statistics_rows": config.statistics_rows, "groups": config.groups,
           "validation_samples": config.validation_samples}
    path = Path(config.out) / "concepts" / (re.sub(r"\W+", "_", name).strip("_") + ".json")
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("demo_key") == key:
            print(f"(reusing {path})")
            return saved
    search = ConceptSearch(max_new_tokens=config.max_new_tokens, seed=config.seed,
                           groups=list(config.groups),
                           samples_per_prompt=config.validation_samples)
    result = find_concept_steering(model, sae, cache.tokens(), reference, statistics, name,
                                   keywords, search=search,
                                   evaluation_samples=config.samples_per_prompt,
                                   vector_strengths=[0.3, 0.5],  # the baseline's own grid
                                   progress=print)
    result["demo_key"] = key
    write_json(path, result)
    return result


def print_rates(result: dict) -> None:
    """Mention rate and perplexity of unsteered, clamped and mean-difference steering."""
    rows = [("unsteered", result["unsteered"]),
            (f"clamp {result['features']}", result["steered"])]
    rows += [(f"mean-difference {p['strength']:g}x", p) for p in result["mean_difference"]]
    for label, point in rows:
        print(f"  {label:28s} mention rate {100 * point['mention_rate']:5.1f}%  perplexity "
              f"{point['perplexity']:7.2f}  KL on neutral text {point['kl_neutral']:.3f}")


def show_generations(result: dict, n_prompts: int, per_prompt: int) -> None:
    """The first sample of the first prompts, unsteered and clamped."""
    for i in range(0, n_prompts * per_prompt, per_prompt):
        print(f"\nprompt: {result['samples']['unsteered'][i]['prompt']!r}")
        for label in ("unsteered", "steered"):
            text = result["samples"][label][i]["text"].strip()
            print(f"  {label:10s} {text!r}")


def run_demo(config: DemoConfig) -> dict:
    """Run the demo; returns (and writes to ``OUT/demo_summary.json``) what it measured."""
    started = time.perf_counter()
    out = Path(config.out)
    name, keywords = headline_concept(config)
    model = load_model(device=config.device)

    section("1. capture", started)
    activations = out / "activations"
    capture_activations(CaptureConfig(tokens=config.tokens, seed=config.seed,
                                      shard_rows=config.shard_rows), activations, model=model)
    cache = ActivationCache.open(activations)
    print(f"{cache.manifest.n_tokens:,} tokens of the default corpus at "
          f"{', '.join(cache.hooks)} in {activations}")

    section("2. the SAE", started)
    sae_dir = demo_sae(config, activations)
    sae = load_foreign_sae(sae_dir, device=config.device).eval()
    summary_file = sae_dir / "train_summary.json"
    held_out = json.loads(summary_file.read_text())["held_out"] if summary_file.is_file() else {}
    print(f"{sae_dir}: {sae.cfg.architecture}, {sae.d_sae:,} latents at "
          f"{sae.cfg.metadata.hook_name}" + (f"; held-out FVU {held_out['fvu']:.3f}, L0 "
                                             f"{held_out['l0']:.0f}" if held_out else ""))
    hook = sae.cfg.metadata.hook_name
    statistics = feature_statistics(sae, cache, max_rows=config.statistics_rows)
    reference = leading_activations(cache, config.statistics_rows * (cache.context - 1),
                                    hook=hook)

    section(f"3. saekit concept: {name}", started)
    result = concept_result(model, sae, sae_dir, cache, name, keywords, config, statistics,
                            reference)
    features = result["features"]

    section(f"4. feature {features[0]}: top-activating texts and logit lens", started)
    examples = top_activating_examples(sae, cache, features[:1], n_examples=6,
                                       tokenizer=model.tokenizer,
                                       max_rows=config.statistics_rows)[features[0]]
    for example in examples:
        print(f"{example.max_activation:6.2f}  {show_example(example)}")
    promoted, suppressed = logit_lens(model, sae, features[0], k=8)
    print("promotes: " + ", ".join(repr(t) for t, _ in promoted))

    section("5. dashboard", started)
    dashboard = write_dashboard(out / "dashboard", model, sae, cache, features, n_examples=12,
                                max_rows=config.statistics_rows)
    print(f"open {dashboard / f'feature_{features[0]}.html'} (index: {dashboard / 'index.html'})")

    section(f"6. steering to {name}: unsteered vs clamped", started)
    show_generations(result, config.shown_prompts, config.samples_per_prompt)
    print()
    print_rates(result)
    print(result["verdict"])

    section(f"7. {GOLDEN_GATE}, the same way", started)
    try:
        golden = concept_result(model, sae, sae_dir, cache, GOLDEN_GATE,
                                benchmark_concepts()[GOLDEN_GATE], config, statistics, reference)
        print(f"the captured tokens mention it {golden['retrieval']['n_mentions']}x")
        print_rates(golden)
    except ConceptError as err:
        golden = {"features": [], "values": [], "unsteered": None, "steered": None,
                  "target_met": False, "verdict": f"{GOLDEN_GATE}: {err}"}
    print(golden["verdict"])

    section("8. measured", started)
    verdict = result["verdict"] + " " + golden["verdict"]
    print(verdict)
    summary = {"config": asdict(config), "sae": str(sae_dir), "held_out": held_out,
               "concept": name, "keywords": keywords, "feature": features[0],
               "features": features, "values": result["values"],
               "top_examples": [show_example(e) for e in examples],
               "logit_lens": {"promoted": promoted, "suppressed": suppressed},
               "steering": {"unsteered": result["unsteered"], "clamped": result["steered"],
                            "mean_difference": [{k: v for k, v in p.items() if k != "samples"}
                                                for p in result["mean_difference"]]},
               "golden_gate": {k: golden[k] for k in ("features", "values", "unsteered",
                                                      "steered", "target_met", "verdict")},
               "target_met": result["target_met"], "verdict": verdict,
               "seconds": round(time.perf_counter() - started, 1)}
    write_json(out / "demo_summary.json", summary)
    print(f"\ndone in {summary['seconds']:.0f} s; summary in {out / 'demo_summary.json'}")
    return summary
