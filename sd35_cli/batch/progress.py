"""Progress on stderr: on a terminal one live line (overall bar, then each server's current image and step);
elsewhere (a log file, a pipe) one plain line per finished image."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO


def bar(fraction: float, width: int) -> str:
    """A text bar ``[####....]`` filled to ``fraction`` (clamped to 0..1)."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h07m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class _Current:
    label: str
    value: int = 0
    maximum: int = 0


class Progress:
    """The run's progress display (``quiet`` prints only messages)."""

    def __init__(self, total: int, skipped: int = 0, stream: TextIO | None = None, live: bool | None = None,
                 quiet: bool = False):
        self.stream = stream or sys.stderr
        self.live = (self.stream.isatty() if live is None else live) and not quiet
        self.quiet = quiet
        self.total = total
        self.skipped = skipped
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self.current: dict[str, _Current] = {}
        self._drawn = False
        self._last_draw = 0.0

    def message(self, text: str) -> None:
        """A line that stays (notices, errors)."""
        self._clear()
        print(text, file=self.stream, flush=True)
        self._draw(force=True)

    def started_job(self, server: str, label: str) -> None:
        self.current[server] = _Current(label)
        self._draw()

    def step(self, server: str, value: int, maximum: int) -> None:
        cur = self.current.get(server)
        if cur is not None:
            cur.value, cur.maximum = value, maximum
            self._draw()

    def idle(self, server: str) -> None:
        self.current.pop(server, None)
        self._draw()

    def finished(self, server: str, label: str, ok: bool, detail: str) -> None:
        """A job ended: counted, and reported on its own line when not live (or when it failed)."""
        if ok:
            self.done += 1
        else:
            self.failed += 1
        cur = self.current.get(server)
        if cur is not None and cur.label == label:
            self.current.pop(server, None)
        n = self.skipped + self.done + self.failed
        if not ok or (not self.live and not self.quiet):
            self.message(f"[{n}/{self.total}] {label}: {detail}")
        else:
            self._draw(force=True)

    def _eta(self) -> str:
        finished = self.done + self.failed
        left = self.total - self.skipped - finished
        if finished == 0 or left <= 0:
            return ""
        per = (time.monotonic() - self.started) / finished
        return f" eta {duration(per * left)}"

    def _line(self) -> str:
        n = self.skipped + self.done + self.failed
        parts = [f"{bar(n / max(self.total, 1), 20)} {n}/{self.total}"
                 + (f" ({self.failed} failed)" if self.failed else "") + self._eta()]
        for server, cur in self.current.items():
            step = f" {bar(cur.value / cur.maximum, 10)} {cur.value}/{cur.maximum}" if cur.maximum else ""
            parts.append(f"{server} {cur.label}{step}")
        return " | ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self.stream.write("\r\x1b[K" + self._line())
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self.live and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        if self.live and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
