"""The SAE interface every architecture implements, its config, and SAELens's folder format.

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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from saekit.errors import SAEConfigError, SAEInputError
from saekit.files import write_json, write_safetensors
from saekit.sae.kernels import BatchSum, geometric_median

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
# SAELens reads cfg.json as its v6 layout (nested metadata) only if metadata says >= 6.0.0.
SAELENS_FORMAT_VERSION = "6.0.0"
NORMALIZATIONS = ("none", "expected_average_only_in")
SAELENS_FIELDS = ("d_in", "d_sae", "k", "dtype", "apply_b_dec_to_input", "normalize_activations",
                  "reshape_activations")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
ARCHITECTURES: dict[str, type[SAE]] = {}


@dataclass
class SAEMetadata:
    """Where the SAE's activations come from (SAELens's ``metadata`` block)."""

    model_name: str | None = None
    hook_name: str | None = None
    hook_head_index: int | None = None
    prepend_bos: bool = True
    context_size: int | None = None
    dataset_path: str | None = None
    model_class_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other SAELens metadata keys, kept as read

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out, "sae_lens_version": SAELENS_FORMAT_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEMetadata:
        names = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in names and k != "sae_lens_version"}
        return cls(**{k: v for k, v in data.items() if k in names}, extra=extra)


@dataclass
class SAEConfig:
    """Shape and architecture of an SAE: the fields every architecture shares, and
    ``options``, the architecture's own settings (its config dataclass, e.g. ``TopKConfig``).

    Field names follow SAELens where it has them; the rest are saekit's. Coefficients,
    thresholds and bandwidths are in normalised units (see the module docstring).
    ``sae_config("topk", 640, 16384, k=32)`` builds one with the settings given by name.
    """

    architecture: str  # one of ARCHITECTURES: "relu", "topk", "batchtopk", "jumprelu"
    d_in: int
    d_sae: int
    # the architecture's config dataclass; None: its defaults; a dict: its fields by name
    options: Any = None
    dtype: str = "float32"
    apply_b_dec_to_input: bool | None = None  # None: the architecture's default
    normalize_activations: str = "none"  # or "expected_average_only_in"
    reshape_activations: str = "none"
    metadata: SAEMetadata = field(default_factory=SAEMetadata)
    # saekit's own fields (cfg.json key "saekit")
    activation_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.metadata, dict):
            self.metadata = SAEMetadata.from_dict(self.metadata)
        if self.architecture not in ARCHITECTURES:
            raise SAEConfigError(f"architecture must be one of {sorted(ARCHITECTURES)}, "
                                 f"got {self.architecture!r}.")
        self.options = architecture_options(self.architecture, self.options)
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SAEConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEConfigError(f"normalize_activations must be one of {NORMALIZATIONS}, "
                                 f"got {self.normalize_activations!r}.")
        if self.dtype not in DTYPES:
            raise SAEConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if not self.activation_scale > 0:
            raise SAEConfigError(f"activation_scale must be positive, got {self.activation_scale}.")
        if self.reshape_activations != "none":
            raise SAEConfigError("reshape_activations other than 'none' (e.g. 'hook_z') is not "
                                 "supported: flatten the heads before the SAE.")

    def to_saelens_dict(self, saelens_architecture: str, device: str) -> dict[str, Any]:
        """cfg.json's content: SAELens's fields at the top, saekit's under ``"saekit"``."""
        options = asdict(self.options)
        values = {**options, **{f.name: getattr(self, f.name) for f in fields(self)}}
        top = {name: values[name] for name in SAELENS_FIELDS if values.get(name) is not None}
        own = {name: value for name, value in values.items()
               if name not in (*SAELENS_FIELDS, "architecture", "metadata", "options")}
        return {"architecture": saelens_architecture, **top, "device": device,
                **ARCHITECTURES[self.architecture].saelens_extra_fields,
                "metadata": self.metadata.to_dict(),
                "saekit": {"architecture": self.architecture, **own}}

    @classmethod
    def from_saelens_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Read cfg.json as saekit or SAELens (v6, or the older flat layout) wrote it."""
        own = dict(data.get("saekit", {}))
        saelens_name = data.get("architecture", "standard")
        architecture = own.pop("architecture", None) or SAELENS_NAMES.get(saelens_name)
        if architecture not in ARCHITECTURES:
            raise SAEConfigError(f"cfg.json has architecture {saelens_name!r}; saekit "
                                 f"reads {sorted(SAELENS_NAMES)}.")
        if data.get("rescale_acts_by_decoder_norm"):
            raise SAEConfigError("cfg.json sets rescale_acts_by_decoder_norm, which saekit does "
                                 "not support: fold the decoder norms in SAELens first.")
        metadata = data.get("metadata") or {k: data[k] for k in LLM_METADATA_KEYS if k in data}
        top = {name: data[name] for name in SAELENS_FIELDS if data.get(name) is not None}
        top["dtype"] = str(top.get("dtype", "float32")).removeprefix("torch.")
        if "saekit" not in data:  # SAELens's own default, not the architecture's
            top.setdefault("apply_b_dec_to_input", True)
            if architecture in ("topk", "batchtopk") and "k" not in top:
                raise SAEConfigError(f"cfg.json is a SAELens {saelens_name} SAE without k "
                                     "(active latents per token); add it.")
        values = {**own, **top}
        option_names = {f.name for f in fields(ARCHITECTURES[architecture].config_class)}
        common = {f.name for f in fields(cls)} - {"architecture", "metadata", "options"}
        # files by older saekit versions hold every architecture's settings: keep this one's
        return cls(architecture=architecture, metadata=SAEMetadata.from_dict(metadata),
                   options={k: v for k, v in values.items() if k in option_names},
                   **{k: v for k, v in values.items() if k in common})


def architecture_options(architecture: str, options: Any = None) -> Any:
    """``options`` as ``architecture``'s config dataclass: None gives its defaults, a dict its
    fields by name (``SAEConfigError`` naming any field it does not have)."""
    config_class = ARCHITECTURES[architecture].config_class
    if options is None:
        return config_class()
    if type(options) is config_class:
        return options
    if not isinstance(options, dict):
        raise SAEConfigError(f"options of a {architecture} SAE must be a "
                             f"{config_class.__name__} or a dict, got {options!r}.")
    known = [f.name for f in fields(config_class)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SAEConfigError(f"{architecture} SAEs have no setting {', '.join(unknown)}; their "
                             f"settings are {', '.join(known)}.")
    return config_class(**options)


def sae_config(architecture: str, d_in: int, d_sae: int, **settings: Any) -> SAEConfig:
    """An SAEConfig with shared fields and the architecture's own settings given alike by name:
    ``sae_config("topk", 640, 16384, k=32, dtype="bfloat16")``."""
    shared = {f.name for f in fields(SAEConfig)} - {"options"}
    options = {**settings.pop("options", {}), **{k: v for k, v in settings.items()
                                                   if k not in shared}}
    return SAEConfig(architecture, d_in, d_sae, options=options,
                     **{k: v for k, v in settings.items() if k in shared})


def settings_of(architectures: Sequence[str]) -> set[str]:
    """Names of the settings at least one of ``architectures`` takes."""
    return {name for name, owners in architecture_settings().items()
            if {arch for arch, _ in owners} & set(architectures)}


def architecture_settings() -> dict[str, list[tuple[str, Any]]]:
    """Setting name → ``[(architecture, its dataclass field), ...]`` over every registered
    architecture (a name several architectures share, such as ``aux_coefficient``, lists each)."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for name, sae_class in sorted(ARCHITECTURES.items()):
        for f in fields(sae_class.config_class):
            out.setdefault(f.name, []).append((name, f))
    return out


