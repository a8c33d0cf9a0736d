"""The SAE interface every architecture implements, and SAELens's folder format (the config:
``saekit.sae.settings``).

All public methods take raw activations. With ``normalize_activations =
"expected_average_only_in"`` the SAE multiplies its input by
``cfg.activation_scale`` (set by ``init_from_data`` so that E||x * scale||^2 =
d_in) and divides reconstructions by it; losses and coefficients live in those
normalised units. ``fold_activation_scale`` moves the scale into the weights.

A saved SAE is a folder SAELens (v6) loads with ``SAE.load_from_disk``:
``cfg.json`` (SAELens's fields, saekit's own under the key ``"saekit"``),
``sae_weights.safetensors`` and optionally ``sparsity.safetensors``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from saekit.errors import SAEConfigError, SAEInputError
from saekit.files import sha256_file, write_json, write_safetensors
from saekit.sae.kernels import BatchSum, geometric_median
from saekit.sae.settings import ARCHITECTURES, DTYPES, SAEConfig


CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
WEIGHTS_SHA256 = "weights_sha256"  # in cfg.json, written at save and checked at load


@dataclass
class TrainStep:
    """One training forward pass: what the trainer backprops, logs and counts."""

    x_hat: Tensor  # [batch, d_in] reconstruction in raw units, detached
    losses: dict[str, Tensor]  # "loss" (to backprop) and detached terms: "mse", "fvu", "l0", ...
    fired: Tensor  # [d_sae] bool: latents active on at least one sample of the batch
    l0: Tensor  # [] mean number of active latents per sample (a tensor: reading it syncs)


class SAE(nn.Module):
    """Sparse autoencoder ``x -> acts = f(x) -> x_hat = acts @ W_dec + b_dec``.

    Parameters: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_out],
    ``b_dec`` [d_out] (d_out = d_in but for transcoders), and for skip transcoders ``W_skip``
    [d_out, d_in], adding ``x @ W_skip^T`` to the output.
    Subclasses set the class attributes below and implement ``_encode`` and ``_training_step``.
    """

    architecture: ClassVar[str]
    config_class: ClassVar[type]  # the architecture's settings, a dataclass (SAEConfig.options)
    sweep_field: ClassVar[str]  # the setting a sweep's folder names always show (e.g. k)
    saelens_architecture: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = False  # keep decoder rows at unit norm while training
    default_apply_b_dec_to_input: ClassVar[bool] = True
    saelens_extra_fields: ClassVar[dict[str, Any]] = {}  # written to cfg.json for SAELens

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "architecture" in cls.__dict__:
            ARCHITECTURES[cls.architecture] = cls

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            raise SAEConfigError(f"{type(self).__name__} needs architecture {self.architecture!r}, "
                                 f"got {cfg.architecture!r}: use load_sae or ARCHITECTURES.")
        cfg = copy.deepcopy(cfg)
        if cfg.apply_b_dec_to_input is None:
            cfg.apply_b_dec_to_input = self.default_apply_b_dec_to_input and not cfg.transcoder
        if cfg.transcoder and cfg.apply_b_dec_to_input:
            raise SAEConfigError("A transcoder cannot subtract b_dec (an output-space bias) from "
                                 "its input: set apply_b_dec_to_input False.")
        self.check_config(cfg)
        self.cfg = cfg
        like = {"dtype": DTYPES[cfg.dtype], "device": device}
        d_out = cfg.d_out or cfg.d_in
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **like))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **like))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, d_out, **like))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **like))
        self.W_skip = nn.Parameter(torch.zeros(d_out, cfg.d_in, **like)) \
            if cfg.skip_connection else None
        self.add_extra_parameters(like)
        if not self.W_dec.is_meta:
            self.reset_parameters()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of the reconstruction: d_in, or a transcoder's output width."""
        return self.cfg.d_out or self.cfg.d_in

    # --- what architectures override -------------------------------------------------------

    def check_config(self, cfg: SAEConfig) -> None:
        """Raise ``SAEConfigError`` for settings this architecture cannot use."""

    def add_extra_parameters(self, like: dict[str, Any]) -> None:
        """Create parameters/buffers beyond the four weights (``like``: dtype and device)."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Tied init: decoder rows in random directions of norm ``initial_decoder_norm()``,
        W_enc = W_dec^T (a transcoder whose widths differ draws its encoder directions apart),
        zero biases and skip term."""
        generator = torch.Generator().manual_seed(self.cfg.seed)

        def random_rows(width: int) -> Tensor:
            rows = torch.randn(self.d_sae, width, generator=generator, dtype=torch.float64)
            return rows * (self.initial_decoder_norm() / rows.norm(dim=1, keepdim=True))

        directions = random_rows(self.d_out)
        self.W_dec.copy_(directions)
        self.W_enc.copy_((directions if self.d_out == self.d_in else random_rows(self.d_in)).t())
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    def initial_decoder_norm(self) -> float:
        """The norm of the decoder rows at initialisation."""
        return 1.0

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups; each ``lr_scale`` multiplies the trainer's learning rate."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def _encode(self, x: Tensor) -> Tensor:
        """Inference activations [n, d_sae] of normalised input ``x`` [n, d_in]."""
        raise NotImplementedError

    def _training_step(self, x: Tensor, target: Tensor, dead_mask: Tensor | None,
                       progress: float, batch_sum: BatchSum) -> TrainStep:
        """``training_forward`` on normalised input ``x`` [batch, d_in] and what to reconstruct,
        ``target`` [batch, d_out] (``x`` itself but for transcoders); ``x_hat`` reconstructs
        ``target`` (its bias: ``output_bias(x)``) and may be normalised and attached."""
        raise NotImplementedError

    def _state_for_saving(self) -> dict[str, Tensor]:
        return dict(self.state_dict())

    def _state_from_saved(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state

    # --- the interface ----------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., d_sae] of raw activations ``x`` [..., d_in]."""
        return self._encode(self._normalised_input(x)).reshape(*x.shape[:-1], self.d_sae)

    def decode(self, acts: Tensor) -> Tensor:
        """Raw-unit reconstruction [..., d_out] of activations ``acts`` [..., d_sae] (without a
        skip transcoder's skip term, which needs the input: see ``forward``)."""
        if acts.ndim == 0 or acts.shape[-1] != self.d_sae:
            raise SAEInputError(f"Feature activations have shape {tuple(acts.shape)}, but this SAE "
                                f"has d_sae = {self.d_sae} latents.")
        return self._raw_output(acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_hat [..., d_out], acts [..., d_sae])`` for raw activations ``x`` [..., d_in]."""
        acts = self.encode(x)
        x_hat = self.decode(acts)
        if self.W_skip is not None:
            skip = self._raw_output(self._normalised_input(x) @ self.W_skip.t())
            x_hat = x_hat + skip.reshape(x_hat.shape)
        return x_hat, acts

    def split_pair(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(input, target)`` of rows read from a cache: a transcoder's rows are [input |
        target] (``ActivationStream.target_hook``), an SAE's its input alone (target None)."""
        if not self.cfg.transcoder:
            return rows, None
        if rows.shape[-1] != self.d_in + self.d_out:
            raise SAEInputError(f"A transcoder reads rows [input | target] of width d_in + d_out "
                                f"= {self.d_in + self.d_out}, got shape {tuple(rows.shape)}: "
                                "read the cache with its output hook as target_hook.")
        return rows[..., :self.d_in], rows[..., self.d_in:]

    def output_bias(self, x: Tensor) -> Tensor:
        """What the reconstruction of normalised input ``x`` [n, d_in] adds to the decoded
        latents: ``b_dec``, plus ``x @ W_skip^T`` for skip transcoders ([n, d_out])."""
        return self.b_dec if self.W_skip is None else self.b_dec + x @ self.W_skip.t()

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None, progress: float = 1.0,
                         batch_sum: BatchSum | None = None, *,
                         target: Tensor | None = None) -> TrainStep:
        """Losses on a batch ``x`` [batch, d_in] of raw activations; a transcoder reconstructs
        ``target`` [batch, d_out] (raw activations at its output hook), an SAE ``x``.

        ``dead_mask`` [d_sae] bool marks latents the trainer counts as dead (for AuxK);
        ``progress`` in [0, 1] is the fraction of training done (for coefficient warm-up).
        Under data parallelism ``batch_sum`` sums a tensor over ranks (gradient to the local
        part): losses then cover the global batch, and summing gradients over ranks gives
        its gradient. ``fired`` stays local. BatchTopK selects from the global batch.
        """
        if x.ndim != 2:
            raise SAEInputError(f"training_forward takes a batch [batch, d_in], got shape "
                                f"{tuple(x.shape)}.")
        x_in = self._normalised_input(x)
        target = x_in if target is None and not self.cfg.transcoder else \
            self._normalised_target(target, len(x))
        step = self._training_step(x_in, target, dead_mask, progress,
                                   batch_sum or (lambda value: value))
        step.x_hat = self._raw_output(step.x_hat.detach())
        step.losses = {k: v if k == "loss" else v.detach() for k, v in step.losses.items()}
        return step

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Call between ``backward`` and ``optimizer.step``: drops the part of each decoder
        row's gradient along the row, for architectures that keep rows at unit norm."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            along = (self.W_dec.grad * rows).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(along * rows)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call after ``optimizer.step``: puts decoder rows back at unit norm where required."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def init_from_data(self, sample: Tensor, target: Tensor | None = None) -> None:
        """Data-dependent init from raw activations ``sample`` [n, d_in] (and, for a transcoder,
        ``target`` [n, d_out], the output hook's activations at the same tokens).

        Sets ``activation_scale`` (when normalising) so that E||x * scale||^2 = d_in (and a
        transcoder's ``output_scale`` so that E||y * scale||^2 = d_out), then ``b_dec`` to the
        geometric median of the normalised sample (of the target, for a transcoder). A
        transcoder's input is not centred by b_dec (an output-space bias), so its ``b_enc``
        starts at ``-median(x) @ W_enc``: otherwise the input's large constant part picks the
        same latents for every token, and most never fire.
        """
        sample = self._check_shape(sample).reshape(-1, self.d_in).to(self.W_dec.device).float()
        if self.cfg.transcoder:
            target = self._checked_target(target, len(sample)).to(self.W_dec.device).float()
        if self.cfg.normalize_activations == "expected_average_only_in":
            self.cfg.activation_scale = _unit_scale(sample)
            if target is not None:
                self.cfg.output_scale = _unit_scale(target)
        output = sample if target is None else target
        self.b_dec.copy_(geometric_median(output * self._output_scale))
        if self.cfg.transcoder:  # b_dec is not subtracted from its input: b_enc centres it
            centre = geometric_median(sample * self.cfg.activation_scale)
            self.b_enc.copy_(-(centre.to(self.W_enc.dtype) @ self.W_enc))

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Fold ``activation_scale`` s into the weights; afterwards the SAE takes and returns raw
        units with ``normalize_activations = "none"``.

        W_enc *= s and b_dec /= s keep every pre-activation (x*s - b_dec) W_enc + b_enc unchanged,
        so feature activations, b_enc and any thresholds stay as they are; W_dec /= s and the
        already-scaled b_dec put reconstructions in raw units. Call it at the end of training:
        decoder rows then have norm 1/s.
        """
        scale, out_scale = self.cfg.activation_scale, self._output_scale
        self.W_enc.mul_(scale)
        self.W_dec.div_(out_scale)
        self.b_dec.div_(out_scale)
        if self.W_skip is not None:  # y s_out = (x s) W_skip^T, so raw y = x W_skip^T s / s_out
            self.W_skip.mul_(scale / out_scale)
        self.cfg.activation_scale = 1.0
        self.cfg.output_scale = None
        self.cfg.normalize_activations = "none"

    # --- files ------------------------------------------------------------------------------

    def save(self, folder: str | Path, firing_frequency: Tensor | None = None) -> Path:
        """Write the SAE to ``folder`` in SAELens's layout; returns the folder.

        ``firing_frequency`` [d_sae] (fraction of tokens each latent fires on) is written as
        ``sparsity.safetensors`` holding log10(frequency + 1e-10) under the key ``sparsity``,
        as SAELens does. Each file is written to a temporary name and renamed into place,
        cfg.json last; other files in ``folder`` are left alone.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self._state_for_saving().items()}
        write_safetensors(folder / WEIGHTS_FILENAME, state)
        if firing_frequency is not None:
            log_sparsity = torch.log10(firing_frequency.detach().float().cpu() + 1e-10)
            write_safetensors(folder / SPARSITY_FILENAME, {"sparsity": log_sparsity})
        else:
            (folder / SPARSITY_FILENAME).unlink(missing_ok=True)
        cfg = self.cfg.to_saelens_dict(self.saelens_architecture, str(self.W_dec.device))
        cfg["dtype"] = str(self.W_dec.dtype).removeprefix("torch.")
        cfg[WEIGHTS_SHA256] = sha256_file(folder / WEIGHTS_FILENAME)  # SAELens ignores it
        write_json(folder / CFG_FILENAME, cfg)
        return folder

    @staticmethod
    def load(folder: str | Path, device: torch.device | str | None = None) -> SAE:
        """Load a saved SAE (saekit's or SAELens's) as the class its cfg.json names."""
        folder = Path(folder)
        if not (folder / CFG_FILENAME).is_file() or not (folder / WEIGHTS_FILENAME).is_file():
            raise SAEConfigError(f"{folder} is not a saved SAE: it needs {CFG_FILENAME} and "
                                 f"{WEIGHTS_FILENAME}.")
        try:
            data = json.loads((folder / CFG_FILENAME).read_text())
        except json.JSONDecodeError as err:
            raise SAEConfigError(f"{folder / CFG_FILENAME} is not valid JSON ({err}); restore "
                                 "it from the SAE's source or save the SAE again.") from err
        cfg = SAEConfig.from_saelens_dict(data)
        device = torch.device(device) if device is not None else torch.get_default_device()
        try:
            state = load_file(folder / WEIGHTS_FILENAME, device=str(device))
        except SafetensorError as err:
            raise SAEConfigError(f"{folder / WEIGHTS_FILENAME} is damaged or truncated ({err}); "
                                 "copy or save the SAE again.") from err
        recorded = data.get(WEIGHTS_SHA256)
        if recorded and sha256_file(folder / WEIGHTS_FILENAME) != recorded:
            raise SAEConfigError(f"{folder / WEIGHTS_FILENAME} does not match the sha256 its "
                                 f"{CFG_FILENAME} recorded at save: it was changed or damaged "
                                 "since. Copy or save the SAE again.")
        return SAE.from_saved_state(cfg, state, str(folder / WEIGHTS_FILENAME), CFG_FILENAME)

    @staticmethod
    def from_saved_state(cfg: SAEConfig, state: dict[str, Tensor], source: str = "the weights",
                         config: str = "the config") -> SAE:
        """The SAE ``cfg`` describes, holding ``state`` (tensors under their saved-file names,
        as ``save`` writes them); ``SAEConfigError`` naming ``source`` and ``config`` (where
        ``cfg`` came from) if they do not fit."""
        sae = ARCHITECTURES[cfg.architecture](cfg, device="meta")
        state = {k: v.to(DTYPES[cfg.dtype]).contiguous()
                 for k, v in sae._state_from_saved(state).items()}
        missing = set(sae.state_dict()) ^ set(state)
        if missing:
            raise SAEConfigError(f"{source} does not fit a {cfg.architecture} SAE: keys "
                                 f"{sorted(missing)} are missing or unexpected.")
        # NaN anywhere, or inf in a weight matrix (a threshold may be +inf: a latent that
        # never fires)
        broken = [k for k, v in state.items() if bool(v.isnan().any())
                  or k.startswith("W_") and not bool(v.isfinite().all())]
        if broken:
            raise SAEConfigError(f"{source}: {broken} hold NaN or inf; the SAE is damaged (or "
                                 "was saved from a diverged run). Train or copy it again.")
        expected = sae.state_dict()
        wrong = [f"{k} {tuple(v.shape)} ({config} implies {tuple(expected[k].shape)})"
                 for k, v in state.items() if v.shape != expected[k].shape]
        if wrong:
            raise SAEConfigError(f"{source}: the weights do not match {config} (d_in "
                                 f"{cfg.d_in}, d_sae {cfg.d_sae}): {', '.join(wrong)}.")
        sae.load_state_dict(state, assign=True)
        return sae

    # --- helpers ----------------------------------------------------------------------------

    def _check_shape(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise SAEInputError(f"The SAE takes activations as a tensor [..., d_in = "
                                f"{self.d_in}], got {type(x).__name__}.")
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            raise SAEInputError(f"Activations have size {x.shape[-1] if x.ndim else 'none'} in the "
                                f"last dimension (shape {tuple(x.shape)}), but this SAE takes "
                                f"d_in = {self.d_in}.")
        return x

    def _normalised_input(self, x: Tensor) -> Tensor:
        """[n, d_in]: ``x`` flattened, in the weights' dtype, times ``activation_scale``."""
        x = self._check_shape(x).reshape(-1, self.d_in).to(self.W_enc.dtype)
        return x if self.cfg.activation_scale == 1.0 else x * self.cfg.activation_scale

    @property
    def _output_scale(self) -> float:
        """The factor normalising the reconstruction's units: ``output_scale`` for a transcoder
        that has one, else ``activation_scale``."""
        out = self.cfg.output_scale
        return self.cfg.activation_scale if out is None else out

    def _raw_output(self, x_hat: Tensor) -> Tensor:
        scale = self._output_scale
        return x_hat if scale == 1.0 else x_hat / scale

    def _checked_target(self, target: Tensor | None, n: int) -> Tensor:
        """A transcoder's target as [n, d_out], or ``SAEInputError`` saying what is wrong."""
        if target is None:
            raise SAEInputError("A transcoder needs the output hook's activations (target=) "
                                "to train on.")
        if target.ndim == 0 or target.shape[-1] != self.d_out or target.numel() != n * self.d_out:
            raise SAEInputError(f"The target has shape {tuple(target.shape)}, but this "
                                f"{'transcoder' if self.cfg.transcoder else 'SAE'} needs "
                                f"[{n}, d_out = {self.d_out}], one row per input row.")
        return target.reshape(n, self.d_out)

    def _normalised_target(self, target: Tensor | None, n: int) -> Tensor:
        """[n, d_out]: the target in the weights' dtype, times the output scale."""
        target = self._checked_target(target, n).to(self.W_enc.dtype)
        scale = self._output_scale
        return target if scale == 1.0 else target * scale

    def _b_dec_in(self) -> Tensor | None:
        """The bias subtracted from the input before encoding, if any."""
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    def _centred(self, x: Tensor) -> Tensor:
        return x if self._b_dec_in() is None else x - self.b_dec


def _unit_scale(sample: Tensor) -> float:
    """The factor s with E||x * s||^2 = width over the rows x of ``sample`` [n, width]."""
    mean_sq_norm = sample.pow(2).sum(-1).mean(dtype=torch.float64).item()
    return math.sqrt(sample.shape[-1] / max(mean_sq_norm, 1e-30))


def load_sae(folder: str | Path, device: torch.device | str | None = None) -> SAE:
    """Load the SAE saved in ``folder`` (cfg.json + sae_weights.safetensors)."""
    if not isinstance(folder, (str, Path)):
        raise SAEConfigError(f"load_sae takes a folder path, got {type(folder).__name__}.")
    return SAE.load(folder, device)
