"""``sd35 demo``: the whole stack on a fresh machine, with no weights, no ComfyUI and no network.

Writes a tiny model set (seeded random weights in the official checkpoint layouts, from
:func:`sd35_core.tiny.write_tiny_model_set`) and tiny tokenizer files (:mod:`sd35_cli.tiny_tokenizers`),
then runs three generations through :func:`sd35_cli.generate.generate`, the code path real weights take:
text-to-image with skip-layer guidance (SD3.5-Medium-like), a canny ControlNet run (SD3.5-Large-like, on a
synthesized picture of shapes) and image-to-image (SD3-Medium-like).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from PIL import Image, ImageDraw

from .generate import GenerateOptions, GenerateResult, generate

HELP = "run text-to-image, ControlNet and image-to-image on tiny random models (no downloads)"
DESCRIPTION = """\
Check an install in under a minute, offline: writes tiny SD3/SD3.5-shaped models with random weights and
tiny tokenizer files under --out, then runs text-to-image with skip-layer guidance, a canny ControlNet run
and an image-to-image run through the same code that real weights take (`sd35 generate`).

Random weights draw noise: the PNGs prove the plumbing, not the pictures.
"""

DEFAULT_OUT = "sd35-demo"
REAL_WEIGHTS = """\
Random weights draw noise: these PNGs show that loading, text encoding, sampling, skip-layer guidance,
ControlNet and the VAE run end to end, not what SD3.5 paints. For real images, get the weights and put them
where ComfyUI keeps them:
  ComfyUI/models/checkpoints/     sd3.5_medium.safetensors, sd3.5_large.safetensors, sd3.5_large_turbo.safetensors
  ComfyUI/models/text_encoders/   clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn)
  ComfyUI/models/controlnet/      sd3.5_large_controlnet_canny.safetensors (blur, depth)
then, for example:
  sd35 generate --model ComfyUI/models/checkpoints/sd3.5_medium.safetensors \\
      --model_folder ComfyUI/models/text_encoders --comfyui ComfyUI --skip_layer_cfg \\
      --prompt "a photo of a cat" --width 1024 --height 1024
