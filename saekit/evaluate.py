"""Evaluate SAEs: reconstruction quality and sparsity over a stream of activations."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from saekit.sae import SAE

DEAD_FREQUENCY = 1e-6
DENSE_FREQUENCY = 0.1


@torch.no_grad()
def reconstruction_metrics(sae: SAE, activations: Iterable[torch.Tensor],
                           chunk: int = 4096) -> dict:
    """FVU, MSE, cosine, L0 and firing frequencies of ``sae`` over ``activations`` ([n, d_in] each).

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all tokens (mean taken over all of
    them); explained variance = 1 - FVU. ``firing_frequency`` [d_sae] is the fraction of
    tokens each latent is non-zero on; dead: below 1e-6, dense: above 0.1.
    """
    device = sae.W_dec.device
    n = 0
    sum_x = sum_sq_x = sum_err = sum_cos = sum_l0 = None
    fires = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    for block in activations:
        for x in block.split(chunk):
            x = x.to(device, sae.W_dec.dtype)
            x_hat, acts = sae(x)
            x64, err = x.double(), (x - x_hat).double()
            parts = (x64.sum(0), x64.pow(2).sum(), err.pow(2).sum(),
                     torch.cosine_similarity(x, x_hat, dim=-1).double().sum(),
                     (acts != 0).sum().double())
            if sum_x is None:
                sum_x, sum_sq_x, sum_err, sum_cos, sum_l0 = parts
            else:
                sum_x, sum_sq_x, sum_err, sum_cos, sum_l0 = (
                    a + b for a, b in zip((sum_x, sum_sq_x, sum_err, sum_cos, sum_l0), parts))
            fires += (acts != 0).sum(0).double()
            n += len(x)
    if n == 0:
        raise ValueError("No activations to evaluate on.")
    variance = sum_sq_x - sum_x.pow(2).sum() / n
    fvu = float(sum_err / variance)
    frequency = (fires / n).float().cpu()
    return {
        "tokens": n,
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "mse": float(sum_err / n),
        "cosine": float(sum_cos / n),
        "l0": float(sum_l0 / n),
        "dead_fraction": float((frequency < DEAD_FREQUENCY).float().mean()),
        "dense_fraction": float((frequency > DENSE_FREQUENCY).float().mean()),
        "firing_frequency": frequency,
    }
