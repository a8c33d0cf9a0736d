"""Sparse autoencoders: one file per architecture, each an ``SAE`` subclass with its own
settings dataclass, registered by name in ``ARCHITECTURES`` when its module is imported.

``load_sae`` reads a folder in SAELens's layout (cfg.json + sae_weights.safetensors) back as the
right class; ``sae_config("topk", d_in, d_sae, k=32)`` builds a config.

Adding an architecture: a file here with its config dataclass (fields made with
``saekit.config.setting``) and an ``SAE`` subclass setting ``architecture``, ``config_class``,
``sweep_field`` and ``saelens_architecture`` and implementing ``_encode`` and
``_training_step`` (which reconstructs its ``target`` from latents plus ``output_bias(x)``); import
it below. ``saekit train --arch NAME`` and its flags follow.

Every architecture can be a transcoder (``SAEConfig.d_out`` set; ``skip_connection`` adds a
learnt linear term): it encodes one hook and reconstructs another (``metadata.hook_name_out``).
"""

from saekit.sae.base import SAE, TrainStep, load_sae
from saekit.sae.settings import (ARCHITECTURES, SAEConfig, SAEMetadata, architecture_options,
                                 architecture_settings, sae_config, settings_of)
from saekit.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saekit.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saekit.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from saekit.sae.relu import ReLUConfig, ReLUSAE
from saekit.sae.topk import TopKConfig, TopKSAE

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEMetadata", "TrainStep", "load_sae",
           "sae_config", "architecture_options", "architecture_settings", "settings_of",
           "ReLUSAE", "ReLUConfig", "TopKSAE", "TopKConfig", "BatchTopKSAE", "BatchTopKConfig",
           "JumpReLUSAE", "JumpReLUConfig", "MatryoshkaSAE", "MatryoshkaConfig"]
