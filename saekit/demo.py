"""``make demo``: the whole story on the embedded default, end to end.

capture (reused if cached) → train a TopK SAE (reused if trained) → find the feature most
selective for the concept → its top-activating texts and logit lens → its dashboard →
unsteered vs clamped generations on neutral prompts → the same with a mean-difference
steering vector (no SAE), the baseline → measured mention rates. It says what it found,
including when the target (clamped mention rate ≥ 50%, unsteered < 5%) is missed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saekit.analyse import feature_statistics, top_activating_examples
from saekit.cache import ActivationCache, leading_activations
from saekit.capture import CaptureConfig, capture_activations
from saekit.dashboard import write_dashboard
from saekit.directions import (logit_lens, mean_difference_direction, nearest_features,
                               search_features)
from saekit.files import write_json
from saekit.model import load_model
from saekit.sae import load_sae
from saekit.steer import SteeringVector
from saekit.steer_eval import keyword_pattern, read_prompts, steering_curve, steering_sweep
from saekit.train import TrainConfig, train

GOLDEN_GATE_TEXTS = [
    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate, the strait "
    "connecting San Francisco Bay and the Pacific Ocean.",
    "We drove north across the Golden Gate Bridge from San Francisco into Marin County.",
    "Painted International Orange, the Golden Gate Bridge opened in 1937 and became the "
    "symbol of San Francisco.",
]


@dataclass
class DemoConfig:
    """What ``saekit demo`` runs. The CLI's ``saekit demo`` flags are these fields."""

    out: str = "runs/demo"
    tokens: int = 600_000  # captured; the last holdout_tokens are held out of training
    train_tokens: int = 500_000
    shard_rows: int = 512  # rows of 128 tokens per cache shard
    holdout_tokens: int = 65_536
    batch_size: int = 1024
    latents: int = 4096
    k: int = 32
    concept_texts: list[str] = field(default_factory=lambda: list(GOLDEN_GATE_TEXTS),
                                     metadata={"flag": "concept_text"})
    keywords: list[str] = field(default_factory=lambda: ["Golden Gate", "San Francisco",
                                                         "bridge"])
    statistics_rows: int = 800  # cache rows for base rates, max activations and examples
    clamp_multiples: list[float] = field(default_factory=lambda: [2.0, 4.0])
    # multiples of the concept's mean-difference direction, steered for comparison (no SAE)
    vector_scales: list[float] = field(default_factory=lambda: [2.0, 3.0])
    max_new_tokens: int = 24
    shown_prompts: int = 3
    seed: int = 0
    device: str | None = None


def section(title: str, started: float) -> None:
    """A section header, with the seconds since ``started`` (a ``time.perf_counter()``)."""
    elapsed = f" [{time.perf_counter() - started:.0f} s]"
    print(f"\n=== {title} " + "=" * max(0, 64 - len(title)) + elapsed, flush=True)


def train_or_reuse(config: DemoConfig, activations: Path) -> Path:
    """The demo's TopK SAE folder, trained unless it already exists."""
    name = f"topk_w{config.latents}_k{config.k}"
    folder = Path(config.out) / "sae" / name
    if not (folder / "train_summary.json").exists():
        train(TrainConfig(activations=str(activations), out=str(folder.parent),
                          arch=["topk"], latents=[config.latents], k=[config.k],
                          tokens=config.train_tokens, holdout_tokens=config.holdout_tokens,
                          batch_size=config.batch_size, seed=config.seed, device=config.device))
    return folder


def show_example(example) -> str:
    """One example as text, the max token in [[ ]]."""
    parts = [f"[[{t}]]" if example.start + i == example.position else t
             for i, t in enumerate(example.tokens)]
    return "".join(parts).replace("\n", " ").strip()


def show_generations(prompts: list[str], settings: list[tuple[str, dict]]) -> None:
    """Print each prompt's generation under each (label, measured setting)."""
    for i, prompt in enumerate(prompts):
        print(f"\nprompt: {prompt!r}")
        for label, point in settings:
            print(f"  {label:24s} {point['samples'][i]['text'].strip()!r}")


def concept_mentions(cache: ActivationCache, tokenizer, keywords: list[str]) -> dict[str, int]:
    """How often each keyword occurs in the cache's text (its rows decoded, BOS dropped)."""
    texts = tokenizer.batch_decode(cache.tokens().tolist(), skip_special_tokens=True)
    return {k: sum(len(keyword_pattern([k]).findall(t)) for t in texts) for k in keywords}


