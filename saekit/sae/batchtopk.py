"""BatchTopK SAE (Bussmann, Leask and Nanda 2024, arXiv 2412.06410).

Training keeps the ``k * batch`` largest ReLU'd pre-activations of the whole batch, so samples
share the budget (k active latents per sample on average). Inference cannot look at a batch,
so ``encode`` uses one threshold theta for all latents, ``acts = pre * (pre > theta)``, where
theta is the running average (rate ``threshold_ema_rate``) of the smallest activation kept in
each training batch, the paper's estimate of E[min positive activation].

Everything else (init, unit-norm decoder, AuxK, sparse kernels) is the TopK SAE's. Saved, it is
a JumpReLU SAE whose ``threshold`` is theta for every latent, which is how SAELens stores it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.sae.kernels import BatchSum, batch_topk, jump_relu
from saekit.sae.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    """TopK over the whole batch while training; a learnt global threshold at inference."""

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    saelens_extra_fields = {}

    threshold: Tensor  # [d_sae] buffer, every entry theta (0 until the first training batch)

    def add_extra_parameters(self, like: dict[str, Any]) -> None:
        self.register_buffer("threshold", torch.zeros(self.d_sae, **like))

    def _encode(self, x: Tensor) -> Tensor:
        return jump_relu(self._centred(x) @ self.W_enc + self.b_enc, self.threshold)

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return batch_topk(pre, self.cfg.k * pre.shape[0])

    @torch.no_grad()
    def _observe(self, vals: Tensor, batch_sum: BatchSum) -> None:
        # ranks average their minima (an empty slice counts for none): all keep the same theta
        seen = vals.new_tensor(float(vals.numel() > 0))
        ranks = batch_sum(seen)
        local = vals.min() if vals.numel() else vals.new_zeros(())
        smallest = (batch_sum(local * seen) / ranks.clamp_min(1)).to(self.threshold.dtype)
        rate = self.cfg.threshold_ema_rate
        # the first batch sets theta outright; afterwards it is a running average
        updated = torch.where(self.threshold > 0, (1 - rate) * self.threshold + rate * smallest,
                              smallest)
        self.threshold.copy_(torch.where(ranks > 0, updated, self.threshold))
