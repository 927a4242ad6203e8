"""The run's JSONL manifest: one line per finished job (and a line per run and per re-queue).

Each line is written and flushed to disk before the next job is looked at, so whatever stops the client
(Ctrl-C, a crash, a power cut) leaves a manifest that a rerun can trust: a job counts as done when its last
record says ``done``, its fingerprint (the exact prompt sent) is unchanged and its files are still there.
A torn last line is ignored.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

MANIFEST_NAME = "manifest.jsonl"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """Append-only JSONL file of records (dicts with a ``type``: ``run``, ``job`` or ``requeued``)."""

    def __init__(self, path: str):
        self.path = path
        self._file = None

    @classmethod
    def in_dir(cls, out_dir: str, fresh: bool = False) -> Manifest:
        """The manifest of ``out_dir``; ``fresh`` moves an existing one aside to ``manifest.jsonl.old``."""
        path = os.path.join(out_dir, MANIFEST_NAME)
        if fresh and os.path.exists(path):
            os.replace(path, path + ".old")
        return cls(path)

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, in file order."""
        out = []
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by a hard stop
                    if isinstance(rec, dict):
                        out.append(rec)
        except FileNotFoundError:
            pass
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last ``job`` record of each job key."""
        out: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            if rec.get("type") == "job" and "job" in rec:
                out[str(rec["job"])] = rec
        return out

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record and push it to disk."""
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run
            if self._file.tell() > 0:
                self._heal()
        rec = {"time": now_iso(), **record}
        self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _heal(self) -> None:
        # A hard stop can leave a last line without its newline; start ours on a fresh line.
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                self._file.write("\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def is_done(record: Mapping[str, Any] | None, fingerprint: str, out_dir: str) -> bool:
    """Whether a job's last record lets a rerun skip it."""
    if not record or record.get("status") != "done" or record.get("fingerprint") != fingerprint:
        return False
    files = record.get("files") or []
    return bool(files) and all(os.path.isfile(os.path.join(out_dir, f)) for f in files)
