"""Load SAEs that other toolkits saved as saekit SAEs: ``load_foreign_sae``.

The layout is detected by the files in the folder (first match wins):

================  ========================================  ==============================
toolkit           files                                     saekit class
================  ========================================  ==============================
saekit / SAELens  cfg.json + sae_weights.safetensors        as cfg.json says (``load_sae``)
sparsify          cfg.json + sae.safetensors                ``TopKSAE`` (or transcoder)
Gemma Scope 2     params.safetensors (+ config.json)        ``JumpReLUSAE``
Gemma Scope       params.npz                                ``JumpReLUSAE``
================  ========================================  ==============================

Gemma Scope (Lieberum et al. 2024, arXiv 2408.05147; Gemma Scope 2 for Gemma 3): ``w_enc``
[d_in, d_sae], ``b_enc`` [d_sae], ``w_dec`` [d_sae, d_in], ``b_dec`` [d_in], ``threshold``
[d_sae] (key case is ignored: W_enc reads as w_enc). ``pre = x @ w_enc + b_enc``,
``acts = pre * (pre > threshold)``, ``x_hat = acts @ w_dec + b_dec``; b_dec is not subtracted
from the input. Thresholds are clamped to a tiny positive number (saekit stores their log).
Gemma Scope 2's config.json names the input as a Hugging Face module (``hf_hook_point_in``):
``model.layers.N.output`` becomes ``blocks.N.hook_resid_post``, as does a folder
``resid_post[_all]/layer_N_...`` without one. Transcoders and affine (skip) variants are refused.

sparsify (EleutherAI): a folder named after its hookpoint with cfg.json (``d_in``, ``k``,
``num_latents`` or ``expansion_factor``, ``activation``, ...) and ``sae.safetensors`` holding
``encoder.weight`` [d_sae, d_in], ``encoder.bias`` [d_sae], ``W_dec`` [d_sae, d_in] and ``b_dec``
[d_in]; ``acts = TopK(ReLU((x - b_dec) @ encoder.weight^T + encoder.bias))``,
``x_hat = acts @ W_dec + b_dec``. A hookpoint ``layers.N`` becomes ``blocks.N.hook_resid_post``.
A sparsify transcoder (cfg.json ``"transcode": true``) does not subtract b_dec from its input;
with ``skip_connection`` it adds ``x @ W_skip^T`` (``W_skip`` [d_out, d_in]). Its hookpoint
``layers.N.mlp`` (the Hugging Face MLP module, read at its input, reconstructed at its output)
becomes ``blocks.N.mlp.hook_in`` -> ``blocks.N.mlp.hook_out``.

SAELens transcoders (cfg.json architecture ``transcoder``, ``skip_transcoder``,
``jumprelu_transcoder``, ``jumprelu_skip_transcoder``, with ``d_out``) load through
``load_sae``, as saekit's own do (see ``saekit.sae.settings``).

A Hugging Face repo id downloads the repo (only ``subfolder`` when given) first.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from saekit.errors import SAEConfigError
from saekit.model import EMBEDDED_MODELS
from saekit.sae import SAE, JumpReLUSAE, SAEConfig, SAEMetadata, TopKSAE, load_sae
from saekit.sae.base import CFG_FILENAME, DTYPES, WEIGHTS_FILENAME

GEMMA_KEYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
SPARSIFY_KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RESID_POST = "blocks.{}.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.{}.mlp.hook_in", "blocks.{}.mlp.hook_out"
SEARCH_DEPTH = 3  # folder levels searched for SAEs when a folder itself holds none

Downloader = Callable[..., str | os.PathLike]
SAE_HELP = ("SAE folder or Hugging Face repo id: saekit/SAELens, Gemma Scope 1 or 2, or "
            "sparsify layout (see saekit.formats)")


class ForeignSAEError(SAEConfigError):
    """A folder or repo holding no SAE layout saekit reads, or an SAE saekit cannot represent."""


@dataclass(frozen=True)
class Layout:
    """One toolkit's folder layout: the files that identify it and how to load it."""

    name: str
    files: tuple[str, ...]
    load: Callable[[Path], SAE]
    description: str

    def matches(self, folder: Path) -> bool:
        return all((folder / name).is_file() for name in self.files)


