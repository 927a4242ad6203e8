"""The run itself: prompts and seeds, conditioning, one SampleRequest per image, sampling, decoding, saving."""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..main import UsageError
from ..prompt_lines import RULE, split_prompt_lines
from .images import control_type_of, decode_image, encode_inputs, load_noise_mask
from .ip_adapter import ip_hints
from .models import LoadedModels, inspect_model, load_models, pick_device
from .options import RAND_SEED_LIMIT, REF_SIZE, SEED_TYPES, GenerateOptions, options_from_args, validate_options
from .output import GenerateResult, output_dir, save_latents
from .png_info import image_settings, png_info
from .progress import ProgressBar, peak_memory
from .settings import Settings, defaults_entry, resolve_settings, settings_summary, slg_requested


def read_prompts(prompt: str, say: Callable[[str], None] = lambda s: None) -> list[str]:
    """The prompts to run: the text itself, or each line (stripped) of a ``.txt`` file, as the reference.

    Blank and ``#`` lines of a file are skipped (the rule ``sd35 batch`` follows too), with a note to ``say``.
    """
    if os.path.splitext(prompt)[-1] == ".txt":
        if not os.path.isfile(prompt):
            raise UsageError(f"--prompt {prompt}: no such prompt file (a prompt ending in .txt is read as a file)")
        with open(prompt, encoding="utf-8") as f:
            lines = split_prompt_lines(f)
        if not lines.prompts:
            raise UsageError(f"--prompt {prompt}: the prompt file has no prompts ({RULE})")
        note = lines.note(f"--prompt {prompt}")
        if note:
            say(f"note: {note}")
        return [text for _, text in lines.prompts]
    return [prompt]


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


def native_size(opts: GenerateOptions, model_row: str, say: Callable[[str], None]) -> GenerateOptions:
    """The model's own image size instead of the reference's 1024 x 1024 default, for a model whose row has
    one (the bundled 64 px toy model, which cannot draw 1024 px at all); any other size is kept."""
    from sd35_core.sampling.defaults import DEFAULTS

    size = DEFAULTS[model_row].size
    if size is None or (opts.width, opts.height) != (REF_SIZE, REF_SIZE):
        return opts
    say(f"note: {DEFAULTS[model_row].label} draws {size}x{size} images; using that size")
    return replace(opts, width=size, height=size)


def _loaded_settings(opts: GenerateOptions, loaded: LoadedModels, say: Callable[[str], None]) -> Settings:
    """The run's settings for the loaded model (and ControlNet), announced on the log."""
    model = loaded.model
    cn_type = control_type_of(loaded, opts) if loaded.controlnet is not None else None
    model_row, cn_row = defaults_entry(opts.model, model.variant, opts.controlnet_ckpt, cn_type)
    if opts.skip_layer_cfg and not slg_requested(opts):
        from sd35_core.sampling.defaults import DEFAULTS

        if DEFAULTS[model_row].slg is None:
            say(f"note: --skip_layer_cfg: {DEFAULTS[model_row].label} has no recommended skip-layer guidance, so "
                "none is applied (as the reference); give --slg_layers/--slg_scale to use it anyway")
    settings = resolve_settings(opts, model_row, cn_row, model.config.depth)
    say(f"{model.label} ({model_row} defaults): {settings.steps} steps, cfg {settings.cfg}, shift {settings.shift}, "
        f"{settings.sampler}" + (f", SLG layers {list(settings.slg.layers)} scale {settings.slg.scale}"
                                  if settings.slg else ""))
    return settings


def encode_prompt(loaded: LoadedModels, text: str):
    """The conditioning (``CondEntry``) of one prompt, with the run's ``--lora`` merged into the text encoders."""
    from sd35_core.loading.lora import applied
    from sd35_core.sampling.guidance import CondEntry

    with applied(loaded.text_modules, loaded.text_loras, backup_device="cpu"):  # merged for the call, then undone
        context, pooled = loaded.text.encode(text)
    return CondEntry(context, pooled)


def noise_mask_of(opts: GenerateOptions, say: Callable[[str], None]) -> torch.Tensor | None:
    """``--mask`` as the sampler's noise mask at the image size (grown by ``--grow_mask``), or ``None``."""
    if not opts.mask:
        return None
    noise_mask = load_noise_mask(opts.mask, opts.width, opts.height, opts.grow_mask, opts.resize_mode)
    if not noise_mask.any():
        say(f"note: --mask {opts.mask} is black (nothing to repaint): the result is the init image")
    return noise_mask


def build_request(opts: GenerateOptions, settings: Settings, init: torch.Tensor | None, controls: list,
                  noise_mask: torch.Tensor | None, seed: int, ip_adapters: tuple = ()):
    """The ``SampleRequest`` of one image: the resolved settings, ``--denoise`` when starting from an image, the
    IP-Adapter hints of ``--ip_image``, the CFG variants (``--cfg_zero_star``, ``--apg``)."""
    from sd35_core.sampling.request import SampleRequest

    from .cfg_options import cfg_variants

    return SampleRequest(steps=settings.steps, cfg=settings.cfg, sampler=settings.sampler, shift=settings.shift,
                         seed=seed, denoise=opts.denoise if init is not None else 1.0, slg=settings.slg,
                         controls=controls, noise_mask=noise_mask, mask_mode=opts.mask_mode,
                         cache_threshold=opts.cache_threshold or 0.0, ip_adapters=ip_adapters,
                         **cfg_variants(opts))


