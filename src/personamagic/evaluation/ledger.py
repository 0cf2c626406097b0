"""Append-only JSON-lines results: one file per process, one record per line, never rewritten.

Each record is written with a single `os.write` on a file opened with O_APPEND, then fsync'ed: a
crash loses at most the record being written, never a finished one. A line cut short by a crash is
skipped when reading, and the next append starts on a fresh line so it cannot be glued to it.
Processes never share a file, so no locking is needed; readers merge all files of the folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import BAD_JSON

logger = logging.getLogger(__name__)


def shard_filename(process_index: int, num_processes: int) -> str:
    return f"process-{process_index}-of-{num_processes}.jsonl"


def append_record(path: Path, record: dict) -> None:
    """Append one JSON record as one line, durably."""
    line = (json.dumps(record, allow_nan=False, sort_keys=True) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: to check the last byte
    try:
        if _ends_without_newline(fd):
            line = b"\n" + line  # a crash cut the last line short: never glue this record to it
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path} ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_without_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_records(folder: Path) -> Iterator[dict]:
    """Every complete record of every `*.jsonl` file in `folder`, file by file, in order."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.jsonl")):
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    logger.warning("%s:%d: skipping a record cut short (an interrupted write)", path, number)
                    continue
                try:
                    record = json.loads(raw)
                except BAD_JSON:
                    logger.warning("%s:%d: skipping a line that is not JSON", path, number)
                    continue
                if isinstance(record, dict):
                    yield record


class Ledger:
    """The results folder of a study, as seen from one process."""

    def __init__(self, folder: str | Path, process_index: int = 0, num_processes: int = 1):
        self.folder = Path(folder)
        self.path = self.folder / shard_filename(process_index, num_processes)

    def append(self, record: dict) -> None:
        append_record(self.path, record)

    def records(self) -> list[dict]:
        return list(read_records(self.folder))