def load_foreign_sae(path_or_repo: str | Path, *, subfolder: str | None = None,
                     model_name: str | None = None, hook_name: str | None = None,
                     device: torch.device | str | None = None, revision: str | None = None,
                     download: Downloader | None = None) -> SAE:
    """Load the SAE in a local folder (or a file in it) or a Hugging Face repo, in any layout above.

    ``subfolder``: the SAE's folder inside ``path_or_repo``. ``model_name`` / ``hook_name`` set
    ``cfg.metadata`` (they win over what the files say; needed where a format says nothing).
    ``download(repo_id=, allow_patterns=, revision=)`` returns the local snapshot folder;
    default ``huggingface_hub.snapshot_download``.
    """
    folder = resolve_folder(path_or_repo, subfolder, revision, download)
    layout = detect_layout(folder)
    if layout is None:
        raise ForeignSAEError(unknown_layout_message(folder))
    sae = layout.load(folder)
    metadata = sae.cfg.metadata
    metadata.model_name = model_name or metadata.model_name
    metadata.hook_name = hook_name or metadata.hook_name
    if layout.name != "saelens":
        source = str(path_or_repo) + (f"/{subfolder}" if subfolder else "")
        metadata.extra.update(source_format=layout.name, source=source)
    return sae.to(device) if device is not None else sae


def detect_layout(folder: str | Path) -> Layout | None:
    """The first of ``LAYOUTS`` whose files ``folder`` holds, else None."""
    return next((layout for layout in LAYOUTS if layout.matches(Path(folder))), None)


def resolve_folder(path_or_repo: str | Path, subfolder: str | None = None,
                   revision: str | None = None, download: Downloader | None = None) -> Path:
    """The local folder of ``path_or_repo`` (+ ``subfolder``), downloading a repo id first."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        folder = path.parent if path.is_file() else path
        folder = folder / subfolder if subfolder else folder
        if not folder.is_dir():
            raise ForeignSAEError(f"{path} has no subfolder {subfolder!r}.")
        return folder
    if not REPO_ID.match(str(path_or_repo)):
        raise ForeignSAEError(f"{str(path_or_repo)!r} is neither an existing folder nor a Hugging "
                              "Face repo id ('org/name').")
    return download_repo(str(path_or_repo), subfolder, revision, download)


def download_repo(repo_id: str, subfolder: str | None = None, revision: str | None = None,
                  download: Downloader | None = None) -> Path:
    """Download ``repo_id`` (only ``subfolder`` when given); return the SAE's local folder."""
    if download is None:
        from huggingface_hub import snapshot_download as download
    subfolder = subfolder.strip("/") if subfolder else None
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        root = Path(download(repo_id=repo_id, allow_patterns=patterns, revision=revision))
    except Exception as err:  # the hub raises many kinds; say what was tried
        raise ForeignSAEError(
            f"{repo_id!r} is not a local folder, and downloading it from the Hugging Face hub "
            f"failed ({type(err).__name__}: {err}). Check the repo id and subfolder, and that "
            "you are online (HF_HUB_OFFLINE unset)."
        ) from err
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise ForeignSAEError(f"The Hugging Face repo {repo_id!r} has no folder {subfolder!r}.")
    return folder


def unknown_layout_message(folder: Path) -> str:
    """What ``folder`` holds, which layouts saekit reads, and subfolders that hold one."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    found = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    expected = "; ".join(f"{layout.description}: {' + '.join(layout.files)}" for layout in LAYOUTS)
    message = (f"{folder} holds no SAE in a layout saekit reads. Found: {found or 'nothing'}. "
               f"Expected one of: {expected} (Gemma Scope 2 may add config.json).")
    candidates = find_sae_folders(folder)
    if candidates:
        shown = ", ".join(str(c.relative_to(folder)) for c in candidates[:10])
        message += f" Subfolders holding one: {shown}; pass subfolder= (--subfolder)."
    return message


def find_sae_folders(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Folders below ``root`` (up to ``depth`` levels) that match a layout, sorted."""
    found = []
    for current, dirs, _ in os.walk(root):
        current = Path(current)
        level = len(current.relative_to(root).parts)
        if level >= depth:
            dirs.clear()
        if level and detect_layout(current):
            found.append(current)
    return sorted(found)


# --- layouts ------------------------------------------------------------------------------


