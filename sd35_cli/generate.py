"""``sd35 generate``: a drop-in for Stability's ``sd3_infer.py``, running on sd35_core.

Same option names, meanings, per-model defaults and output folder naming as the reference's ``main()``, so a
reference command line works unchanged; see :data:`DESCRIPTION` for where we deliberately differ.
The functions here are the one code path from files to PNGs: the demo calls :func:`generate` too.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image

from sd35_core.samplers import SAMPLERS

from .main import UsageError

HELP = "text-to-image / image-to-image / ControlNet, a drop-in for the reference's sd3_infer.py"
DESCRIPTION = """\
Generate images with SD3 Medium, SD3.5 Medium, Large, Large Turbo and the SD3.5 Large ControlNets.

A drop-in for Stability's sd3_infer.py: the same option names and meanings (underscored or dashed),
the same defaults per model file name (and, for renamed files, per detected model), and the same
output folders: OUT_DIR/<model name>[_<controlnet name>]/<prompt[:50]><POSTFIX or _timestamp>/000000.png.
A --prompt ending in .txt is read as one prompt per line (one image each).

Where this differs from the reference, on purpose:
  * --skip_layer_cfg on SD3.5 Medium uses cfg 4.0 as the reference's CONFIGS intend; the reference reads
    the cfg before its SLG config and so runs at 5.0. Pass --cfg 5 to reproduce it exactly.
  * Image encodes (--init_image, --controlnet_cond_image) take the VAE mean: the reference samples from
    the global RNG there, which makes its own runs unrepeatable.
  * --steps 0, --cfg 0 or --shift 0 are errors here; the reference silently replaced them by defaults.
  * Values are parsed per option (like python-fire: True/False, numbers, None), not as python literals:
    --prompt 123 is the prompt "123".
  * An existing output folder is an error, as in the reference (choose another --postfix).
Beyond the reference: explicit SLG parameters (--slg_*), text encoder files (--clip_l, --clip_g, --t5xxl;
--t5xxl none runs without T5), tokenizer files (--tokenizers, --comfyui or COMFYUI_PATH), --device, --dtype,
--save_latent, --json, --negative_prompt, ControlNet strength and image preprocessing.
"""

# The reference's module-level defaults (sd3_infer.py), kept so that omitted options behave the same.
REF_PROMPT = "a photo of a cat"
REF_MODEL = "models/sd3.5_large.safetensors"
REF_OUT_DIR = "outputs"
REF_SEED = 23
REF_SEED_TYPE = "rand"
REF_SIZE = 1024
REF_DENOISE = 0.8
REF_MODEL_FOLDER = "models"
# Parameter order of the reference's main(); python-fire fills unnamed positional arguments in this order.
REFERENCE_ORDER = (
    "prompt", "model", "out_dir", "postfix", "seed", "seed_type", "sampler", "steps", "cfg", "shift",
    "width", "height", "controlnet_ckpt", "controlnet_cond_image", "vae", "init_image", "denoise",
    "skip_layer_cfg", "verbose", "model_folder", "text_encoder_device",
)
SEED_TYPES = ("fixed", "roll", "rand")
# Text encoder files looked for in --model_folder, first match wins (the reference only knows the first).
TEXT_ENCODER_NAMES = {
    "clip_l": ("clip_l.safetensors",),
    "clip_g": ("clip_g.safetensors",),
    "t5xxl": ("t5xxl.safetensors", "t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
              "t5xxl_fp8_e4m3fn_scaled.safetensors"),
}
RAND_SEED_LIMIT = 100000  # the reference draws rand seeds from [0, 100000)
NONE_WORDS = ("none", "null", "")


# --------------------------------------------------------------------------------------------------
# option parsing (python-fire compatible spellings)


def _is_none(text: str) -> bool:
    return text.strip().lower() in NONE_WORDS


def parse_bool(text: str | bool) -> bool:
    """``True``/``False`` the way python-fire reads them (plus yes/no/1/0/on/off)."""
    if isinstance(text, bool):
        return text
    word = text.strip().lower()
    if word in ("true", "1", "yes", "on", "y"):
        return True
    if word in ("false", "0", "no", "off", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_int(text: str) -> int | None:
    """A whole number (``40`` or ``40.0``), or ``None``."""
    if _is_none(text):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def parse_float(text: str) -> float | None:
    """A finite number, or ``None``."""
    if _is_none(text):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def parse_optional_str(text: str) -> str | None:
    """A path or name; ``None`` (any case) means not given, as python-fire reads it."""
    return None if _is_none(text) else text


def parse_layers(text: str) -> tuple[int, ...]:
    """Block indices written ``7,8,9``, ``7 8 9`` or ``[7, 8, 9]``."""
    cleaned = text.strip().strip("[]()")
    parts = [p for p in re.split(r"[,\s]+", cleaned) if p]
    try:
        layers = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like 7,8,9; got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one block index, e.g. 7,8,9")
    return layers


def _opt(parser, name: str, **kw) -> argparse.Action:
    """An option under its reference spelling plus the dashed one (``--model_folder`` / ``--model-folder``)."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    kw.setdefault("default", None)
    return parser.add_argument(*names, dest=name, **kw)


