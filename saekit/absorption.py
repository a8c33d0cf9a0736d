"""Feature absorption on the first-letter spelling task (Chanin et al. 2024, "A is for
Absorption", arXiv 2409.14507), measured the way SAEBench's absorption eval does, with the
differences listed at the end.

**Words.** Every vocabulary token that decodes to a space followed by ``min_letters`` or more
lowercase letters a–z is a word. ``max_words`` of them are drawn (seeded) and split at
random into train and held-out (``test_fraction``) words. Each word is read at the end of a
fixed spelling prompt (by default one example, ``<bos> wheat has the first letter: W\\n<word>``,
to keep a word to ~10 tokens on a CPU): its feature vector is the activation at the SAE's
hook at the word's position (the model is causal, so a template after the word would not
change it).

**Probes.** Per letter L, a class-balanced, L2-penalised logistic regression "starts with L"
is fitted with L-BFGS on the train words' standardised activations. Its weights mapped back
to raw activation space, normalised, are the probe direction d_L.

**Main latents.** Per letter, the SAE's latents are ranked by their mean activation on train
words starting with L minus that on the other train words; a logistic probe is fitted on the
top k latents for k = 1, 2, ... ``max_main_latents``, and k grows while each step raises
its train F1 by at least ``f1_jump`` (SAEBench's feature-splitting rule). Those k latents
are the letter's main latents M_L.

**Absorption.** For a held-out word starting with L that the probe gets right (logit > 0: a
probe true positive), with SAE activations a_i, latent i contributes c_i = a_i (D_i . d_L)
along the probe (D_i: latent i's decoder row in raw units). The word is *absorbed* when

1. no main latent fires (a_i <= 0 for every i in M_L);
2. the latent j outside M_L with the largest c_j is aligned with the probe:
   cos(D_j, d_L) >= ``min_cosine`` (0.025, as SAEBench);
3. j carries the letter: c_j > 0 and c_j >= ``min_share`` (0.4, as SAEBench) times the sum
   of all positive contributions, sum_i max(c_i, 0).

absorption rate(L) = absorbed words / probe true positives of L (held-out words). A letter is
*covered* when its probe's held-out F1 is at least ``min_probe_f1`` (0.6, as SAEBench) and it
has at least ``min_true_positives`` probe true positives; the mean rate averages covered
letters.

**Differences from SAEBench.** (3) compares c_j with the SAE's positive contributions along
d_L, not with the raw activation's projection x . d_L: the residual stream of Gemma 3 270M
carries a large constant offset (norm ~3,100 at layer 6) that would dominate x . d_L. Main
latents are ranked by mean difference (as SAEBench's sparse-probing eval does) rather than by
an L1 probe over all latents, and F1 is measured on the train words. The paper's own
integrated-gradients ablation is not computed; partial absorption is not measured.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.analyse import model_activations
from saekit.errors import SaekitError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPELLING_EXAMPLES = (" wheat",)  # one example: ~10 tokens a word on a shared 2-core CPU
WORD_MARKERS = ("\u2581", "\u0120", " ")  # SentencePiece, byte-level BPE, plain space


class AbsorptionError(SaekitError, ValueError):
    """Spelling data or an SAE the absorption measurement cannot use."""


@dataclass
class SpellingData:
    """Single-token words and their activations at one hook."""

    hook: str
    words: list[str]  # n words, without the leading space
    letters: Tensor  # [n] index of the first letter in LETTERS
    activations: Tensor  # [n, d_model] at ``hook``, at the word's position
    test: Tensor  # [n] bool: held-out words

    def __post_init__(self) -> None:
        n = len(self.words)
        if self.activations.ndim != 2 or len(self.activations) != n or len(self.letters) != n \
                or len(self.test) != n:
            raise AbsorptionError(f"Spelling data of {n} words needs letters [{n}], test [{n}] and "
                                  f"activations [{n}, d_model]; got {tuple(self.letters.shape)}, "
                                  f"{tuple(self.test.shape)}, {tuple(self.activations.shape)}.")
        if bool(self.test.all()) or not bool(self.test.any()):
            raise AbsorptionError("Spelling data needs both train and held-out words.")


@dataclass
class LetterProbes:
    """One linear probe per letter in raw activation space: logit = x . weight + bias."""

    weight: Tensor  # [26, d_model]
    bias: Tensor  # [26]

    def logits(self, x: Tensor) -> Tensor:
        """Logits [n, 26] of activations ``x`` [n, d_model]."""
        return x.float() @ self.weight.T + self.bias

    def directions(self) -> Tensor:
        """Unit probe directions [26, d_model]."""
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class LetterAbsorption:
    """Absorption of one letter on the held-out words."""

    letter: str
    probe_f1: float  # held-out F1 of the letter's probe
    true_positives: int  # held-out words starting with the letter that the probe gets right
    main_latents: list[int]
    main_f1: float  # train F1 of the k-sparse probe on the main latents
    main_silent: int  # true positives on which no main latent fires
    absorbed: int  # true positives absorbed (see the module docstring)
    absorbing_latents: dict[int, int] = field(default_factory=dict)  # latent -> words absorbed
    covered: bool = False

    @property
    def absorption_rate(self) -> float:
        return self.absorbed / self.true_positives if self.true_positives else math.nan


@dataclass
class AbsorptionResult:
    """Per-letter absorption of one SAE."""

    letters: list[LetterAbsorption]

    @property
    def covered(self) -> list[LetterAbsorption]:
        return [letter for letter in self.letters if letter.covered]

    @property
    def mean_absorption_rate(self) -> float:
        """Mean absorption rate over covered letters (NaN if none is covered)."""
        rates = [letter.absorption_rate for letter in self.covered]
        return sum(rates) / len(rates) if rates else math.nan

    def summary(self) -> dict:
        return {"mean_absorption_rate": self.mean_absorption_rate,
                "letters_covered": len(self.covered),
                "letters": [{**vars(letter), "absorption_rate": letter.absorption_rate}
                            for letter in self.letters]}


def word_tokens(tokenizer, min_letters: int = 2) -> tuple[list[str], list[int]]:
    """Vocabulary tokens that decode to a space and ``min_letters``+ letters a-z:
    ``(words without the space, token ids)``, ordered by id."""
    words, ids = [], []
    for piece, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        body = piece[1:]
        if piece[:1] not in WORD_MARKERS or len(body) < min_letters or not body.isascii() \
                or not body.isalpha() or not body.islower():
            continue
        if tokenizer.decode([token_id]) == " " + body:
            words.append(body)
            ids.append(token_id)
    return words, ids


def spelling_prompt(examples: Sequence[str] = SPELLING_EXAMPLES) -> str:
    """The few-shot prefix read before every word: ``" wheat has the first letter: W\\n..."``."""
    return "".join(f"{word} has the first letter: {word.strip()[0].upper()}\n"
                   for word in examples)


@torch.no_grad()
def spelling_activations(model, hook: str, token_ids: Sequence[int],
                         examples: Sequence[str] = SPELLING_EXAMPLES,
                         batch_rows: int = 64) -> Tensor:
    """Activations [n, d_model] at ``hook`` of each token in ``token_ids``, read at its
    position after BOS and ``spelling_prompt(examples)``."""
    prefix = model.to_tokens(spelling_prompt(examples))[0].cpu()
    words = torch.tensor(list(token_ids), dtype=prefix.dtype)
    out = []
    for start in range(0, len(words), batch_rows):
        chunk = words[start:start + batch_rows, None]
        rows = torch.cat([prefix.expand(len(chunk), -1), chunk], dim=1)
        out.append(model_activations(model, hook, rows)[:, -1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.cfg.d_model)


def spelling_data(model, hook: str, max_words: int = 5000, test_fraction: float = 0.3,
                  seed: int = 0, examples: Sequence[str] = SPELLING_EXAMPLES,
                  batch_rows: int = 64) -> SpellingData:
    """Draw ``max_words`` words of ``model``'s vocabulary (not the prompt's examples), read
    their activations at ``hook`` and split off ``test_fraction`` of them as held-out."""
    if not 0 < test_fraction < 1:
        raise AbsorptionError(f"test_fraction must be between 0 and 1, got {test_fraction}.")
    words, ids = word_tokens(model.tokenizer)
    taken = {word.strip() for word in examples}
    pairs = [(word, token_id) for word, token_id in zip(words, ids) if word not in taken]
    if len(pairs) < 2:
        raise AbsorptionError(f"{model.cfg.model_name}'s vocabulary has {len(pairs)} "
                              "single-token lowercase words; the spelling task needs more.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=generator)[:max_words].tolist()
    chosen = [pairs[i] for i in order]
    n_test = min(len(chosen) - 1, max(1, round(test_fraction * len(chosen))))
    test = torch.zeros(len(chosen), dtype=torch.bool)
    test[torch.randperm(len(chosen), generator=generator)[:n_test]] = True
    return SpellingData(hook, [word for word, _ in chosen],
                        torch.tensor([LETTERS.index(word[0]) for word, _ in chosen]),
                        spelling_activations(model, hook, [i for _, i in chosen], examples,
                                             batch_rows), test)


def fit_logistic(x: Tensor, y: Tensor, l2: float = 1e-2, max_iter: int = 300
                 ) -> tuple[Tensor, Tensor]:
    """Class-balanced L2-penalised logistic regressions, one per row of ``y`` [b, n] (bool),
    on inputs ``x`` [n, d] shared by all or [b, n, d] one each. Inputs are standardised for
    the fit; the returned ``(weight [b, d], bias [b])`` act on raw inputs."""
    x = x.double()
    mean, std = x.mean(-2, keepdim=True), x.std(-2, keepdim=True).clamp_min(1e-6)
    z = (x - mean) / std
    equation = "nd,bd->bn" if x.ndim == 2 else "bnd,bd->bn"
    n = y.shape[1]
    target = y.double()
    positives = target.sum(1, keepdim=True).clamp(1, n - 1)
    balance = torch.where(y, n / (2 * positives), n / (2 * (n - positives)))
    w = torch.zeros(len(y), x.shape[-1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(y), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        logits = torch.einsum(equation, z, w) + b[:, None]
        value = (F.binary_cross_entropy_with_logits(logits, target, weight=balance,
                                                    reduction="none").mean(1)
                 + l2 * w.pow(2).sum(1)).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    weight = w.detach() / std.squeeze(-2)
    bias = b.detach() - (mean.squeeze(-2) * weight).sum(-1)
    return weight.float(), bias.float()


def f1_scores(predicted: Tensor, actual: Tensor) -> Tensor:
    """F1 [b] of boolean predictions against labels, both [b, n] (0 where nothing is positive)."""
    hits = (predicted & actual).sum(1).float()
    return 2 * hits / (predicted.sum(1) + actual.sum(1)).clamp_min(1).float()


def letter_labels(letters: Tensor) -> Tensor:
    """[26, n] bool: word n starts with letter l."""
    return F.one_hot(letters, len(LETTERS)).T.bool()


def fit_letter_probes(data: SpellingData, l2: float = 1e-2) -> LetterProbes:
    """One probe per letter, fitted on ``data``'s train words."""
    train = ~data.test
    weight, bias = fit_logistic(data.activations[train], letter_labels(data.letters[train]), l2)
    return LetterProbes(weight, bias)


