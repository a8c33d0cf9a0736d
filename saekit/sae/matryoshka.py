"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen and Nanda 2025, arXiv 2503.17547).

A BatchTopK SAE whose dictionary is read as nested prefixes: latents ``[0, m_1)``,
``[0, m_2)``, ..., ``[0, d_sae)``. Training reconstructs the input from each prefix alone
(the entries BatchTopK selected, restricted to that prefix) and minimises the mean of the
prefixes' FVUs, so the first latents must explain what they can on their own: general
features settle early in the dictionary and specific ones later, which the paper finds
reduces feature absorption and splitting. The full-width FVU is logged as ``fvu``.

Prefix widths grow geometrically up to the full width: ``matryoshka_prefixes`` of them,
each ``matryoshka_growth`` times the previous (16,384 latents, 4 prefixes, growth 4: 256,
1,024, 4,096, 16,384). Inference, saving and everything else are BatchTopK's: a saved
Matryoshka SAE is an ordinary SAELens ``jumprelu`` folder whose latents happen to be ordered
from general to specific.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.config import setting
from saekit.errors import SAEConfigError
from saekit.sae.base import SAEConfig
from saekit.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saekit.sae.kernels import BatchSum, reconstruction_losses, sparse_decode, total_variance


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """Settings of a Matryoshka BatchTopK SAE: BatchTopK's, and its nested prefixes."""

    matryoshka_prefixes: int = setting(4, "nested dictionary prefixes trained to reconstruct "
                                       "on their own (1: plain BatchTopK)", ge=1)
    matryoshka_growth: float = setting(4.0, "width ratio of consecutive prefixes", gt=1)


def prefix_widths(d_sae: int, prefixes: int, growth: float) -> list[int]:
    """Increasing prefix widths ending at ``d_sae``, each ~``growth`` times the previous."""
    widths = {max(1, round(d_sae / growth ** i)) for i in range(prefixes)}
    return sorted(widths)


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK with a nested-prefix reconstruction loss."""

    architecture = "matryoshka"
    config_class = MatryoshkaConfig

    def check_config(self, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        widths = prefix_widths(cfg.d_sae, cfg.options.matryoshka_prefixes,
                               cfg.options.matryoshka_growth)
        if len(widths) < cfg.options.matryoshka_prefixes:
            raise SAEConfigError(f"{cfg.options.matryoshka_prefixes} prefixes growing "
                                 f"{cfg.options.matryoshka_growth:g}x do not fit in d_sae = "
                                 f"{cfg.d_sae}: use fewer --matryoshka-prefixes.")

    @property
    def widths(self) -> list[int]:
        """The prefix widths, the last being ``d_sae``."""
        options = self.cfg.options
        return prefix_widths(self.d_sae, options.matryoshka_prefixes, options.matryoshka_growth)

    def _reconstruct(self, x: Tensor, target: Tensor, rows: Tensor, cols: Tensor, vals: Tensor,
                     batch_sum: BatchSum) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        # each prefix adds its own latents' decode to the previous prefix's reconstruction
        x_hat = self.output_bias(x).expand_as(target)
        variance = total_variance(target, batch_sum)
        start, prefix_fvus = 0, []
        for width in self.widths[:-1]:
            group = (cols >= start) & (cols < width)
            x_hat = x_hat + sparse_decode(self.W_dec, rows[group], cols[group], vals[group],
                                          x.shape[0])
            prefix_fvus.append(batch_sum((target - x_hat).pow(2).sum()) / variance)
            start = width
        group = cols >= start
        x_hat = x_hat + sparse_decode(self.W_dec, rows[group], cols[group], vals[group],
                                      x.shape[0])
        losses = reconstruction_losses(target, x_hat, batch_sum)
        prefix_fvus.append(losses["fvu"])
        objective = torch.stack(prefix_fvus).mean()
        losses["prefix_fvu"] = prefix_fvus[0]  # the smallest prefix alone
        return x_hat, losses, objective
