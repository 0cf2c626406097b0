"""Files written so that a crash never leaves a half-written one: a temporary sibling, fsync, rename
(and no folder left behind that a failed write created); weights files (safetensors, or PyTorch's pickle
format without running any code it holds) read back with one clear error when they are not readable;
the lock a run holds on its output folder; a filesystem fault as one line."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import DiskError, FolderInUse, ModelLoadError

# safetensors' dtype names (the "dtype" of its header) -> torch dtypes, for shape-only reads
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can span many lines)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_safetensors(
    path: Path, *, advice: str = "", lazy: bool = False, error: type[Exception] = ModelLoadError
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and the string header of a safetensors file; a corrupt file raises `error` (the kind of
    file it should be: a model's weights, a concept...), its message ending in `advice`. `lazy`: no tensor
    data is read; the tensors are empty ones on the meta device (names, shapes and dtypes)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if lazy:
                slices = {k: f.get_slice(k) for k in f.keys()}
                tensors = {k: torch.empty(s.get_shape(), dtype=_SAFETENSORS_DTYPES[s.get_dtype()], device="meta")
                           for k, s in slices.items()}
            else:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError / OSError for unreadable files
        message = f"{path} is not a readable safetensors file ({first_line(err)})"
        raise error(f"{message}; {advice}" if advice else message) from None
    return tensors, header


def read_weights(path: Path, *, advice: str, lazy: bool = False):
    """What a weights file holds, read without running any code it may hold: the tensors of a
    `.safetensors` file (a flat dict, `load_safetensors`), else a weights-only `torch.load` onto the CPU
    (`.bin`, `.pt`, `.pth`, `.ckpt`: dicts, lists and numbers of tensors, never other pickled objects).

    `lazy`: the tensors' data is not read (memory-mapped, or on the meta device for safetensors), for a
    look at names and shapes. Every failure is one ModelLoadError ending in `advice` (what to pass instead).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path, advice=advice, lazy=lazy)[0]
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler names the class or function it would have had to import.
        if "GLOBAL" in str(err):
            raise ModelLoadError(
                f"{path} holds pickled Python objects other than tensors (code that would run when loaded); "
                f"refusing it: {advice}"
            ) from None
        raise ModelLoadError(f"{path} is not a PyTorch weights file (it does not unpickle); {advice}") from None
    except Exception as err:  # torch.load raises RuntimeError, EOFError, ValueError... on a foreign file
        raise ModelLoadError(f"{path} is not a PyTorch weights file ({first_line(err)}); {advice}") from None


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], header: dict[str, str], path: Path) -> None:
    """save_file to a temporary sibling, fsync, then rename over `path`: readers see old or new, never half."""

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=header)
        except SafetensorError as err:  # its own type, not OSError, even for a full disk
            raise safetensors_os_error(err) from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    write_atomic(path, write)


def safetensors_os_error(err: Exception) -> OSError:
    """The OSError behind a SafetensorError ("… I/O error: No space left on device (os error 28)"), so
    that a full disk is the same fault whichever library met it."""
    match = re.search(r"\(os error (\d+)\)", str(err))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return OSError(str(err))


def write_atomic(path: Path, write) -> None:
    """Call `write(temporary_path)` on a hidden sibling, then rename it to `path`; on any error the
    temporary file and the folders this call created are removed, and `path` is untouched. The file
    gets the usual umask permissions."""
    path = Path(path)
    created = make_folders(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    except BaseException:
        remove_empty_folders(created)
        raise
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        remove_empty_folders(created)
        raise


def make_folders(folder: Path) -> list[Path]:
    """`mkdir -p folder`; returns the folders it created, outermost first (for `remove_empty_folders`).
    On an error, those made so far are removed again and the OSError is raised."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    created = []
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:
            if p.is_dir():  # made meanwhile by someone else: not ours to remove
                continue
            remove_empty_folders(created)
            raise
        except BaseException:
            remove_empty_folders(created)
            raise
        created.append(p)
    return created


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of `folders` (outermost first, as `make_folders` returns them) that are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): keep it and everything above it
            return


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


LOCK_FILENAME = ".personamagic.lock"


class FolderLock:
    """An OS file lock on `folder/.personamagic.lock`, held while a run writes into `folder`. It is the
    kernel's lock on an open file (flock / LockFileEx), so it dies with its process: a killed run never
    blocks the next one. A second run on the same folder gets one FolderInUse naming the holder's pid."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILENAME
        self._file = None

    def acquire(self) -> "FolderLock":
        while True:
            try:
                file = open(self.path, "a+", encoding="utf-8")
            except OSError as err:
                raise disk_error(self.path.parent, err) from None
            if not _try_lock(file):
                file.seek(0)
                holder = file.read().strip() or "unknown"
                file.close()
                raise FolderInUse(f"{self.path.parent} is in use by another run (pid {holder}); wait for it to end "
                                  "or choose another --output")
            if _same_file(file, self.path):
                break
            # The holder released it (and removed the file) between our open and our lock: the lock
            # is on a file nobody else will find, so try again on the current one.
            file.close()
        self._file = file
        try:
            file.seek(0)
            file.truncate()
            file.write(str(os.getpid()))
            file.flush()
        except OSError as err:
            self.release()
            raise disk_error(self.path, err) from None
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


def _same_file(file, path: Path) -> bool:
    """Whether the open `file` is still the one at `path` (not removed or replaced meanwhile)."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except OSError:
        return False


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


def disk_error(path, err: OSError) -> DiskError:
    """A filesystem fault while writing `path` as one line: `cannot write PATH: No space left on device`."""
    fault = DiskError(f"cannot write {path}: {err.strerror or err}")
    fault.errno = err.errno  # what the fault was (a full disk, a read-only one...): DiskError.remedy
    return fault
