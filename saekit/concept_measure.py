"""Forward-pass measurements behind ``saekit.concept``'s search: decoder directions, the
residual stream's scale, the output gradient of a concept's tokens, the screen of candidate
directions, and activations over text windows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saekit.analyse import model_activations
from saekit.concept_texts import ConceptError
from saekit.steer import SteeringVector, steer


@torch.no_grad()
def decoder_directions(sae) -> Tensor:
    """What one unit of each latent adds to the raw activation: ``[d_sae, d_in]`` float32
    (``decode(e_i) - decode(0)``, so any input scaling of the SAE is accounted for)."""
    zero = sae.decode(torch.zeros(1, sae.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype))
    out = []
    for start in range(0, sae.d_sae, 4096):
        eye = torch.eye(sae.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype)[start:start + 4096]
        out.append((sae.decode(eye) - zero).float().cpu())
    return torch.cat(out)


def residual_scale(reference: Tensor) -> float:
    """Mean norm of ``reference`` [tokens, d_model] after subtracting its mean."""
    reference = reference.float()
    return float((reference - reference.mean(0)).norm(dim=-1).mean())


def prompt_batch(model, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """``(tokens [n, T], mask [n, T])``: prompts with BOS, right-padded (a causal model's real
    positions never see the padding); ``mask`` marks real non-BOS positions."""
    rows = [model.to_tokens(p)[0] for p in prompts]
    width = max(len(r) for r in rows)
    pad = rows[0][0].item()
    tokens = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        mask[i, 1:len(row)] = True
    return tokens, mask


def concept_log_mass(logits: Tensor, token_ids: Sequence[int]) -> Tensor:
    """log of the next-token probability of any of ``token_ids``: ``[...]`` from logits
    ``[..., d_vocab]``."""
    logprobs = logits.float().log_softmax(-1)
    return logprobs[..., list(token_ids)].logsumexp(-1)


def output_gradient(model, hook: str, tokens: Tensor, mask: Tensor,
                    token_ids: Sequence[int]) -> Tensor:
    """Gradient ``[d_model]`` of the mean (over ``mask``ed positions) log-probability of
    ``token_ids`` with respect to a vector added at ``hook`` on those positions."""
    device = next(model.parameters()).device
    delta = torch.zeros(model.cfg.d_model, device=device, requires_grad=True)
    where = mask.to(device)[..., None]

    def add_delta(act: Tensor, hook) -> Tensor:
        return act + where.to(act.dtype) * delta.to(act.dtype)

    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook, add_delta)]):
        logits = model(tokens.to(device), return_type="logits")
        objective = concept_log_mass(logits, token_ids)[mask.to(device)].mean()
        (gradient,) = torch.autograd.grad(objective, delta)
    return gradient.detach().float().cpu()


@torch.no_grad()
def screen_directions(model, hook: str, directions: Tensor, norms: Sequence[float],
                      tokens: Tensor, mask: Tensor, token_ids: Sequence[int]
                      ) -> tuple[Tensor, Tensor]:
    """Each unit direction ``[n, d_model]`` added with each norm at every non-BOS position:
    ``(lift [n, len(norms)], kl [n, len(norms)])``, the mean change in log p(concept tokens)
    and the mean KL(unsteered || steered) over the real positions."""
    device = next(model.parameters()).device
    tokens, mask = tokens.to(device), mask.to(device)
    base = model(tokens, return_type="logits").float().log_softmax(-1)[mask]
    base_mass = base[:, list(token_ids)].logsumexp(-1)
    lift = torch.zeros(len(directions), len(norms))
    kl = torch.zeros(len(directions), len(norms))
    for i, direction in enumerate(directions):
        for j, norm in enumerate(norms):
            with steer(model, SteeringVector(direction * norm, hook)):
                logprobs = model(tokens, return_type="logits").float().log_softmax(-1)[mask]
            lift[i, j] = (logprobs[:, list(token_ids)].logsumexp(-1) - base_mass).mean()
            kl[i, j] = (base.exp() * (base - logprobs)).sum(-1).clamp_min(0).mean()
    return lift, kl


@torch.inference_mode()
def window_activation(model, hook: str, window: Tensor) -> Tensor:
    """Activations at ``hook`` of one token window ``[len]``, read after BOS (BOS dropped):
    ``[len, d_model]`` float32 on the CPU."""
    bos = torch.tensor([model.tokenizer.bos_token_id])
    ids = torch.cat([bos, window.cpu()])[None].to(next(model.parameters()).device)
    return model_activations(model, hook, ids)[0, 1:].float().cpu()


def window_activations(model, hook: str, windows: Sequence[Tensor]) -> Tensor:
    """Activations at ``hook`` of each token window (``window_activation``), concatenated:
    ``[tokens, d_model]``."""
    out = [window_activation(model, hook, window) for window in windows]
    if not out:
        raise ConceptError("No concept texts to read activations from.")
    return torch.cat(out)


