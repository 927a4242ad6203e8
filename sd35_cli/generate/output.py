"""Where a run's files go (the reference's folder naming), writing them, and what the run reports."""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .options import stem


def output_dir(
    out_dir: str, model: str, prompt: str, postfix: str | None = None, controlnet_ckpt: str | None = None,
    now: datetime.datetime | None = None,
) -> str:
    """The reference's output folder: ``out_dir/<model>[_<controlnet>]/<sanitized prompt[:50]><postfix>``.

    The prompt part is the ``--prompt`` argument itself (for a .txt file, its path), with every character
    other than word characters, ``-`` and ``.`` replaced by ``_`` and any extension dropped; the postfix
    defaults to ``_YYYY-mm-ddTHH-MM-SS``.
    """
    sanitized = re.sub(r"[^\w\-\.]", "_", prompt)
    name = stem(model) + ("_" + stem(controlnet_ckpt) if controlnet_ckpt is not None else "")
    stamp = (now or datetime.datetime.now()).strftime("_%Y-%m-%dT%H-%M-%S")
    return os.path.join(out_dir, name, stem(sanitized)[:50] + (postfix or stamp))


@dataclass
class GenerateResult:
    """What :func:`generate` did: files written, seeds, settings and timings."""

    out_dir: str
    files: list[str]
    prompts: list[str]
    seeds: list[int]
    model: str
    variant: str
    settings: dict[str, Any]
    width: int
    height: int
    device: str  # the device the run actually used
    seconds: dict[str, float]
    steps_run: int
    memory: dict[str, int | None]
    latent_file: str | None = None
    control_image_file: str | None = None
    latents: torch.Tensor | None = field(default=None, repr=False)
    cache: dict[str, Any] | None = None  # the step cache's figures, when it was on
    dtype: str = ""  # the diffusion model's compute dtype (float32, bfloat16, ...)
    weights_dtype: str = ""  # its weights' dtype in memory ("as stored" when kept as in the file)

    @property
    def seconds_per_step(self) -> float:
        """Sampling wall time per step, over all images."""
        total = self.steps_run * len(self.files)
        return self.seconds.get("sample", 0.0) / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        """The ``--json`` summary (JSON-ready)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latents"}
        d["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        d["seconds_per_step"] = round(self.seconds_per_step, 5)
        d.update(self.memory)
        del d["memory"]
        return d


def save_latents(path: str, latents: torch.Tensor) -> str:
    """``--save_latent``: the latents as .safetensors under the key ``latent`` (folders made); returns ``path``."""
    from sd35_core.loading.checkpoint import write_safetensors

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(path, {"latent": latents.contiguous()})
    return path
