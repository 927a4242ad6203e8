"""The run itself: queue prepared jobs on the servers, follow them, bring the images home, keep the manifest.

Everything happens on the calling thread except reading the websockets (one listener thread per server,
feeding a queue), so the manifest and the output folder have a single writer.
"""

from __future__ import annotations

import os
import queue
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .client import HAVE_WEBSOCKET, ComfyClient, EventListener, history_error, output_images
from .errors import BatchError, PromptRejected, ServerError, ServerUnreachable
from .jobs import UPLOAD_SUBFOLDER, PreparedJob
from .manifest import Manifest
from .progress import Progress
from .scheduler import JobQueue, ServerLoad, choose_server

REFRESH_S = 0.5  # how often each server's /queue is read
FAILURES_TO_DEATH = 3  # consecutive failed calls after which a server counts as gone ...
DEATH_AFTER_S = 5.0  # ... or failures spanning this long
VANISH_AFTER_S = 5.0  # a prompt neither queued nor in the history this long was lost (server restarted)
ROW_TIMEOUT_S = 3600.0  # a prompt not finished this long after it started (or was queued) is stuck


@dataclass
class _Server:
    client: ComfyClient
    load: ServerLoad = field(default_factory=ServerLoad)
    listener: EventListener | None = None
    uploaded: set[str] = field(default_factory=set)
    failures: int = 0
    first_failure: float = 0.0
    refused_submits: int = 0  # POST /prompt failures in a row (a server can answer /queue and still fail those)
    last_activity: float = 0.0  # when a prompt of ours last started or finished there
    next_refresh: float = 0.0
    queued: set[str] = field(default_factory=set)  # prompt ids in its queue at the last refresh


@dataclass
class _Flight:
    job: PreparedJob
    server: int
    prompt_id: str
    submitted: float
    check_at: float = 0.0
    started: bool = False
    started_at: float | None = None
    missing_since: float | None = None

    def start(self) -> bool:
        """Mark the prompt as running; whether it was not marked before."""
        if self.started:
            return False
        self.started, self.started_at = True, time.monotonic()
        return True


@dataclass
class RunResult:
    done: int = 0
    failed: int = 0
    interrupted: bool = False
    first_error: str | None = None


class AllServersGone(BatchError):
    """No server is left to finish the run."""