(--comfyui PATH, or COMFYUI_PATH, finds the tokenizer files ComfyUI bundles; --tokenizers DIR takes a folder
with clip/ and t5/tokenizer.json. The demo's own tokenizers fit only its tiny models.)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``demo`` options on ``parser``."""
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for the tiny models, inputs and PNGs (default: ./{DEFAULT_OUT})")
    parser.add_argument("--size", type=int, default=256, metavar="PX",
                        help="image width and height, a multiple of 16 up to 512 (default: 256)")
    parser.add_argument("--steps", type=int, default=10, metavar="N", help="sampling steps per run (default: 10)")
    parser.add_argument("--seed", type=int, default=23, metavar="N", help="seed (default: 23)")
    parser.add_argument("--device", default=None, metavar="DEV", help="device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch CPU threads (default: 1; the tiny models are too small for more threads to "
                             "pay off, and on a busy machine extra threads mostly wait for each other)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--verbose", action="store_true", help="more messages, and tracebacks on errors")


@dataclass
class DemoRun:
    """One of the demo's generations."""

    title: str
    result: GenerateResult


def shapes_image(width: int, height: int) -> Image.Image:
    """A synthetic photo-like picture: a gradient sky, a sun, a house and a hill (for the canny ControlNet)."""
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=(int(70 + 120 * t), int(130 + 80 * t), int(220 - 60 * t)))
    s = min(width, height)
    draw.ellipse([int(0.68 * width), int(0.08 * height), int(0.68 * width + 0.2 * s), int(0.08 * height + 0.2 * s)],
                 fill=(250, 210, 60))
    draw.ellipse([int(-0.3 * width), int(0.62 * height), int(1.3 * width), int(1.5 * height)], fill=(60, 140, 60))
    x0, y0, x1, y1 = int(0.22 * width), int(0.45 * height), int(0.55 * width), int(0.75 * height)
    draw.rectangle([x0, y0, x1, y1], fill=(200, 80, 60))
    draw.polygon([(x0 - int(0.04 * width), y0), ((x0 + x1) // 2, int(0.28 * height)), (x1 + int(0.04 * width), y0)],
                 fill=(120, 50, 40))
    draw.rectangle([int(0.35 * width), int(0.6 * height), int(0.42 * width), y1], fill=(90, 60, 30))
    return img


def run_demo(out: str, *, size: int = 256, steps: int = 10, seed: int = 23, device: str | None = None,
             log: TextIO | None = None, verbose: bool = False, threads: int | None = 1) -> dict[str, Any]:
    """Write the tiny models and tokenizers under ``out`` and run the three generations; returns a summary.

    ``threads`` sets torch's CPU thread count for the run (restored afterwards); ``None`` leaves it alone.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: expected a whole number >= 1")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out, size=size, steps=steps, seed=seed, device=device, log=log, verbose=verbose)
    finally:
        torch.set_num_threads(previous)


def _run_demo(out: str, *, size: int, steps: int, seed: int, device: str | None, log: TextIO | None,
              verbose: bool) -> dict[str, Any]:
    from sd35_core.tiny import write_tiny_model_set

    from .tiny_tokenizers import write_tiny_tokenizers

    log = log if log is not None else sys.stderr
    if size <= 0 or size % 16:
        raise ValueError(f"--size {size}: expected a positive multiple of 16 pixels")
    t0 = time.perf_counter()
    out = os.path.abspath(out)
    models_dir = os.path.join(out, "models")
    print(f"Writing tiny random-weight models to {models_dir} ...", file=log, flush=True)
    models = write_tiny_model_set(models_dir, seed=0)
    tokenizers = write_tiny_tokenizers(os.path.join(models_dir, "tokenizers")).directory
    t_models = time.perf_counter() - t0

    inputs = os.path.join(out, "inputs")
    os.makedirs(inputs, exist_ok=True)
    picture = os.path.join(inputs, "shapes.png")
    shapes_image(size, size).save(picture)

    # One postfix per demo run keeps the reference's folder naming; a counter avoids an earlier run's folders.
    outputs = os.path.join(out, "outputs")
    stamp = datetime.datetime.now().strftime("_%Y-%m-%dT%H-%M-%S")
    postfix, n = stamp, 1
    while os.path.isdir(outputs) and any(stamp_dir.endswith(postfix) for _, dirs, _ in os.walk(outputs)
                                         for stamp_dir in dirs):
        n += 1
        postfix = f"{stamp}_{n}"
    common = dict(
        out_dir=outputs, postfix=postfix, seed=seed, seed_type="fixed", steps=steps,
        width=size, height=size, model_folder=os.path.dirname(models.text_encoders["clip_l"]),
        tokenizers=tokenizers, device=device,
    )
    jobs = [
        ("text-to-image, SD3.5-Medium-like, skip-layer guidance",
         GenerateOptions(prompt="a lighthouse on a cliff at sunset, oil painting",
                         model=models.checkpoints["sd3.5_medium"], skip_layer_cfg=True, **common)),
        ("ControlNet (canny edges of inputs/shapes.png), SD3.5-Large-like",
         GenerateOptions(prompt="a red house on a green hill under a yellow sun",
                         model=models.checkpoints["sd3.5_large"], controlnet_ckpt=models.controlnets["canny"],
                         controlnet_cond_image=picture, controlnet_preprocess="auto", **common)),
        ("image-to-image (inputs/shapes.png, denoise 0.6), SD3-Medium-like",
         GenerateOptions(prompt="a watercolor of a house on a hill", model=models.checkpoints["sd3_medium"],
                         init_image=picture, denoise=0.6, **common)),
    ]
    runs = []
    for i, (title, opts) in enumerate(jobs, 1):
        print(f"\n[{i}/{len(jobs)}] {title}", file=log, flush=True)
        runs.append(DemoRun(title, generate(opts, log=log, quiet=not verbose)))
    total = time.perf_counter() - t0
    return {
        "out": out,
        "threads": torch.get_num_threads(),
        "models_dir": models_dir,
        "tokenizers": tokenizers,
        "seconds_writing_models": round(t_models, 3),
        "seconds_total": round(total, 3),
        "runs": [
            {
                "title": r.title,
                "files": r.result.files,
                "control_image": r.result.control_image_file,
                "settings": r.result.settings,
                "seconds": round(r.result.seconds["total"], 3),
                "seconds_per_step": round(r.result.seconds_per_step, 5),
                "steps_run": r.result.steps_run,
                "peak_rss_bytes": r.result.memory.get("peak_rss_bytes"),
                "peak_gpu_bytes": r.result.memory.get("peak_gpu_bytes"),
            }
            for r in runs
        ],
    }


def print_summary(summary: dict[str, Any], stream: TextIO) -> None:
    """The human-readable report: where the PNGs are, how long each part took, and what comes next."""

    def p(*parts: str) -> None:
        print(*parts, file=stream)

    p("")
    threads = summary["threads"]
    p(f"sd35 demo: done in {summary['seconds_total']:.1f} s on {threads} CPU thread{'s' if threads > 1 else ''} "
      f"(tiny models and tokenizers written in {summary['seconds_writing_models']:.1f} s to {summary['models_dir']})")
    for i, r in enumerate(summary["runs"], 1):
        p(f"  {i}. {r['title']}")
        for f in r["files"]:
            p(f"       {f}")
        if r["control_image"]:
            p(f"       control image the ControlNet saw: {r['control_image']}")
        p(f"       {r['steps_run']} steps, {r['seconds_per_step'] * 1000:.0f} ms/step, {r['seconds']:.1f} s in all")
    p("")
    p(REAL_WEIGHTS)


def run(args: argparse.Namespace) -> int:
    """``sd35 demo``."""
    summary = run_demo(args.out, size=args.size, steps=args.steps, seed=args.seed, device=args.device,
                       verbose=args.verbose, threads=args.threads)
    if args.json:
        print_summary(summary, sys.stderr)
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, sys.stdout)
    return 0
