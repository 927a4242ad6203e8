"""``sd35 generate``'s options: the reference's names, spellings and defaults, parsed and checked.

Same option names, meanings and per-model defaults as the reference's ``sd3_infer.py`` ``main()``, so a
reference command line works unchanged; see :data:`DESCRIPTION` for where we deliberately differ.
Values are read the way python-fire reads them; fire-style positional values fill the options in the
reference's parameter order.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass

from sd35_core.image.fit import DEFAULT_RESIZE_MODE, RESIZE_MODES
from sd35_core.sampling.mask import MASK_MODES
from sd35_core.sampling.samplers import SAMPLERS

from ..main import UsageError
from .cfg_options import add_cfg_options, check_cfg_options

HELP = "text-to-image / image-to-image / inpainting / ControlNet, a drop-in for the reference's sd3_infer.py"
DESCRIPTION = """\
Generate images with SD3 Medium, SD3.5 Medium, Large, Large Turbo and the SD3.5 Large ControlNets.

A drop-in for Stability's sd3_infer.py: the same option names and meanings (underscored or dashed),
the same defaults per model file name (and, for renamed files, per detected model), and the same
output folders: OUT_DIR/<model name>[_<controlnet name>]/<prompt[:50]><POSTFIX or _timestamp>/000000.png.
A --prompt ending in .txt is read as one prompt per line (one image each); blank lines and lines starting
with # are skipped, with a note (as sd35 batch reads a .txt prompts file).

Where this differs from the reference, on purpose:
  * --skip_layer_cfg on SD3.5 Medium uses cfg 4.0 as the reference's CONFIGS intend; the reference reads
    the cfg before its SLG config and so runs at 5.0. Pass --cfg 5 to reproduce it exactly.
  * Image encodes (--init_image, --controlnet_cond_image) take the VAE mean: the reference samples from
    the global RNG there, which makes its own runs unrepeatable.
  * --steps 0, --cfg 0 or --shift 0 are errors here; the reference silently replaced them by defaults.
  * Values are parsed per option (like python-fire: True/False, numbers, None), not as python literals:
    --prompt 123 is the prompt "123".
  * An existing output folder is an error, as in the reference (choose another --postfix).
  * An --init_image or --controlnet_cond_image of another aspect ratio is center-cropped to the output's
    aspect before resizing (--resize_mode crop, with a note); the reference stretches it: --resize_mode stretch.
Beyond the reference: explicit SLG parameters (--slg_*), CFG-Zero* and APG as ComfyUI's nodes compute them
(--cfg_zero_star, --zero_init_steps, --apg, --apg_*), text encoder files (--clip_l, --clip_g, --t5xxl;
--t5xxl none runs without T5), tokenizer files (--tokenizers, --comfyui or COMFYUI_PATH), --device, --dtype,
--save_latent, --json, --negative_prompt, ControlNet strength and image preprocessing, and inpainting:
--init_image IMG --mask MASK.png repaints where the mask is white (or the image transparent) and keeps the
rest, as ComfyUI's noise-mask sampling (--grow_mask N, --mask_mode differential for soft masks).
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


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora PATH[:STRENGTH[:CLIP_STRENGTH]]``."""

    path: str
    strength: float = 1.0
    clip_strength: float = 1.0


def parse_lora(text: str) -> LoraSpec:
    """``PATH[:STRENGTH[:CLIP_STRENGTH]]``; STRENGTH defaults to 1 and CLIP_STRENGTH to STRENGTH.

    Numbers are taken from the right, so a path may itself hold colons (``C:\\loras\\x.safetensors``).
    """
    parts = str(text).split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise argparse.ArgumentTypeError(f"expected PATH[:STRENGTH[:CLIP_STRENGTH]]; got {text!r}")
    strength = numbers[0] if numbers else 1.0
    return LoraSpec(path, strength, numbers[1] if len(numbers) > 1 else strength)


def _opt(parser, name: str, **kw) -> argparse.Action:
    """An option under its reference spelling plus the dashed one (``--model_folder`` / ``--model-folder``)."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    kw.setdefault("default", None)
    return parser.add_argument(*names, dest=name, **kw)


def _flag(parser, name: str, help: str) -> argparse.Action:
    return _opt(parser, name, nargs="?", const=True, type=parse_bool, metavar="BOOL", help=help)


class _Only:
    """An argument container that registers only the options named in ``names`` (by ``dest``)."""

    def __init__(self, container, names: Collection[str]):
        self.container, self.names = container, frozenset(names)

    def add_argument(self, *flags, **kw):
        if kw.get("dest") in self.names:
            return self.container.add_argument(*flags, **kw)
        return None


