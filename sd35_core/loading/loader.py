"""Find the model parts in checkpoint files and load them, configured from the weights themselves.

Every official layout is detected by key names, never by file name: single files with the diffusion model
under ``model.diffusion_model.`` and the VAE under ``first_stage_model.`` (optionally bundling the text
encoders under ``text_encoders.*.transformer.``), bare diffusion models, HF-layout text encoder files, and
Stability's ControlNet release files. diffusers' layouts (a transformer or VAE file, or a whole model folder as
the model path) are seen in the official layout by key (:mod:`.diffusers_layout`). GGUF files (told apart by
their content) hold a bare diffusion model whose quantized weights stay quantized in memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..models.clip import CLIPConfig, CLIPTextModel
from ..models.controlnet import LOAD_KEY_MAP as CONTROLNET_KEY_MAP
from ..models.controlnet import ControlNet, ControlNetConfig, check_controlnet_fits
from ..models.latent import SD3_PREVIEW, LatentPreview
from ..models.mmditx import MMDiTConfig, MMDiTX
from ..models.t5 import T5Config, T5Encoder
from ..models.vae import VAE, VAEConfig
from .checkpoint import DTypePolicy, SafetensorsFile, find_prefix, load_weights, open_safetensors
from .diffusers_folder import is_model_folder, open_model_folder
from .diffusers_layout import official_view
from .gguf.reader import GGUFFile, is_gguf
from .gguf.sd3 import open_sd3_gguf
from .text_roles import BUNDLED_TEXT_PREFIXES, check_role, check_text_encoder_files, identify_for_role
from .unused_tensors import check_all_used

log = logging.getLogger(__name__)

# A key suffix that only the named part has; its prefix locates the part inside a file.
MARKERS = {
    "mmdit": "joint_blocks.0.x_block.attn.qkv.weight",
    "vae": "decoder.conv_in.weight",
    "clip": "text_model.final_layer_norm.weight",
    "t5": "encoder.final_layer_norm.weight",
    "controlnet": "controlnet_blocks.0.weight",
}
PART_LABELS = {
    "mmdit": "an SD3/SD3.5 diffusion model", "vae": "a VAE", "clip_l": "CLIP-L", "clip_g": "CLIP-G",
    "t5xxl": "T5-XXL", "controlnet": "a ControlNet",
}
VARIANT_LABELS = {
    "sd3_medium": "SD3 Medium",
    "sd3.5_medium": "SD3.5 Medium",
    "sd3.5_large": "SD3.5 Large or Large Turbo",
    "sd3.5_large_turbo": "SD3.5 Large Turbo",
}


@dataclass
class DiffusionModel:
    """A loaded MMDiT(-X) with what was detected about it."""

    mmdit: MMDiTX
    config: MMDiTConfig
    variant: str  # key into sd35_core.sampling.defaults; "sd3.5_large" when Turbo cannot be told apart
    path: str
    policy: DTypePolicy
    preview: LatentPreview = SD3_PREVIEW  # for live previews: the file's own map when its VAE is not SD3's

    @property
    def label(self) -> str:
        return VARIANT_LABELS[self.variant]


@dataclass
class TextEncoders:
    clip_l: CLIPTextModel
    clip_g: CLIPTextModel
    t5: T5Encoder | None


@dataclass
class ModelParts:
    """Whatever a checkpoint file holds; parts it does not bundle are ``None``."""

    model: DiffusionModel | None
    vae: VAE | None
    text_encoders: TextEncoders | None


def open_model_file(path: str | os.PathLike):
    """A safetensors file in the official layout: the file itself, or a view of it when it is in diffusers' names."""
    return official_view(open_safetensors(path))


def detect_parts(file: SafetensorsFile) -> dict[str, str]:
    """Map each part found in ``file`` (mmdit, vae, clip_l, clip_g, t5xxl, controlnet) to its key prefix."""
    keys = file.keys()
    found: dict[str, str] = {}
    for part in ("mmdit", "vae", "controlnet"):
        prefix = find_prefix(keys, MARKERS[part])
        if prefix is not None:
            found[part] = prefix
    for role, prefix in BUNDLED_TEXT_PREFIXES.items():
        marker = MARKERS["t5" if role == "t5xxl" else "clip"]
        if prefix + marker in file:
            found[role] = prefix
    return found


