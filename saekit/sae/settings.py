"""An SAE's config (``SAEConfig``: shape, architecture, its own settings) and metadata, the
registry of architectures, and the translation to and from SAELens's cfg.json.

A config with ``d_out`` set is a transcoder: it reads ``metadata.hook_name`` and reconstructs
``metadata.hook_name_out`` (width ``d_out``), optionally with a linear skip term
(``skip_connection``: ``W_skip`` [d_out, d_in], as SAELens and sparsify store it). Any
architecture can be one. SAELens names a ReLU transcoder ``transcoder`` / ``skip_transcoder``
and a JumpReLU one ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from collections.abc import Sequence
from typing import Any

import torch

from saekit.errors import SAEConfigError

# SAELens reads cfg.json as its v6 layout (nested metadata) only if metadata says >= 6.0.0.
SAELENS_FORMAT_VERSION = "6.0.0"
NORMALIZATIONS = ("none", "expected_average_only_in")
SAELENS_FIELDS = ("d_in", "d_sae", "k", "dtype", "apply_b_dec_to_input", "normalize_activations",
                  "reshape_activations", "d_out")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
ARCHITECTURES: dict[str, type] = {}  # name -> SAE subclass, filled as each module loads
# SAELens architecture -> (saekit architecture, has a skip connection)
SAELENS_TRANSCODERS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
                       "jumprelu_transcoder": ("jumprelu", False),
                       "jumprelu_skip_transcoder": ("jumprelu", True)}


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
    hook_name_out: str | None = None  # a transcoder's output hook (written only when set)
    extra: dict[str, Any] = field(default_factory=dict)  # other SAELens metadata keys, kept as read

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if out["hook_name_out"] is None:
            del out["hook_name_out"]
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
    # transcoders: the output's width (None: an ordinary SAE, reconstructing its input), a learnt
    # linear skip term input -> output, and the output's scale (None: activation_scale)
    d_out: int | None = None
    skip_connection: bool = False
    output_scale: float | None = None

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
        if self.d_out is not None and (not isinstance(self.d_out, int) or self.d_out < 1):
            raise SAEConfigError(f"d_out must be a positive integer, got {self.d_out!r}.")
        if self.skip_connection and self.d_out is None:
            raise SAEConfigError("skip_connection needs a transcoder (d_out set): an SAE with a "
                                 "skip term would learn the identity.")
        if self.output_scale is not None and not self.output_scale > 0:
            raise SAEConfigError(f"output_scale must be positive, got {self.output_scale}.")
        if not self.activation_scale > 0:
            raise SAEConfigError(f"activation_scale must be positive, got {self.activation_scale}.")
        if self.reshape_activations != "none":
            raise SAEConfigError("reshape_activations other than 'none' (e.g. 'hook_z') is not "
                                 "supported: flatten the heads before the SAE.")

    @property
    def transcoder(self) -> bool:
        """Whether this reconstructs another hook (``d_out`` set) rather than its input."""
        return self.d_out is not None

    def to_saelens_dict(self, saelens_architecture: str, device: str) -> dict[str, Any]:
        """cfg.json's content: SAELens's fields at the top, saekit's under ``"saekit"``."""
        options = asdict(self.options)
        values = {**options, **{f.name: getattr(self, f.name) for f in fields(self)}}
        top = {name: values[name] for name in SAELENS_FIELDS if values.get(name) is not None}
        own = {name: value for name, value in values.items()
               if name not in (*SAELENS_FIELDS, "architecture", "metadata", "options")}
        if self.transcoder:
            saelens_architecture = saelens_transcoder_name(saelens_architecture,
                                                           self.skip_connection)
        return {"architecture": saelens_architecture, **top, "device": device,
                **ARCHITECTURES[self.architecture].saelens_extra_fields,
                "metadata": self.metadata.to_dict(),
                "saekit": {"architecture": self.architecture, **own}}

    @classmethod
    def from_saelens_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Read cfg.json as saekit or SAELens (v6, or the older flat layout) wrote it."""
        if not isinstance(data, dict) or not isinstance(data.get("saekit", {}), dict):
            raise SAEConfigError(f"cfg.json holds {type(data).__name__} data, not an SAE config "
                                 "(an object with d_in, d_sae, architecture, ...).")
        wrong = [k for k in ("d_in", "d_sae") if isinstance(data.get(k), bool)
                 or not isinstance(data.get(k), int) or data[k] < 1]
        if wrong:
            raise SAEConfigError(f"cfg.json needs {' and '.join(wrong)} as positive whole numbers "
                                 f"(got {', '.join(f'{k}={data.get(k)!r}' for k in wrong)}): it "
                                 "is damaged or not an SAE config.")
        own = dict(data.get("saekit", {}))
        saelens_name = data.get("architecture", "standard")
        if saelens_name in SAELENS_TRANSCODERS and "saekit" not in data:
            own["architecture"], own["skip_connection"] = SAELENS_TRANSCODERS[saelens_name]
            if data.get("d_out") is None:
                raise SAEConfigError(f"cfg.json is a SAELens {saelens_name} without d_out (the "
                                     "output width); add it.")
        architecture = own.pop("architecture", None) or SAELENS_NAMES.get(saelens_name)
        if architecture not in ARCHITECTURES:
            raise SAEConfigError(f"cfg.json has architecture {saelens_name!r}; saekit reads "
                                 f"{sorted([*SAELENS_NAMES, *SAELENS_TRANSCODERS])}.")
        if data.get("rescale_acts_by_decoder_norm"):
            raise SAEConfigError("cfg.json sets rescale_acts_by_decoder_norm, which saekit does "
                                 "not support: fold the decoder norms in SAELens first.")
        metadata = data.get("metadata") or {k: data[k] for k in LLM_METADATA_KEYS if k in data}
        top = {name: data[name] for name in SAELENS_FIELDS if data.get(name) is not None}
        top["dtype"] = str(top.get("dtype", "float32")).removeprefix("torch.")
        if "saekit" not in data:  # SAELens's own default, not the architecture's
            top.setdefault("apply_b_dec_to_input", saelens_name not in SAELENS_TRANSCODERS)
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


def saelens_transcoder_name(saelens_architecture: str, skip_connection: bool) -> str:
    """SAELens's name for a transcoder of this activation (``jumprelu_skip_transcoder``, ...);
    SAELens has no TopK transcoder, so a TopK one keeps the name ``topk``."""
    base = {"standard": "relu", "jumprelu": "jumprelu"}.get(saelens_architecture)
    names = {value: name for name, value in SAELENS_TRANSCODERS.items()}
    return names.get((base, skip_connection), saelens_architecture)


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
                     "dataset_path", "model_class_name", "hook_name_out")
