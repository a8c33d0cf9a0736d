"""What is computed from SAE decoder/encoder directions and a text: logit lens, decoder
neighbours, the feature map, and feature search.

Built on ``saekit.analyse`` (feature-id checks, model activations, and the corpus statistics
that feature search uses as a base rate); ``analyse`` does not import this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.analyse import (AnalysisInputError, FeatureStatistics, TokenStrings, check_features,
                            feature_statistics, model_activations, model_hook)


@dataclass
class FeatureHit:
    """One feature found by ``search_features``; ``score`` is explained there."""

    feature: int
    score: float
    mean_activation: float  # m: mean over the text's non-BOS tokens
    max_activation: float  # on the text
    corpus_mean: float  # mean activation over the corpus tokens
    frequency: float  # firing frequency on the corpus
    token_activations: list[float]  # [tokens] on the text
    corpus_max: float = 0.0  # max activation over the corpus tokens
    log_ratio: float = 0.0  # log(m / b), b the smoothed corpus mean

    @property
    def raw_score(self) -> float:
        """The unnormalised ``m * log(m / b)`` (the score before it was scaled by the range)."""
        return self.mean_activation * self.log_ratio


# --- weights: logit lens, neighbours, map ------------------------------------------------------

def unembedding(model) -> tuple[Tensor, Tensor, bool]:
    """``(W_U [d_model, d_vocab], gain [d_model], centre)`` of the model's output path.

    A direction d added to the residual reaches the logits as ``norm(d) @ W_U``. The final
    norm's input-dependent 1/rms (1/std) factor is positive and the same for every vocabulary
    entry, so it is left out; its elementwise gain is kept: ``1 + weight`` for Gemma's RMSNorm
    (HF ``Gemma3RMSNorm`` multiplies by ``1 + weight``), ``weight`` for others. LayerNorm also
    subtracts the mean (``centre``).
    """
    W_U = model.W_U
    norm = getattr(model, "ln_final", None)
    norm = getattr(norm, "original_component", norm)
    weight = getattr(norm, "weight", None)
    if weight is None:
        gain = torch.ones(W_U.shape[0], device=W_U.device)
    else:
        gain = (1 + weight.float()) if "Gemma" in type(norm).__name__ else weight.float()
    return W_U, gain.detach(), isinstance(norm, torch.nn.LayerNorm)


@torch.inference_mode()
def logit_lens_values(model, sae, features) -> Tensor:
    """Direct logit effect of each feature's decoder row, ``[n_features, d_vocab]``."""
    ids = check_features(sae, features)
    W_U, gain, centre = unembedding(model)
    rows = sae.W_dec[ids.to(sae.W_dec.device)].float().to(W_U.device)
    if centre:
        rows = rows - rows.mean(-1, keepdim=True)
    return (rows * gain.to(W_U.device)) @ W_U.float()