class BatchRun:
    """One run of prepared jobs over ``clients``; see :meth:`run`."""

    def __init__(self, clients: Sequence[ComfyClient], jobs: Sequence[PreparedJob], out_dir: str, manifest: Manifest,
                 progress: Progress, *, use_websocket: bool = True, max_queue: int = 2,
                 poll_interval: float = 0.5, client_id: str | None = None, row_timeout: float = ROW_TIMEOUT_S):
        self.servers = [_Server(c) for c in clients]
        self.jobs: JobQueue[PreparedJob] = JobQueue(jobs)
        self.out_dir = out_dir
        self.manifest = manifest
        self.progress = progress
        self.use_websocket = use_websocket and HAVE_WEBSOCKET
        self.max_queue = max_queue
        self.poll_interval = poll_interval
        self.row_timeout = row_timeout  # 0: wait forever
        self.client_id = client_id or f"sd35-batch-{uuid.uuid4().hex}"
        self.events: queue.Queue = queue.Queue()
        self.flights: dict[str, _Flight] = {}  # prompt id -> flight
        self.result = RunResult()

    # ------------------------------------------------------------------------------------------- main loop

    def run(self) -> RunResult:
        """Run until every job is done or failed. Ctrl-C cancels this run's prompts on the servers and returns
        with ``interrupted`` set; losing every server raises :class:`AllServersGone`. The manifest is complete
        up to the last finished job either way."""
        if self.use_websocket:
            for i, s in enumerate(self.servers):
                s.listener = EventListener(i, s.client, self.client_id, self.events)
                s.listener.start()
        try:
            while len(self.jobs):
                if not any(s.load.alive for s in self.servers):
                    raise AllServersGone(
                        f"every server is gone; {len(self.jobs)} job(s) were not finished. The manifest "
                        f"{self.manifest.path} is complete up to here: rerun the same command to resume")
                self._refresh()
                self._dispatch()
                self._pump_events(0.05)
                self._poll()
                self._check_stuck()
        except KeyboardInterrupt:
            self.result.interrupted = True
            self._cancel_flights()
        finally:
            for s in self.servers:
                if s.listener is not None:
                    s.listener.stop()
            self.manifest.close()
            self.progress.close()
        return self.result

    def _refresh(self) -> None:
        now = time.monotonic()
        for i, s in enumerate(self.servers):
            if not s.load.alive or now < s.next_refresh:
                continue
            s.next_refresh = now + REFRESH_S
            try:
                running, pending = s.client.queue()
            except (ServerUnreachable, ServerError) as e:
                self._failed(i, e)
                continue
            s.failures = 0
            s.queued = set(running) | set(pending)
            s.load.depth = len(running) + len(pending)
            mine = [f for f in self.flights.values() if f.server == i]
            s.load.ours = sum(1 for f in mine if f.prompt_id in s.queued)
            for f in mine:
                if f.prompt_id not in s.queued:
                    f.check_at = min(f.check_at, now)  # left the queue: finished (or lost), look now
                elif f.prompt_id in running and f.start():
                    s.last_activity = now
                    self.progress.started_job(s.client.label, f.job.label)

    def _dispatch(self) -> None:
        while self.jobs.pending:
            i = choose_server([s.load for s in self.servers], self.max_queue)
            if i is None:
                return
            job = self.jobs.take()
            assert job is not None
            if job.error is not None:
                self._record(job, "error", None, error=job.error)
                continue
            s = self.servers[i]
            prompt_id = str(uuid.uuid4())
            try:
                self._upload(s, job)
                s.client.submit(job.prompt, self.client_id, prompt_id)
            except PromptRejected as e:
                self._record(job, "error", i, error=str(e))
                continue
            except OSError as e:  # an image of the row went away since the run started
                self._record(job, "error", i, error=f"cannot upload the row's image: {e.strerror or e} "
                                                    f"({getattr(e, 'filename', '')})")
                continue
            except (ServerUnreachable, ServerError) as e:
                # Not the row's fault (a refused prompt is PromptRejected): the row goes back for any server,
                # and a server that keeps failing is dropped (its rows re-queued on the others).
                self.jobs.put_back(job)
                s.refused_submits += 1
                if s.refused_submits >= FAILURES_TO_DEATH:
                    self._dead(i, f"{e} ({s.refused_submits} prompts in a row)")
                else:
                    self._failed(i, e)
                return  # retry on a later turn, after the next look at every server's queue
            s.refused_submits = 0
            now = time.monotonic()
            self.jobs.assign(i, job)
            self.flights[prompt_id] = _Flight(job, i, prompt_id, now, check_at=now + self._poll_gap())
            s.load.depth += 1
            s.load.ours += 1
            s.queued.add(prompt_id)

    def _upload(self, s: _Server, job: PreparedJob) -> None:
        for path, name in job.uploads.items():
            if name in s.uploaded:
                continue
            value = s.client.upload_image(path, name, UPLOAD_SUBFOLDER)
            if value != f"{UPLOAD_SUBFOLDER}/{name}":
                raise ServerError(f"{s.client.label} stored the upload of {path} as {value!r}, "
                                  f"not {UPLOAD_SUBFOLDER}/{name}")
            s.uploaded.add(name)
        for name, content in job.made.items():
            if name in s.uploaded:
                continue
            value = s.client.upload_bytes(content, name, UPLOAD_SUBFOLDER)
            if value != f"{UPLOAD_SUBFOLDER}/{name}":
                raise ServerError(f"{s.client.label} stored the upload of {name} as {value!r}, "
                                  f"not {UPLOAD_SUBFOLDER}/{name}")
            s.uploaded.add(name)

    def _check_stuck(self) -> None:
        """Drop a server whose prompt of ours has run past ``row_timeout``, or has waited in its queue that long
        while nothing of ours started or finished there: it accepted the row and does not get to it. Its rows go
        back to the queue for the other servers; whatever it finishes later is not fetched, so nothing is done
        twice."""
        if not self.row_timeout:
            return
        now = time.monotonic()
        for flight in list(self.flights.values()):
            s = self.servers[flight.server]
            # A queued row waits for the one ahead of it: its clock runs from the server's last sign of life.
            since = flight.started_at if flight.started_at is not None else max(flight.submitted, s.last_activity)
            if flight.prompt_id not in self.flights or not s.load.alive or now - since <= self.row_timeout:
                continue
            state = "running" if flight.started else "queued"
            self._cancel_on(flight.server, [f for f in self.flights.values() if f.server == flight.server])
            self._dead(flight.server, f"{flight.job.label} was {state} there for more than {self.row_timeout:g} s "
                                      "(--row-timeout) without finishing")

    def _poll_gap(self) -> float:
        # With the websocket the history is read when a prompt ends; polling stays as a slow safety net.
        return 2.0 if self.use_websocket else self.poll_interval

    def _pump_events(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = deadline - time.monotonic()
                index, kind, data = self.events.get(timeout=left) if left > 0 else self.events.get_nowait()
            except queue.Empty:
                return
            self._event(index, kind, data)

    def _event(self, index: int, kind: str, data: Mapping[str, Any]) -> None:
        s = self.servers[index]
        if kind == "_ws_lost":
            s.listener = None
            if s.load.alive:
                try:
                    s.client.queue()
                except (ServerUnreachable, ServerError) as e:
                    self._dead(index, str(e))
                    return
                self.progress.message(f"websocket to {s.client.label} lost ({data}); following it by polling")
            return
        flight = self.flights.get(str(data.get("prompt_id"))) if isinstance(data, Mapping) else None
        if flight is None or flight.server != index:
            return
        if kind in ("execution_start", "executing", "progress") and flight.start():
            s.last_activity = time.monotonic()
            self.progress.started_job(s.client.label, flight.job.label)
        if kind == "progress":
            self.progress.step(s.client.label, int(data.get("value", 0)), int(data.get("max", 0)))
        elif (kind == "executing" and data.get("node") is None) or kind in (
                "execution_success", "execution_error", "execution_interrupted"):
            flight.check_at = time.monotonic()

    def _poll(self) -> None:
        now = time.monotonic()
        for flight in sorted(self.flights.values(), key=lambda f: f.check_at):
            if flight.check_at > now or flight.prompt_id not in self.flights:
                continue
            s = self.servers[flight.server]
            if not s.load.alive:
                continue
            try:
                entry = s.client.history(flight.prompt_id)
            except (ServerUnreachable, ServerError) as e:
                self._failed(flight.server, e)
                continue
            if entry is None:
                flight.check_at = now + self._poll_gap()
                if flight.prompt_id in s.queued:
                    flight.missing_since = None
                elif flight.missing_since is None:
                    flight.missing_since = now
                    flight.check_at = now + REFRESH_S
                elif now - flight.missing_since > VANISH_AFTER_S:
                    self._lost(flight, "the prompt vanished from the server's queue (was it restarted?)")
                continue
            self._complete(flight, entry)

    # ------------------------------------------------------------------------------------------- outcomes

    def _complete(self, flight: _Flight, entry: Mapping[str, Any]) -> None:
        s = self.servers[flight.server]
        s.last_activity = time.monotonic()
        seconds = _execution_seconds(entry)
        if seconds is None:
            seconds = time.monotonic() - flight.submitted
        error = history_error(entry)
        images = output_images(entry) if error is None else []
        if error is None and not images:
            error = "the prompt finished without saving an image (does the workflow end in Save Image?)"
        files = []
        if error is None:
            try:
                for nid, i, ref in images:
                    data = s.client.view(ref)
                    ext = os.path.splitext(ref.get("filename", ""))[1] or ".png"
                    name = f"{flight.job.job.stem}_{nid}_{i}{ext}"
                    write_atomic(os.path.join(self.out_dir, name), data)
                    files.append(name)
            except ServerUnreachable as e:
                self._failed(flight.server, e)
                flight.check_at = time.monotonic() + self.poll_interval
                return
            except ServerError as e:  # the server is there but will not hand the image over
                error = f"could not fetch the image: {e}"
                files = []
        self.flights.pop(flight.prompt_id, None)
        self.jobs.finish(flight.job.key)
        if error is None:
            self._record(flight.job, "done", flight.server, prompt_id=flight.prompt_id, files=files, seconds=seconds)
        else:
            self._record(flight.job, "error", flight.server, prompt_id=flight.prompt_id, error=error,
                         seconds=seconds)

    def _record(self, job: PreparedJob, status: str, server: int | None, *, error: str | None = None,
                prompt_id: str | None = None, files: Sequence[str] = (), seconds: float | None = None) -> None:
        j = job.job
        label = self.servers[server].client.label if server is not None else None
        rec: dict[str, Any] = {
            "type": "job", "job": j.key, "row": j.row.index, "line": j.row.line, "k": j.k, "seed": j.seed,
            "settings": dict(j.settings), "status": status, "server": label, "prompt_id": prompt_id,
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
            detail = ", ".join(files) + (f" ({seconds:.1f}s on {label})" if seconds is not None else "")
        else:
            self.result.failed += 1
            detail = f"failed: {error}"
        self.progress.finished(label or "-", job.label, status == "done", detail)

    def _failed(self, index: int, error: Exception) -> None:
        s = self.servers[index]
        now = time.monotonic()
        if s.failures == 0:
            s.first_failure = now
        s.failures += 1
        if s.failures >= FAILURES_TO_DEATH or now - s.first_failure > DEATH_AFTER_S:
            self._dead(index, str(error))

    def _dead(self, index: int, reason: str) -> None:
        s = self.servers[index]
        if not s.load.alive:
            return
        s.load.alive = False
        if s.listener is not None:
            s.listener.stop()
        lost = self.jobs.server_lost(index)
        for job in lost:
            for pid in [p for p, f in self.flights.items() if f.job.key == job.key]:
                del self.flights[pid]
            self.manifest.append({"type": "requeued", "job": job.key, "row": job.job.row.index,
                                  "server": s.client.label, "reason": reason})
        self.progress.idle(s.client.label)
        left = sum(1 for x in self.servers if x.load.alive)
        self.progress.message(f"server {s.client.label} is gone ({reason}); "
                              + (f"re-queued {', '.join(j.label for j in lost)} on the other server(s)" if lost
                                 else "nothing of ours was on it") + f"; {left} server(s) left")

    def _lost(self, flight: _Flight, reason: str) -> None:
        s = self.servers[flight.server]
        self.flights.pop(flight.prompt_id, None)
        found = self.jobs.finish(flight.job.key)
        if found is not None:
            self.jobs.put_back(flight.job)
        self.manifest.append({"type": "requeued", "job": flight.job.key, "row": flight.job.job.row.index,
                              "server": s.client.label, "reason": reason})
        self.progress.message(f"{flight.job.label} on {s.client.label}: {reason}; queued again")

    def _cancel_flights(self) -> None:
        """Take this run's prompts off the servers (pending ones deleted, a running one interrupted)."""
        by_server: dict[int, list[_Flight]] = {}
        for f in self.flights.values():
            by_server.setdefault(f.server, []).append(f)
        for index, flights in by_server.items():
            self._cancel_on(index, flights)

    def _cancel_on(self, index: int, flights: Sequence[_Flight]) -> None:
        """Best effort: delete ``flights`` from server ``index``'s queue, interrupt the one running there."""
        s = self.servers[index]
        if not s.load.alive:
            return
        try:
            running, _pending = s.client.queue()
            s.client.delete_queued(f.prompt_id for f in flights if f.prompt_id not in running)
            for f in flights:
                if f.prompt_id in running:
                    s.client.interrupt(f.prompt_id)
        except (ServerUnreachable, ServerError):
            pass


def _execution_seconds(entry: Mapping[str, Any]) -> float | None:
    """Server-side execution time from the history's message timestamps (milliseconds)."""
    stamps = {}
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if isinstance(data, dict) and "timestamp" in data:
            stamps[event] = data["timestamp"]
    end = stamps.get("execution_success", stamps.get("execution_error", stamps.get("execution_interrupted")))
    start = stamps.get("execution_start")
    if start is None or end is None:
        return None
    return max(0.0, (end - start) / 1000.0)


def write_atomic(path: str, data: bytes) -> None:
    """Write through a temporary name, so a file under the final name is always whole."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise BatchError(f"cannot write {path}: {e.strerror or e}; the manifest is complete up to the "
                         "previous image, rerun to resume") from None
