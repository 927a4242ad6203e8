"""The driver of ``--engine ray``: rows over a pool of :class:`~.worker.RowWorker` actors, one row in flight each.

The calling process is the only writer of the output folder and the manifest: an image is written under a
temporary name and renamed, then its ``job`` record is appended and flushed, so whatever stops the run
leaves only whole images and a manifest a rerun can trust. A worker that dies (its process killed, its node
lost) is replaced by a new actor that loads the models again; the row it was rendering goes back to the front
of the queue once (a ``requeued`` record says so) and is recorded as failed if it kills a worker a second
time. Ctrl-C kills the workers and returns with what is recorded so far.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...generate.options import GenerateOptions
from ..errors import BatchError
from ..manifest import Manifest
from ..progress import Progress
from ..runner import RunResult, write_atomic
from .jobs import RowJob
from .worker import Loaded, RowResult, RowWorker

ATTEMPTS = 2  # a row is redone once after its worker died under it
WAIT_S = 0.5  # how long one look at the workers waits (Ctrl-C is seen between looks)


@dataclass(frozen=True)
class PoolConfig:
    """How many workers, what each one gets from Ray, and the model options they load."""

    options: GenerateOptions
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float


@dataclass
class _Worker:
    handle: Any
    label: str
    ready: bool = False
    job: RowJob | None = None
    started: float = 0.0


class WorkerLoadError(BatchError):
    """A worker could not load the models (every other would fail the same way)."""


@dataclass
class _State:
    flights: dict[Any, tuple[str, _Worker]] = field(default_factory=dict)  # ObjectRef -> (kind, worker)
    attempts: collections.Counter = field(default_factory=collections.Counter)


class RayPool:
    """One run of prepared row jobs on a pool of Ray actors; see :meth:`run`."""

    def __init__(self, config: PoolConfig, jobs: Sequence[RowJob], out_dir: str, manifest: Manifest,
                 progress: Progress):
        import ray

        self.ray = ray
        self.config = config
        self.queue: collections.deque[RowJob] = collections.deque(jobs)
        self.out_dir = out_dir
        self.manifest = manifest
        self.progress = progress
        self.state = _State()
        self.workers: list[_Worker] = []
        self.result = RunResult()
        self._actor = ray.remote(RowWorker).options(
            num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker, max_restarts=0)
        self._spawned = 0

    def run(self) -> RunResult:
        """Run until every job is done or failed; Ctrl-C returns with ``interrupted`` set. A worker that cannot
        load the models raises :class:`WorkerLoadError`. The manifest is complete up to the last finished row."""
        try:
            for job in [j for j in self.queue if j.error is not None]:
                self.queue.remove(job)
                self._record(job, "error", None, error=job.error)
            if self.queue:
                for _ in range(min(self.config.workers, len(self.queue))):
                    self.workers.append(self._spawn())
            while self.queue or any(w.job is not None for w in self.workers):
                self._dispatch()
                self._collect(WAIT_S)
        except KeyboardInterrupt:
            self.result.interrupted = True
        finally:
            for w in self.workers:
                self._kill(w)
            self.manifest.close()
            self.progress.close()
        return self.result

    # ------------------------------------------------------------------------------------------- workers

    def _spawn(self) -> _Worker:
        handle = self._actor.remote(self.config.options, int(max(1, self.config.cpus_per_worker)))
        self._spawned += 1
        w = _Worker(handle, f"worker {self._spawned}")
        self.state.flights[handle.load.remote()] = ("load", w)
        return w

    def _kill(self, w: _Worker) -> None:
        try:
            self.ray.kill(w.handle, no_restart=True)
        except Exception:  # already gone
            pass

    def _replace(self, w: _Worker, reason: str) -> None:
        self._kill(w)
        self.progress.idle(w.label)
        fresh = self._spawn()
        self.workers[self.workers.index(w)] = fresh
        self.progress.message(f"{w.label} died ({reason}); {fresh.label} replaces it")

    # ------------------------------------------------------------------------------------------- rows

    def _dispatch(self) -> None:
        for w in self.workers:
            if not w.ready or w.job is not None or not self.queue:
                continue
            job = self.queue.popleft()
            w.job, w.started = job, time.monotonic()
            self.state.flights[w.handle.render.remote(job.options, job.job.seed)] = ("render", w)
            self.progress.started_job(w.label, job.label)

    def _collect(self, timeout: float) -> None:
        if not self.state.flights:
            time.sleep(timeout)  # pragma: no cover - every live worker has a flight
            return
        ready, _ = self.ray.wait(list(self.state.flights), num_returns=1, timeout=timeout)
        for ref in ready:
            kind, w = self.state.flights.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # the actor died, or its node, or Ray killed it (memory)
                self._died(kind, w, e)
                continue
            if kind == "load":
                self._loaded(w, value)
                continue
            self._finished(w, value)

    def _loaded(self, w: _Worker, report: Loaded) -> None:
        if report.error is not None:
            raise WorkerLoadError(f"{w.label} could not load the models: {report.error}")
        w.ready = True
        if not self.progress.quiet:
            self.progress.message(f"{w.label} ready on {report.where} (models loaded in {report.seconds:.1f}s)")

    def _died(self, kind: str, w: _Worker, error: Exception) -> None:
        reason = _death_reason(error)
        if kind == "load":
            raise WorkerLoadError(f"{w.label} died while loading the models ({reason}); nothing more was started")
        job, w.job = w.job, None
        assert job is not None
        self.state.attempts[job.key] += 1
        if self.state.attempts[job.key] < ATTEMPTS:
            self.queue.appendleft(job)
            self.manifest.append({"type": "requeued", "job": job.key, "row": job.job.row.index,
                                  "server": w.label, "reason": f"the worker died ({reason})"})
        else:
            self._record(job, "error", w.label, error=f"the worker died under this row {ATTEMPTS} times "
                                                      f"(last: {reason})", seconds=time.monotonic() - w.started)
        self._replace(w, reason)

    def _finished(self, w: _Worker, result: RowResult) -> None:
        job, w.job = w.job, None
        assert job is not None
        if result.error is not None:
            self._record(job, "error", w.label, error=result.error, seconds=result.seconds)
            return
        write_atomic(os.path.join(self.out_dir, job.file_name), result.png)
        self._record(job, "done", w.label, files=[job.file_name], seconds=result.seconds)

    def _record(self, job: RowJob, status: str, worker: str | None, *, error: str | None = None,
                files: Sequence[str] = (), seconds: float | None = None) -> None:
        j = job.job
        rec: dict[str, Any] = {
            "type": "job", "job": j.key, "row": j.row.index, "line": j.row.line, "k": j.k, "seed": j.seed,
            "settings": dict(j.settings), "status": status, "server": worker, "prompt_id": None,
            "files": list(files), "seconds": None if seconds is None else round(seconds, 3),
            "fingerprint": job.fingerprint,
        }
        if error is not None:
            rec["error"] = error
            if self.result.first_error is None:
                self.result.first_error = f"{job.label}: {error}"
        self.manifest.append(rec)
        if status == "done":
            self.result.done += 1
            detail = ", ".join(files) + (f" ({seconds:.1f}s on {worker})" if seconds is not None else "")
        else:
            self.result.failed += 1
            detail = f"failed: {error}"
        self.progress.finished(worker or "-", job.label, status == "done", detail)


def _death_reason(error: Exception) -> str:
    """The first line of Ray's account of a dead actor (it goes on with ids and advice)."""
    text = str(error).strip().splitlines()
    return next((line.strip() for line in text if line.strip()), type(error).__name__)[:300]