def sample_latent(loaded: LoadedModels, opts: GenerateOptions, request, positive, negative,
                  init: torch.Tensor | None, hooks=None) -> torch.Tensor:
    """Sample one image's latent (raw VAE space, CPU float32): text-to-image, or image-to-image from ``init``;
    ``hooks`` a :class:`sd35_core.sampling.pipeline.RunHooks` or ``None``."""
    from sd35_core.loading.lora import applied
    from sd35_core.sampling.pipeline import NO_HOOKS, img2img, txt2img

    hooks = hooks or NO_HOOKS

    model = loaded.model
    with applied(model.mmdit, loaded.model_loras, backup_device="cpu"):  # backups off the GPU
        if init is None:
            latent = txt2img(model.mmdit, positive, negative, request, width=opts.width, height=opts.height,
                             hooks=hooks)
        else:
            latent = img2img(model.mmdit, positive, negative, request, init_latent=init, hooks=hooks)
    if latent.device.type == "cuda":
        torch.cuda.synchronize(latent.device)
    return latent.float().cpu()


def render_image(loaded: LoadedModels, opts: GenerateOptions, seed: int,
                 say: Callable[[str], None] = lambda s: None) -> tuple[torch.Tensor, Image.Image, PngInfo]:
    """One image of ``opts.prompt`` (the text itself) with ``seed`` on models loaded with the same model options:
    ``(latent, image, png_info)``, the same numbers (and PNG text chunks) as :func:`generate` makes for that
    prompt and seed.

    ``sd35 batch --engine ray`` renders each row with it; the row's settings are ``opts``' fields.
    """
    validate_options(opts)
    loaded.model.config.check_image_size(opts.width, opts.height)
    noise_mask = noise_mask_of(opts, say)
    settings = _loaded_settings(opts, loaded, say)
    init, controls, _shown = encode_inputs(loaded, opts, say)
    negative = encode_prompt(loaded, opts.negative_prompt)
    positive = encode_prompt(loaded, opts.prompt)
    ip = ip_hints(loaded.ip, opts, loaded.model.config)
    request = build_request(opts, settings, init, controls, noise_mask, seed, ip)
    latent = sample_latent(loaded, opts, request, positive, negative, init)
    info = png_info(_image_settings(opts, settings, request, opts.prompt, seed, init is not None))
    return latent, decode_image(loaded.vae, latent), info


