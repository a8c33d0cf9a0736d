"""AuxK with dead latents whose pre-activations are positive on some ranks' data only.

AuxK leaves out chosen entries <= 0 (zero after the ReLU), so one rank may decode no aux entry
while another does: every rank must still make the same collective calls (else gloo fails with
a collective mismatch and NCCL hangs), and the losses must equal one process's on the whole
batch (for BatchTopK also the selection over the global batch and the learnt threshold).
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saekit.sae import sae_config, TopKSAE
from saekit.sae.batchtopk import BatchTopKSAE
from saekit.train import Distributed

D_IN, D_SAE, K = 8, 32, 2


def _sae(arch: str) -> TopKSAE:
    """An SAE whose latent 0 reads x[:, 0] and nothing else; latent 0 will be marked dead."""
    torch.manual_seed(0)
    cls = {"topk": TopKSAE, "batchtopk": BatchTopKSAE}[arch]
    sae = cls(sae_config(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=K))
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc[:, 0] = 0.0
        sae.W_enc[0, 0] = 1.0
        sae.b_enc[0] = 0.0
    return sae


def _batch() -> torch.Tensor:
    """[32, d_in]: x[:, 0] > 0 on the first half (rank 0's), < 0 on the second (rank 1's)."""
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1))
    x[:16, 0] = x[:16, 0].abs() + 0.1
    x[16:, 0] = -x[16:, 0].abs() - 0.1
    return x


def _dead() -> torch.Tensor:
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[0] = True
    return dead


def _losses(arch: str, x: torch.Tensor, ranks: Distributed) -> dict[str, float]:
    sae = _sae(arch)
    step = sae.training_forward(x, dead_mask=_dead(), progress=0.5, batch_sum=ranks.batch_sum)
    losses = {name: float(value.detach()) for name, value in step.losses.items()}
    if arch == "batchtopk":  # its inference threshold follows the smallest kept activation
        losses["threshold"] = float(sae.threshold[0])
    return losses


def _rank_main(rank: int, port: int, arch: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        x = _batch()[rank * 16:(rank + 1) * 16]
        results[rank] = _losses(arch, x, Distributed(rank, 2))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_over_two_ranks_equals_one_process(arch):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(_free_port(), arch, results), nprocs=2, join=True)
        per_rank = [dict(results[0]), dict(results[1])]
    whole = _losses(arch, _batch(), Distributed())
    assert whole["auxk"] > 0
    for losses in per_rank:
        assert losses.keys() == whole.keys()
        for name in whole:
            assert losses[name] == pytest.approx(whole[name], rel=1e-5), (name, losses, whole)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_with_dead_latents_that_never_reach_zero_is_the_full_error(arch):
    """No chosen dead entry is positive: e_hat = 0, so auxk = ||e||^2 / TV(e), not 0."""
    x = _batch()[16:]  # x[:, 0] < 0 everywhere: latent 0's pre-activation is negative
    step = _sae(arch).training_forward(x, dead_mask=_dead(), progress=0.5,
                                       batch_sum=lambda t: t)
    error = x * _sae(arch).cfg.activation_scale - step.x_hat.detach()
    expected = error.pow(2).sum() / (error - error.mean(0)).pow(2).sum()
    assert float(step.losses["auxk"]) == pytest.approx(float(expected), rel=1e-5)
