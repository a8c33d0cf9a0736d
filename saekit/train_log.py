"""Training logs: one JSON line per SAE every ``log_every`` steps (``metrics.jsonl`` in the SAE's
folder), wandb too if asked for, cut back to the step a resumed run restarts from."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from saekit.errors import TrainingError
from saekit.files import atomic_path


def logged_at(config: Any, step: int) -> bool:
    """Whether a metrics line is written after ``step`` steps (every ``log_every``, and the
    last step)."""
    return step % config.log_every == 0 or step == config.steps


def truncate_metrics(path: Path, step: int) -> None:
    """Drop logged lines past ``step`` (written after the checkpoint a resume starts from) and
    any line a crash or a full disk left torn."""
    if path.exists():
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if (entry := _logged_entry(line)) is not None and entry["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in lines))


def _logged_entry(line: str) -> dict | None:
    """A metrics.jsonl line as a dict, or None for a blank, torn or foreign line."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("step"), int) else None


class MetricsWriter:
    """Appends one JSON line per SAE every ``log_every`` steps; wandb too if asked for."""

    def __init__(self, out: Path, runs: list[Any], start: int, config: Any,
                 learning_rate: Callable[[Any, int], float]) -> None:
        self.learning_rate = learning_rate  # (config, step) -> the step's learning rate
        self.config, self.files, self.started = config, {}, (time.perf_counter(), start)
        for run in runs:
            path = out / run.name / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            truncate_metrics(path, start)
            self.files[run.name] = open(path, "a")
        self.wandb = None
        if config.wandb:
            try:
                import wandb
            except ImportError as err:
                raise TrainingError("--wandb needs wandb: pip install wandb") from err
            self.wandb = wandb.init(project="saekit", config=asdict(config))

    def log(self, step: int, logs: dict[str, dict[str, torch.Tensor | float]]) -> None:
        if not logged_at(self.config, step):
            return
        elapsed = time.perf_counter() - self.started[0]
        rate = (step - self.started[1]) * self.config.batch_size / max(elapsed, 1e-9)
        for name, values in logs.items():
            line = {"step": step, "tokens": step * self.config.batch_size,
                    "lr": self.learning_rate(self.config, step - 1),
                    **{k: float(v) for k, v in values.items()}, "tokens_per_s": rate}
            self.files[name].write(json.dumps(line) + "\n")
            self.files[name].flush()
            if self.wandb:
                self.wandb.log({f"{name}/{k}": v for k, v in line.items()}, step=step)

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        if self.wandb:
            self.wandb.finish()
