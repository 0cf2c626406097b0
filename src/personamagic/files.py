"""Files written so that a crash never leaves a half-written one: a temporary sibling, fsync, rename;
and safetensors read back with one clear error when they are not readable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and the string header of a safetensors file; a corrupt file is a UserError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError / OSError for unreadable files
        raise UserError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    return tensors, header


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], header: dict[str, str], path: Path) -> None:
    """save_file to a temporary sibling, fsync, then rename over `path`: readers see old or new, never half."""

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    write_atomic(path, write)


def write_atomic(path: Path, write) -> None:
    """Call `write(temporary_path)` on a hidden sibling, then rename it to `path`; on any error the
    temporary file is removed and `path` is untouched. The file gets the usual umask permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


LOCK_FILENAME = ".personamagic.lock"


class FolderLock:
    """An OS file lock on `folder/.personamagic.lock`, held while a run writes into `folder`. It is the
    kernel's lock on an open file (flock / LockFileEx), so it dies with its process: a killed run never
    blocks the next one. A second run on the same folder gets one UserError naming the holder's pid."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILENAME
        self._file = None

    def acquire(self) -> "FolderLock":
        try:
            self._file = open(self.path, "a+", encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write {self.path.parent}: {err.strerror or err}") from None
        if not _try_lock(self._file):
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            raise UserError(f"{self.path.parent} is in use by another run (pid {holder}); wait for it to end "
                            "or choose another --output")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def release(self) -> None:
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)
        self._file.close()  # closing the file drops the lock
        self._file = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(file) -> bool:
    """Take an exclusive, non-blocking lock on an open file; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            file.seek(0)
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def disk_error(path, err: OSError) -> UserError:
    """A filesystem fault while writing `path` as one line: `cannot write PATH: No space left on device`."""
    return UserError(f"cannot write {path}: {err.strerror or err}")