def run_demo(config: DemoConfig) -> dict:
    """Run the demo; returns (and writes to ``OUT/demo_summary.json``) what it measured."""
    started = time.perf_counter()
    out = Path(config.out)
    model = load_model(device=config.device)

    section("1. capture", started)
    activations = out / "activations"
    capture_activations(CaptureConfig(tokens=config.tokens, seed=config.seed,
                                      shard_rows=config.shard_rows), activations, model=model)
    cache = ActivationCache.open(activations)
    print(f"{cache.manifest['n_tokens']:,} tokens of the default corpus at "
          f"{', '.join(cache.hooks)} in {activations}")

    section("2. train a TopK SAE", started)
    sae_dir = train_or_reuse(config, activations)
    sae = load_sae(sae_dir, device=config.device)
    summary = json.loads((sae_dir / "train_summary.json").read_text())["held_out"]
    print(f"{sae_dir.name}: held-out FVU {summary['fvu']:.3f}, L0 {summary['l0']:.0f}, "
          f"dead {100 * summary['dead_fraction_training']:.1f}% -> {sae_dir}")

    section("3. find the Golden Gate feature", started)
    stats = feature_statistics(sae, cache, max_rows=config.statistics_rows)
    hits = search_features(sae, model, text="\n".join(config.concept_texts), statistics=stats,
                           top=5)
    for hit in hits:
        print(f"feature {hit.feature:5d}  score {hit.score:6.2f}  mean on text "
              f"{hit.mean_activation:6.2f}  corpus frequency {100 * hit.frequency:.3f}%")
    feature = hits[0].feature
    max_activation = float(stats.max_activation[feature])
    print(f"-> feature {feature} (max activation on the corpus sample {max_activation:.2f})")

    section(f"4. feature {feature}: top-activating texts and logit lens", started)
    examples = top_activating_examples(sae, cache, [feature], n_examples=6,
                                       tokenizer=model.tokenizer,
                                       max_rows=config.statistics_rows)[feature]
    for example in examples:
        print(f"{example.max_activation:6.2f}  {show_example(example)}")
    promoted, suppressed = logit_lens(model, sae, feature, k=8)
    print("promotes: " + ", ".join(repr(t) for t, _ in promoted))
    print("suppresses: " + ", ".join(repr(t) for t, _ in suppressed))

    section("5. dashboard", started)
    neighbours = [f for f, _ in nearest_features(sae, feature, k=5)]
    dashboard = write_dashboard(out / "dashboard", model, sae, cache,
                                [feature, *[h.feature for h in hits[1:]], *neighbours],
                                n_examples=12, max_rows=config.statistics_rows)
    print(f"open {dashboard / f'feature_{feature}.html'} (index: {dashboard / 'index.html'})")

    section("6. steering: unsteered vs clamped", started)
    values = [m * max_activation for m in config.clamp_multiples]
    prompts = read_prompts()
    curve = steering_curve(model, sae, feature, values, prompts, config.keywords,
                           max_new_tokens=config.max_new_tokens, samples_per_prompt=1,
                           seed=config.seed, out=out / "steering")
    settings = [("unsteered", curve["baseline"])] + [
        (f"clamp {m:g}x max = {v:.2f}", point)
        for m, v, point in zip(config.clamp_multiples, values, curve["curve"])]
    show_generations(prompts[:config.shown_prompts], settings)

    section("7. for comparison: a mean-difference steering vector (no SAE)", started)
    hook = sae.cfg.metadata.hook_name
    reference = leading_activations(cache, hook=hook)
    direction = mean_difference_direction(model, hook, config.concept_texts, reference)
    print(f"v = mean activation on the concept texts - mean on the corpus at {hook} "
          f"(|v| = {direction.norm():.0f}, typical |x| = {reference.norm(dim=-1).mean():.0f})")
    sweep = steering_sweep(model, [[SteeringVector(direction, hook, scale)]
                                   for scale in config.vector_scales],
                           prompts, config.keywords, max_new_tokens=config.max_new_tokens,
                           samples_per_prompt=1, seed=config.seed, baseline=False)
    vector_settings = [(f"add {scale:g} v", point)
                       for scale, point in zip(config.vector_scales, sweep["curve"])]
    show_generations(prompts[:config.shown_prompts], vector_settings)

    section("8. measured", started)
    mentions = concept_mentions(cache, model.tokenizer, config.keywords)
    print(f"the {cache.manifest['n_tokens']:,} captured tokens mention the concept "
          + ", ".join(f"{k!r} {n}x" for k, n in mentions.items()))
    for label, point in settings + vector_settings:
        print(f"{label:24s} mention rate {100 * point['mention_rate']:5.1f}%  perplexity "
              f"{point['perplexity']:7.2f}  KL on neutral text {point['kl_neutral']:.3f}")
    best = max(curve["curve"], key=lambda p: p["mention_rate"])
    best_vector = max(sweep["curve"], key=lambda p: p["mention_rate"])
    met = best["mention_rate"] >= 0.5 and curve["baseline"]["mention_rate"] < 0.05
    verdict = ("target met" if met else "target MISSED") + (
        f": clamping SAE feature {feature} gives {100 * best['mention_rate']:.0f}% (target >= "
        f"50%), unsteered {100 * curve['baseline']['mention_rate']:.0f}% (target < 5%), over "
        f"{len(prompts)} neutral prompts x {config.max_new_tokens} tokens, keywords "
        f"{config.keywords}. The mean-difference vector at the same hook reaches "
        f"{100 * best_vector['mention_rate']:.0f}% (perplexity {best_vector['perplexity']:.1f})")
    if not met and best_vector["mention_rate"] >= 0.5:
        verdict += (": the model can be steered to the concept at this layer, but this SAE "
                    "has no feature for it; the corpus it was trained on names it too rarely "
                    "(above) for a dictionary of this size to spend a latent on it")
    print(verdict)
    result = {"config": asdict(config), "sae": str(sae_dir), "held_out": summary,
              "search": [asdict(h) | {"token_activations": None} for h in hits],
              "feature": feature, "max_activation": max_activation,
              "top_examples": [show_example(e) for e in examples],
              "logit_lens": {"promoted": promoted, "suppressed": suppressed},
              "steering": {label: {k: p[k] for k in ("mention_rate", "perplexity", "kl_neutral")}
                           for label, p in settings + vector_settings},
              "concept_mentions_in_cache": mentions,
              "target_met": met, "verdict": verdict,
              "seconds": round(time.perf_counter() - started, 1)}
    write_json(out / "demo_summary.json", result)
    print(f"\ndone in {result['seconds']:.0f} s; summary in {out / 'demo_summary.json'}")
    return result


def register_cli(subparsers) -> argparse.ArgumentParser:
    from saekit.cli import add_config_arguments, config_from_args

    parser = subparsers.add_parser("demo", help="the main job on the embedded default, "
                                   "end to end (capture, train, find, show, steer, measure)")
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(run=lambda args: run_demo(config_from_args(DemoConfig, args)))
    return parser
