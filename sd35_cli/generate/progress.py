"""Progress on stderr and the peak memory a run reports."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch


class ProgressBar:
    """A one-line progress bar on a text stream (stderr); on a non-terminal it prints one line at the end."""

    def __init__(self, total: int, label: str = "sampling", stream: TextIO | None = None, width: int = 30):
        self.total = max(1, total)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.done = 0
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int) -> None:
        """Record that ``done`` steps are finished."""
        self.done = min(done, self.total)
        if self.live:
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def step_callback(self, info: Any) -> None:
        """A sampler callback: ``info.index`` is the 0-based step just taken."""
        self.update(info.index + 1)

    def close(self) -> None:
        """Finish the line."""
        self.stream.write(("\r" if self.live else "") + self._line() + "\n")
        self.stream.flush()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        filled = int(self.width * self.done / self.total)
        rate = f"{elapsed / self.done:.2f} s/step" if self.done else "-- s/step"
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:.1f}s {rate}"


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """Peak memory so far: accelerator bytes (CUDA) and the process's peak resident set (bytes)."""
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = int(torch.cuda.max_memory_allocated(device))
    rss = None
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = int(kb if sys.platform == "darwin" else kb * 1024)
    except (ImportError, OSError):  # pragma: no cover - Windows
        pass
    return {"peak_gpu_bytes": gpu, "peak_rss_bytes": rss}