def main_latents(acts: Tensor, letters: Tensor, max_latents: int = 10, f1_jump: float = 0.03,
                 l2: float = 1e-2) -> tuple[list[list[int]], list[float]]:
    """Each letter's main latents and their k-sparse probe's F1 (see the module docstring),
    from train words' SAE activations ``acts`` [n, d_sae] and first letters ``letters`` [n]."""
    labels = letter_labels(letters)
    positives = labels.sum(1, keepdim=True).clamp_min(1)
    negatives = (~labels).sum(1, keepdim=True).clamp_min(1)
    mean_difference = (labels.float() @ acts) / positives - ((~labels).float() @ acts) / negatives
    ranked = mean_difference.topk(min(max_latents, acts.shape[1]), dim=1).indices  # [26, K]
    chosen: list[list[int]] = [[] for _ in LETTERS]
    best = torch.full((len(LETTERS),), -math.inf)
    growing = labels.any(1)
    for k in range(1, ranked.shape[1] + 1):
        x = acts.T[ranked[:, :k]].transpose(1, 2)  # [26, n, k]
        weight, bias = fit_logistic(x, labels, l2)
        f1 = f1_scores(torch.einsum("bnk,bk->bn", x, weight) + bias[:, None] > 0, labels)
        growing &= f1 >= best + f1_jump
        for letter in growing.nonzero().flatten().tolist():
            chosen[letter], best[letter] = ranked[letter, :k].tolist(), f1[letter]
    chosen = [[i for i in latents if mean_difference[letter, i] > 0]
              for letter, latents in enumerate(chosen)]
    return chosen, [float(f) if math.isfinite(f) else math.nan for f in best.tolist()]