def add_arguments(parser: argparse.ArgumentParser, only: Collection[str] | None = None,
                  title: str | None = None) -> None:
    """Register the ``generate`` options on ``parser``.

    ``only``: just these options (by name, e.g. ``"model"``, ``"steps"``), in one group called ``title``;
    ``sd35 batch --engine ray`` takes the model and sampling options this way, with the same names and parsing.
    """
    if only is not None:
        group = _Only(parser.add_argument_group(title), only)
        unknown = set(only) - set(GenerateOptions.__dataclass_fields__)
        if unknown:
            raise ValueError(f"only: not options of sd35 generate: {sorted(unknown)}")
        _add_options(group, group)
        return
    _add_options(parser.add_argument_group("options of the reference's sd3_infer.py"),
                 parser.add_argument_group("beyond the reference"))
    parser.add_argument("positional", nargs="*", metavar="ARG",
                        help="python-fire style positional values, in the reference's parameter order "
                             "(prompt, model, out_dir, ...)")
    parser.set_defaults(_types={a.dest: a.type for a in parser._actions if a.dest in REFERENCE_ORDER})


def _add_options(ref, ext) -> None:
    _opt(ref, "prompt", metavar="TEXT|FILE.txt",
         help=f"prompt, or a .txt file with one prompt per line, blank and # lines skipped "
              f"(default: {REF_PROMPT!r})")
    _opt(ref, "model", type=parse_optional_str, metavar="FILE",
         help=f"SD3/SD3.5 .safetensors checkpoint or bare diffusion model, or a GGUF diffusion model (Q8_0, Q4_0, "
              f"...; with --vae) (default: {REF_MODEL})")
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

    _opt(ext, "negative_prompt", metavar="TEXT", help="negative prompt (default: empty, as the reference)")
    _opt(ext, "slg_layers", type=parse_layers, metavar="7,8,9", help="skip-layer guidance: blocks to skip")
    _opt(ext, "slg_scale", type=parse_float, metavar="S", help="skip-layer guidance scale (0 turns SLG off)")
    _opt(ext, "slg_start", type=parse_float, metavar="F", help="SLG window start, fraction of the steps")
    _opt(ext, "slg_end", type=parse_float, metavar="F", help="SLG window end, fraction of the steps")
    _opt(ext, "slg_window", choices=("steps", "sigma"),
         help="steps: the reference's step-index window (default); sigma: ComfyUI's sigma-percent window")
    add_cfg_options(ext, _opt, _flag, parse_int, parse_float)
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
    _opt(ext, "lora", type=parse_lora, action="append", metavar="PATH[:S[:CLIP_S]]",
         help="apply a LoRA / LyCORIS file (any trainer's format) at strength S (default 1) to the diffusion "
              "model and CLIP_S (default S) to the text encoders; repeat to stack several, in order")
    _opt(ext, "controlnet_strength", type=parse_float, metavar="S", help="ControlNet strength (default: 1.0)")
    _opt(ext, "controlnet_preprocess", choices=("none", "auto", "canny", "blur"),
         help="none: the control image is used as given (default, as the reference); auto: canny edges or "
              "blur chosen by the ControlNet's type; canny/blur: that preprocessor")
    _opt(ext, "resize_mode", choices=RESIZE_MODES,
         help="--init_image / --controlnet_cond_image (and --mask) of another aspect ratio than --width x "
              "--height: crop cuts the middle at the output's aspect first (default, as ComfyUI's ImageScale "
              "crop=center), stretch resizes regardless (the reference), pad fits the whole image with black "
              "bars; a note says what was done")
    _opt(ext, "mask", type=parse_optional_str, metavar="MASK.png",
         help="with --init_image: repaint only where the mask is white (or where the image is transparent), "
              "keeping the rest of the init image, as ComfyUI's noise-mask sampling; resized to the image")
    _opt(ext, "grow_mask", type=parse_int, metavar="N",
         help="with --mask: round the mask and grow it by N pixels, as ComfyUI's VAE Encode (for Inpainting) "
              "(default: 0, the mask as given)")
    _opt(ext, "mask_mode", choices=MASK_MODES,
         help="with --mask: standard (default) or differential (a grey level m repaints over the last m of the "
              "noise range: a soft mask as per-pixel strength)")
    _opt(ext, "save_latent", type=parse_optional_str, metavar="FILE",
         help="also write the final latents (VAE space, what the decoder receives; [N,16,H/8,W/8] for N prompts) "
              "as .safetensors under the key 'latent'")
    _opt(ext, "cache_threshold", type=parse_float, metavar="T",
         help="step cache: 0 is off (default); above 0 a step whose first joint block changed less than T "
              "(relative) since the last full step reuses what the other blocks added then (0.05-0.15 on "
              "released models); the saved model evaluations are reported")
    _opt(ext, "ip_adapter", type=parse_optional_str, metavar="FILE",
         help="SD3.5 Large IP-Adapter: InstantX's ip-adapter.bin (tensors only, via torch's restricted unpickler) "
              "or its .safetensors conversion (sd35 convert-ip-adapter); with --clip_vision and --ip_image")
    _opt(ext, "clip_vision", type=parse_optional_str, metavar="FILE",
         help="the IP-Adapter's SigLIP vision tower (sigclip_vision_patch14_384.safetensors)")
    _opt(ext, "ip_image", type=parse_optional_str, metavar="IMAGE", help="the picture to prompt with")
    _opt(ext, "ip_scale", type=parse_float, metavar="S", help="IP-Adapter scale (default: 0.5; 0 leaves it out)")
    _flag(ext, "compile", "run the diffusion model's joint blocks through torch.compile (the first step compiles and "
                          "is reported separately; falls back to eager with a warning where compiling is unavailable)")
    _flag(ext, "json", "print a JSON summary on stdout (files, seeds, seconds per step, peak memory); "
                       "all other output goes to stderr")


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
    cfg_zero_star: bool = False
    zero_init_steps: int | None = None
    apg: bool = False
    apg_eta: float | None = None
    apg_norm_threshold: float | None = None
    apg_momentum: float | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    tokenizers: str | None = None
    comfyui: str | None = None
    device: str | None = None
    dtype: str = "default"
    lora: tuple[LoraSpec, ...] = ()
    controlnet_strength: float = 1.0
    controlnet_preprocess: str = "none"
    resize_mode: str = DEFAULT_RESIZE_MODE
    mask: str | None = None
    grow_mask: int = 0
    mask_mode: str = "standard"
    save_latent: str | None = None
    cache_threshold: float = 0.0
    ip_adapter: str | None = None
    clip_vision: str | None = None
    ip_image: str | None = None
    ip_scale: float | None = None
    compile: bool = False
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
        kwargs[name] = tuple(v) if isinstance(v, list) else v
    return GenerateOptions(**kwargs)


