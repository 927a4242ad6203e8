"""Starting or joining Ray for ``--engine ray``, and how much of it each worker gets."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from ..errors import BatchError

INSTALL_HINT = 'pip install "comfyui-sd35[ray]" (in a checkout: pip install -e ".[ray]")'
_PACKAGES = ("sd35_core", "sd35_cli")


def import_ray() -> Any:
    """The ``ray`` module, or a ``BatchError`` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise BatchError(f"--engine ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def runtime_env() -> dict[str, Any]:
    """Ship this copy of ``sd35_core`` and ``sd35_cli`` to every worker, so the cluster runs the driver's code
    (not whatever version a node has installed, or none)."""
    import sd35_cli
    import sd35_core

    dirs = [os.path.dirname(os.path.abspath(m.__file__)) for m in (sd35_core, sd35_cli)]
    return {"py_modules": dirs, "excludes": ["__pycache__", "*.pyc"]}


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (or ``$RAY_ADDRESS``), else start a local one with ``num_cpus``
    (default: this machine's CPUs). Returns whether this call started or joined Ray (the caller then shuts it
    down); a Ray already initialized in this process is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = {"runtime_env": runtime_env(), "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **common)
    except ConnectionError as e:
        raise BatchError(f"--address {address}: no Ray cluster answered ({e}); start one with `ray start --head` "
                         "or leave --address out for a local Ray") from None
    return True


def plan_workers(resources: dict[str, float], workers: int | None, cpus_per_worker: float | None,
                 gpus_per_worker: float | None, device: str | None) -> tuple[int, float, float]:
    """``(workers, cpus each, gpus each)`` from the cluster's resources and the options.

    GPUs are used when the cluster has them and ``--device`` does not say cpu: one per worker and as many
    workers as GPUs by default. On CPUs only, one worker with every CPU by default (a torch process already uses
    all of them); ``--workers`` splits them.
    """
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if gpus_per_worker is None:
        wants_gpu = device in (None, "auto") or str(device).startswith("cuda")
        gpus_per_worker = 1.0 if gpus > 0 and wants_gpu else 0.0
    if gpus_per_worker < 0 or (cpus_per_worker is not None and cpus_per_worker <= 0):
        raise BatchError("--gpus-per-worker / --cpus-per-worker: expected a positive number")
    if workers is None:
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker > 0 else 1
    if workers < 1:
        raise BatchError(f"--workers: expected 1 or more, got {workers}")
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if gpus_per_worker > 0 else float(max(1, math.floor(cpus / workers)))
    return workers, cpus_per_worker, gpus_per_worker