def logit_lens(model, sae, feature: int, k: int = 10
               ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """``(promoted, suppressed)``: the ``k`` tokens whose logits the feature's decoder row
    raises most, and those it lowers most, as (decoded token, logit change per unit)."""
    return logit_lens_batch(model, sae, [feature], k)[0]


def logit_lens_batch(model, sae, features, k: int = 10, chunk: int = 32):
    """``logit_lens`` of several features: a list of ``(promoted, suppressed)``."""
    ids = check_features(sae, features)
    strings = TokenStrings(model.tokenizer)
    out = []
    for part in ids.split(chunk):
        values = logit_lens_values(model, sae, part)
        high, low = values.topk(k, dim=1), values.topk(k, dim=1, largest=False)
        for j in range(len(part)):
            out.append(tuple(list(zip(strings(t.indices[j].tolist()), t.values[j].tolist()))
                             for t in (high, low)))
    return out


@torch.no_grad()
def decoder_similarities(sae, feature: int) -> Tensor:
    """Cosine similarity of every decoder row with ``feature``'s, ``[d_sae]``."""
    (feature,) = check_features(sae, feature).tolist()
    rows = F.normalize(sae.W_dec.float(), dim=1)
    return (rows @ rows[feature]).cpu()


def nearest_features(sae, feature: int, k: int = 10) -> list[tuple[int, float]]:
    """The ``k`` features whose decoder rows have the highest cosine with ``feature``'s."""
    sims = decoder_similarities(sae, feature)
    sims[feature] = -math.inf
    top = sims.topk(min(k, sae.d_sae - 1))
    return list(zip(top.indices.tolist(), top.values.tolist()))


@torch.no_grad()
def feature_map(sae, feature: int, n_neighbours: int = 50) -> tuple[Tensor, Tensor]:
    """``(ids [n], coordinates [n, 2])``: ``feature`` (first) and its nearest neighbours placed
    by PCA of their unit decoder rows (the top two principal components)."""
    ids = torch.tensor([feature] + [i for i, _ in nearest_features(sae, feature, n_neighbours)])
    rows = F.normalize(sae.W_dec[ids.to(sae.W_dec.device)].float(), dim=1).cpu()
    centred = rows - rows.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ vh[:2].T
    if coords.shape[1] < 2:
        coords = F.pad(coords, (0, 2 - coords.shape[1]))
    return ids, coords * torch.where(coords[0] < 0, -1.0, 1.0)  # the feature on the + side


@torch.no_grad()
def neighbour_label_agreement(sae, labels: Tensor, k: int = 10, max_centres: int = 2000,
                              seed: int = 0) -> dict:
    """How often a feature's ``k`` nearest decoder neighbours share its label, against ``k``
    random features. ``labels`` [d_sae] int64 (-1: unlabelled, left out everywhere); centres
    are up to ``max_centres`` labelled features (seeded sample), neighbours and random features
    are drawn from the labelled ones. Returns the two rates, their ratio and the counts."""
    labelled = (labels >= 0).nonzero().flatten()
    if len(labelled) <= k:
        raise AnalysisInputError(f"Only {len(labelled)} features have a label; need more than "
                                 f"k = {k}.")
    generator = torch.Generator().manual_seed(seed)
    centres = labelled[torch.randperm(len(labelled), generator=generator)[:max_centres]]
    rows = F.normalize(sae.W_dec.float(), dim=1).cpu()
    sims = rows[centres] @ rows[labelled].T  # [centres, labelled]
    sims[labelled[None, :] == centres[:, None]] = -math.inf  # not itself
    neighbours = labelled[sims.topk(k, dim=1).indices]
    random = labelled[torch.randint(len(labelled), (len(centres), k), generator=generator)]
    own = labels[centres][:, None]
    near = float((labels[neighbours] == own).float().mean())
    chance = float((labels[random] == own).float().mean())
    return {"neighbour_agreement": near, "random_agreement": chance,
            "ratio": near / chance if chance > 0 else math.inf, "k": k,
            "n_centres": len(centres), "n_labelled_features": len(labelled)}


# --- texts: activations, mean-difference direction, search -------------------------------------

@torch.inference_mode()
def text_activations(model, hook: str, texts: Sequence[str]) -> Tensor:
    """Activations at ``hook`` of each text's tokens (BOS first, then dropped), concatenated:
    ``[tokens, d_model]``."""
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise AnalysisInputError("Give non-empty texts to run the model on.")
    tokenizer = model.tokenizer
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], 1)
        out.append(model_activations(model, hook, ids)[0, 1:])
    return torch.cat(out)


