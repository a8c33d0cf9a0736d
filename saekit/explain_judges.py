"""How a judge model scores a label against texts (``saekit.explain`` detection and
``saekit.explain_scores`` fuzzing): two judges behind one method,
``p_yes(scorer, label, texts) -> [n]``, the judge's probability that each text fits the label.

- ``QuestionJudge`` asks a chat model a yes/no question per text and reads P(yes) / (P(yes) +
  P(no)) from its next-token probabilities (a local model or an OpenAI-compatible endpoint).
- ``LikelihoodJudge`` asks no question: P(yes) = sigmoid(log p(text | context with the label) -
  log p(text | the same context with a content-free label)), the posterior, at even prior odds,
  that the text was written under the label. The text's own likelihood cancels, so a judge that
  reacts to the texts themselves (shorter, rarer) cannot bias it. Needs the text's token
  log-probabilities: a local model.

Measured on 210 features of the shipped SAE with SmolLM2-135M-Instruct (README, "Explain
features"): labels built from the tokens a feature fires on score AUROC 0.45 (detection) and
0.52 (fuzzing) with the question judge, at chance; 0.58 and 0.61 with the likelihood judge,
against 0.51 and 0.54 for labels of other features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from saekit.explain import ExplainError, clean_text, detection_prompt
from saekit.explain_scores import fuzzing_prompt

JUDGES = ("auto", "likelihood", "question")
LIKELIHOOD_CONTEXTS = {
    "detection": "A text about {label}:\n",
    "fuzzing": "In this text, the tokens marked <<like this>> are {label}:\n",
}
CONTENT_FREE_LABEL = "something"


@dataclass
class QuestionJudge:
    """P(yes) of a yes/no question per text, from the chat model's next-token probabilities."""

    model: object  # LocalExplainer or OpenAIExplainer
    method: str = "question"

    def p_yes(self, scorer: str, label: str, texts: list[str]) -> Tensor:
        """``[len(texts)]`` P(yes) that each text fits ``label`` (``scorer``: detection or
        fuzzing, which picks the question)."""
        prompt = {"detection": detection_prompt, "fuzzing": fuzzing_prompt}[scorer]
        return self.model.yes_probability([prompt(label, text) for text in texts])


@dataclass
class LikelihoodJudge:
    """P(yes) from how much the label makes each text more likely (see the module doc)."""

    model: object  # LocalExplainer
    method: str = "likelihood"
    # log p(text | content-free context) of a call's texts, the same for every label scored on
    # them: (scorer, texts) -> [n]. Keyed by the whole list, so the values are computed in the
    # same batches as without the cache (bit for bit: a resumed run stores the same scores).
    content_free: dict[tuple[str, tuple[str, ...]], Tensor] = field(default_factory=dict,
                                                                     repr=False)

    def p_yes(self, scorer: str, label: str, texts: list[str]) -> Tensor:
        """``[len(texts)]`` sigmoid of the log-likelihood ratio of each text with and without
        ``label`` in ``scorer``'s context."""
        context = LIKELIHOOD_CONTEXTS[scorer]
        with_label = self.model.log_likelihood(
            [(context.format(label=clean_text(label)), text) for text in texts])
        key = (scorer, tuple(texts))
        if key not in self.content_free:
            if len(self.content_free) >= 64:  # the labels of a feature are scored together
                self.content_free.clear()
            self.content_free[key] = self.model.log_likelihood(
                [(context.format(label=CONTENT_FREE_LABEL), text) for text in texts])
        return torch.sigmoid(with_label - self.content_free[key])


def make_judge(model, method: str = "auto") -> QuestionJudge | LikelihoodJudge:
    """The judge ``method`` (``JUDGES``) running on ``model`` (the explainer): ``auto`` is the
    likelihood judge for a local model, the question judge for an endpoint (whose token
    log-probabilities of a given text chat-completions do not return)."""
    local = hasattr(model, "log_likelihood")
    if method == "auto":
        method = "likelihood" if local else "question"
    if method == "question":
        return QuestionJudge(model)
    if method == "likelihood":
        if not local:
            raise ExplainError("The likelihood judge reads the log-probabilities of given texts, "
                               "which an OpenAI-compatible endpoint does not return: use "
                               "--judge question with --explainer openai.")
        return LikelihoodJudge(model)
    raise ExplainError(f"Unknown judge {method!r}: give one of {', '.join(JUDGES)}.")
