"""The SAEs of a training run and one optimiser step of each: ``Run`` (an SAE, its Adam state and
dead-latent counters), the learning-rate schedule, and the ranks of a torchrun job."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from saekit.errors import TrainingError
from saekit.sae import ARCHITECTURES, SAE, SAEConfig

if TYPE_CHECKING:
    from saekit.train import TrainConfig


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then linear decay to zero."""
    warmup = max(1, int(config.lr_warmup_fraction * config.steps))
    decay = int(config.lr_decay_fraction * config.steps)
    factor = min(1.0, (step + 1) / warmup)
    if decay and step >= config.steps - decay:
        factor = min(factor, (config.steps - step) / decay)
    return config.lr * factor


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls, device: torch.device) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), world)

    def batch_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over ranks (differentiable: gradients flow to the local part)."""
        if self.world == 1:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return value + (total - value.detach())

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def any_(self, mask: torch.Tensor) -> torch.Tensor:
        return self.sum_(mask.to(torch.int32)) > 0 if self.world > 1 else mask


@dataclass
class Run:
    """One SAE of the sweep and its training state; it reads block ``part`` of
    ``ActivationStream.per_hook`` (its hook's columns)."""

    name: str
    sae: SAE
    optimizer: torch.optim.Adam
    tokens_since_fired: torch.Tensor  # [d_sae] int64
    part: int = 0
    # the first step whose losses held NaN or inf (-1: none yet) and those losses, kept on
    # the device so that a step needs no host sync; ``check_finite_losses`` reads them
    first_nonfinite: torch.Tensor | None = None
    nonfinite_values: torch.Tensor | None = None
    loss_names: tuple[str, ...] = ()

    def note_nonfinite(self, losses: dict[str, torch.Tensor], step: int) -> None:
        """Record ``losses`` (0-dim tensors) if they are the first to hold NaN or inf."""
        values = torch.stack([v.float() for v in losses.values()])
        if self.first_nonfinite is None:
            self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=values.device)
            self.nonfinite_values = torch.zeros_like(values)
            self.loss_names = tuple(losses)
        first = (self.first_nonfinite < 0) & ~values.isfinite().all()
        self.first_nonfinite = torch.where(first, step, self.first_nonfinite)
        self.nonfinite_values = torch.where(first, values, self.nonfinite_values)

    def dead_mask(self, threshold: int) -> torch.Tensor:
        return self.tokens_since_fired >= threshold

    def state(self) -> dict:
        return {"sae": self.sae.state_dict(), "cfg": asdict(self.sae.cfg),
                "optimizer": self.optimizer.state_dict(),
                "tokens_since_fired": self.tokens_since_fired}

    def restore(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.sae.cfg.activation_scale = state["cfg"]["activation_scale"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


def make_runs(configs: dict[str, SAEConfig], config: TrainConfig, device: torch.device,
              part: int = 0, prefix: str = "") -> list[Run]:
    """A fresh Run per SAE config, named ``prefix + name`` (its folder under ``--out``),
    reading block ``part`` of each batch."""
    runs = []
    for name, sae_cfg in configs.items():
        sae = ARCHITECTURES[sae_cfg.architecture](sae_cfg, device=device)
        # fused: one pass over each tensor (same update up to rounding; on CPU ~9x faster)
        optimizer = torch.optim.Adam(sae.parameter_groups(), lr=config.lr,
                                     fused=torch.device(device).type in ("cpu", "cuda"))
        runs.append(Run(prefix + name, sae, optimizer,
                        torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device), part))
    return runs


def train_step(run: Run, batch: torch.Tensor, config: TrainConfig, step: int,
               ranks: Distributed) -> dict[str, torch.Tensor]:
    """One optimiser step of one SAE on this rank's slice ``batch`` [batch / world, d_in];
    its losses and dead fraction as 0-dim tensors (on the device: reading them syncs)."""
    dead = run.dead_mask(config.dead_tokens)
    x, target = run.sae.split_pair(batch)
    result = run.sae.training_forward(x, dead_mask=dead, progress=step / config.steps,
                                      batch_sum=ranks.batch_sum, target=target)
    run.optimizer.zero_grad(set_to_none=True)
    result.losses["loss"].backward()
    for parameter in run.sae.parameters():
        if parameter.grad is not None:
            ranks.sum_(parameter.grad)
    run.sae.before_optimizer_step()
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(config, step) * group["lr_scale"]
    run.optimizer.step()
    run.sae.after_optimizer_step()
    fired = ranks.any_(result.fired)
    run.tokens_since_fired += config.batch_size
    run.tokens_since_fired.masked_fill_(fired, 0)  # no host sync, unlike [fired] = 0
    logged = {k: v.detach() for k, v in result.losses.items()}
    run.note_nonfinite(logged, step)
    logged["dead_fraction"] = run.dead_mask(config.dead_tokens).float().mean()
    return logged


def check_finite_losses(runs: list[Run], config: TrainConfig) -> None:
    """Raise if a run's loss became non-finite at any step so far (one host sync per run:
    ``train_step`` only records it on the device, so call this before logging or saving)."""
    for run in runs:
        if run.first_nonfinite is None or int(run.first_nonfinite) < 0:
            continue
        values = dict(zip(run.loss_names, run.nonfinite_values.tolist()))
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        raise TrainingError(
            f"{run.name}: the loss became non-finite at step {int(run.first_nonfinite)} ({bad})"
            f" - training diverged (lr {config.lr:g}); lower --lr or normalise the "
            "activations. Nothing from that step on was saved: the last checkpoint is intact.")


def check_finite_parameters(runs: list[Run], step: int) -> None:
    """Refuse to save SAEs whose parameters hold NaN or inf (named by SAE and tensor)."""
    for run in runs:
        bad = [name for name, p in run.sae.named_parameters() if not bool(p.isfinite().all())]
        if bad:
            raise TrainingError(f"{run.name}: parameters {bad} are non-finite after step "
                                f"{step}; lower --lr. Not saved.")