@torch.inference_mode()
def mean_difference_direction(model, hook: str, texts: Sequence[str], reference: Tensor) -> Tensor:
    """``mean(activations on texts) - mean(reference)`` ``[d_model]``, float32.

    ``reference`` [tokens, d_model]: activations of ordinary text at ``hook`` (e.g. a batch
    from the activation cache, BOS positions left out). Added to the residual stream (a
    ``saekit.steer.SteeringVector``) it moves an average position to the texts' average: the
    classic activation-steering baseline that SAE-feature steering is measured against.
    """
    concept = text_activations(model, hook, texts).float()
    reference = reference.reshape(-1, reference.shape[-1]).float()
    if reference.shape[-1] != concept.shape[-1] or len(reference) == 0:
        raise AnalysisInputError(f"reference of shape {tuple(reference.shape)} does not match "
                                 f"the activations at {hook!r} (d_model = {concept.shape[-1]}).")
    return concept.mean(0).cpu() - reference.mean(0).cpu()


@torch.inference_mode()
def search_features(sae, model_or_acts, text: str | None = None, cache=None,
                    statistics: FeatureStatistics | None = None, top: int = 10,
                    max_rows: int | None = None) -> list[FeatureHit]:
    """The features most specific to ``text``, best first.

    ``model_or_acts``: a model (run on ``text`` up to the SAE's hook, BOS dropped) or
    activations ``[tokens, d_in]``. The corpus base rate comes from ``statistics`` (all
    features) or a pass over ``cache`` (first ``max_rows`` rows).

    Score: ``(m / r) * log(m / b)`` for features with m > 0 (others score 0), where
    - m is the feature's mean activation on the text's tokens;
    - b is the corpus mean after add-one smoothing, ``b = (N * corpus_mean + m) / (N + 1)``
      over N corpus tokens (as if the corpus held one more token at the text's level), so a
      feature never seen in the corpus has a bounded ratio;
    - r is the feature's range, its max activation over the corpus (``statistics``), or its
      max on the text where that is larger, which also covers a corpus max of 0.
    ``m / r`` in (0, 1] is how strongly the text drives the feature relative to its own range,
    ``log(m / b)`` how much more than its base rate it fires on the text. Scaling by the range
    rather than by m keeps dense high-magnitude features (on for much of the corpus, a little
    higher on the text) from winning on magnitude alone; a merely rare feature that the text
    drives only weakly still scores low. Each hit keeps the raw numbers: m, the corpus mean
    and max, ``log_ratio = log(m / b)``, and ``raw_score = m * log(m / b)``.
    """
    if isinstance(model_or_acts, Tensor):
        acts = model_or_acts.reshape(-1, model_or_acts.shape[-1])
    else:
        acts = text_activations(model_or_acts, model_hook(sae), [text])
    if acts.shape[-1] != sae.d_in or len(acts) == 0:
        raise AnalysisInputError(f"Activations of shape {tuple(acts.shape)} do not fit this SAE "
                                 f"(d_in = {sae.d_in}, at least one token).")
    if statistics is None:
        if cache is None:
            raise AnalysisInputError("search_features needs a cache or precomputed statistics "
                                     "for the corpus base rate.")
        statistics = feature_statistics(sae, cache, max_rows=max_rows)
    if len(statistics.features) != sae.d_sae:
        raise AnalysisInputError("search_features needs statistics of all d_sae features.")
    feats = sae.encode(acts.to(sae.W_dec.device)).float().cpu()  # [tokens, d_sae]
    mean, text_max = feats.mean(0), feats.max(0).values
    n = statistics.n_tokens
    corpus_mean, corpus_max = statistics.mean_activation.float(), statistics.max_activation.float()
    base = (n * corpus_mean + mean) / (n + 1)
    log_ratio = torch.where(mean > 0, torch.log(mean / base.clamp_min(1e-30)), 0.0)
    scale = torch.maximum(corpus_max.clamp_min(0), text_max).clamp_min(1e-30)
    score = torch.where(mean > 0, mean / scale * log_ratio, 0.0)
    best = score.topk(min(top, sae.d_sae))
    return [FeatureHit(f, float(score[f]), float(mean[f]), float(text_max[f]),
                       float(corpus_mean[f]), float(statistics.frequency[f]),
                       feats[:, f].tolist(), float(corpus_max[f]), float(log_ratio[f]))
            for f in best.indices.tolist()]
