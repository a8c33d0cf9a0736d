"""ReLU SAE with an L1 penalty, as in Anthropic's April 2024 training update.

``acts = ReLU(x @ W_enc + b_enc)`` (no b_dec subtracted from the input by default).
Loss: ``E ||x - x_hat||^2 + lambda * E sum_i acts_i * ||W_dec[i]||``. Decoder norms are
left free (the penalty weighs them in); lambda ramps up linearly over the first
``l1_warmup_fraction`` of training. Init: decoder rows in random directions with norm
``decoder_init_norm`` (0.1), ``W_enc = W_dec^T``, zero biases. SAELens calls it "standard".
"""

from __future__ import annotations

from torch import Tensor

from saekit.sae.base import SAE, TrainStep
from saekit.sae.kernels import BatchSum, batch_mean, reconstruction_losses, warmup


class ReLUSAE(SAE):
    """ReLU + L1 (decoder-norm weighted) sparse autoencoder."""

    architecture = "relu"
    saelens_architecture = "standard"
    unit_norm_decoder = False
    default_apply_b_dec_to_input = False

    def _encode(self, x: Tensor) -> Tensor:
        return (self._centred(x) @ self.W_enc + self.b_enc).relu()

    def _training_step(self, x: Tensor, dead_mask: Tensor | None, progress: float,
                       batch_sum: BatchSum) -> TrainStep:
        acts = self._encode(x)
        x_hat = acts @ self.W_dec + self.b_dec
        losses = reconstruction_losses(x, x_hat, batch_sum)
        losses["l1"] = batch_mean((acts * self.W_dec.norm(dim=1)).sum(-1), batch_sum)
        active = acts > 0
        losses["l0"] = batch_mean(active.sum(-1).to(acts.dtype), batch_sum)
        coefficient = warmup(self.cfg.l1_coefficient, self.cfg.l1_warmup_fraction, progress)
        losses["loss"] = losses["mse"] + coefficient * losses["l1"]
        return TrainStep(x_hat=x_hat, losses=losses, fired=active.any(0), l0=losses["l0"].item())
