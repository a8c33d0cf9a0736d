"""Shared fixtures: the real embedded model (converted once into the saekit cache) and small captures."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model():
    """The embedded Gemma 3 270M as a TransformerBridge."""
    from saekit import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def small_capture(model, tmp_path_factory):
    """A 48-row capture of two hooks on the default corpus, in small shards."""
    from saekit import CaptureConfig, capture_activations

    config = CaptureConfig(hooks=["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"],
                           tokens=48 * 64, context=64, batch_rows=4, shard_rows=8)
    out = tmp_path_factory.mktemp("capture") / "acts"
    capture_activations(config, out, model=model)
    return out