def _flag(parser, name: str, help: str) -> argparse.Action:
    return _opt(parser, name, nargs="?", const=True, type=parse_bool, metavar="BOOL", help=help)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``generate`` options on ``parser``."""
    ref = parser.add_argument_group("options of the reference's sd3_infer.py")
    _opt(ref, "prompt", metavar="TEXT|FILE.txt",
         help=f"prompt, or a .txt file with one prompt per line (default: {REF_PROMPT!r})")
    _opt(ref, "model", type=parse_optional_str, metavar="FILE",
         help=f"SD3/SD3.5 .safetensors checkpoint or bare diffusion model (default: {REF_MODEL})")
    _opt(ref, "out_dir", type=parse_optional_str, metavar="DIR", help=f"output root (default: {REF_OUT_DIR})")
    _opt(ref, "postfix", type=parse_optional_str, metavar="TEXT",
         help="suffix of the output folder name (default: _<timestamp>)")
    _opt(ref, "seed", type=parse_int, metavar="N", help=f"seed (default: {REF_SEED})")
    _opt(ref, "seed_type", type=str.lower, choices=SEED_TYPES,
         help=f"fixed: every prompt uses --seed; roll: prompt i uses seed+i; rand: a random seed in "
              f"[0, {RAND_SEED_LIMIT}) per prompt (default: {REF_SEED_TYPE}, as the reference)")
    _opt(ref, "sampler", type=parse_optional_str, metavar="NAME",
         help=f"{', '.join(SAMPLERS)} (default: per model)")
    _opt(ref, "steps", type=parse_int, metavar="N", help="sampling steps (default: per model)")
    _opt(ref, "cfg", type=parse_float, metavar="SCALE", help="classifier-free guidance scale (default: per model)")
    _opt(ref, "shift", type=parse_float, metavar="S", help="flow schedule shift (default: per model)")
    _opt(ref, "width", type=parse_int, metavar="PX", help=f"image width, a multiple of 16 (default: {REF_SIZE})")
    _opt(ref, "height", type=parse_int, metavar="PX", help=f"image height, a multiple of 16 (default: {REF_SIZE})")
    _opt(ref, "controlnet_ckpt", type=parse_optional_str, metavar="FILE",
         help="SD3.5 Large ControlNet (blur, canny or depth) in Stability's release layout")
    _opt(ref, "controlnet_cond_image", type=parse_optional_str, metavar="IMAGE",
         help="control image (already a canny/blur/depth image unless --controlnet_preprocess says otherwise)")
    _opt(ref, "vae", type=parse_optional_str, metavar="FILE",
         help="separate VAE file (default: the one bundled in --model)")
    _opt(ref, "init_image", type=parse_optional_str, metavar="IMAGE", help="start from this image (image-to-image)")
    _opt(ref, "denoise", type=parse_float, metavar="D",
         help=f"with --init_image: fraction of the steps to run, in (0, 1] (default: {REF_DENOISE})")
    _flag(ref, "skip_layer_cfg",
          "skip-layer guidance with the model's recommended settings (SD3.5 Medium: layers 7,8,9, scale 2.5, "
          "steps 1%%-20%%, cfg 4.0 -- the reference meant 4.0 but runs 5.0, pass --cfg 5 for its numbers); "
          "models without recommended settings ignore it, as the reference does, unless --slg_* are given")
    _flag(ref, "verbose", "progress messages, and a traceback on errors")
    _opt(ref, "model_folder", type=parse_optional_str, metavar="DIR",
         help=f"folder with clip_l.safetensors, clip_g.safetensors and t5xxl.safetensors (or t5xxl_fp16 / "
              f"t5xxl_fp8_e4m3fn) (default: {REF_MODEL_FOLDER}; text encoders bundled in --model are used "
              "when the folder lacks them)")
    _opt(ref, "text_encoder_device", type=parse_optional_str, metavar="DEV",
         help="device for the text encoders (default: cpu, where they run in fp32 as in the reference; "
              "bf16 on GPUs)")

    ext = parser.add_argument_group("beyond the reference")
    _opt(ext, "negative_prompt", metavar="TEXT", help="negative prompt (default: empty, as the reference)")
    _opt(ext, "slg_layers", type=parse_layers, metavar="7,8,9", help="skip-layer guidance: blocks to skip")
    _opt(ext, "slg_scale", type=parse_float, metavar="S", help="skip-layer guidance scale (0 turns SLG off)")
    _opt(ext, "slg_start", type=parse_float, metavar="F", help="SLG window start, fraction of the steps")
    _opt(ext, "slg_end", type=parse_float, metavar="F", help="SLG window end, fraction of the steps")
    _opt(ext, "slg_window", choices=("steps", "sigma"),
         help="steps: the reference's step-index window (default); sigma: ComfyUI's sigma-percent window")
    _opt(ext, "clip_l", type=parse_optional_str, metavar="FILE", help="CLIP-L text encoder file")
    _opt(ext, "clip_g", type=parse_optional_str, metavar="FILE", help="CLIP-G text encoder file")
    _opt(ext, "t5xxl", metavar="FILE|none", help="T5-XXL text encoder file; 'none' runs without T5")
    _opt(ext, "tokenizers", type=parse_optional_str, metavar="DIR",
         help="tokenizer files: a folder with clip/{vocab.json,merges.txt} and t5/tokenizer.json")
    _opt(ext, "comfyui", type=parse_optional_str, metavar="PATH",
         help="a ComfyUI checkout whose bundled tokenizer files to use (default: $COMFYUI_PATH)")
    _opt(ext, "device", type=parse_optional_str, metavar="DEV",
         help="device for the diffusion model and VAE: cpu, cuda, cuda:1, mps (default: cuda if available)")
    _opt(ext, "dtype", choices=("default", "fp32", "fp16", "bf16", "fp8_e4m3fn"),
         help="weight dtype of the diffusion model, VAE and ControlNet (default: bf16 on GPUs, fp32 on CPU; "
              "the reference runs fp16)")
    _opt(ext, "controlnet_strength", type=parse_float, metavar="S", help="ControlNet strength (default: 1.0)")
    _opt(ext, "controlnet_preprocess", choices=("none", "auto", "canny", "blur"),
         help="none: the control image is used as given (default, as the reference); auto: canny edges or "
              "blur chosen by the ControlNet's type; canny/blur: that preprocessor")
    _opt(ext, "save_latent", type=parse_optional_str, metavar="FILE",
         help="also write the final latents (VAE space, what the decoder receives; [N,16,H/8,W/8] for N prompts) "
              "as .safetensors under the key 'latent'")
    _flag(ext, "json", "print a JSON summary on stdout (files, seeds, seconds per step, peak memory); "
                       "all other output goes to stderr")
    parser.add_argument("positional", nargs="*", metavar="ARG",
                        help="python-fire style positional values, in the reference's parameter order "
                             "(prompt, model, out_dir, ...)")
    parser.set_defaults(_types={a.dest: a.type for a in parser._actions if a.dest in REFERENCE_ORDER})


# --------------------------------------------------------------------------------------------------
# options


@dataclass
class GenerateOptions:
    """Everything ``sd35 generate`` takes; defaults are the reference's (``None``: per model)."""

    prompt: str = REF_PROMPT
    model: str = REF_MODEL
    out_dir: str = REF_OUT_DIR
    postfix: str | None = None
    seed: int = REF_SEED
    seed_type: str = REF_SEED_TYPE
    sampler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    shift: float | None = None
    width: int = REF_SIZE
    height: int = REF_SIZE
    controlnet_ckpt: str | None = None
    controlnet_cond_image: str | None = None
    vae: str | None = None
    init_image: str | None = None
    denoise: float = REF_DENOISE
    skip_layer_cfg: bool = False
    verbose: bool = False
    model_folder: str = REF_MODEL_FOLDER
    text_encoder_device: str = "cpu"
    negative_prompt: str = ""
    slg_layers: tuple[int, ...] | None = None
    slg_scale: float | None = None
    slg_start: float | None = None
    slg_end: float | None = None
    slg_window: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    tokenizers: str | None = None
    comfyui: str | None = None
    device: str | None = None
    dtype: str = "default"
    controlnet_strength: float = 1.0
    controlnet_preprocess: str = "none"
    save_latent: str | None = None
    json: bool = False


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    """Turn parsed arguments into :class:`GenerateOptions` (fire-style positionals fill unnamed options)."""
    values = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "positional")}
    positional = list(getattr(args, "positional", None) or [])
    if positional:
        types = getattr(args, "_types", None) or {}
        free = [name for name in REFERENCE_ORDER if values.get(name) is None]
        if len(positional) > len(free):
            raise UsageError(f"too many positional arguments: {positional[len(free):]}")
        for name, text in zip(free, positional, strict=False):
            conv = types.get(name)
            try:
                values[name] = conv(text) if conv else text
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"argument {name}: {e}") from None
    defaults = GenerateOptions()
    kwargs = {}
    for name in GenerateOptions.__dataclass_fields__:
        v = values.get(name)
        if v is None:
            v = getattr(defaults, name)
        kwargs[name] = v
    return GenerateOptions(**kwargs)


