"""A concept score that is not a keyword list: a logistic-regression probe on the model's own
activations, trained on the concept's corpus windows against ordinary corpus windows.

The probe reads mean-pooled residual-stream activations at a layer other than the one being
steered (by default two thirds of the way through the model), so it neither shares the
steering direction nor sees the edit: a generated text is scored by the unsteered model
reading it. Features are standardised on the training windows; the weights are fitted with
L-BFGS under an L2 penalty. ``held_out_accuracy`` (balanced, on a quarter of the windows
never fitted on) says how well it separates concept from ordinary text; a generation counts
as about the concept when its probability is at least 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.analyse import model_activations
from saekit.concept_texts import ConceptError


@dataclass
class ConceptProbe:
    """A fitted probe: P(concept) = sigmoid(((pooled - mean) / std) . weight + bias)."""

    hook: str
    weight: Tensor  # [d_model]
    bias: float
    mean: Tensor  # [d_model]
    std: Tensor  # [d_model]
    held_out_accuracy: float  # balanced accuracy on held-out windows
    n_concept: int
    n_ordinary: int

    def probability(self, pooled: Tensor) -> Tensor:
        """P(concept) of mean-pooled activations ``pooled`` [n, d_model] -> [n]."""
        return torch.sigmoid(((pooled - self.mean) / self.std) @ self.weight + self.bias)

    @torch.inference_mode()
    def score_continuations(self, model, samples: Sequence[dict]) -> list[float]:
        """P(concept) of each sample's ``text`` (mean over its tokens), read by ``model`` after
        its ``prompt``; an empty continuation scores 0."""
        out = []
        for sample in samples:
            prompt = model.to_tokens(sample["prompt"])
            tokens = model.to_tokens(sample["prompt"] + sample["text"])
            if tokens.shape[1] <= prompt.shape[1]:
                out.append(0.0)
                continue
            acts = model_activations(model, self.hook, tokens)[0, prompt.shape[1]:]
            out.append(float(self.probability(acts.float().mean(0, keepdim=True).cpu())[0]))
        return out

    def summary(self) -> dict:
        return {"hook": self.hook, "held_out_accuracy": self.held_out_accuracy,
                "n_concept": self.n_concept, "n_ordinary": self.n_ordinary}


def probe_hook(model) -> str:
    """The residual stream two thirds of the way through ``model``."""
    return f"blocks.{(2 * model.cfg.n_layers) // 3}.hook_resid_post"


def ordinary_windows(tokens: Tensor, mentions: Sequence[tuple[int, int, int]], n: int,
                     length: int, seed: int = 0, bos_token_id: int | None = None,
                     min_length: int = 8) -> list[Tensor]:
    """``n`` windows of up to ``length`` tokens of ``tokens`` [rows, context] that touch no
    concept mention (``(row, first, last)`` spans) and hold no BOS: seeded random starts,
    each cut before the next mention; shorter than ``min_length``, it is drawn again."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for row, first, last in mentions:
        spans.setdefault(row, []).append((first, last))
    generator = torch.Generator().manual_seed(seed)
    rows, context = tokens.shape
    out: list[Tensor] = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        row = int(torch.randint(rows, (1,), generator=generator))
        start = int(torch.randint(1, context, (1,), generator=generator))
        end = min(context, start + length)
        for first, last in spans.get(row, []):
            if first <= start <= last:
                end = start
            elif start < first < end:
                end = first
        window = tokens[row, start:end]
        if bos_token_id is not None:
            boundary = (window == bos_token_id).nonzero().flatten()
            window = window[:int(boundary[0])] if len(boundary) else window
        if len(window) >= min(min_length, length):
            out.append(window.clone())
    if len(out) < n:
        raise ConceptError(f"Found only {len(out)} of {n} corpus windows free of the concept's "
                           "keywords to train its probe against; give more specific keywords.")
    return out


def pooled_activations(model, hook: str, windows: Sequence[Tensor]) -> Tensor:
    """Mean activation at ``hook`` of each window, read after BOS: ``[n_windows, d_model]``."""
    from saekit.concept_measure import window_activation

    return torch.stack([window_activation(model, hook, window).mean(0) for window in windows])


def fit_concept_probe(model, concept: Sequence[Tensor], ordinary: Sequence[Tensor],
                      hook: str | None = None, l2: float = 1e-2, seed: int = 0) -> ConceptProbe:
    """Fit a probe separating ``concept`` from ``ordinary`` token windows (lists of 1-D token
    tensors, BOS excluded) at ``hook`` (default ``probe_hook(model)``)."""
    if len(concept) < 4 or len(ordinary) < 4:
        raise ConceptError(f"A concept probe needs at least 4 concept and 4 ordinary texts, got "
                           f"{len(concept)} and {len(ordinary)}.")
    hook = hook or probe_hook(model)
    x = torch.cat([pooled_activations(model, hook, concept),
                   pooled_activations(model, hook, ordinary)])
    y = torch.cat([torch.ones(len(concept)), torch.zeros(len(ordinary))])
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(y), dtype=torch.bool)
    for label in (1.0, 0.0):  # a stratified quarter held out
        index = (y == label).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        held[index[:max(1, len(index) // 4)]] = True
    trial = _fit(x[~held], y[~held], l2)
    predicted = trial.probability(x[held]) >= 0.5
    recalls = [float((predicted[y[held] == label] == bool(label)).float().mean())
               for label in (1.0, 0.0)]
    probe = _fit(x, y, l2)
    return ConceptProbe(hook, probe.weight, probe.bias, probe.mean, probe.std,
                        sum(recalls) / 2, len(concept), len(ordinary))


def _fit(x: Tensor, y: Tensor, l2: float) -> ConceptProbe:
    """Class-balanced L2-penalised logistic regression on standardised ``x`` [n, d]."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mean) / std).double()
    positive = float(y.sum())
    weights = torch.where(y > 0, len(y) / (2 * positive), len(y) / (2 * (len(y) - positive)))
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = (F.binary_cross_entropy_with_logits(z @ w + b, y.double(),
                                                    weight=weights.double())
                 + l2 * w.pow(2).sum())
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return ConceptProbe("", w.detach().float(), float(b.detach()), mean, std, float("nan"),
                        int(positive), len(y) - int(positive))
