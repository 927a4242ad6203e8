"""``sd35 demo``: the whole stack on a fresh machine with the bundled tiny shapes model (no downloads).

The pack ships a small model of SD3.5 Medium's architecture, trained in this repository on pictures of one
shape on a plain background (``sd35_train``; files in ``assets/tiny_shapes``). The demo runs it through
:func:`sd35_cli.generate.generate`, the code path real weights take: six prompts in a 2 x 3 grid, a canny
ControlNet run and an image-to-image run.
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

from .generate import GenerateOptions, GenerateResult, generate, load_models
from .generate.models import pick_device

HELP = "draw shapes with the bundled tiny SD3.5-architecture model: txt2img grid, ControlNet, img2img"
DESCRIPTION = """\
Check an install in under a minute, offline: runs the bundled tiny shapes model (SD3.5 Medium's
architecture at toy size, trained here on 64x64 pictures of one shape on a plain background) through the
code real weights take (`sd35 generate`): a 2x3 grid of prompts, a canny ControlNet run and an
image-to-image run. It is a toy: it knows 8 colours, 3 shapes and 5 positions, and nothing else.
"""

DEFAULT_OUT = "sd35-demo"
GRID_PROMPTS = (
    "a red circle on the left of a blue background",
    "a yellow square on the top of a purple background",
    "a green triangle on the right of a white background",
    "a white circle on the bottom of a black background",
    "a purple square on the center of a green background",
    "a blue triangle on the top of a yellow background",
)
CONTROL_PROMPT = "a yellow triangle on the right of a blue background"
INIT_PROMPT = "a red circle on the left of a white background"
IMG2IMG_PROMPT = "a purple circle on the left of a white background"
CELL = 192  # grid cell side in pixels (the 64 px images are scaled up 3x)
REAL_WEIGHTS = """\
The tiny shapes model is a toy trained on coloured shapes; it shows that loading, text encoding, sampling,
guidance, ControlNet and the VAE work end to end. For real images, get the SD3.5 weights and put them where
ComfyUI keeps them:
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
                        help=f"folder for the inputs and PNGs (default: ./{DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="sampling steps per run (default: the model's recommended count)")
    parser.add_argument("--seed", type=int, default=23, metavar="N", help="seed (default: 23)")
    parser.add_argument("--device", default=None, metavar="DEV", help="device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch CPU threads (default: 1; the tiny model is too small for more threads to "
                             "pay off, and on a busy machine extra threads mostly wait for each other)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--verbose", action="store_true", help="more messages, and tracebacks on errors")


@dataclass
class DemoRun:
    """One of the demo's generations."""

    title: str
    result: GenerateResult


def shape_picture(spec_args: dict[str, str], path: str) -> str:
    """Draw one picture of the training distribution (seeded) and save it as ``path``."""
    import random

    from sd35_train.data import random_spec, render

    Image.fromarray(render(random_spec(random.Random(7), **spec_args))).save(path)
    return path


def grid_image(prompts: list[str], files: list[str], columns: int = 3) -> Image.Image:
    """Images in a grid, each captioned with its prompt (two lines)."""
    rows = (len(files) + columns - 1) // columns
    caption_h = 30
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (prompt, f) in enumerate(zip(prompts, files, strict=True)):
        x, y = (i % columns) * CELL, (i // columns) * (CELL + caption_h)
        with Image.open(f) as im:
            grid.paste(im.convert("RGB").resize((CELL, CELL), Image.NEAREST), (x, y))
        words = prompt.split(" ")
        cut = len(words) // 2
        for line, text in enumerate((" ".join(words[:cut]), " ".join(words[cut:]))):
            draw.text((x + 4, y + CELL + 2 + 13 * line), text, fill=(20, 20, 20))
    return grid


def run_demo(out: str, *, steps: int | None = None, seed: int = 23, device: str | None = None,
             log: TextIO | None = None, verbose: bool = False, threads: int | None = 1) -> dict[str, Any]:
    """Run the grid, ControlNet and img2img generations with the bundled model under ``out``; returns a summary.

    ``threads`` sets torch's CPU thread count for the run (restored afterwards); ``None`` leaves it alone.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: expected a whole number >= 1")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out, steps=steps, seed=seed, device=device, log=log, verbose=verbose)
    finally:
        torch.set_num_threads(previous)


def _postfix(outputs: str) -> str:
    # One postfix per demo run keeps the reference's folder naming; a counter avoids an earlier run's folders.
    stamp = datetime.datetime.now().strftime("_%Y-%m-%dT%H-%M-%S")
    postfix, n = stamp, 1
    while os.path.isdir(outputs) and any(d.endswith(postfix) for _, dirs, _ in os.walk(outputs) for d in dirs):
        n += 1
        postfix = f"{stamp}_{n}"
    return postfix


def _run_demo(out: str, *, steps: int | None, seed: int, device: str | None, log: TextIO | None,
              verbose: bool) -> dict[str, Any]:
    from sd35_train.bundled import tiny_shapes_checkpoint, tiny_shapes_controlnet

    log = log if log is not None else sys.stderr
    t0 = time.perf_counter()
    out = os.path.abspath(out)
    model, controlnet = tiny_shapes_checkpoint(), tiny_shapes_controlnet()
    inputs = os.path.join(out, "inputs")
    os.makedirs(inputs, exist_ok=True)
    prompts_file = os.path.join(inputs, "grid_prompts.txt")
    with open(prompts_file, "w", encoding="utf-8") as f:
        f.write("\n".join(GRID_PROMPTS) + "\n")
    control = shape_picture({"color": "green", "shape": "triangle", "position": "right", "background": "white"},
                            os.path.join(inputs, "control_triangle.png"))
    init = shape_picture({"color": "red", "shape": "circle", "position": "left", "background": "white"},
                         os.path.join(inputs, "init_red_circle.png"))

    outputs = os.path.join(out, "outputs")
    common = dict(model=model, out_dir=outputs, postfix=_postfix(outputs), seed=seed, seed_type="fixed",
                  steps=steps, width=64, height=64, device=device)
    print(f"Loading the bundled tiny shapes model ({model}) ...", file=log, flush=True)
    loaded = load_models(GenerateOptions(prompt="", **common), pick_device(device))
    jobs = [
        ("text-to-image: six prompts (grid.png)", GenerateOptions(prompt=prompts_file, **common), loaded),
        ("text-to-image with skip-layer guidance", GenerateOptions(prompt=GRID_PROMPTS[0], skip_layer_cfg=True,
                                                                   **common), loaded),
        ("canny ControlNet (edges of inputs/control_triangle.png)",
         GenerateOptions(prompt=CONTROL_PROMPT, controlnet_ckpt=controlnet, controlnet_cond_image=control,
                         controlnet_preprocess="auto", **common), None),
        ("image-to-image (inputs/init_red_circle.png, denoise 0.7): red circle -> purple circle",
         GenerateOptions(prompt=IMG2IMG_PROMPT, init_image=init, denoise=0.7, **common), loaded),
    ]
    runs = []
    for i, (title, opts, reuse) in enumerate(jobs, 1):
        print(f"\n[{i}/{len(jobs)}] {title}", file=log, flush=True)
        runs.append(DemoRun(title, generate(opts, log=log, quiet=not verbose, loaded=reuse)))
    grid_path = os.path.join(out, "grid.png")
    grid_image(list(GRID_PROMPTS), runs[0].result.files).save(grid_path)
    total = time.perf_counter() - t0
    return {
        "out": out,
        "model": model,
        "controlnet": controlnet,
        "grid": grid_path,
        "threads": torch.get_num_threads(),
        "seconds_total": round(total, 3),
        "runs": [
            {
                "title": r.title,
                "prompts": r.result.prompts,
                "files": r.result.files,
                "control_image": r.result.control_image_file,
                "settings": r.result.settings,
                "seconds": round(r.result.seconds["total"], 3),
                "seconds_per_step": round(r.result.seconds_per_step, 5),
                "steps_run": r.result.steps_run,
                "peak_rss_bytes": r.result.memory.get("peak_rss_bytes"),
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
      "with the bundled tiny shapes model (a toy trained on shapes)")
    p(f"  grid of six prompts: {summary['grid']}")
    for i, r in enumerate(summary["runs"], 1):
        p(f"  {i}. {r['title']}")
        for f in r["files"][:1] if len(r["files"]) > 1 else r["files"]:
            p(f"       {f}" + (f" (and {len(r['files']) - 1} more)" if len(r["files"]) > 1 else ""))
        if r["control_image"]:
            p(f"       control image the ControlNet saw: {r['control_image']}")
        p(f"       {r['steps_run']} steps, {r['seconds_per_step'] * 1000:.0f} ms/step, {r['seconds']:.1f} s in all")
    p("")
    p(REAL_WEIGHTS)


def run(args: argparse.Namespace) -> int:
    """``sd35 demo``."""
    summary = run_demo(args.out, steps=args.steps, seed=args.seed, device=args.device, verbose=args.verbose,
                       threads=args.threads)
    if args.json:
        print_summary(summary, sys.stderr)
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, sys.stdout)
    return 0