# --------------------------------------------------------------------------------------------------
# the reference's naming, prompts and seeds


def read_prompts(prompt: str) -> list[str]:
    """The prompts to run: the text itself, or each line (stripped) of a ``.txt`` file, as the reference."""
    if os.path.splitext(prompt)[-1] == ".txt":
        if not os.path.isfile(prompt):
            raise UsageError(f"--prompt {prompt}: no such prompt file (a prompt ending in .txt is read as a file)")
        with open(prompt, encoding="utf-8") as f:
            prompts = [line.strip() for line in f.readlines()]
        if not prompts:
            raise UsageError(f"--prompt {prompt}: the prompt file is empty")
        return prompts
    return [prompt]


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


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
    name = _stem(model) + ("_" + _stem(controlnet_ckpt) if controlnet_ckpt is not None else "")
    stamp = (now or datetime.datetime.now()).strftime("_%Y-%m-%dT%H-%M-%S")
    return os.path.join(out_dir, name, _stem(sanitized)[:50] + (postfix or stamp))


def seeds_for(seed: int, seed_type: str, count: int, rand: Callable[[], int] | None = None) -> list[int]:
    """Seed of each prompt: ``fixed`` repeats ``seed``, ``roll`` counts up from it, ``rand`` draws fresh ones."""
    if seed_type == "fixed":
        return [seed] * count
    if seed_type == "roll":
        return [seed + i for i in range(count)]
    if seed_type == "rand":
        draw = rand or (lambda: secrets.randbelow(RAND_SEED_LIMIT))
        return [int(draw()) for _ in range(count)]
    raise UsageError(f"--seed_type: expected one of {', '.join(SEED_TYPES)}, got {seed_type!r}")


