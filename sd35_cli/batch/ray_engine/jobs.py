"""The rows of a ``--engine ray`` run as ``sd35 generate`` options: one :class:`RowJob` per image.

A row's columns replace the matching options of the command line (``prompt`` → ``--prompt``, ``negative`` →
``--negative_prompt``, ``control_image`` → ``--controlnet_cond_image``, ``mask_image`` → ``--mask``, ``ip_image``
and ``ip_scale`` → ``--ip_image`` / ``--ip_scale``; ``seed``,
``steps``, ``cfg``, ``width``, ``height``, ``denoise`` and ``init_image`` by their own names), so a row renders
exactly what ``sd35 generate`` renders with those options. A row whose options do not hold together is
recorded as failed with the reason and never sent to a worker; columns the engine cannot honour stop the run
before anything starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ...generate.options import GenerateOptions, validate_options
from ...main import UsageError
from ..errors import BatchError
from ..rows import Job, Row, file_digest

# Column -> the GenerateOptions field it sets.
COLUMN_OPTIONS = {
    "prompt": "prompt",
    "negative": "negative_prompt",
    "steps": "steps",
    "cfg": "cfg",
    "width": "width",
    "height": "height",
    "denoise": "denoise",
    "init_image": "init_image",
    "control_image": "controlnet_cond_image",
    "mask_image": "mask",
    "ip_image": "ip_image",
    "ip_scale": "ip_scale",
    "apg_eta": "apg_eta",
    "apg_norm_threshold": "apg_norm_threshold",
    "apg_momentum": "apg_momentum",
}
# Options that only say where and how a command writes its results: no part of what an image is.
NOT_IN_FINGERPRINT = ("prompt", "out_dir", "postfix", "seed", "seed_type", "verbose", "save_latent", "json")
IMAGE_OPTIONS = ("init_image", "controlnet_cond_image", "mask", "ip_image")


@dataclass(frozen=True)
class RowJob:
    """One image of the run: the job (row and seed), its ``sd35 generate`` options, and its identity."""

    job: Job
    options: GenerateOptions | None  # None when ``error`` says why the row cannot run
    fingerprint: str
    error: str | None = None

    @property
    def key(self) -> str:
        return self.job.key

    @property
    def label(self) -> str:
        j = self.job
        return f"row {j.row.index} seed {j.seed}"

    @property
    def file_name(self) -> str:
        """The image's name in ``--out``: ``<row>_<seed>_sd35_0.png`` (the ComfyUI engine's pattern, with the
        pack's name where that engine puts the Save Image node's id)."""
        return f"{self.job.stem}_sd35_0.png"


def check_columns(rows: Sequence[Row], base: GenerateOptions) -> None:
    """``BatchError`` for a column the engine cannot honour (before any worker starts)."""
    for row in rows:
        for column in row.values:
            if column == "seed" or column in COLUMN_OPTIONS:
                continue
            raise BatchError(f"row {row.index} (line {row.line}): column {column!r} means nothing to --engine ray "
                             f"(its columns: seed, {', '.join(COLUMN_OPTIONS)})")
        if "control_image" in row.values and not base.controlnet_ckpt:
            raise BatchError(f"row {row.index} (line {row.line}): column 'control_image' needs --controlnet_ckpt "
                             "(the ControlNet to feed it to)")
        if ("ip_image" in row.values or "ip_scale" in row.values) and not (base.ip_adapter and base.clip_vision):
            raise BatchError(f"row {row.index} (line {row.line}): columns 'ip_image' and 'ip_scale' need --ip_adapter "
                             "and --clip_vision (the IP-Adapter and its vision tower)")


def row_options(base: GenerateOptions, job: Job) -> GenerateOptions:
    """``base`` with the row's columns and the job's seed; ``UsageError`` when they do not hold together."""
    values: dict[str, Any] = {COLUMN_OPTIONS[c]: v for c, v in job.settings.items() if c in COLUMN_OPTIONS}
    if "prompt" not in values:
        raise UsageError("the row has no prompt")
    opts = replace(base, seed=job.seed, seed_type="fixed", **values)
    if opts.controlnet_ckpt and not opts.controlnet_cond_image:
        raise UsageError("no control image: give the row a control_image or the run --controlnet_cond_image")
    validate_options(opts)
    return opts


def fingerprint(opts: GenerateOptions, seed: int, digests: dict[str, str]) -> str:
    """What the image depends on (options, seed, the bytes of its input images), hashed."""
    what = {k: v for k, v in asdict(opts).items() if k not in NOT_IN_FINGERPRINT}
    what.update(engine="ray", text=opts.prompt, seed=seed)
    for name in IMAGE_OPTIONS:
        path = getattr(opts, name)
        if path:
            what[name + "_sha256"] = digests.setdefault(path, file_digest(path))
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def prepare_row_jobs(base: GenerateOptions, jobs: Sequence[Job]) -> list[RowJob]:
    """A :class:`RowJob` per job; a job whose options do not hold together carries its error instead."""
    digests: dict[str, str] = {}
    out = []
    for job in jobs:
        try:
            opts = row_options(base, job)
            fp = fingerprint(opts, job.seed, digests)
        except (UsageError, ValueError, OSError) as e:
            raw = json.dumps({"settings": dict(job.settings), "error": str(e)}, sort_keys=True, default=str)
            out.append(RowJob(job, None, hashlib.sha256(raw.encode()).hexdigest(), error=str(e)))
            continue
        out.append(RowJob(job, opts, fp))
    return out
