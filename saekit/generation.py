"""Generate text under steering: a seeded, batched KV-cache sampler (``sample_tokens``),
``generate`` for one prompt, and ``saekit steer`` (one feature clamped, on the command line)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.formats import SAE_HELP
from saekit.sae import SAE
from saekit.steer import POSITIONS, Intervention, Positions, SteeringError, steer


@dataclass
class GenerationConfig:
    """Sampling and placement settings shared by ``saekit steer`` and ``saekit steer-eval``."""

    max_new_tokens: int = setting(30, "tokens to generate", ge=1)
    temperature: float = setting(0.7, "sampling temperature (0: greedy)", ge=0)
    seed: int = setting(0, "sampling seed")
    positions: str = setting("all", "where edits apply: every position, or generated tokens "
                             "only", choices=POSITIONS)
    device: str | None = setting(None, DEVICE_HELP)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class SteerConfig(GenerationConfig):
    """What ``saekit steer`` generates: text with one SAE feature clamped."""

    sae: str = setting("", SAE_HELP, required=True)
    feature: int = setting(None, "latent index", required=True, ge=0)
    value: float = setting(None, "clamp value, in the SAE's activation units", required=True)
    prompt: str = setting("", "the text to continue", required=True)
    compare: bool = setting(False, "also generate the unsteered text")


def model_device(model) -> torch.device:
    """The device ``model`` runs on."""
    device = getattr(model.cfg, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def sample_next(logits: Tensor, temperature: float, generator: torch.Generator,
                noise_period: int | None = None) -> Tensor:
    """One token per row of ``logits`` [batch, d_vocab]: greedy at temperature 0, else drawn
    from softmax(logits / temperature) by inverting its CDF with one uniform per row (exact,
    and far cheaper over a 262k vocabulary than ``torch.multinomial``)."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = (logits.float() / temperature).softmax(-1).cumsum(-1)
    period = noise_period or len(cdf)
    uniform = torch.rand(period, 1, generator=generator, device=cdf.device)
    uniform = uniform.repeat(-(-len(cdf) // period), 1)[:len(cdf)] * cdf[:, -1:]
    return torch.searchsorted(cdf, uniform, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


@torch.no_grad()
def sample_tokens(model, prompts: Tensor | Sequence[str], interventions: Sequence[Any] = (),
                  max_new_tokens: int = 30, temperature: float = 0.7, seed: int = 0,
                  positions: Positions = "all", noise_period: int | None = None) -> Tensor:
    """New tokens [batch, <= max_new_tokens] sampled after ``prompts``, steered.

    ``prompts``: token ids [batch, prompt], or texts, which are generated as one batch, left-
    padded (BOS first) with an attention mask. Decoding is incremental over the model's KV
    cache; sampling is seeded by its own generator (the global RNG is not touched);
    ``temperature`` 0 is greedy. Rows that stop early are padded with EOS. With
    ``noise_period`` n, row i draws the random numbers of row i % n, so blocks of n rows
    (settings generated together, see ``OnRows``) differ only by their steering.
    """
    return torch.stack(list(iter_sampled_tokens(model, prompts, interventions, max_new_tokens,
                                                temperature, seed, positions, noise_period)),
                       dim=1)


@torch.no_grad()  # torch's decorator keeps grad off each time a generator resumes
def iter_sampled_tokens(model, prompts: Tensor | Sequence[str], interventions: Sequence[Any] = (),
                        max_new_tokens: int = 30, temperature: float = 0.7, seed: int = 0,
                        positions: Positions = "all", noise_period: int | None = None
                        ) -> Iterator[Tensor]:
    """``sample_tokens`` one step at a time: yields each step's tokens [batch] as they are
    sampled (steered while the iterator runs; closing it early removes the hooks)."""
    from transformer_lens.utilities import get_attention_mask

    if not temperature >= 0 or not math.isfinite(temperature):
        raise SteeringError(f"temperature must be a finite number >= 0, got {temperature}.")
    if max_new_tokens < 1:
        raise SteeringError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    device = model_device(model)
    if isinstance(prompts, Tensor):
        tokens = prompts.to(device)
        mask = torch.ones_like(tokens)
    else:
        tokens = model.to_tokens(list(prompts), padding_side="left").to(device)
        mask = get_attention_mask(model.tokenizer, tokens, prepend_bos=True,
                                  padding_side="left").to(device).long()
    stop = torch.tensor(sorted(stop_token_ids(model)), device=device, dtype=torch.long)
    fill = int(stop[0]) if len(stop) else 0
    generator = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(len(tokens), dtype=torch.bool, device=device)
    with steer(model, *interventions, positions=positions):
        # only the last position's logits are sampled from: the prompt's 262k-wide rows cost
        # as much as a third of the generation
        logits, cache = model(tokens, return_type="logits_and_cache", attention_mask=mask,
                              use_cache=True, logits_to_keep=1)
        for step in range(max_new_tokens):
            if not bool(torch.isfinite(logits[:, -1]).all()):
                raise SteeringError(
                    "The steered model's logits are not finite (NaN or inf): the edit is too "
                    f"large for {logits.dtype} ({_describe(interventions)}). Use smaller values.")
            token = sample_next(logits[:, -1], temperature, generator, noise_period)
            token = torch.where(done, torch.full_like(token, fill), token)
            yield token
            done |= torch.isin(token, stop)
            if step == max_new_tokens - 1 or bool(done.all()):
                return
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = model(token[:, None], return_type="logits_and_cache",
                                  attention_mask=mask, past_key_values=cache)


def _describe(interventions: Sequence[Any]) -> str:
    parts = []
    for item in interventions:
        item = getattr(item, "intervention", item)  # OnRows: one setting of a sweep
        for what in ("clamp", "add"):
            values = getattr(item, what, None)
            if values:
                parts.append(f"{what} " + ", ".join(f"{f}={v:g}" for f, v in values.items()))
    return "; ".join(parts) or "no feature edits"


def stop_token_ids(model) -> set[int]:
    """The token ids generation stops at (and pads finished rows with)."""
    ids = getattr(model.cfg, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    eos = getattr(getattr(model, "tokenizer", None), "eos_token_id", None)
    return set(ids) | ({eos} if eos is not None else set())


def generate(model, prompt: str, sae: SAE | None = None,
             clamp: Mapping[int, float] | None = None, add: Mapping[int, float] | None = None,
             ablate: Sequence[int] | None = None, max_new_tokens: int = 30,
             temperature: float = 0.7, seed: int = 0, positions: Positions = "all",
             hook: str | None = None) -> str:
    """The continuation of ``prompt`` (text only, without the prompt), steered through ``sae``.

    Seeded sampling: the same seed gives the same text; ``temperature`` 0 is greedy.
    """
    if sae is None and any(v for v in (clamp, add, ablate, hook)):
        raise SteeringError("clamp, add, ablate and hook need an sae.")
    if not isinstance(prompt, str) or not prompt:
        raise SteeringError(f"generate takes the prompt as a non-empty string, got {prompt!r}.")
    plan = [] if sae is None else [Intervention(sae, clamp or {}, add or {}, ablate or (), hook)]
    tokens = model.to_tokens(prompt)
    new = sample_tokens(model, tokens, plan, max_new_tokens, temperature, seed, positions)
    return model.tokenizer.decode(new[0].tolist(), skip_special_tokens=True)


# --- command line ----------------------------------------------------------------------------

def load_sae_and_model(sae_dir: str, device: str | None = None):
    """``(sae, model)``: the SAE at ``sae_dir`` (any layout ``load_foreign_sae`` reads) and the
    model its metadata names, on one device."""
    from saekit.formats import load_foreign_sae
    from saekit.model import DEFAULT_MODEL, default_device, load_model

    device = default_device(device)
    sae = load_foreign_sae(sae_dir, device=device)
    model = load_model(sae.cfg.metadata.model_name or DEFAULT_MODEL, device=device)
    return sae, model
