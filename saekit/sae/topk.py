"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093).

``acts = TopK(ReLU((x - b_dec) @ W_enc + b_enc))``: each sample keeps its k largest latents.
Init: unit-norm decoder rows in random directions, ``W_enc = W_dec^T``; rows are kept at unit
norm (parallel gradient removed, rows renormalised after each step). ``init_from_data`` puts
b_dec at the geometric median, as the paper does for its pre-bias.

Loss (the paper's section 2.4 and appendix A.2, normalised as in its reference train.py):
``fvu + aux_coefficient * auxk`` with ``fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` and
``auxk = sum ||e - e_hat||^2 / sum ||e - mean(e)||^2``, where ``e = x - x_hat`` (detached) and
``e_hat = W_dec^T z_aux`` (no bias) is decoded from the ``aux_k`` largest ReLU'd pre-activations
among dead latents (aux_k defaults to d_in // 2, alpha to 1/32; zero when none are dead).
Chosen entries <= 0 are left out of the decode: they are zero after the ReLU and get no
gradient, so they change neither the loss nor its gradient.

Training never forms a dense [batch, d_sae] gradient: see ``saekit.sae.kernels``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dataclasses import dataclass

from saekit.config import check_fields, setting
from saekit.errors import SAEConfigError
from saekit.sae.base import SAE, SAEConfig, TrainStep
from saekit.sae.kernels import (BatchSum, batch_mean, encoder_preacts, fired_latents,
                                gather_preacts, positive_masked_topk, reconstruction_losses,
                                row_topk, sparse_decode, total_variance, workspace)


@dataclass
class TopKConfig:
    """Settings of a TopK SAE."""

    k: int | None = setting(32, "active latents per sample (batchtopk: on average)", ge=1)
    aux_k: int | None = setting(None, "dead latents the AuxK loss decodes from (default: "
                                "d_in // 2)", ge=1)
    aux_coefficient: float = setting(1 / 32, "weight of the AuxK loss on dead latents (0: off)",
                                     ge=0)

    def __post_init__(self) -> None:
        check_fields(self, SAEConfigError)


class TopKSAE(SAE):
    """k active latents per sample, AuxK loss for dead latents, sparse training kernels."""

    architecture = "topk"
    config_class = TopKConfig
    sweep_field = "k"
    saelens_architecture = "topk"
    unit_norm_decoder = True
    default_apply_b_dec_to_input = True
    saelens_extra_fields = {"rescale_acts_by_decoder_norm": False}

    def check_config(self, cfg: SAEConfig) -> None:
        k, aux_k = cfg.options.k, cfg.options.aux_k
        if k is None or not 1 <= k < cfg.d_sae:
            raise SAEConfigError(f"{cfg.architecture} needs an integer k with 1 <= k < d_sae = "
                                 f"{cfg.d_sae}, got k = {k!r}.")
        if aux_k is not None and not 1 <= aux_k <= cfg.d_sae:
            raise SAEConfigError(f"aux_k must be between 1 and d_sae = {cfg.d_sae}, got {aux_k}.")

    @property
    def aux_k(self) -> int:
        return self.cfg.options.aux_k or max(1, self.d_in // 2)

    def _encode(self, x: Tensor) -> Tensor:
        pre = self._centred(x) @ self.W_enc + self.b_enc
        values, indices = pre.topk(self.cfg.options.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def _select(self, pre: Tensor, batch_sum: BatchSum) -> tuple[Tensor, Tensor]:
        """Training-time active coordinates ``(rows, cols)``, row-sorted."""
        return row_topk(pre, self.cfg.options.k)

    def _observe(self, vals: Tensor, batch_sum: BatchSum) -> None:
        """Hook on the active values [nnz] of each training batch."""

    def _training_step(self, x: Tensor, target: Tensor, dead_mask: Tensor | None,
                       progress: float, batch_sum: BatchSum) -> TrainStep:
        batch = x.shape[0]
        b_dec_in = self._b_dec_in()
        # only this step reads pre, so one buffer can serve every step (while training)
        pre = encoder_preacts(x, b_dec_in, self.W_enc, self.b_enc,
                              out=workspace("preacts", (batch, self.d_sae), x))
        rows, cols = self._select(pre, batch_sum)
        aux_rows, aux_cols, any_dead = self._aux_positions(pre, dead_mask)
        vals = gather_preacts(pre, x, b_dec_in, self.W_enc, self.b_enc,
                              torch.cat([rows, aux_rows]), torch.cat([cols, aux_cols])).relu()
        vals, aux_vals = vals.split([rows.numel(), aux_rows.numel()])
        self._observe(vals.detach(), batch_sum)
        x_hat, losses, objective = self._reconstruct(x, target, rows, cols, vals, batch_sum)
        losses["auxk"] = self._auxk_loss((target - x_hat).detach(), aux_rows, aux_cols, aux_vals,
                                         any_dead, batch_sum)
        active_per_sample = x.new_zeros(batch).index_add_(0, rows, (vals > 0).to(x.dtype))
        losses["l0"] = batch_mean(active_per_sample, batch_sum)
        losses["loss"] = objective + self.cfg.options.aux_coefficient * losses["auxk"]
        return TrainStep(x_hat=x_hat, losses=losses, fired=fired_latents(cols, vals, self.d_sae),
                         l0=losses["l0"].detach())

    def _reconstruct(self, x: Tensor, target: Tensor, rows: Tensor, cols: Tensor, vals: Tensor,
                     batch_sum: BatchSum) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(x_hat, losses, reconstruction objective)``: ``target`` reconstructed from the
        active entries of input ``x``; TopK's objective is the FVU."""
        x_hat = sparse_decode(self.W_dec, rows, cols, vals, x.shape[0]) + self.output_bias(x)
        losses = reconstruction_losses(target, x_hat, batch_sum)
        return x_hat, losses, losses["fvu"]

    def _aux_positions(self, pre: Tensor, dead_mask: Tensor | None
                       ) -> tuple[Tensor, Tensor, bool]:
        """AuxK's entries ``(rows, cols)`` and whether any latent is dead."""
        empty = torch.empty(0, dtype=torch.long, device=pre.device)
        if dead_mask is None:
            return empty, empty, False
        # the selection's sizes depend on the data: this is its one read of the dead set
        dead = dead_mask.to(pre.device).nonzero().squeeze(1)
        if not dead.numel():
            return empty, empty, False
        return *positive_masked_topk(pre, dead, self.aux_k), True

    def _auxk_loss(self, error: Tensor, rows: Tensor, cols: Tensor, vals: Tensor,
                   any_dead: bool, batch_sum: BatchSum) -> Tensor:
        # Decided on the dead mask, which is global, never on this rank's entries (which may be
        # none while another rank has some): every rank must make the same batch_sum calls.
        if not any_dead:
            return error.new_zeros(())
        error_hat = sparse_decode(self.W_dec, rows, cols, vals, error.shape[0])
        squared_error = batch_sum((error - error_hat).pow(2).sum())
        return (squared_error / total_variance(error, batch_sum)).nan_to_num(0.0)
