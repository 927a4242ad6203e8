"""The tiny shapes model's evaluator: seeded prompts in, accuracy per attribute out (JSON-ready dicts).

Prompts are samples of a split seed the training never drew from (:data:`EVAL_SPLIT`), written with the
caption template; each image gets its own noise seed. Every image goes through the standard path (loader,
SD3 text encoder, :func:`sd35_core.sampling.pipeline.txt2img`, VAE decode) and is read back by
:func:`~.analysis.read_image`; a setting's score is the share of images whose colour, shape, position and
background match the prompt (``all``: every attribute of an image right). ``shape_fill`` is the shape read a
second way, by :func:`~.recon.read_independent` (two-means binarisation and the area over the bounding box),
which shares no threshold with the first reader: a shape both readers agree on is drawn, not guessed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sd35_core.sampling.guidance import CondEntry
from sd35_core.sampling.pipeline import txt2img
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance

from .analysis import read_image
from .data import IMAGE_SIZE, ShapeSpec, spec_for
from .recon import read_independent

EVAL_SPLIT = 1  # the training set is split 0 (RecipeConfig.seed); held-out prompts come from here
NOISE_SEED = 10_000  # image i is sampled from noise seed NOISE_SEED + i
ATTRIBUTES = ("color", "shape", "position", "background")
INDEPENDENT = "shape_fill"  # the shape by the independent fill-ratio reader


@dataclass(frozen=True)
class EvalSetting:
    """One row of the evaluator's table."""

    name: str
    sampler: str
    steps: int
    cfg: float
    shift: float
    slg: SkipLayerGuidance | None = None

    def request(self, seed: int) -> SampleRequest:
        return SampleRequest(steps=self.steps, cfg=self.cfg, sampler=self.sampler, shift=self.shift, seed=seed,
                             seed_mode="per_image", slg=self.slg)

    def describe(self) -> dict:
        out = {"name": self.name, "sampler": self.sampler, "steps": self.steps, "cfg": self.cfg, "shift": self.shift}
        if self.slg is not None:
            out["slg"] = {"layers": list(self.slg.layers), "scale": self.slg.scale, "start": self.slg.start,
                          "end": self.slg.end}
        return out


def eval_specs(n: int) -> list[ShapeSpec]:
    """The ``n`` held-out prompts' specs."""
    return [spec_for(EVAL_SPLIT, i) for i in range(n)]


def generate_images(model, vae, text, prompts: Sequence[str], setting: EvalSetting, seed: int = NOISE_SEED,
                    batch: int = 16) -> list[np.ndarray]:
    """Images (``uint8 [64, 64, 3]``) for ``prompts``; image ``i`` from noise seed ``seed + i``."""
    neg_ctx, neg_pooled = text.encode("")
    negative = CondEntry(neg_ctx, neg_pooled)
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        conds = [text.encode(p) for p in chunk]
        positive = CondEntry(torch.cat([c for c, _ in conds]), torch.cat([p for _, p in conds]))
        latents = txt2img(model, positive, negative, setting.request(seed + start), width=IMAGE_SIZE,
                          height=IMAGE_SIZE, batch_size=len(chunk))
        pixels = vae.decode(latents)
        arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images += list(arr)
    return images


def score(specs: Sequence[ShapeSpec], images: Sequence[np.ndarray]) -> dict[str, float]:
    """Share of images whose read-back attributes match their spec, per attribute and for all at once
    (the evaluator's own reader), and the share whose shape the independent reader gets (``shape_fill``)."""
    hits = {a: 0 for a in ATTRIBUTES}
    every = independent = 0
    for spec, image in zip(specs, images, strict=True):
        reading = read_image(image)
        ok = {a: getattr(reading, a) == getattr(spec, a) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        every += all(ok.values())
        independent += read_independent(image) == spec.shape
    n = len(specs)
    return {**{a: round(hits[a] / n, 4) for a in ATTRIBUTES}, "all": round(every / n, 4),
            INDEPENDENT: round(independent / n, 4)}


def evaluate(model, vae, text, settings: Sequence[EvalSetting], n: int = 96) -> list[dict]:
    """Score every setting on the ``n`` held-out prompts; one dict per setting (settings, accuracy, seconds)."""
    specs = eval_specs(n)
    prompts = [s.caption() for s in specs]
    rows = []
    for setting in settings:
        t = time.perf_counter()
        images = generate_images(model, vae, text, prompts, setting)
        rows.append({**setting.describe(), "accuracy": score(specs, images),
                     "seconds": round(time.perf_counter() - t, 1)})
    return rows