def generate(opts: GenerateOptions, *, log: TextIO | None = None, now: datetime.datetime | None = None,
             loaded: LoadedModels | None = None, quiet: bool = False) -> GenerateResult:
    """Run ``sd35 generate`` with ``opts``: load, encode, sample, decode and save; returns what was done.

    Progress and messages go to ``log`` (default stderr); ``quiet`` keeps only the progress bar and notes.
    ``loaded`` reuses models loaded by :func:`load_models` with the same options.
    """
    from sd35_core.sampling.passes import PassStats
    from sd35_core.sampling.pipeline import RunHooks

    log = log if log is not None else sys.stderr
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        if not quiet or msg.startswith("note:"):
            print(msg, file=log, flush=True)

    validate_options(opts)
    prompts = read_prompts(opts.prompt, say)
    noise_mask = noise_mask_of(opts, say)
    device = pick_device(opts.device)
    seconds: dict[str, float] = {}

    out_dir = output_dir(opts.out_dir, opts.model, opts.prompt, opts.postfix, opts.controlnet_ckpt, now)
    if os.path.exists(out_dir):
        raise UsageError(f"output folder {out_dir} already exists; choose another --postfix or --out_dir")
    if loaded is None:
        # Settings that do not fit the model fail here, before gigabytes of weights are read.
        config, variant = inspect_model(opts.model)
        opts = native_size(opts, defaults_entry(opts.model, variant)[0], say)
        config.check_image_size(opts.width, opts.height)
        resolve_settings(opts, defaults_entry(opts.model, variant)[0], "", config.depth)
        t = time.perf_counter()
        loaded = load_models(opts, device, say)
        seconds["load"] = time.perf_counter() - t
    model = loaded.model
    model.config.check_image_size(opts.width, opts.height)

    settings = _loaded_settings(opts, loaded, say)

    t = time.perf_counter()
    init, controls, shown = encode_inputs(loaded, opts, say)
    seconds["encode_images"] = time.perf_counter() - t

    t = time.perf_counter()
    negative = encode_prompt(loaded, opts.negative_prompt)
    seconds["encode_text"] = time.perf_counter() - t

    seeds = seeds_for(opts.seed, opts.seed_type, len(prompts))
    ip = ip_hints(loaded.ip, opts, model.config)
    request = build_request(opts, settings, init, controls, noise_mask, seeds[0], ip)
    os.makedirs(out_dir, exist_ok=False)
    control_file = None
    if shown is not None:
        control_file = os.path.join(out_dir, "control.png")
        shown.save(control_file)
    files: list[str] = []
    latents: list[torch.Tensor] = []
    steps_run = 0
    stats = PassStats()  # over all images
    seconds.setdefault("sample", 0.0)
    seconds.setdefault("decode", 0.0)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        t = time.perf_counter()
        positive = encode_prompt(loaded, prompt)
        seconds["encode_text"] += time.perf_counter() - t
        run_steps = settings.steps - (0 if init is None else int(settings.steps * (1 - opts.denoise)))
        bar = ProgressBar(run_steps, label=f"image {i + 1}/{len(prompts)} seed {seed}", stream=log)
        request = replace(request, seed=seed)
        step_ends: list[float] = []

        def on_step(info, bar=bar, step_ends=step_ends) -> None:
            step_ends.append(time.perf_counter())
            bar.step_callback(info)

        t = time.perf_counter()
        latent = sample_latent(loaded, opts, request, positive, negative, init, RunHooks(callback=on_step, stats=stats))
        if i == 0 and step_ends:
            # The first step compiles (with --compile) or warms caches: reported apart from the rest.
            seconds["first_step"] = step_ends[0] - t
            if opts.compile and len(step_ends) > 1:
                later = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
                say(f"compile: first step {seconds['first_step']:.2f} s (warm-up, compiling), "
                    f"later steps {later:.3f} s each")
        seconds["sample"] += time.perf_counter() - t
        bar.close()
        steps_run = run_steps
        latents.append(latent)
        t = time.perf_counter()
        image = decode_image(loaded.vae, latent)
        path = os.path.join(out_dir, f"{i:06d}.png")
        image.save(path, pnginfo=png_info(_image_settings(opts, settings, request, prompt, seed, init is not None)))
        seconds["decode"] += time.perf_counter() - t
        files.append(path)
        if opts.verbose:
            say(f"Saved {path}")

    all_latents = torch.cat(latents)
    latent_file = None
    if opts.save_latent:
        latent_file = save_latents(opts.save_latent, all_latents)
    seconds["total"] = time.perf_counter() - t_start
    cache = None
    if request.cache_threshold > 0:
        total = steps_run * len(files)
        cache = {"threshold": request.cache_threshold, "steps": total, "steps_reused": stats.cache_hits,
                 "model_evaluations_saved": stats.cache_hits,
                 "evaluation_ratio": round(total / max(1, total - stats.cache_hits), 3)}
        say(f"step cache: {stats.cache_hits} of {total} steps reused ({cache['evaluation_ratio']}x fewer model "
            "evaluations)")
    return GenerateResult(
        out_dir=out_dir, files=files, prompts=prompts, seeds=seeds, model=opts.model, variant=model.variant,
        settings=settings_summary(settings, opts), width=opts.width, height=opts.height, device=str(device),
        dtype=_dtype_name(model.policy.compute),
        weights_dtype=_dtype_name(model.policy.storage) if model.policy.storage is not None else "as stored",
        seconds=seconds, steps_run=steps_run, memory=peak_memory(device), latent_file=latent_file,
        control_image_file=control_file, latents=all_latents, cache=cache,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _image_settings(opts: GenerateOptions, settings: Settings, request: Any, prompt: str, seed: int,
                    img2img: bool) -> dict[str, Any]:
    """What one PNG records about how it was made (see :mod:`.png_info`)."""
    slg = None
    if settings.slg is not None:
        g = settings.slg
        slg = {"layers": list(g.layers), "scale": g.scale, "start": g.start, "end": g.end, "window": g.window}
    controlnet = None
    if opts.controlnet_ckpt:
        controlnet = {"model": os.path.basename(opts.controlnet_ckpt), "strength": opts.controlnet_strength,
                      "image": os.path.basename(opts.controlnet_cond_image or ""),
                      "preprocess": opts.controlnet_preprocess}
    loras = tuple({"file": os.path.basename(lo.path), "strength": lo.strength, "clip_strength": lo.clip_strength}
                  for lo in opts.lora)
    ip_adapter = None
    if opts.ip_adapter:
        ip_adapter = {"model": os.path.basename(opts.ip_adapter), "image": os.path.basename(opts.ip_image or ""),
                      "scale": request.ip_adapters[0].weight if request.ip_adapters else 0.0}
    return image_settings(
        prompt=prompt, negative=opts.negative_prompt, seed=seed, steps=settings.steps, cfg=settings.cfg,
        sampler=settings.sampler, schedule=request.schedule, shift=settings.shift, slg=slg, width=opts.width,
        height=opts.height, model=opts.model, denoise=opts.denoise if img2img else None,
        init_image=opts.init_image if img2img else None, controlnet=controlnet, loras=loras, ip_adapter=ip_adapter,
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