# --------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Settings:
    """The sampling settings a run ends up with, after per-model defaults."""

    shift: float
    steps: int
    cfg: float
    sampler: str
    slg: Any  # sd35_core SkipLayerGuidance or None
    defaults_from: str  # which defaults-table entry applied ("" when none)


def _check_size(opts: GenerateOptions) -> None:
    for name in ("width", "height"):
        v = getattr(opts, name)
        if v is None or v < 16 or v % 16:
            raise UsageError(
                f"--{name} {v}: expected a positive multiple of 16 pixels (the VAE downsamples by 8 and the "
                f"model patches 2x2 latents), e.g. {max(16, (v or 0) // 16 * 16)}"
            )


def _positive(name: str, value, whole: bool = False) -> None:
    if value is not None and value <= 0:
        kind = "a whole number >= 1" if whole else "a number > 0"
        raise UsageError(f"--{name} {value}: expected {kind} (leave it out for the model's default)")


def _slg_requested(opts: GenerateOptions) -> bool:
    return any(getattr(opts, n) is not None for n in ("slg_layers", "slg_scale", "slg_start", "slg_end"))


def defaults_entry(model_path: str, variant: str, controlnet_path: str | None = None,
                   controlnet_type: str | None = None) -> tuple[str, str]:
    """Which rows of sd35_core.defaults apply: ``(model row, controlnet row or "")``.

    As the reference, the model file's base name picks the row (``sd3.5_medium.safetensors`` ->
    ``sd3.5_medium``); a renamed file falls back to the variant detected from its weights. A ControlNet
    row comes from the ControlNet file's name, else from its type (``sd3.5_large_controlnet_<type>``).
    """
    from sd35_core.defaults import DEFAULTS

    model_row = _stem(model_path) if _stem(model_path) in DEFAULTS else variant
    cn_row = ""
    if controlnet_path is not None:
        if _stem(controlnet_path) in DEFAULTS:
            cn_row = _stem(controlnet_path)
        elif controlnet_type is not None and f"sd3.5_large_controlnet_{controlnet_type}" in DEFAULTS:
            cn_row = f"sd3.5_large_controlnet_{controlnet_type}"
    return model_row, cn_row


def resolve_settings(
    opts: GenerateOptions, model_row: str, controlnet_row: str = "", depth: int | None = None
) -> Settings:
    """Per-model defaults filled in under the options given, in the reference's precedence.

    The model row gives shift/steps/cfg/sampler; ``--skip_layer_cfg`` adds the row's SLG and its cfg
    (4.0 for SD3.5 Medium, see DESCRIPTION); a ControlNet row overrides the model row; explicit options
    override both. ``--slg_*`` options enable SLG on any model (unset fields from the recommended SLG).
    """
    from sd35_core.defaults import DEFAULTS, defaults_for
    from sd35_core.guidance import SkipLayerGuidance

    _positive("steps", opts.steps, whole=True)
    _positive("shift", opts.shift)
    _positive("cfg", opts.cfg)
    base = defaults_for(model_row, slg=bool(opts.skip_layer_cfg))
    shift, steps, cfg, sampler = base.shift, base.steps, base.cfg, base.sampler
    if controlnet_row:
        cn = defaults_for(controlnet_row)
        shift, steps, cfg, sampler = cn.shift, cn.steps, cn.cfg, cn.sampler
    slg = base.slg
    if _slg_requested(opts) or (slg is not None and opts.slg_window):
        rec = DEFAULTS[model_row].slg
        template = slg or (rec.guidance() if rec is not None else SkipLayerGuidance())
        slg = SkipLayerGuidance(
            layers=opts.slg_layers if opts.slg_layers is not None else template.layers,
            scale=opts.slg_scale if opts.slg_scale is not None else template.scale,
            start=opts.slg_start if opts.slg_start is not None else template.start,
            end=opts.slg_end if opts.slg_end is not None else template.end,
            window=opts.slg_window or template.window,
        )
    if slg is not None and not slg.enabled:
        slg = None
    if slg is not None and depth is not None:
        slg.check_depth(depth)
    return Settings(
        shift=opts.shift if opts.shift is not None else shift,
        steps=opts.steps if opts.steps is not None else steps,
        cfg=opts.cfg if opts.cfg is not None else cfg,
        sampler=opts.sampler if opts.sampler is not None else sampler,
        slg=slg,
        defaults_from=controlnet_row or model_row,
    )


