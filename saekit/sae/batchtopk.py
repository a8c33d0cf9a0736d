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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saekit.sae.kernels import BatchSum, batch_topk, global_nth_largest, jump_relu
from saekit.config import setting
from saekit.sae.topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    """Settings of a BatchTopK SAE: TopK's, and how fast the inference threshold follows."""

    threshold_ema_rate: float = setting(0.01, "rate of the running average that sets the "
                                        "inference threshold", gt=0, le=1)


class BatchTopKSAE(TopKSAE):
    """TopK over the whole batch while training; a learnt global threshold at inference."""

    architecture = "batchtopk"
    config_class = BatchTopKConfig
    saelens_architecture = "jumprelu"
    saelens_extra_fields = {}

    threshold: Tensor  # [d_sae] buffer, every entry theta (0 until the first training batch)

    def add_extra_parameters(self, like: dict[str, Any]) -> None:
        self.register_buffer("threshold", torch.zeros(self.d_sae, **like))

    def _encode(self, x: Tensor) -> Tensor:
        return jump_relu(self._centred(x) @ self.W_enc + self.b_enc, self.threshold)

    def _select(self, pre: Tensor, batch_sum: BatchSum) -> tuple[Tensor, Tensor]:
        return batch_topk(pre, self.cfg.options.k, batch_sum)

    @torch.no_grad()
    def _observe(self, vals: Tensor, batch_sum: BatchSum) -> None:
        # theta follows the smallest kept activation of the global batch, the same on all ranks
        kept = int(batch_sum(vals.new_tensor(vals.numel(), dtype=torch.float64)))
        if kept == 0:
            return
        smallest = global_nth_largest(vals, kept, batch_sum).to(self.threshold.dtype)
        rate = self.cfg.options.threshold_ema_rate
        # the first batch sets theta outright; afterwards it is a running average
        self.threshold.copy_(torch.where(self.threshold > 0,
                                         (1 - rate) * self.threshold + rate * smallest, smallest))
