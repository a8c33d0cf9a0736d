"""ReLU SAE with an L1 penalty, as in Anthropic's April 2024 training update.

``acts = ReLU(x @ W_enc + b_enc)`` (no b_dec subtracted from the input by default).
Loss: ``E ||x - x_hat||^2 + lambda * E sum_i acts_i * ||W_dec[i]||``. Decoder norms are
left free (the penalty weighs them in); lambda ramps up linearly over the first
``l1_warmup_fraction`` of training. Init: decoder rows in random directions with norm
``decoder_init_norm`` (0.1), ``W_enc = W_dec^T``, zero biases. SAELens calls it "standard".
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saekit.config import check_fields, setting
from saekit.errors import SAEConfigError
from saekit.sae.base import SAE, TrainStep
from saekit.sae.kernels import BatchSum, batch_mean, reconstruction_losses, warmup


@dataclass
class ReLUConfig:
    """Settings of a ReLU + L1 SAE."""

    l1_coefficient: float = setting(5.0, "weight of the L1 sparsity penalty", ge=0)
    l1_warmup_fraction: float = setting(0.05, "fraction of training over which the L1 weight "
                                        "ramps up from 0", ge=0, le=1)
    decoder_init_norm: float = setting(0.1, "norm of the initial decoder rows", gt=0)

    def __post_init__(self) -> None:
        check_fields(self, SAEConfigError)


class ReLUSAE(SAE):
    """ReLU + L1 (decoder-norm weighted) sparse autoencoder."""

    architecture = "relu"
    config_class = ReLUConfig
    sweep_field = "l1_coefficient"
    saelens_architecture = "standard"
    unit_norm_decoder = False
    default_apply_b_dec_to_input = False

    def initial_decoder_norm(self) -> float:
        return self.cfg.options.decoder_init_norm

    def _encode(self, x: Tensor) -> Tensor:
        return (self._centred(x) @ self.W_enc + self.b_enc).relu()

    def _training_step(self, x: Tensor, target: Tensor, dead_mask: Tensor | None,
                       progress: float, batch_sum: BatchSum) -> TrainStep:
        acts = self._encode(x)
        x_hat = acts @ self.W_dec + self.output_bias(x)
        losses = reconstruction_losses(target, x_hat, batch_sum)
        losses["l1"] = batch_mean((acts * self.W_dec.norm(dim=1)).sum(-1), batch_sum)
        active = acts > 0
        losses["l0"] = batch_mean(active.sum(-1).to(acts.dtype), batch_sum)
        options = self.cfg.options
        coefficient = warmup(options.l1_coefficient, options.l1_warmup_fraction, progress)
        losses["loss"] = losses["mse"] + coefficient * losses["l1"]
        return TrainStep(x_hat=x_hat, losses=losses, fired=active.any(0), l0=losses["l0"].detach())