def _describe_foreign(file: SafetensorsFile) -> str:
    keys = file.keys()
    if find_prefix(keys, MARKERS["mmdit"]) is not None:
        parts = ["diffusion model"] + [label for part, label in (("vae", "VAE"), ("clip", "text encoders"))
                                       if find_prefix(keys, MARKERS[part]) is not None]
        return f"an SD3/SD3.5 checkpoint ({', '.join(parts)})"
    if any(".input_blocks." in k or k.startswith("input_blocks.") for k in keys):
        return "a UNet checkpoint (SD1.x/SDXL layout), not an SD3/SD3.5 model"
    if any("double_blocks." in k for k in keys):
        return "a Flux checkpoint, not an SD3/SD3.5 model"
    if find_prefix(keys, MARKERS["clip"]) is not None:
        return "a CLIP text encoder"
    if find_prefix(keys, MARKERS["t5"]) is not None:
        return "a T5 text encoder"
    if find_prefix(keys, MARKERS["vae"]) is not None:
        return "a VAE"
    if find_prefix(keys, MARKERS["controlnet"]) is not None:
        return "a ControlNet"
    return f"an unrecognised model ({len(keys)} tensors)"


def detect_variant(config: MMDiTConfig, metadata: dict[str, str]) -> str:
    """The variant key; Turbo shares Large's shapes, so only file metadata can say it is Turbo."""
    variant = config.variant
    if variant == "sd3.5_large" and any("turbo" in str(v).lower() for v in metadata.values()):
        return "sd3.5_large_turbo"
    return variant


def _config(derive, file: SafetensorsFile, shapes, what: str):
    """Derive a config from shapes; a failure names the file and the part that was expected."""
    try:
        return derive(shapes)
    except (CheckpointError, KeyError, ValueError) as e:
        raise file.error(f"{what}; {e}") from None


def _build(cls, config, file: SafetensorsFile, prefix: str, policy: DTypePolicy, device, **kw):
    with torch.device("meta"):
        module = cls(config)
    return load_weights(module, file, prefix, policy, device, **kw)


def _load_mmdit(file: SafetensorsFile, prefix: str, policy: DTypePolicy, device) -> DiffusionModel:
    config = _config(MMDiTConfig.from_shapes, file, file.shapes(prefix), "an SD3/SD3.5 diffusion model")
    mmdit = _build(MMDiTX, config, file, prefix, policy, device)
    mmdit.compute_dtype = policy.compute
    variant = detect_variant(config, file.metadata)
    log.info("%s: %s, depth %d, hidden %d, %s", file.name, VARIANT_LABELS[variant], config.depth,
             config.hidden_size, _storage_summary(file, prefix, policy))
    preview = LatentPreview.from_metadata(file.metadata, file.path) or SD3_PREVIEW
    return DiffusionModel(mmdit, config, variant, file.path, policy, preview)


def _storage_summary(file, prefix: str, policy: DTypePolicy) -> str:
    if not isinstance(file, GGUFFile):
        return str(policy.storage)
    counts: dict[str, int] = {}
    for key, info in file.tensors.items():
        if key.startswith(prefix):
            counts[info.qtype.name] = counts.get(info.qtype.name, 0) + 1
    return "GGUF " + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))


def _load_vae(file: SafetensorsFile, prefix: str, policy: DTypePolicy, device) -> VAE:
    config = _config(VAEConfig.from_shapes, file, file.shapes(prefix), "an SD3 VAE")
    # fp8 is never worth it for the VAE: it is small and its convolutions are precision-sensitive.
    vae_policy = policy if policy.storage != torch.float8_e4m3fn else DTypePolicy(policy.compute, policy.compute)
    return _build(VAE, config, file, prefix, vae_policy, device)


def _load_clip(file: SafetensorsFile, prefix: str, role: str, policy: DTypePolicy, device) -> CLIPTextModel:
    # The activation cannot be read from the weights; it follows from the slot (OpenAI CLIP-L vs OpenCLIP bigG).
    act = "quick_gelu" if role == "clip_l" else "gelu"
    config = _config(lambda s: CLIPConfig.from_shapes(s, hidden_act=act), file, file.shapes(prefix),
                     f"a CLIP text encoder for {role}")
    return _build(CLIPTextModel, config, file, prefix, policy, device)


def _load_t5(file: SafetensorsFile, prefix: str, policy: DTypePolicy, device) -> T5Encoder:
    shapes = file.shapes(prefix)
    config = _config(T5Config.from_shapes, file, shapes, "a T5 text encoder")
    return _build(T5Encoder, config, file, prefix, policy, device, key_map=T5Encoder.key_map(shapes))


def checkpoint_parts(path: str | os.PathLike) -> dict[str, str]:
    """The parts a checkpoint file holds (mmdit, vae, clip_l, clip_g, t5xxl, controlnet) and their key
    prefixes, from its header alone; a GGUF file holds the diffusion model only (or is refused as foreign)."""
    if is_gguf(path):
        file, prefix = open_sd3_gguf(path)
        file.close()
        return {"mmdit": prefix}
    if is_model_folder(path):
        return {part: "" for part in open_model_folder(path)}
    return detect_parts(open_model_file(path))