def absorbing_latent(acts: Tensor, along_probe: Tensor, cosine: Tensor, main: Sequence[int],
                     min_cosine: float = 0.025, min_share: float = 0.4) -> Tensor:
    """For words' SAE activations ``acts`` [n, d_sae], given each latent's decoder projection
    on the unit probe direction ``along_probe`` [d_sae] and cosine with it ``cosine``
    [d_sae]: the latent that absorbs each word, or -1 where the word is not absorbed [n]."""
    contributions = acts.float() * along_probe
    main = torch.as_tensor(list(main), dtype=torch.long)
    silent = (acts[:, main] <= 0).all(1)
    others = contributions.index_fill(1, main, -math.inf)
    top_value, top = others.max(1)
    total = contributions.clamp_min(0).sum(1)
    absorbed = silent & (cosine[top] >= min_cosine) & (top_value > 0) \
        & (top_value >= min_share * total)
    return torch.where(absorbed, top, -1)


@torch.no_grad()
def sae_activations(sae, x: Tensor, batch_rows: int = 4096) -> Tensor:
    """SAE activations [n, d_sae] of raw activations ``x`` [n, d_in], on the CPU."""
    device = sae.W_dec.device
    return torch.cat([sae.encode(x[i:i + batch_rows].to(device)).float().cpu()
                      for i in range(0, len(x), batch_rows)])


