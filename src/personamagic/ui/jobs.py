"""The job queue behind the web UI: one worker thread runs one job at a time, in submission order.

A GPU holds one training or one sampling run at a time, and several browser tabs share the server,
so every piece of heavy work is a `Job` on one `JobQueue`. The page never waits on a job: it submits
one, keeps its id, and polls `Job.snapshot()`. Each job owns a fresh output folder; a job that is
cancelled or fails has its folder deleted, so nothing half-written is ever left behind.

Cancelling is cooperative: the work reports progress through `Job.report`, which raises
`JobCancelled` once `JobQueue.cancel` was called. `personalize(..., progress=...)` and
`generate(..., progress=...)` call their callback after every step (image batch), so a cancel takes
effect within one step.
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import PersonaMagicError

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED_STATES = (DONE, FAILED, CANCELLED)
# Shown for errors that are not the user's to fix; the traceback goes to the server log.
INTERNAL_ERROR = "something went wrong on the server (the traceback is in its log); try again or report it"


class JobCancelled(Exception):
    """Raised from `Job.report` inside the running work once the job was cancelled."""


def new_job_id() -> str:
    """`20261126-101502-3fa9c1`: sorts by submission time, unique without a counter."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@dataclass
class Job:
    """One unit of heavy work and everything the page shows about it."""

    kind: str  # "personalize" or "generate"
    folder: Path  # made for this job alone; deleted if the job is cancelled or fails
    work: Callable[["Job"], Any]  # runs in the worker thread; its return value becomes `result`
    label: str = ""  # what the job is about, for the page (e.g. the concept's name)
    id: str = field(default_factory=new_job_id)
    state: str = QUEUED
    phase: str = ""  # e.g. "warm-up" then "train" for a personalization
    step: int = 0  # progress within the phase
    total: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per reported step that had logs
    result: Any = None
    error: str = ""  # one line for the page when state == FAILED
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def report(self, step: int, total: int, logs: dict | None = None, phase: str = "") -> None:
        """Progress callback for the work: record the step; raise JobCancelled if cancelled."""
        with self._lock:
            self.step, self.total, self.phase = step, total, phase
            if logs:
                self.history.append({"index": len(self.history) + 1, "phase": phase, "step": step, **logs})
        if self._cancel.is_set():
            raise JobCancelled(self.id)

    def snapshot(self) -> dict:
        """A consistent copy of the job's state for another thread (the page's polling)."""
        with self._lock:
            return {
                "id": self.id,
                "kind": self.kind,
                "label": self.label,
                "state": self.state,
                "phase": self.phase,
                "step": self.step,
                "total": self.total,
                "history": list(self.history),
                "result": self.result,
                "error": self.error,
                "folder": self.folder,
                "cancelling": self._cancel.is_set() and self.state == RUNNING,
            }

    def _set(self, **changes) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)


class JobQueue:
    """Runs submitted jobs one at a time, first in first out, in a single daemon thread."""

    def __init__(self):
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._order: list[str] = []  # submission order, for "n jobs ahead"
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="personamagic-jobs", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise RuntimeError("the job queue is closed")
            self._jobs[job.id] = job
            self._order.append(job.id)
        self._pending.put(job)
        logger.info("queued %s job %s (%s)", job.kind, job.id, job.label)
        return job

    def get(self, job_id: str | None) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def active(self) -> list[Job]:
        """Queued and running jobs, in submission order."""
        with self._lock:
            return [self._jobs[i] for i in self._order if not self._jobs[i].finished]

    def ahead_of(self, job: Job) -> int:
        """How many unfinished jobs were submitted before `job` (0 = it runs now or next)."""
        with self._lock:
            index = self._order.index(job.id)
            return sum(not self._jobs[i].finished for i in self._order[:index])

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, a running one at its next step. False if already finished."""
        job = self.get(job_id)
        if job is None or job.finished:
            return False
        job._cancel.set()
        with job._lock:
            queued = job.state == QUEUED
            if queued:  # the worker skips it; nothing ran, so only its folder goes
                job.state, job.finished_at = CANCELLED, time.time()
        if queued:
            _remove_folder(job)
            logger.info("cancelled queued %s job %s", job.kind, job.id)
        return True

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job has finished (tests, scripts). TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        while not job.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            time.sleep(0.05)
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything, let the running job stop at its next step, end the worker."""
        with self._lock:
            self._closed = True
            ids = list(self._order)
        for job_id in ids:
            self.cancel(job_id)
        self._pending.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._pending.get()
            if job is None:
                return
            with job._lock:
                if job.state != QUEUED:  # cancelled while waiting
                    continue
                job.state, job.started_at = RUNNING, time.time()
            logger.info("started %s job %s", job.kind, job.id)
            try:
                result = job.work(job)
            except JobCancelled:
                _remove_folder(job)
                job._set(state=CANCELLED, finished_at=time.time())
                logger.info("cancelled %s job %s", job.kind, job.id)
            except PersonaMagicError as err:
                _remove_folder(job)
                job._set(state=FAILED, error=str(err), finished_at=time.time())
                logger.info("%s job %s failed: %s", job.kind, job.id, err)
            except Exception:  # anything else is a bug: log it whole, show one line
                logger.exception("%s job %s crashed", job.kind, job.id)
                _remove_folder(job)
                job._set(state=FAILED, error=INTERNAL_ERROR, finished_at=time.time())
            else:
                job._set(state=DONE, result=result, finished_at=time.time())
                logger.info("finished %s job %s", job.kind, job.id)


def _remove_folder(job: Job) -> None:
    if job.folder.exists():
        shutil.rmtree(job.folder, ignore_errors=True)