# --------------------------------------------------------------------------------------------------
# checks


def stem(path: str) -> str:
    """A file option's base name without its extension: the reference names folders and picks defaults by it."""
    return os.path.splitext(os.path.basename(path))[0]


def _check_size(opts: GenerateOptions) -> None:
    for name in ("width", "height"):
        v = getattr(opts, name)
        if v is None or v < 16 or v % 16:
            raise UsageError(
                f"--{name} {v}: expected a positive multiple of 16 pixels (the VAE downsamples by 8 and the "
                f"model patches 2x2 latents), e.g. {max(16, (v or 0) // 16 * 16)}"
            )


def check_positive(name: str, value, whole: bool = False) -> None:
    """``UsageError`` naming ``--name`` unless ``value`` is ``None`` (the model's default) or above 0."""
    if value is not None and value <= 0:
        kind = "a whole number >= 1" if whole else "a number > 0"
        raise UsageError(f"--{name} {value}: expected {kind} (leave it out for the model's default)")


def validate_options(opts: GenerateOptions) -> None:
    """Checks that need no files: sizes, counts, ranges, choices. ``UsageError`` naming the option."""
    _check_size(opts)
    check_positive("steps", opts.steps, whole=True)
    check_positive("shift", opts.shift)
    check_positive("cfg", opts.cfg)
    if opts.cache_threshold is not None and not (math.isfinite(opts.cache_threshold) and opts.cache_threshold >= 0):
        raise UsageError(f"--cache_threshold {opts.cache_threshold}: expected a number >= 0 (0 turns the cache off)")
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {opts.sampler}: expected one of {', '.join(SAMPLERS)}")
    if opts.seed_type not in SEED_TYPES:
        raise UsageError(f"--seed_type {opts.seed_type}: expected one of {', '.join(SEED_TYPES)}")
    if opts.seed is None or opts.seed < 0:
        raise UsageError(f"--seed {opts.seed}: expected a whole number >= 0")
    if opts.init_image and not (opts.denoise is not None and 0.0 < opts.denoise <= 1.0):
        raise UsageError(f"--denoise {opts.denoise}: expected a number in (0, 1] (the fraction of steps to run)")
    if opts.mask and not opts.init_image:
        raise UsageError("--mask needs --init_image (the picture whose masked part is repainted)")
    if opts.grow_mask is None or opts.grow_mask < 0:
        raise UsageError(f"--grow_mask {opts.grow_mask}: expected a whole number of pixels >= 0")
    if opts.mask_mode not in MASK_MODES:
        raise UsageError(f"--mask_mode {opts.mask_mode}: expected one of {', '.join(MASK_MODES)}")
    from .ip_adapter import check_ip_options

    check_ip_options(opts)
    check_cfg_options(opts)
    if opts.controlnet_cond_image and not opts.controlnet_ckpt:
        raise UsageError("--controlnet_cond_image needs --controlnet_ckpt (the ControlNet to feed it to)")
    if opts.controlnet_ckpt and not opts.controlnet_cond_image:
        raise UsageError("--controlnet_ckpt needs --controlnet_cond_image (the control image)")
    if opts.model.lower().endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")):
        raise UsageError(
            f"--model {opts.model}: pickle checkpoints can run arbitrary code and are not loaded; "
            "use the .safetensors release of the model"
        )
