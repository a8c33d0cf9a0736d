"""Atomic file writes (a temporary file beside the target, fsync, then rename) and the lock that
keeps two runs out of one output folder."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import save_file

from saekit.errors import SaekitError

TMP_MARK = ".tmp-"
LOCK_FILE = ".saekit-lock"


class FolderInUseError(SaekitError):
    """Another saekit run is writing to the same output folder."""


class OutputPathError(SaekitError):
    """An output path that cannot be written."""


def check_writable(path: str | Path, folder: bool = False) -> None:
    """Raise ``OutputPathError`` now, before expensive work, if ``path`` (a file, or with
    ``folder`` a folder) could not be written: a file in the way of a folder or of its parent,
    a folder in the way of a file, or no write permission. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise OutputPathError(f"{path} is a {'file' if folder else 'folder'}; give a "
                              f"{'folder' if folder else 'file'} path for the output.")
    existing = path if path.exists() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"Cannot write {path}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"Cannot write {path}: no write permission in {existing}.")


@contextmanager
def output_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold an advisory lock on the output ``folder`` (created if missing) while a run writes
    there; a second run on the same folder is refused at once. The folders this call created
    are removed again if the run left them empty (the lock file of a folder that existed stays:
    removing a lock file others may have opened would let two runs in)."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderInUseError(f"{folder} is in use by another saekit {command} (it holds "
                               f"{folder / LOCK_FILE}). Wait for that run to finish, or give "
                               "another --out.") from None
    try:
        yield folder
    finally:
        try:
            # removed while still held, so that no other run can lock the file being removed
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                (folder / LOCK_FILE).unlink(missing_ok=True)
                for made in created:
                    made.rmdir()  # stops (OSError) at the first folder holding something
        except OSError:
            pass
        finally:
            lock.release()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: object) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically. A failed write (a full disk, ...) raises
    ``OSError``, as any other write does."""
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata=metadata)
        except SafetensorError as err:
            raise os_error_of(err, path) from err


def save_torch(path: str | Path, data: object) -> None:
    """``torch.save`` ``data`` to ``path``, atomically. A failed write (a full disk, ...) raises
    ``OSError``: torch reports it as a ``RuntimeError`` of its zip writer."""
    with atomic_path(path) as tmp:
        try:
            torch.save(data, tmp)
        except RuntimeError as err:
            if not re.search(r"iostream error|inline_container|file write failed", str(err)):
                raise
            free = shutil.disk_usage(Path(path).parent).free
            code = errno.ENOSPC if free < (1 << 20) else errno.EIO
            raise OSError(code, f"{os.strerror(code)} ({free:,} bytes free; torch: "
                                f"{str(err).splitlines()[0]})", str(path)) from err


def os_error_of(err: Exception, path: str | Path) -> Exception:
    """safetensors reports I/O failures as ``SafetensorError("... (os error 28)")``: the
    ``OSError`` it stands for (errno, message, ``path``), or ``err`` itself when it is not one."""
    found = re.search(r"os error (\d+)", str(err))
    if not found:
        return err
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while block := data.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