def measure_absorption(sae, data: SpellingData, probes: LetterProbes | None = None,
                       max_main_latents: int = 10, f1_jump: float = 0.03,
                       min_cosine: float = 0.025, min_share: float = 0.4,
                       min_probe_f1: float = 0.6, min_true_positives: int = 10
                       ) -> AbsorptionResult:
    """Per-letter absorption rate of ``sae`` on ``data``'s held-out words, with ``probes``
    (default: fitted on ``data``'s train words). See the module docstring."""
    if sae.d_in != data.activations.shape[1]:
        raise AbsorptionError(f"The SAE reads {sae.d_in}-dimensional activations; the spelling "
                              f"data holds {data.activations.shape[1]}-dimensional ones.")
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if hook and hook != data.hook:
        raise AbsorptionError(f"The SAE was trained on {hook}; the spelling data was read at "
                              f"{data.hook}.")
    probes = probes or fit_letter_probes(data)
    acts = sae_activations(sae, data.activations)
    decoder = sae.W_dec.detach().float().cpu() / sae.cfg.activation_scale  # raw-unit rows
    along = probes.directions() @ decoder.T  # [26, d_sae]
    cosine = along / decoder.norm(dim=1).clamp_min(1e-12)
    train, test = ~data.test, data.test
    main, main_f1 = main_latents(acts[train], data.letters[train], max_main_latents, f1_jump)
    actual = letter_labels(data.letters[test])
    predicted = (probes.logits(data.activations[test]) > 0).T
    probe_f1 = f1_scores(predicted, actual)
    letters = []
    for index, letter in enumerate(LETTERS):
        hits = (actual[index] & predicted[index]).nonzero().flatten()
        word_acts = acts[test][hits]
        silent = (word_acts[:, main[index]] <= 0).all(1)
        absorber = absorbing_latent(word_acts, along[index], cosine[index], main[index],
                                    min_cosine, min_share)
        absorbed = absorber[absorber >= 0].tolist()
        letters.append(LetterAbsorption(
            letter, float(probe_f1[index]), len(hits), main[index], main_f1[index],
            int(silent.sum()), len(absorbed), dict(Counter(absorbed).most_common()),
            bool(probe_f1[index] >= min_probe_f1 and len(hits) >= min_true_positives
                 and main[index])))
    return AbsorptionResult(letters)