SAELENS_NAMES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
LLM_METADATA_KEYS = ("model_name", "hook_name", "hook_head_index", "prepend_bos", "context_size",
                     "dataset_path", "model_class_name")


@dataclass
class TrainStep:
    """One training forward pass: what the trainer backprops, logs and counts."""

    x_hat: Tensor  # [batch, d_in] reconstruction in raw units, detached
    losses: dict[str, Tensor]  # "loss" (to backprop) and detached terms: "mse", "fvu", "l0", ...
    fired: Tensor  # [d_sae] bool: latents active on at least one sample of the batch
    l0: float  # mean number of active latents per sample


class SAE(nn.Module):
    """Sparse autoencoder ``x -> acts = f(x) -> x_hat = acts @ W_dec + b_dec``.

    Parameters: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in],
    ``b_dec`` [d_in].
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
            cfg.apply_b_dec_to_input = self.default_apply_b_dec_to_input
        self.check_config(cfg)
        self.cfg = cfg
        like = {"dtype": DTYPES[cfg.dtype], "device": device}
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **like))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **like))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **like))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **like))
        self.add_extra_parameters(like)
        if not self.W_dec.is_meta:
            self.reset_parameters()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # --- what architectures override -------------------------------------------------------

    def check_config(self, cfg: SAEConfig) -> None:
        """Raise ``SAEConfigError`` for settings this architecture cannot use."""

    def add_extra_parameters(self, like: dict[str, Any]) -> None:
        """Create parameters/buffers beyond the four weights (``like``: dtype and device)."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Tied init: decoder rows in random directions of norm ``initial_decoder_norm()``,
        W_enc = W_dec^T, zero biases."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        directions = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float64)
        directions *= self.initial_decoder_norm() / directions.norm(dim=1, keepdim=True)
        self.W_dec.copy_(directions)
        self.W_enc.copy_(directions.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    def initial_decoder_norm(self) -> float:
        """The norm of the decoder rows at initialisation."""
        return 1.0

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups; each ``lr_scale`` multiplies the trainer's learning rate."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def _encode(self, x: Tensor) -> Tensor:
        """Inference activations [n, d_sae] of normalised input ``x`` [n, d_in]."""
        raise NotImplementedError

    def _training_step(self, x: Tensor, dead_mask: Tensor | None, progress: float,
                       batch_sum: BatchSum) -> TrainStep:
        """``training_forward`` on normalised ``x``; ``x_hat`` may be normalised and attached."""
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
        """Raw-unit reconstruction [..., d_in] of activations ``acts`` [..., d_sae]."""
        if acts.ndim == 0 or acts.shape[-1] != self.d_sae:
            raise SAEInputError(f"Feature activations have shape {tuple(acts.shape)}, but this SAE "
                                f"has d_sae = {self.d_sae} latents.")
        return self._raw_output(acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_hat [..., d_in], acts [..., d_sae])`` for raw activations ``x`` [..., d_in]."""
        acts = self.encode(x)
        return self.decode(acts), acts

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None, progress: float = 1.0,
                         batch_sum: BatchSum | None = None) -> TrainStep:
        """Losses on a batch ``x`` [batch, d_in] of raw activations.

        ``dead_mask`` [d_sae] bool marks latents the trainer counts as dead (for AuxK);
        ``progress`` in [0, 1] is the fraction of training done (for coefficient warm-up).
        Under data parallelism ``batch_sum`` sums a tensor over ranks (gradient to the local
        part): losses then cover the global batch, and summing gradients over ranks gives
        its gradient. ``fired`` stays local. BatchTopK selects from the global batch.
        """
        if x.ndim != 2:
            raise SAEInputError(f"training_forward takes a batch [batch, d_in], got shape "
                                f"{tuple(x.shape)}.")
        step = self._training_step(self._normalised_input(x), dead_mask, progress,
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
    def init_from_data(self, sample: Tensor) -> None:
        """Data-dependent init from raw activations ``sample`` [n, d_in].

        Sets ``activation_scale`` (when normalising) so that E||x * scale||^2 = d_in, then
        ``b_dec`` to the geometric median of the normalised sample.
        """
        sample = self._check_shape(sample).reshape(-1, self.d_in).to(self.W_dec.device).float()
        if self.cfg.normalize_activations == "expected_average_only_in":
            mean_sq_norm = sample.pow(2).sum(-1).mean(dtype=torch.float64).item()
            self.cfg.activation_scale = math.sqrt(self.d_in / max(mean_sq_norm, 1e-30))
        self.b_dec.copy_(geometric_median(sample * self.cfg.activation_scale))

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Fold ``activation_scale`` s into the weights; afterwards the SAE takes and returns raw
        units with ``normalize_activations = "none"``.

        W_enc *= s and b_dec /= s keep every pre-activation (x*s - b_dec) W_enc + b_enc unchanged,
        so feature activations, b_enc and any thresholds stay as they are; W_dec /= s and the
        already-scaled b_dec put reconstructions in raw units. Call it at the end of training:
        decoder rows then have norm 1/s.
        """
        scale = self.cfg.activation_scale
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        self.cfg.activation_scale = 1.0
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
            cfg = SAEConfig.from_saelens_dict(json.loads((folder / CFG_FILENAME).read_text()))
        except json.JSONDecodeError as err:
            raise SAEConfigError(f"{folder / CFG_FILENAME} is not valid JSON ({err}); restore "
                                 "it from the SAE's source or save the SAE again.") from err
        device = torch.device(device) if device is not None else torch.get_default_device()
        sae = ARCHITECTURES[cfg.architecture](cfg, device="meta")
        try:
            state = load_file(folder / WEIGHTS_FILENAME, device=str(device))
        except SafetensorError as err:
            raise SAEConfigError(f"{folder / WEIGHTS_FILENAME} is damaged or truncated ({err}); "
                                 "copy or save the SAE again.") from err
        state = {k: v.to(DTYPES[cfg.dtype]) for k, v in sae._state_from_saved(state).items()}
        missing = set(sae.state_dict()) ^ set(state)
        if missing:
            raise SAEConfigError(f"{folder / WEIGHTS_FILENAME} does not fit a {cfg.architecture} "
                                 f"SAE: keys {sorted(missing)} are missing or unexpected.")
        expected = sae.state_dict()
        wrong = [f"{k} {tuple(v.shape)} (cfg.json implies {tuple(expected[k].shape)})"
                 for k, v in state.items() if v.shape != expected[k].shape]
        if wrong:
            raise SAEConfigError(f"{folder}: the weights do not match {CFG_FILENAME} (d_in "
                                 f"{cfg.d_in}, d_sae {cfg.d_sae}): {', '.join(wrong)}.")
        sae.load_state_dict(state, assign=True)
        return sae

    # --- helpers ----------------------------------------------------------------------------

    def _check_shape(self, x: Tensor) -> Tensor:
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            raise SAEInputError(f"Activations have size {x.shape[-1] if x.ndim else 'none'} in the "
                                f"last dimension (shape {tuple(x.shape)}), but this SAE takes "
                                f"d_in = {self.d_in}.")
        return x

    def _normalised_input(self, x: Tensor) -> Tensor:
        """[n, d_in]: ``x`` flattened, in the weights' dtype, times ``activation_scale``."""
        x = self._check_shape(x).reshape(-1, self.d_in).to(self.W_enc.dtype)
        return x if self.cfg.activation_scale == 1.0 else x * self.cfg.activation_scale

    def _raw_output(self, x_hat: Tensor) -> Tensor:
        scale = self.cfg.activation_scale
        return x_hat if scale == 1.0 else x_hat / scale

    def _b_dec_in(self) -> Tensor | None:
        """The bias subtracted from the input before encoding, if any."""
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    def _centred(self, x: Tensor) -> Tensor:
        return x if self._b_dec_in() is None else x - self.b_dec


def load_sae(folder: str | Path, device: torch.device | str | None = None) -> SAE:
    """Load the SAE saved in ``folder`` (cfg.json + sae_weights.safetensors)."""
    return SAE.load(folder, device)