# --------------------------------------------------------------------------------------------------
# files and models


def pick_device(name: str | None) -> torch.device:
    """``--device``: the given one, else CUDA when available, else Apple MPS, else the CPU."""
    if name and name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name!r}: not a device name (cpu, cuda, cuda:1, mps)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available in this torch build or machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _require_file(option: str, path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"--{option} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"--{option} {path}: is a folder; expected a file")
    return path


def text_encoder_files(opts: GenerateOptions, bundled_roles: Sequence[str] = ()) -> dict[str, str | None]:
    """Where each text encoder comes from: a file path, ``"bundled"`` (inside ``--model``) or ``None`` (T5 off).

    Order per encoder: ``--clip_l/--clip_g/--t5xxl``, then ``--model_folder`` (the reference's names, and
    ``t5xxl_fp16`` / ``t5xxl_fp8_e4m3fn`` for T5), then the copy bundled in the checkpoint.
    """
    found: dict[str, str | None] = {}
    for role, names in TEXT_ENCODER_NAMES.items():
        explicit = getattr(opts, role)
        if role == "t5xxl" and explicit is not None and explicit.strip().lower() in NONE_WORDS:
            found[role] = None
            continue
        if explicit is not None:
            found[role] = _require_file(role, explicit)
            continue
        folder = opts.model_folder
        hit = next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)
        if hit is not None:
            found[role] = hit
        elif role in bundled_roles:
            found[role] = "bundled"
        else:
            tried = ", ".join(os.path.join(folder, n) for n in names)
            extra = "; or pass --t5xxl none to run without T5" if role == "t5xxl" else ""
            raise UsageError(
                f"{role} text encoder not found: looked for {tried} (--model_folder {folder}) and inside "
                f"{opts.model}; pass --{role} FILE{extra}"
            )
    return found


def inspect_model(path: str) -> tuple[Any, str]:
    """``(MMDiTConfig, variant)`` of a checkpoint from its header alone (no weights read)."""
    from sd35_core.checkpoint import open_safetensors
    from sd35_core.loader import detect_parts, detect_variant, load_checkpoint
    from sd35_core.mmditx import MMDiTConfig

    _require_file("model", path)
    file = open_safetensors(path)
    prefix = detect_parts(file).get("mmdit")
    if prefix is None:
        load_checkpoint(path)  # raises the loader's CheckpointError saying what the file is instead
        raise UsageError(f"{path}: expected an SD3/SD3.5 checkpoint")  # pragma: no cover
    config = MMDiTConfig.from_shapes(file.shapes(prefix))
    return config, detect_variant(config, file.metadata)


@dataclass
class LoadedModels:
    """Everything a run needs, loaded."""

    model: Any  # sd35_core.loader.DiffusionModel
    vae: Any  # sd35_core.vae.VAE
    text: Any  # sd35_core.text_encoder.SD3TextEncoder
    controlnet: Any = None  # sd35_core.controlnet.ControlNet
    controlnet_path: str | None = None  # "8b" or "2b"
    text_files: dict[str, str | None] = field(default_factory=dict)


