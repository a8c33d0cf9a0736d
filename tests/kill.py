"""kill -9 of a training process as soon as it has written its first checkpoint."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import torch


def kill_at_first_checkpoint(command: list[str], out: Path, env: dict,
                             timeout: float = 600) -> int:
    """Start ``command`` (training into ``out``), SIGKILL it once ``out/checkpoint.pt``
    exists; the step the checkpoint holds."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (out / "checkpoint.pt").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return torch.load(out / "checkpoint.pt", weights_only=True)["step"]
