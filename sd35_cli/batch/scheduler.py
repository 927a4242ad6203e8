"""Spreading jobs over servers: the choice of server (a pure function of queue depths) and the job book-keeping.

Each server is kept at most ``max_queue`` prompts deep (counting every client's prompts, not only ours), so a
server that is busy with someone else's work, or slower, gets fewer rows, and no server sits idle while rows
wait. A server that stops answering hands its in-flight jobs back to the front of the queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

J = TypeVar("J")


@dataclass
class ServerLoad:
    """What the scheduler knows about one server."""

    alive: bool = True
    depth: int = 0  # prompts in its queue, running and pending, from every client
    ours: int = 0  # how many of those are this run's


def choose_server(loads: Sequence[ServerLoad], max_queue: int) -> int | None:
    """Index of the server the next job goes to, or ``None`` when every live server is full (or none is alive).

    The live server with the shortest queue wins; ties go to the one holding fewer of our jobs, then to the
    one listed first.
    """
    if max_queue < 1:
        raise ValueError(f"max_queue: expected 1 or more, got {max_queue}")
    best: tuple[tuple[int, int, int], int] | None = None
    for i, load in enumerate(loads):
        if not load.alive or load.depth >= max_queue:
            continue
        key = (load.depth, load.ours, i)
        if best is None or key < best[0]:
            best = (key, i)
    return None if best is None else best[1]


class JobQueue(Generic[J]):
    """Pending jobs (in order) and the jobs each server is working on, keyed by a job key."""

    def __init__(self, jobs: Iterable[J], key=lambda job: job.key):
        self._key = key
        self.pending: deque[J] = deque(jobs)
        self._order = {self._key(j): n for n, j in enumerate(self.pending)}
        self.inflight: dict[int, dict[str, J]] = {}

    def __len__(self) -> int:
        return len(self.pending) + sum(len(v) for v in self.inflight.values())

    def take(self) -> J | None:
        """The next pending job (removed from the queue), or ``None``."""
        return self.pending.popleft() if self.pending else None

    def put_back(self, job: J) -> None:
        """Return a job that could not be queued to the front."""
        self.pending.appendleft(job)

    def assign(self, server: int, job: J) -> None:
        self.inflight.setdefault(server, {})[self._key(job)] = job

    def finish(self, key: str) -> tuple[int, J] | None:
        """Take a job out of flight; returns (server, job), or ``None`` when it was not in flight."""
        for server, jobs in self.inflight.items():
            if key in jobs:
                return server, jobs.pop(key)
        return None

    def server_lost(self, server: int) -> list[J]:
        """Move the jobs of a server that went away back to the front of the queue, in their original order."""
        lost = sorted(self.inflight.pop(server, {}).values(), key=lambda j: self._order.get(self._key(j), 0))
        for job in reversed(lost):
            self.pending.appendleft(job)
        return lost

    def in_flight(self, server: int) -> list[J]:
        return list(self.inflight.get(server, {}).values())