def load_models(
    opts: GenerateOptions, device: torch.device, say: Callable[[str], None] = lambda s: None
) -> LoadedModels:
    """Load the diffusion model, VAE, text encoders (+ tokenizers) and ControlNet the options name."""
    from sd35_core.checkpoint import open_safetensors
    from sd35_core.controlnet import check_controlnet_fits
    from sd35_core.loader import detect_parts, load_checkpoint, load_controlnet, load_text_encoder, load_vae
    from sd35_core.text_encoder import SD3TextEncoder
    from sd35_core.tokenization import SD3Tokenizer, find_tokenizer_files

    _require_file("model", opts.model)
    for option in ("vae", "controlnet_ckpt", "init_image", "controlnet_cond_image"):
        if getattr(opts, option) is not None:
            _require_file(option, getattr(opts, option))
    found = detect_parts(open_safetensors(opts.model))
    if opts.vae is None and "vae" not in found and "mmdit" in found:
        raise UsageError(f"{opts.model} holds no VAE (first_stage_model.*); pass --vae FILE")
    bundled = [r for r in ("clip_l", "clip_g", "t5xxl") if r in found]
    files = text_encoder_files(opts, bundled)

    say("Loading tokenizers...")
    comfyui = opts.comfyui or os.environ.get("COMFYUI_PATH") or None
    clip_dir, t5_json = find_tokenizer_files(opts.tokenizers, comfyui)
    tokenizer = SD3Tokenizer.from_files(clip_dir, t5_json)

    say(f"Loading SD3 model {os.path.basename(opts.model)}...")
    parts = load_checkpoint(opts.model, opts.dtype, device)
    model = parts.model

    text_device = pick_device(opts.text_encoder_device or "cpu")
    encoders: dict[str, Any] = {}
    for role, src in files.items():
        if src is None:
            encoders[role] = None
        elif src == "bundled":
            if parts.text_encoders is None:
                raise UsageError(f"{opts.model}: expected bundled text encoders; the file holds an incomplete set")
            encoders[role] = getattr(parts.text_encoders, "t5" if role == "t5xxl" else role)
        else:
            say(f"Loading {role} from {src}...")
            encoders[role] = load_text_encoder(src, role, "default", text_device)
    uses_bundled = "bundled" in files.values()
    text = SD3TextEncoder(
        encoders["clip_l"], encoders["clip_g"], encoders["t5xxl"], tokenizer,
        device=device if uses_bundled else text_device, context_dim=model.config.context_dim,
    )
    if text.pooled_dim != model.config.pooled_dim:
        raise UsageError(
            f"text encoders give a pooled vector of width {text.pooled_dim} but {opts.model} expects "
            f"{model.config.pooled_dim}: the CLIP files do not belong to this model"
        )
    if text.context_dim != model.config.context_dim:
        raise UsageError(
            f"T5 gives context width {text.context_dim} but {opts.model} expects {model.config.context_dim}"
        )

    say("Loading VAE model...")
    if opts.vae is not None:
        vae = load_vae(opts.vae, opts.dtype, device)
    elif parts.vae is not None:
        vae = parts.vae
    else:
        raise UsageError(f"{opts.model} holds no VAE (first_stage_model.*); pass --vae FILE")

    controlnet = path = None
    if opts.controlnet_ckpt is not None:
        say(f"Loading ControlNet {os.path.basename(opts.controlnet_ckpt)}...")
        controlnet = load_controlnet(opts.controlnet_ckpt, model, opts.dtype, device)
        path = check_controlnet_fits(controlnet.config, model.config)
    say("Models loaded.")
    return LoadedModels(model, vae, text, controlnet, path, files)


# --------------------------------------------------------------------------------------------------
# images


def load_image_resized(path: str, width: int, height: int) -> Image.Image:
    """Open ``path`` and resize it to ``width`` x ``height`` with LANCZOS, then RGB (the reference's order)."""
    with Image.open(path) as img:
        img.load()
        return img.resize((width, height), Image.LANCZOS).convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``IMAGE`` tensor ``[1, H, W, 3]`` in 0..1."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def encode_image(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """VAE mean latent (raw VAE space, CPU float32) of ``[B, 3, H, W]`` pixels already scaled for the VAE."""
    with torch.no_grad():
        return vae.encode(pixels).float().cpu()


def init_latent(vae: Any, path: str, width: int, height: int) -> torch.Tensor:
    """``--init_image`` as a raw VAE-space latent ``[1, 16, h, w]`` (pixels ``2x-1``, VAE mean)."""
    # Contiguous NCHW as the reference builds it (layout can change which convolution kernel runs).
    x = pil_to_tensor(load_image_resized(path, width, height)).permute(0, 3, 1, 2).contiguous()
    return encode_image(vae, x * 2.0 - 1.0)


def control_type_of(loaded: LoadedModels, opts: GenerateOptions) -> str:
    """The ControlNet's type: from the file's ``control_type`` tensor, else from its file name."""
    name = loaded.controlnet.control_type_name if loaded.controlnet is not None else None
    if name:
        return name
    stem = _stem(opts.controlnet_ckpt or "").lower()
    for kind in ("canny", "blur", "depth"):
        if kind in stem:
            return kind
    return "blur"  # no type known: plain 2x-1 scaling, the reference's non-canny branch


def control_image(
    loaded: LoadedModels, opts: GenerateOptions, width: int, height: int
) -> tuple[torch.Tensor, Image.Image]:
    """The control image as the VAE input ``[1, 3, H, W]`` and as the picture the ControlNet sees."""
    from sd35_core.controlnet import prepare_control_image
    from sd35_core.preprocess import blur, canny

    kind = control_type_of(loaded, opts)
    image = pil_to_tensor(load_image_resized(opts.controlnet_cond_image, width, height))
    pre = opts.controlnet_preprocess
    if pre == "auto":
        pre = kind if kind in ("canny", "blur") else "none"
    if pre == "canny":
        image = canny(image)
    elif pre == "blur":
        image = blur(image)
    shown = Image.fromarray((image[0].numpy() * 255).round().clip(0, 255).astype(np.uint8), "RGB")
    pixels = prepare_control_image(image, width, height, kind, path=loaded.controlnet_path)
    return pixels, shown


def decode_image(vae: Any, latent: torch.Tensor) -> Image.Image:
    """Decode one raw VAE latent ``[1, 16, h, w]`` to a PIL image exactly as the reference's ``vae_decode``."""
    with torch.no_grad():
        image = vae.decode(latent).float().cpu()
    image = torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)[0]
    decoded = (255.0 * np.moveaxis(image.numpy(), 0, 2)).astype(np.uint8)
    return Image.fromarray(decoded)