def inspect_diffusion_model(path: str | os.PathLike) -> tuple[MMDiTConfig, str]:
    """``(config, variant)`` of the diffusion model in a checkpoint (safetensors or GGUF), no weights read."""
    if is_gguf(path):
        file, prefix = open_sd3_gguf(path)
    else:
        file = open_model_folder(path)["mmdit"] if is_model_folder(path) else open_model_file(path)
        prefix = detect_parts(file).get("mmdit")
        if prefix is None:
            raise file.error(f"an SD3/SD3.5 checkpoint (MMDiT weights); this file is {_describe_foreign(file)}")
    try:
        config = _config(MMDiTConfig.from_shapes, file, file.shapes(prefix), "an SD3/SD3.5 diffusion model")
        return config, detect_variant(config, file.metadata)
    finally:
        if isinstance(file, GGUFFile):
            file.close()


def load_checkpoint(
    path: str | os.PathLike,
    dtype: str = "default",
    device: str | torch.device = "cpu",
    text_dtype: str | None = None,
) -> ModelParts:
    """Load every part a checkpoint holds: diffusion model (required), VAE and text encoders when bundled.

    ``path`` is a single file (official, ComfyUI scaled-fp8 or diffusers layout) or a diffusers model folder
    (``transformer/``, ``vae/``, ``text_encoder*/``). Every tensor of the file must be read by a part or be a
    known harmless extra (:mod:`.unused_tensors`), else the load fails naming the tensors.

    A GGUF file holds the diffusion model only; its tensors stay as the file stores them (quantized blocks,
    F16, F32) and are dequantized or cast to ``dtype``'s compute dtype when each layer runs.
    ``text_dtype`` is the bundled text encoders' dtype; by default fp32 on CPU and fp16 elsewhere (callers
    that load on the CPU and move to a GPU later, as ComfyUI does, pass the dtype for the GPU).
    """
    policy = DTypePolicy.named(dtype, device)
    if is_gguf(path):
        file, prefix = open_sd3_gguf(path)
        # As the file stores them: resident memory is the file's size; ``dtype`` picks the compute dtype.
        with file:
            model = _load_mmdit(file, prefix, DTypePolicy(None, policy.compute), device)
            check_all_used(file, {"mmdit": prefix}, labels=PART_LABELS)
            return ModelParts(model, None, None)
    if os.path.isdir(path):
        return _load_model_folder(path, policy, device, text_dtype)
    file = open_model_file(path)
    parts = detect_parts(file)
    if "mmdit" not in parts:
        raise file.error(f"an SD3/SD3.5 checkpoint (MMDiT weights); this file is {_describe_foreign(file)}")
    model = _load_mmdit(file, parts["mmdit"], policy, device)
    vae = _load_vae(file, parts["vae"], policy, device) if "vae" in parts else None
    text = None
    if "clip_l" in parts and "clip_g" in parts:
        text_dtype = text_dtype or ("fp32" if torch.device(device).type == "cpu" else "fp16")
        text_policy = DTypePolicy.named(text_dtype, device)
        t5 = _load_t5(file, parts["t5xxl"], text_policy, device) if "t5xxl" in parts else None
        text = TextEncoders(
            _load_clip(file, parts["clip_l"], "clip_l", text_policy, device),
            _load_clip(file, parts["clip_g"], "clip_g", text_policy, device),
            t5,
        )
    # Every part found must have been loaded (a lone bundled CLIP-L, say, is reported rather than dropped).
    check_all_used(file, parts, labels=PART_LABELS)
    return ModelParts(model, vae, text)


def _load_model_folder(path, policy: DTypePolicy, device, text_dtype: str | None) -> ModelParts:
    """A diffusers model folder: each part from its own file, every file read in full."""
    files = open_model_folder(path)
    loaded: dict[str, object] = {}
    text_policy = DTypePolicy.named(text_dtype or ("fp32" if torch.device(device).type == "cpu" else "fp16"), device)
    for part, file in files.items():
        marker = MARKERS["t5" if part == "t5xxl" else "clip" if part.startswith("clip") else part]
        prefix = find_prefix(file.keys(), marker)
        if prefix is None:
            raise file.error(f"{PART_LABELS[part]} (its '{marker}'); this file is {_describe_foreign(file)}")
        if part == "mmdit":
            loaded[part] = _load_mmdit(file, prefix, policy, device)
        elif part == "vae":
            loaded[part] = _load_vae(file, prefix, policy, device)
        elif part == "t5xxl":
            loaded[part] = _load_t5(file, prefix, text_policy, device)
        else:
            check_role(file, part, identify_for_role(file, part))
            loaded[part] = _load_clip(file, prefix, part, text_policy, device)
        check_all_used(file, {part: prefix}, labels=PART_LABELS)
    model = loaded["mmdit"]
    model.path = os.fspath(path)
    text = None
    if "clip_l" in loaded and "clip_g" in loaded:
        text = TextEncoders(loaded["clip_l"], loaded["clip_g"], loaded.get("t5xxl"))
    return ModelParts(model, loaded.get("vae"), text)


