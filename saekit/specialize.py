"""Specialise a general SAE to one concept, for concepts too rare in the corpus to have a feature
(Muhamed et al. 2024, "Decoding Dark Matter: Specialized Sparse Autoencoders", arXiv 2411.00743).

The concept's data is every text the caller has for it: corpus windows around its keywords,
the user's texts, and, for a concept the corpus barely mentions, the model's own continuations
of short prompts that name it (``concept_generations``: what the model knows about it, which is
what a steering feature has to call up). The general SAE, put back into normalised units,
continues training on batches that mix activations of those texts (``concept_fraction`` of each
batch) with ordinary corpus activations, so it keeps the features it has while some of its
latents turn to the concept. Held-out slices of both are measured before and after (FVU), so
the price paid on ordinary text is on record. The paper also tilts the loss towards rare
tokens (TERM); here the mixing fraction does that job.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.concept_texts import ConceptError
from saekit.config import check_fields, setting
from saekit.sae import SAE

# (the bare name is not one: after it alone the base model often emits image tokens)
PROMPT_TEMPLATES = ("{Name} is", "Tell me about {name}.", "The history of {name}",
                    "A visit to {name}", "Facts about {name}:", "{Name} was", "I saw {name}",
                    "Everything about {name}:")


@dataclass
class SpecializeConfig:
    """How ``saekit concept --specialize`` fine-tunes the SAE on the concept's texts."""

    specialize_steps: int = setting(300, "fine-tuning steps", ge=1)
    specialize_batch: int = setting(1024, "activations per fine-tuning step", ge=2)
    specialize_lr: float = setting(1e-4, "Adam learning rate, in normalised units", gt=0)
    concept_fraction: float = setting(0.25, "share of each batch from the concept's texts",
                                      gt=0, lt=1)
    generations: int = setting(48, "model continuations of prompts naming the concept "
                               "(0: none)", ge=0)
    generation_tokens: int = setting(48, "tokens per continuation", ge=1)

    def __post_init__(self) -> None:
        check_fields(self, ConceptError)


def concept_generations(model, name: str, n: int, max_new_tokens: int,
                        seed: int = 0) -> list[str]:
    """``n`` texts: a prompt naming the concept (``PROMPT_TEMPLATES`` in turn) and the
    unsteered model's sampled continuation of it (temperature 1)."""
    from saekit.generation import sample_tokens, stop_token_ids
    from saekit.steer_eval import continuation_lengths

    if n < 1:
        return []
    forms = {"name": name, "Name": name[:1].upper() + name[1:]}
    prompts = [PROMPT_TEMPLATES[i % len(PROMPT_TEMPLATES)].format(**forms) for i in range(n)]
    new = sample_tokens(model, prompts, [], max_new_tokens, temperature=1.0, seed=seed)
    lengths = continuation_lengths(new, stop_token_ids(model))
    return [prompt + model.tokenizer.decode(row[:length].tolist(), skip_special_tokens=True)
            for prompt, row, length in zip(prompts, new, lengths)]


def fvu(sae: SAE, x: Tensor) -> float:
    """Fraction of variance unexplained of ``x`` [n, d_in] by ``sae``."""
    from saekit.evaluate import reconstruction_metrics

    return reconstruction_metrics(sae, [x])["fvu"]


@torch.no_grad()
def unfold_activation_scale(sae: SAE, sample: Tensor) -> None:
    """Undo ``fold_activation_scale`` (to train further) without changing any output: the SAE
    takes activations times a scale s again. For architectures that keep decoder rows at unit
    norm in training, s = 1 / (mean decoder row norm), the scale it was trained at (rows are
    1/s after folding); otherwise s makes E||x * s||^2 = d_in over ``sample`` [n, d_in]."""
    if sae.cfg.normalize_activations != "none" or sae.cfg.activation_scale != 1.0:
        return  # already in normalised units
    if sae.unit_norm_decoder:
        scale = 1.0 / float(sae.W_dec.norm(dim=1).mean())
    else:
        scale = math.sqrt(sae.d_in / max(sample.float().pow(2).sum(-1).mean().item(), 1e-30))
    sae.W_enc.div_(scale)
    sae.W_dec.mul_(scale)
    sae.b_dec.mul_(scale)
    sae.cfg.activation_scale = scale
    sae.cfg.normalize_activations = "expected_average_only_in"


def specialize_sae(sae: SAE, concept: Tensor, general: Tensor, config: SpecializeConfig,
                   seed: int = 0, progress=None) -> tuple[SAE, dict]:
    """A copy of ``sae`` fine-tuned on batches mixing ``concept`` [n, d_in] (the concept's
    texts' activations) and ``general`` [m, d_in] (ordinary text), and a report: FVU on
    held-out tenths of both, before and after."""
    if len(concept) < 10 or len(general) < 10:
        raise ConceptError(f"Specialising needs >= 10 activations of each kind, got "
                           f"{len(concept)} concept and {len(general)} ordinary.")
    generator = torch.Generator().manual_seed(seed)
    concept = concept.float()[torch.randperm(len(concept), generator=generator)]
    general = general.float()[torch.randperm(len(general), generator=generator)]
    c_train, c_test = _split(concept)
    g_train, g_test = _split(general)
    tuned = copy.deepcopy(sae).float().train()
    report = {"fvu_concept_before": fvu(sae, c_test), "fvu_ordinary_before": fvu(sae, g_test)}
    unfold_activation_scale(tuned, g_train)
    parameters = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.specialize_lr)
    n_concept = max(1, round(config.concept_fraction * config.specialize_batch))
    n_general = config.specialize_batch - n_concept
    device = tuned.W_dec.device
    for step in range(config.specialize_steps):
        batch = torch.cat([
            c_train[torch.randint(len(c_train), (n_concept,), generator=generator)],
            g_train[torch.randint(len(g_train), (n_general,), generator=generator)]]).to(device)
        result = tuned.training_forward(batch, progress=1.0)
        optimizer.zero_grad(set_to_none=True)
        result.losses["loss"].backward()
        tuned.before_optimizer_step()
        optimizer.step()
        tuned.after_optimizer_step()
        if progress and (step + 1) % 100 == 0:
            progress(f"specialising: step {step + 1}/{config.specialize_steps}, loss "
                     f"{float(result.losses['loss'].detach()):.4g}")
    tuned.fold_activation_scale()
    tuned.eval()
    report |= {"fvu_concept_after": fvu(tuned, c_test), "fvu_ordinary_after": fvu(tuned, g_test),
               "n_concept_activations": len(concept), "n_ordinary_activations": len(general)}
    return tuned, report


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    """(first nine tenths, last tenth) of ``x``."""
    cut = len(x) - max(1, len(x) // 10)
    return x[:cut], x[cut:]


def most_changed_features(before: SAE, after: SAE, concept: Tensor, top: int = 10
                          ) -> list[dict]:
    """The latents whose mean activation on ``concept`` [n, d_in] rose most in fine-tuning."""
    with torch.no_grad():
        old = before.encode(concept.to(before.W_dec.device, before.W_dec.dtype)).float().mean(0)
        new = after.encode(concept.to(after.W_dec.device, after.W_dec.dtype)).float().mean(0)
    rise = (new - old).cpu()
    order = rise.argsort(descending=True)[:top]
    return [{"feature": int(f), "mean_before": float(old[f]), "mean_after": float(new[f])}
            for f in order]