# --------------------------------------------------------------------------------------------------
# progress and memory


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


# --------------------------------------------------------------------------------------------------
# the run


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
    device: str
    seconds: dict[str, float]
    steps_run: int
    memory: dict[str, int | None]
    latent_file: str | None = None
    control_image_file: str | None = None
    latents: torch.Tensor | None = field(default=None, repr=False)

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


def _settings_dict(s: Settings, opts: GenerateOptions) -> dict[str, Any]:
    slg = None
    if s.slg is not None:
        slg = {"layers": list(s.slg.layers), "scale": s.slg.scale, "start": s.slg.start, "end": s.slg.end,
               "window": s.slg.window}
    d = {"shift": s.shift, "steps": s.steps, "cfg": s.cfg, "sampler": s.sampler, "slg": slg,
         "defaults_from": s.defaults_from, "seed_type": opts.seed_type}
    if opts.init_image:
        d["denoise"] = opts.denoise
    return d


def validate_options(opts: GenerateOptions) -> None:
    """Checks that need no files: sizes, counts, ranges, choices. ``UsageError`` naming the option."""
    _check_size(opts)
    _positive("steps", opts.steps, whole=True)
    _positive("shift", opts.shift)
    _positive("cfg", opts.cfg)
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {opts.sampler}: expected one of {', '.join(SAMPLERS)}")
    if opts.seed_type not in SEED_TYPES:
        raise UsageError(f"--seed_type {opts.seed_type}: expected one of {', '.join(SEED_TYPES)}")
    if opts.seed is None or opts.seed < 0:
        raise UsageError(f"--seed {opts.seed}: expected a whole number >= 0")
    if opts.init_image and not (opts.denoise is not None and 0.0 < opts.denoise <= 1.0):
        raise UsageError(f"--denoise {opts.denoise}: expected a number in (0, 1] (the fraction of steps to run)")
    if opts.controlnet_cond_image and not opts.controlnet_ckpt:
        raise UsageError("--controlnet_cond_image needs --controlnet_ckpt (the ControlNet to feed it to)")
    if opts.controlnet_ckpt and not opts.controlnet_cond_image:
        raise UsageError("--controlnet_ckpt needs --controlnet_cond_image (the control image)")
    if opts.model.lower().endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")):
        raise UsageError(
            f"--model {opts.model}: pickle checkpoints can run arbitrary code and are not loaded; "
            "use the .safetensors release of the model"
        )


