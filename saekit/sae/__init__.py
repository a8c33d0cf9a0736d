"""Sparse autoencoders: one class per architecture behind the ``SAE`` interface.

``ARCHITECTURES`` maps ``SAEConfig.architecture`` to its class; ``load_sae`` reads a folder in
SAELens's layout (cfg.json + sae_weights.safetensors) back as the right class.
"""

from saekit.sae.base import ARCHITECTURES, SAE, SAEConfig, SAEMetadata, TrainStep, load_sae
from saekit.sae.batchtopk import BatchTopKSAE
from saekit.sae.jumprelu import JumpReLUSAE
from saekit.sae.relu import ReLUSAE
from saekit.sae.topk import TopKSAE

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEMetadata", "TrainStep", "load_sae",
           "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE"]
