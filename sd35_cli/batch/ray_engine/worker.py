"""The Ray actor of ``--engine ray``: loads the models once, then renders rows into PNG bytes.

A plain class (the pool wraps it with ``ray.remote``), so it also runs, and is read, without Ray. It never
writes into the output folder: the image travels back to the driver, which writes it atomically and keeps
the manifest, so a worker on another machine needs no shared output folder and a killed worker cannot leave
half an image behind.
"""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
from dataclasses import dataclass

from ...generate.options import GenerateOptions
from ...main import UsageError


@dataclass(frozen=True)
class Loaded:
    """What a worker reports after loading: where it runs, how long loading took, or why it failed."""

    where: str  # host:pid
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class RowResult:
    """What a worker sends back for one row: the PNG (``None`` on failure), the error, its seconds."""

    png: bytes | None
    error: str | None
    seconds: float


def _one_line(e: BaseException) -> str:
    """An exception as the manifest shows it: its type, its message and, for a bug, where it was raised."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, (ValueError, OSError, UsageError)):
        return text  # a problem with the input: the message names it
    tb = traceback.extract_tb(e.__traceback__)
    return text + (f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else "")


class RowWorker:
    """Renders rows with models loaded once from ``opts`` (its model options) on ``opts.device``."""

    def __init__(self, opts: GenerateOptions, threads: int):
        self.opts = opts
        self.threads = threads
        self.loaded = None

    def load(self) -> Loaded:
        """Load the models; the report says where this worker runs, or why the models could not be loaded."""
        import torch

        from ...generate.models import load_models, pick_device

        t = time.perf_counter()
        where = f"{socket.gethostname()}:{os.getpid()}"
        torch.set_num_threads(max(1, self.threads))  # the CPUs Ray gave this worker, not the whole machine's
        try:
            self.loaded = load_models(self.opts, pick_device(self.opts.device))
        except Exception as e:  # reported by the driver, which stops the run: every worker would fail alike
            return Loaded(where, time.perf_counter() - t, _one_line(e))
        return Loaded(where, time.perf_counter() - t)

    def render(self, opts: GenerateOptions, seed: int) -> RowResult:
        """One row: ``opts`` are the run's options with the row's columns; the image as PNG bytes."""
        from ...generate.generation import render_image

        t = time.perf_counter()
        try:
            _latent, image, info = render_image(self.loaded, opts, seed)
            buf = io.BytesIO()
            image.save(buf, format="PNG", pnginfo=info)  # the bytes sd35 generate writes for the same image
            return RowResult(buf.getvalue(), None, time.perf_counter() - t)
        except Exception as e:  # the row is recorded as failed; the worker goes on with the next one
            return RowResult(None, _one_line(e), time.perf_counter() - t)