def generate(opts: GenerateOptions, *, log: TextIO | None = None, now: datetime.datetime | None = None,
             loaded: LoadedModels | None = None, quiet: bool = False) -> GenerateResult:
    """Run ``sd35 generate`` with ``opts``: load, encode, sample, decode and save; returns what was done.

    Progress and messages go to ``log`` (default stderr); ``quiet`` keeps only the progress bar and notes.
    ``loaded`` reuses models loaded by :func:`load_models` with the same options.
    """
    from sd35_core.controlnet import ControlHint
    from sd35_core.guidance import CondEntry
    from sd35_core.latent import process_in
    from sd35_core.pipeline import img2img, txt2img
    from sd35_core.request import SampleRequest

    log = log if log is not None else sys.stderr
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        if not quiet or msg.startswith("note:"):
            print(msg, file=log, flush=True)

    validate_options(opts)
    prompts = read_prompts(opts.prompt)
    device = pick_device(opts.device)
    seconds: dict[str, float] = {}

    out_dir = output_dir(opts.out_dir, opts.model, opts.prompt, opts.postfix, opts.controlnet_ckpt, now)
    if os.path.exists(out_dir):
        raise UsageError(f"output folder {out_dir} already exists; choose another --postfix or --out_dir")
    if loaded is None:
        # Settings that do not fit the model fail here, before gigabytes of weights are read.
        config, variant = inspect_model(opts.model)
        config.check_image_size(opts.width, opts.height)
        resolve_settings(opts, defaults_entry(opts.model, variant)[0], "", config.depth)
        t = time.perf_counter()
        loaded = load_models(opts, device, say)
        seconds["load"] = time.perf_counter() - t
    model = loaded.model
    model.config.check_image_size(opts.width, opts.height)

    cn_type = control_type_of(loaded, opts) if loaded.controlnet is not None else None
    model_row, cn_row = defaults_entry(opts.model, model.variant, opts.controlnet_ckpt, cn_type)
    if opts.skip_layer_cfg and not _slg_requested(opts):
        from sd35_core.defaults import DEFAULTS

        if DEFAULTS[model_row].slg is None:
            say(f"note: --skip_layer_cfg: {DEFAULTS[model_row].label} has no recommended skip-layer guidance, so "
                "none is applied (as the reference); give --slg_layers/--slg_scale to use it anyway")
    settings = resolve_settings(opts, model_row, cn_row, model.config.depth)
    say(f"{model.label} ({model_row} defaults): {settings.steps} steps, cfg {settings.cfg}, shift {settings.shift}, "
        f"{settings.sampler}" + (f", SLG layers {list(settings.slg.layers)} scale {settings.slg.scale}"
                                  if settings.slg else ""))

    t = time.perf_counter()
    init = None
    if opts.init_image:
        say("Encoding init image...")
        init = init_latent(loaded.vae, opts.init_image, opts.width, opts.height)
    controls = []
    shown = None
    if loaded.controlnet is not None:
        say("Encoding control image...")
        pixels, shown = control_image(loaded, opts, opts.width, opts.height)
        cond_latent = process_in(encode_image(loaded.vae, pixels))
        controls.append(ControlHint(loaded.controlnet, cond_latent, strength=opts.controlnet_strength))
    seconds["encode_images"] = time.perf_counter() - t

    t = time.perf_counter()
    neg_context, neg_pooled = loaded.text.encode(opts.negative_prompt)
    negative = CondEntry(neg_context, neg_pooled)
    seconds["encode_text"] = time.perf_counter() - t

    seeds = seeds_for(opts.seed, opts.seed_type, len(prompts))
    request = SampleRequest(steps=settings.steps, cfg=settings.cfg, sampler=settings.sampler, shift=settings.shift,
                            seed=seeds[0], denoise=opts.denoise if init is not None else 1.0, slg=settings.slg,
                            controls=controls)
    os.makedirs(out_dir, exist_ok=False)
    control_file = None
    if shown is not None:
        control_file = os.path.join(out_dir, "control.png")
        shown.save(control_file)
    files: list[str] = []
    latents: list[torch.Tensor] = []
    steps_run = 0
    seconds.setdefault("sample", 0.0)
    seconds.setdefault("decode", 0.0)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        t = time.perf_counter()
        context, pooled = loaded.text.encode(prompt)
        seconds["encode_text"] += time.perf_counter() - t
        positive = CondEntry(context, pooled)
        run_steps = settings.steps - (0 if init is None else int(settings.steps * (1 - opts.denoise)))
        bar = ProgressBar(run_steps, label=f"image {i + 1}/{len(prompts)} seed {seed}", stream=log)
        request = replace(request, seed=seed)
        t = time.perf_counter()
        if init is None:
            latent = txt2img(model.mmdit, positive, negative, request, width=opts.width, height=opts.height,
                             callback=bar.step_callback)
        else:
            latent = img2img(model.mmdit, positive, negative, request, init_latent=init, callback=bar.step_callback)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds["sample"] += time.perf_counter() - t
        bar.close()
        steps_run = run_steps
        latent = latent.float().cpu()
        latents.append(latent)
        t = time.perf_counter()
        image = decode_image(loaded.vae, latent)
        path = os.path.join(out_dir, f"{i:06d}.png")
        image.save(path)
        seconds["decode"] += time.perf_counter() - t
        files.append(path)
        if opts.verbose:
            say(f"Saved {path}")

    all_latents = torch.cat(latents)
    latent_file = None
    if opts.save_latent:
        from safetensors.torch import save_file

        parent = os.path.dirname(os.path.abspath(opts.save_latent))
        os.makedirs(parent, exist_ok=True)
        save_file({"latent": all_latents.contiguous()}, opts.save_latent)
        latent_file = opts.save_latent
    seconds["total"] = time.perf_counter() - t_start
    return GenerateResult(
        out_dir=out_dir, files=files, prompts=prompts, seeds=seeds, model=opts.model, variant=model.variant,
        settings=_settings_dict(settings, opts), width=opts.width, height=opts.height, device=str(device),
        seconds=seconds, steps_run=steps_run, memory=peak_memory(device), latent_file=latent_file,
        control_image_file=control_file, latents=all_latents,
    )


def run(args: argparse.Namespace) -> int:
    """``sd35 generate``: parse, run, report (JSON on stdout with ``--json``)."""
    import json

    opts = options_from_args(args)
    result = generate(opts)
    if opts.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(f"Saved {len(result.files)} image(s) to {result.out_dir}")
        print(f"  sampling: {result.seconds_per_step:.3f} s/step, total {result.seconds['total']:.1f} s")
    return 0
