"""Jobs made ready to queue: each row's workflow patched with its settings, its files named for upload.

A row whose values do not fit the workflow becomes a job with an error, recorded in the manifest and never
queued; the run itself (:mod:`.runner`) only queues what this module made ready.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .rows import PATH_COLUMNS, Job, file_digest
from .targets import Target, apply_settings

UPLOAD_SUBFOLDER = "sd35_batch"


@dataclass
class PreparedJob:
    """A job with its final prompt (file columns already replaced by their upload names)."""

    job: Job
    prompt: dict[str, Any] | None
    fingerprint: str
    uploads: dict[str, str] = field(default_factory=dict)  # local path -> name in the upload subfolder
    error: str | None = None  # a problem with this row's values: recorded, never queued
    made: dict[str, bytes] = field(default_factory=dict)  # name in the upload subfolder -> PNG made for the row

    @property
    def key(self) -> str:
        return self.job.key

    @property
    def label(self) -> str:
        j = self.job
        return f"row {j.row.index}" + (f" seed {j.seed}" if j.seed is not None else f" #{j.k}")


def upload_name(path: str, digest: str) -> str:
    """Name an uploaded image by its content, so every server and every rerun agrees on it."""
    return f"{digest[:16]}_{os.path.basename(path)}"


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _made_mask(settings: dict[str, Any], with_image: bool, cache: dict[tuple, tuple[str, bytes]]) -> tuple[str, bytes]:
    """The PNG uploaded for a row's ``mask_image`` (see :mod:`.masks`); sets the columns it replaces."""
    from .masks import image_with_mask_png, mask_png

    mask = settings["mask_image"]
    image = settings.get("init_image") if with_image else None
    if with_image and image is None:
        raise ValueError("column 'mask_image': the Load Image node it goes to also gives the picture (the mask "
                         "is that picture's alpha), so the row needs an init_image too")
    key = (image, mask)
    if key not in cache:
        content = image_with_mask_png(image, mask) if with_image else mask_png(mask)
        stem = os.path.splitext(os.path.basename(image or mask))[0]
        cache[key] = (f"{hashlib.sha256(content).hexdigest()[:16]}_{stem}_masked.png", content)
    name, content = cache[key]
    settings["mask_image"] = f"{UPLOAD_SUBFOLDER}/{name}"
    if with_image:
        settings["init_image"] = settings["mask_image"]
    return name, content


def prepare_jobs(api: Mapping[str, Any], targets: Mapping[str, Sequence[Target]], jobs: Sequence[Job],
                 object_info: Mapping[str, Any] | None = None) -> list[PreparedJob]:
    """Patch the workflow for every job. A value that does not fit its input makes that job an error."""
    from .masks import loader_gives_the_image

    digests: dict[str, str] = {}
    made_cache: dict[tuple, tuple[str, bytes]] = {}
    mask_with_image = "mask_image" in targets and loader_gives_the_image(api, targets)
    out = []
    for job in jobs:
        settings = dict(job.settings)
        uploads, made = {}, {}
        try:
            if "mask_image" in settings:
                name, content = _made_mask(settings, mask_with_image, made_cache)
                made[name] = content
        except ValueError as e:
            out.append(PreparedJob(job, None, fingerprint(settings), error=str(e)))
            continue
        for column in sorted((PATH_COLUMNS - {"mask_image"}) & settings.keys()):
            if made and column == "init_image" and mask_with_image:
                continue  # the picture travels inside the made PNG
            path = settings[column]
            if path not in digests:
                digests[path] = file_digest(path)
            uploads[path] = upload_name(path, digests[path])
            settings[column] = f"{UPLOAD_SUBFOLDER}/{uploads[path]}"
        try:
            prompt = apply_settings(api, targets, settings, object_info)
            out.append(PreparedJob(job, prompt, fingerprint(prompt), uploads, made=made))
        except ValueError as e:
            out.append(PreparedJob(job, None, fingerprint(settings), uploads, error=str(e), made=made))
    return out
