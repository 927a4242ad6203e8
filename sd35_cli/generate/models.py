"""Model loading for ``sd35 generate``: device choice, the files the options name, and loading them."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..main import UsageError
from .options import NONE_WORDS, TEXT_ENCODER_NAMES, GenerateOptions

TOKENIZER_HINT = (
    "Point at the tokenizer files with --tokenizers DIR (a folder holding clip/vocab.json, clip/merges.txt and "
    "t5/tokenizer.json, as `sd35 demo` writes) or --comfyui PATH (a ComfyUI checkout: its comfy/ folder "
    "bundles both tokenizers; the COMFYUI_PATH environment variable does the same)."
)


def comfyui_tokenizer_dirs(comfyui: str | os.PathLike | None) -> list[str]:
    """A ComfyUI checkout's bundled CLIP and T5 tokenizer folders (none without a checkout)."""
    if comfyui is None:
        return []
    root = os.fspath(comfyui)
    return [os.path.join(root, "comfy", "sd1_tokenizer"), os.path.join(root, "comfy", "text_encoders", "t5_tokenizer")]


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


def _require_model(path: str) -> str:
    """``--model``: a checkpoint file, or a diffusers model folder (``transformer/``, ``vae/``, ``text_encoder*/``)."""
    from sd35_core.loading.diffusers_folder import is_model_folder

    if os.path.isdir(path) and not is_model_folder(path):
        raise UsageError(f"--model {path}: is a folder but no diffusers model folder (no transformer/ inside); "
                         "expected a checkpoint file or a diffusers model folder")
    if not os.path.exists(path):
        raise UsageError(f"--model {path}: no such file")
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
    """``(MMDiTConfig, variant)`` of a checkpoint (safetensors or GGUF) from its header alone (no weights read);
    a file that is no SD3/SD3.5 model raises the loader's CheckpointError saying what it is."""
    from sd35_core.loading.loader import inspect_diffusion_model

    _require_model(path)
    return inspect_diffusion_model(path)


@dataclass
class LoadedModels:
    """Everything a run needs, loaded."""

    model: Any  # sd35_core.loading.loader.DiffusionModel
    vae: Any  # sd35_core.models.vae.VAE
    text: Any  # sd35_core.text.encoder.SD3TextEncoder
    controlnet: Any = None  # sd35_core.models.controlnet.ControlNet
    controlnet_path: str | None = None  # "8b" or "2b"
    text_files: dict[str, str | None] = field(default_factory=dict)
    # ``(LoraPatches, strength)`` stacks from --lora, applied while encoding and sampling (sd35_core.loading.lora)
    model_loras: tuple = ()
    text_loras: tuple = ()
    ip: Any = None  # .ip_adapter.IPParts from --ip_adapter / --clip_vision

    @property
    def text_modules(self) -> torch.nn.Module:
        """The text encoders as one module with children clip_l / clip_g / t5xxl: what LoRAs patch."""
        t = self.text
        return torch.nn.ModuleDict({k: v for k, v in (("clip_l", t.clip_l), ("clip_g", t.clip_g), ("t5xxl", t.t5))
                                    if v is not None})


def load_models(
    opts: GenerateOptions, device: torch.device, say: Callable[[str], None] = lambda s: None
) -> LoadedModels:
    """Load the diffusion model, VAE, text encoders (+ tokenizers) and ControlNet the options name."""
    from sd35_core.loading.loader import checkpoint_parts, load_checkpoint, load_controlnet, load_text_encoder, load_vae
    from sd35_core.loading.lora import load_lora
    from sd35_core.loading.text_roles import check_text_encoder_files
    from sd35_core.models.controlnet import check_controlnet_fits
    from sd35_core.text.encoder import SD3TextEncoder
    from sd35_core.text.tokenization import SD3Tokenizer, find_tokenizer_files

    _require_model(opts.model)
    for option in ("vae", "controlnet_ckpt", "init_image", "controlnet_cond_image"):
        if getattr(opts, option) is not None:
            _require_file(option, getattr(opts, option))
    for spec in opts.lora:
        _require_file("lora", spec.path)
    found = checkpoint_parts(opts.model)
    if opts.vae is None and "vae" not in found and "mmdit" in found:
        raise UsageError(f"{opts.model} holds no VAE (first_stage_model.*); pass --vae FILE")
    bundled = [r for r in ("clip_l", "clip_g", "t5xxl") if r in found]
    files = text_encoder_files(opts, bundled)
    # Each file against its slot and the two CLIPs against each other, from the headers, before loading anything.
    check_text_encoder_files({role: opts.model if src == "bundled" else src for role, src in files.items()
                              if src is not None})

    say("Loading tokenizers...")
    comfyui = opts.comfyui or os.environ.get("COMFYUI_PATH") or None
    clip_dir, t5_json = find_tokenizer_files(opts.tokenizers, *comfyui_tokenizer_dirs(comfyui), model_path=opts.model,
                                             hint=TOKENIZER_HINT)
    tokenizer = SD3Tokenizer.from_files(clip_dir, t5_json)

    say(f"Loading SD3 model {os.path.basename(opts.model)}...")
    parts = load_checkpoint(opts.model, opts.dtype, device)
    model = parts.model
    if opts.compile:
        from sd35_core.models.compile import compile_model

        compile_model(model.mmdit)

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
    loaded = LoadedModels(model, vae, text, controlnet, path, files)
    for spec in opts.lora:
        say(f"Loading LoRA {os.path.basename(spec.path)} (strength {spec.strength:g}, clip {spec.clip_strength:g})...")
        lora = load_lora(spec.path, model.mmdit, loaded.text_modules)
        if lora.model is not None:
            loaded.model_loras += ((lora.model, spec.strength),)
        if lora.clip is not None:
            loaded.text_loras += ((lora.clip, spec.clip_strength),)
    from .ip_adapter import load_ip_parts

    loaded.ip = load_ip_parts(opts, device, say)
    say("Models loaded.")
    return loaded