def load_gemma_scope(folder: Path) -> JumpReLUSAE:
    """Gemma Scope (params.npz) or Gemma Scope 2 (params.safetensors + config.json) as JumpReLU."""
    if (folder / "params.safetensors").is_file():
        raw = load_file(folder / "params.safetensors")
    else:
        import numpy as np

        with np.load(folder / "params.npz") as data:
            raw = {key: torch.from_numpy(data[key].copy()) for key in data.files}
    params = {key.lower(): value for key, value in raw.items()}
    _require(folder, "params", params, GEMMA_KEYS)
    if params["threshold"].ndim == 0:
        params["threshold"] = params["threshold"].expand(params["b_enc"].shape).clone()
    d_in, d_sae = _matrix_shape(folder, "w_enc", params["w_enc"])
    _check_shapes(folder, params, {"w_enc": (d_in, d_sae), "w_dec": (d_sae, d_in),
                                   "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)})
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    _check_gemma_config(folder, config, d_sae)
    hf_hook = config.get("hf_hook_point_in")
    metadata = SAEMetadata(model_name=saekit_model_name(config.get("model_name")),
                           hook_name=_gemma_hook_name(folder, hf_hook),
                           extra={"hf_hook_name": hf_hook} if hf_hook else {})
    cfg = SAEConfig("jumprelu", d_in, d_sae, dtype=_dtype_name(params["w_enc"]),
                    apply_b_dec_to_input=False, metadata=metadata)
    return _build(cfg, {"W_enc": params["w_enc"], "b_enc": params["b_enc"],
                        "W_dec": params["w_dec"], "b_dec": params["b_dec"],
                        "threshold": params["threshold"]})


def load_sparsify(folder: Path) -> TopKSAE:
    """An EleutherAI sparsify SAE folder (cfg.json + sae.safetensors) as a TopK SAE."""
    config = _read_json(folder / "cfg.json")
    weights = load_file(folder / "sae.safetensors")
    transcoder = bool(config.get("transcode"))
    skip = bool(config.get("skip_connection")) or "W_skip" in weights
    if skip and not transcoder:
        raise ForeignSAEError(f"{folder}: sparsify SAEs with a skip connection are not supported "
                              "(only transcoders with one).")
    if config.get("normalize_io"):
        raise ForeignSAEError(f"{folder}: sparsify's normalize_io is not supported.")
    if config.get("activation", "topk") != "topk" or config.get("signed"):
        raise ForeignSAEError(f"{folder}: sparsify activation {config.get('activation')!r}"
                              f"{' (signed)' if config.get('signed') else ''} is not supported; "
                              "saekit reads the 'topk' activation.")
    _require(folder, "sae.safetensors", weights, SPARSIFY_KEYS)
    d_sae, d_in = _matrix_shape(folder, "encoder.weight", weights["encoder.weight"])
    d_out = weights["W_dec"].shape[-1] if weights["W_dec"].ndim == 2 else d_in
    _check_shapes(folder, weights, {"encoder.bias": (d_sae,), "W_dec": (d_sae, d_out),
                                    "b_dec": (d_out,),
                                    **({"W_skip": (d_out, d_in)} if skip else {})})
    width = config.get("num_latents") or d_in * config.get("expansion_factor", 0)
    if config.get("d_in", d_in) != d_in or (width and width != d_sae):
        raise ForeignSAEError(f"{folder}: cfg.json says d_in {config.get('d_in')} and "
                              f"{width} latents, but the weights have {d_in} and {d_sae}.")
    if not isinstance(config.get("k"), int):
        raise ForeignSAEError(f"{folder}/cfg.json has no integer k (active latents per token).")
    cfg = SAEConfig("topk", d_in, d_sae, options={"k": config["k"]},
                    dtype=_dtype_name(weights["W_dec"]), apply_b_dec_to_input=not transcoder,
                    metadata=_sparsify_metadata(folder.name, transcoder),
                    d_out=d_out if transcoder else None, skip_connection=skip)
    return _build(cfg, {"W_enc": weights["encoder.weight"].T, "b_enc": weights["encoder.bias"],
                        "W_dec": weights["W_dec"], "b_dec": weights["b_dec"],
                        **({"W_skip": weights["W_skip"]} if skip else {})})


def _sparsify_metadata(hookpoint: str, transcoder: bool) -> SAEMetadata:
    """Bridge hook names of a sparsify hookpoint: ``layers.N`` is the block's output; for a
    transcoder ``layers.N.mlp`` is the MLP's input and output."""
    extra = {"sparsify_hookpoint": hookpoint}
    layer = re.fullmatch(r"(?:model\.)?layers\.(\d+)", hookpoint)
    mlp = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.mlp", hookpoint)
    if transcoder and mlp:
        return SAEMetadata(hook_name=MLP_IN.format(mlp.group(1)),
                           hook_name_out=MLP_OUT.format(mlp.group(1)), extra=extra)
    if not transcoder and layer:
        return SAEMetadata(hook_name=RESID_POST.format(layer.group(1)), extra=extra)
    return SAEMetadata(extra=extra)


def _load_saelens(folder: Path) -> SAE:
    return load_sae(folder)


LAYOUTS = (
    Layout("saelens", (CFG_FILENAME, WEIGHTS_FILENAME), _load_saelens, "saekit/SAELens"),
    Layout("sparsify", ("cfg.json", "sae.safetensors"), load_sparsify, "sparsify"),
    Layout("gemma_scope_2", ("params.safetensors",), load_gemma_scope, "Gemma Scope 2"),
    Layout("gemma_scope", ("params.npz",), load_gemma_scope, "Gemma Scope"),
)


# --- helpers ------------------------------------------------------------------------------


def saekit_model_name(name: str | None) -> str | None:
    """saekit's name for a model a foreign config names: ``google/gemma-3-270m[-pt]`` →
    ``gemma-3-270m`` (the embedded default); anything else as it is."""
    if not name:
        return None
    short = name.split("/")[-1].removesuffix("-pt")
    for key, hub_id in EMBEDDED_MODELS.items():
        if short in (key, hub_id.split("/")[-1]):
            return key
    return name


def _gemma_hook_name(folder: Path, hf_hook: str | None) -> str | None:
    if hf_hook:
        match = re.fullmatch(r"model\.layers\.(\d+)\.output", hf_hook)
        return RESID_POST.format(match.group(1)) if match else None
    match = re.match(r"layer_(\d+)_", folder.name)
    if match and folder.parent.name in ("resid_post", "resid_post_all"):
        return RESID_POST.format(match.group(1))
    return None


def _check_gemma_config(folder: Path, config: dict, d_sae: int) -> None:
    kind, architecture = config.get("type", "sae"), config.get("architecture", "jump_relu")
    hook_in, hook_out = config.get("hf_hook_point_in"), config.get("hf_hook_point_out")
    if kind != "sae":
        raise ForeignSAEError(f"{folder} holds a Gemma Scope {kind!r}, not an SAE; saekit loads "
                              "SAEs only.")
    if hook_out and hook_out != hook_in:
        raise ForeignSAEError(f"{folder} holds a Gemma Scope transcoder ({hook_in} -> "
                              f"{hook_out}); saekit loads SAEs only.")
    if config.get("affine_connection"):
        raise ForeignSAEError(f"{folder}: Gemma Scope SAEs with an affine skip connection are not "
                              "supported.")
    if architecture.replace("_", "") != "jumprelu":
        raise ForeignSAEError(f"{folder}/config.json has architecture {architecture!r}; saekit "
                              "reads Gemma Scope's jump_relu.")
    if config.get("width", d_sae) != d_sae:
        raise ForeignSAEError(f"{folder}/config.json says width {config['width']}, but the "
                              f"weights have {d_sae} latents.")


def _build(cfg: SAEConfig, state: dict[str, Tensor]) -> SAE:
    """An SAE of ``cfg`` holding ``state`` (saved-file names, as ``SAE.load`` reads them)."""
    return SAE.from_saved_state(cfg, state)


def _require(folder: Path, what: str, tensors: dict[str, Tensor], keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise ForeignSAEError(f"{folder}: {what} lacks {missing}; it holds {sorted(tensors)}.")


def _matrix_shape(folder: Path, key: str, tensor: Tensor) -> tuple[int, int]:
    if tensor.ndim != 2:
        raise ForeignSAEError(f"{folder}: {key} should be a matrix, got shape "
                              f"{tuple(tensor.shape)}.")
    return tensor.shape[0], tensor.shape[1]


def _check_shapes(folder: Path, tensors: dict[str, Tensor],
                  shapes: dict[str, tuple[int, ...]]) -> None:
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {shape})" for k, shape in shapes.items()
             if tuple(tensors[k].shape) != shape]
    if wrong:
        raise ForeignSAEError(f"{folder}: tensors of inconsistent shapes: {', '.join(wrong)}.")


def _dtype_name(tensor: Tensor) -> str:
    names = {dtype: name for name, dtype in DTYPES.items()}
    return names.get(tensor.dtype, "float32")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ForeignSAEError(f"{path} is not valid JSON ({err}).") from err