def load_vae(path: str | os.PathLike, dtype: str = "default", device: str | torch.device = "cpu") -> VAE:
    """Load a VAE from a standalone VAE file (official or diffusers layout) or from a checkpoint that bundles one."""
    file = open_model_file(path)
    prefix = find_prefix(file.keys(), MARKERS["vae"])
    if prefix is None:
        raise file.error(f"a VAE (decoder.conv_in.weight); this file is {_describe_foreign(file)}")
    vae = _load_vae(file, prefix, DTypePolicy.named(dtype, device), device)
    _check_used_by_part(file, "vae", prefix)
    return vae


def _check_used_by_part(file, part: str, prefix: str) -> None:
    """Every tensor of ``file`` read by ``part`` or owned by another part of the file (which other loads read)."""
    parts = {**detect_parts(file), part: prefix}
    check_all_used(file, parts, others=set(parts) - {part}, labels=PART_LABELS)


def load_text_encoder(
    path: str | os.PathLike, role: str, dtype: str = "default", device: str | torch.device = "cpu"
) -> CLIPTextModel | T5Encoder:
    """Load one text encoder (``role`` is clip_l, clip_g or t5xxl) from an HF-layout or bundling file."""
    if role not in ("clip_l", "clip_g", "t5xxl"):
        raise ValueError(f"text encoder role: expected clip_l, clip_g or t5xxl; got {role!r}")
    file = open_safetensors(path)
    policy = DTypePolicy.named(dtype, device)
    keys = file.keys()
    check_role(file, role, identify_for_role(file, role))
    if role == "t5xxl":
        prefix = BUNDLED_TEXT_PREFIXES[role] if BUNDLED_TEXT_PREFIXES[role] + MARKERS["t5"] in file else ""
        if prefix + MARKERS["t5"] not in file:
            raise file.error(
                f"a T5 text encoder (encoder.final_layer_norm.weight); this file is {_describe_foreign(file)}"
            )
        t5 = _load_t5(file, prefix, policy, device)
        _check_used_by_part(file, role, prefix)
        return t5
    prefix = BUNDLED_TEXT_PREFIXES[role] if BUNDLED_TEXT_PREFIXES[role] + MARKERS["clip"] in file else ""
    if prefix + MARKERS["clip"] not in file:
        found = find_prefix(keys, MARKERS["clip"])
        if found is None:
            raise file.error(f"a CLIP text encoder for {role}; this file is {_describe_foreign(file)}")
        prefix = found
    clip = _load_clip(file, prefix, role, policy, device)
    _check_used_by_part(file, role, prefix)
    return clip


def load_text_encoders(
    paths: dict[str, str], dtype: str = "default", device: str | torch.device = "cpu"
) -> TextEncoders:
    """Load CLIP-L, CLIP-G and optionally T5 (``paths`` maps clip_l, clip_g and optionally t5xxl to files) after
    checking from the headers that each file fits its slot and that the two CLIPs are not swapped."""
    check_text_encoder_files(paths)
    parts = {role: load_text_encoder(p, role, dtype, device) for role, p in paths.items()}
    return TextEncoders(parts["clip_l"], parts["clip_g"], parts.get("t5xxl"))


def load_controlnet(
    path: str | os.PathLike, model: DiffusionModel, dtype: str = "default", device: str | torch.device = "cpu"
) -> ControlNet:
    """Load an SD3.5 ControlNet release file and check that it fits ``model``."""
    file = open_safetensors(path)
    prefix = find_prefix(file.keys(), MARKERS["controlnet"])
    if prefix is None:
        raise file.error(f"an SD3.5 ControlNet (controlnet_blocks.*); this file is {_describe_foreign(file)}")
    shapes = {CONTROLNET_KEY_MAP.get(k, k): v for k, v in file.shapes(prefix).items()}
    config = _config(ControlNetConfig.from_shapes, file, shapes, "an SD3.5 ControlNet")
    try:
        check_controlnet_fits(config, model.config)
    except ValueError as e:
        raise CheckpointError(f"{file.path}: {e}") from None
    cn = _build(ControlNet, config, file, prefix, DTypePolicy.named(dtype, device), device, key_map=CONTROLNET_KEY_MAP,
                optional=ControlNet.OPTIONAL_KEYS)
    if "control_type" in file.shapes(prefix):
        cn.control_type = int(file.tensor(prefix + "control_type").flatten()[0])
        file.used.add(prefix + "control_type")
    _check_used_by_part(file, "controlnet", prefix)
    return cn
