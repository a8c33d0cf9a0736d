"""saekit: sparse-autoencoder interpretability for language models.

Pipeline: capture (``capture``) → cache (``cache``) → train (``train``, ``sae/``)
→ evaluate/analyse → steer.
"""

__version__ = "0.1.0"

from saekit.cache import ActivationCache, ActivationStream  # noqa: E402
from saekit.capture import CaptureConfig, capture_activations  # noqa: E402
from saekit.corpus import load_corpus, pack_token_rows  # noqa: E402
from saekit.errors import (  # noqa: E402
    CacheMismatchError,
    CorpusError,
    CorruptCacheError,
    HookNameError,
    ModelLoadError,
    SaekitError,
)
from saekit.formats import load_foreign_sae  # noqa: E402
from saekit.model import load_model  # noqa: E402
from saekit.sae import SAE, load_sae  # noqa: E402
from saekit.generation import generate  # noqa: E402
from saekit.steer import Intervention, SteeringError, SteeringVector, steer  # noqa: E402
from saekit.steer_eval import steering_curve, steering_sweep  # noqa: E402

__all__ = [
    "ActivationCache", "ActivationStream", "CaptureConfig", "capture_activations",
    "load_corpus", "pack_token_rows", "load_model", "SaekitError", "CacheMismatchError",
    "CorpusError", "CorruptCacheError", "HookNameError", "ModelLoadError", "SAE", "load_sae", "load_foreign_sae",
    "Intervention", "SteeringError", "SteeringVector", "generate", "steer", "steering_curve",
    "steering_sweep",
]
