"""Tiny, seeded model sets in the official checkpoint layouts, for tests, the demo and benchmarks.

The real code paths (file detection, shape-derived configs, loaders, samplers) run unchanged on them;
only the sizes are small. Random weights draw noise: these files prove plumbing and numerics, not images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import write_safetensors


def randomize_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Fill every parameter of ``module`` with seeded values that keep activations well scaled.

    Matrices get ``N(0, 1/fan_in)`` so deep stacks neither explode nor vanish; vectors (biases, norm
    scales) get ``1 + N(0, std)`` when they are norm weights and ``N(0, std)`` otherwise, so every
    tensor differs from its default and a parity test can catch a mixed-up key.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif _is_norm_weight(name):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return module


def _is_norm_weight(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    return name.endswith(".weight") and any("norm" in part or part.startswith("ln_") for part in leaf[:-1])


def save_state(
    path: str | os.PathLike,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``{prefix: state_dict}`` as one ``.safetensors`` file, optionally cast to ``dtype``."""
    out: dict[str, torch.Tensor] = {}
    for prefix, state in parts.items():
        for k, v in state.items():
            t = v.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[prefix + k] = t.contiguous()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_safetensors(path, out, metadata)
    return path


# ---------------------------------------------------------------------------------------------------------
# Tiny configurations: the real architectures at toy widths. Head width stays 64 as in every release.
# ---------------------------------------------------------------------------------------------------------

CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 64, 128, 256
MMDIT_WIDTH = 128
VARIANTS = ("sd3_medium", "sd3.5_medium", "sd3.5_large")


def mmdit_config(variant: str = "sd3.5_medium", depth: int | None = None, hidden: int = MMDIT_WIDTH):
    """A tiny MMDiT config shaped like ``variant`` (SD3.5 Medium: attn2 in its first half, qk-norm)."""
    from ..models.mmditx import MMDiTConfig

    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}; got {variant!r}")
    depth = depth or (10 if variant == "sd3.5_medium" else 4)
    return MMDiTConfig(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // 64,
        pos_embed_max_size=32,
        pooled_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        context_dim=T5_WIDTH,
        qk_norm=variant != "sd3_medium",
        x_block_self_attn_layers=tuple(range(depth // 2)) if variant == "sd3.5_medium" else (),
    )


def clip_config(role: str):
    from ..models.clip import CLIPConfig

    wide = role == "clip_g"
    width = CLIP_G_WIDTH if wide else CLIP_L_WIDTH
    return CLIPConfig(
        vocab_size=49408,
        hidden_size=width,
        num_layers=3 if wide else 2,
        num_heads=width // 64,
        intermediate_size=4 * width,
        max_positions=77,
        hidden_act="gelu" if wide else "quick_gelu",
        projection_dim=width if wide else None,
    )


def t5_config():
    from ..models.t5 import T5Config

    return T5Config(vocab_size=32128, d_model=T5_WIDTH, d_kv=64, num_heads=T5_WIDTH // 64, d_ff=512, num_layers=2)


def vae_config():
    from ..models.vae import VAEConfig

    return VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


def controlnet_config(layers: int = 2):
    from ..models.controlnet import ControlNetConfig

    return ControlNetConfig(
        hidden_size=MMDIT_WIDTH,
        num_heads=MMDIT_WIDTH // 64,
        num_layers=layers,
        patch_size=2,
        in_channels=16,
        pooled_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        has_x_embedder=False,  # as released: the 8b ControlNets use the diffusion model's patch embedding
    )


def sincos_pos_embed(hidden: int, grid: int) -> torch.Tensor:
    """The fixed 2D sin-cos position grid the released models carry in ``pos_embed`` ``[1, grid², hidden]``."""
    coords = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(hidden // 4, dtype=torch.float64) / (hidden / 4))

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    h, w = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([embed(h), embed(w)], dim=1).float()[None]


# ---------------------------------------------------------------------------------------------------------
# Seeded modules and files in the official layouts.
# ---------------------------------------------------------------------------------------------------------


def tiny_mmdit(variant: str = "sd3.5_medium", seed: int = 0, **kw):
    from ..models.mmditx import MMDiTX

    config = mmdit_config(variant, **kw)
    model = randomize_(MMDiTX(config), seed)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(config.hidden_size, config.pos_embed_max_size))
    return model.eval()


def tiny_clip(role: str, seed: int = 0):
    from ..models.clip import CLIPTextModel

    return randomize_(CLIPTextModel(clip_config(role)), seed).eval()


def tiny_t5(seed: int = 0):
    from ..models.t5 import T5Encoder

    return randomize_(T5Encoder(t5_config()), seed).eval()


def tiny_vae(seed: int = 0):
    from ..models.vae import VAE

    return randomize_(VAE(vae_config()), seed).eval()


def tiny_controlnet(seed: int = 0, layers: int = 2):
    from ..models.controlnet import ControlNet

    return randomize_(ControlNet(controlnet_config(layers)), seed).eval()


def _t5_file_state(t5: nn.Module) -> dict[str, torch.Tensor]:
    # Real T5 files carry the token embedding as shared.weight (and often encoder.embed_tokens.weight too).
    state = dict(t5.state_dict())
    for key in [k for k in state if k.endswith("embed_tokens.weight")]:
        state["shared.weight"] = state.pop(key)
    return state


def write_checkpoint(
    path: str | os.PathLike,
    variant: str = "sd3.5_medium",
    *,
    seed: int = 0,
    vae: bool = True,
    text_encoders: bool = False,
    bare: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """A single-file checkpoint: ``model.diffusion_model.`` (+ ``first_stage_model.``, + bundled encoders).

    ``bare=True`` writes the diffusion model alone without prefix, as ComfyUI's ``diffusion_models`` holds it.
    """
    mmdit = tiny_mmdit(variant, seed)
    if bare:
        return save_state(path, {"": mmdit.state_dict()}, metadata=metadata)
    parts = {"model.diffusion_model.": mmdit.state_dict()}
    if vae:
        parts["first_stage_model."] = tiny_vae(seed + 1).state_dict()
    if text_encoders:
        parts["text_encoders.clip_l.transformer."] = tiny_clip("clip_l", seed + 2).state_dict()
        parts["text_encoders.clip_g.transformer."] = tiny_clip("clip_g", seed + 3).state_dict()
        parts["text_encoders.t5xxl.transformer."] = _t5_file_state(tiny_t5(seed + 4))
    return save_state(path, parts, metadata=metadata)


def write_text_encoders(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """``clip_l.safetensors``, ``clip_g.safetensors`` and ``t5xxl_fp16.safetensors`` in HF layout (fp16)."""
    d = os.fspath(directory)
    return {
        "clip_l": save_state(os.path.join(d, "clip_l.safetensors"), {"": tiny_clip("clip_l", seed + 2).state_dict()},
                             dtype=torch.float16),
        "clip_g": save_state(os.path.join(d, "clip_g.safetensors"), {"": tiny_clip("clip_g", seed + 3).state_dict()},
                             dtype=torch.float16),
        "t5xxl": save_state(os.path.join(d, "t5xxl_fp16.safetensors"), {"": _t5_file_state(tiny_t5(seed + 4))},
                            dtype=torch.float16),
    }


def write_controlnet(path: str | os.PathLike, control_type: str = "canny", seed: int = 0) -> str:
    """A ControlNet for the tiny Large-like model in Stability's release key layout."""
    from ..models.controlnet import CONTROL_TYPES, SAVE_KEY_MAP

    state = {SAVE_KEY_MAP.get(k, k): v for k, v in tiny_controlnet(seed).state_dict().items()}
    state["control_type"] = torch.tensor([CONTROL_TYPES[control_type]], dtype=torch.int32)
    return save_state(path, {"": state})


def kohya_lora_tensors(module: nn.Module, prefix: str, rank: int, gen: torch.Generator,
                       select=lambda key: True) -> dict[str, torch.Tensor]:
    """Seeded kohya-format LoRA tensors (``<prefix><key_>.lora_down/up.weight``, ``.alpha`` = rank / 2) for
    every matrix weight of ``module`` whose key ``select`` accepts."""
    out = {}
    for key, w in module.state_dict().items():
        if w.ndim != 2 or not key.endswith(".weight") or not select(key):
            continue
        name = prefix + key[: -len(".weight")].replace(".", "_")
        out[name + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=gen) / math.sqrt(w.shape[1])
        out[name + ".lora_up.weight"] = 0.2 * torch.randn(w.shape[0], rank, generator=gen) / math.sqrt(rank)
        out[name + ".alpha"] = torch.tensor(rank / 2.0)
    return out


def write_lora(path: str | os.PathLike, variant: str = "sd3.5_large", *, seed: int = 0, rank: int = 4,
               text_encoders: bool = True) -> str:
    """A seeded kohya-format LoRA (``lora_unet_*``, ``lora_te1/2/3_*``) for the tiny ``variant`` model set.

    Every linear layer of the diffusion model (``.weight`` matrices) gets a rank-``rank`` update with
    ``alpha = rank / 2``; with ``text_encoders`` the CLIP and T5 attention and MLP layers get one too.
    """
    gen = torch.Generator().manual_seed(1000 + seed)
    tensors = kohya_lora_tensors(tiny_mmdit(variant, seed), "lora_unet_", rank, gen)
    if text_encoders:
        clip_layers = lambda k: ".encoder.layers." in k  # noqa: E731
        tensors |= kohya_lora_tensors(tiny_clip("clip_l", seed + 2), "lora_te1_", rank, gen, clip_layers)
        tensors |= kohya_lora_tensors(tiny_clip("clip_g", seed + 3), "lora_te2_", rank, gen, clip_layers)
        tensors |= kohya_lora_tensors(tiny_t5(seed + 4), "lora_te3_", rank, gen, lambda k: ".SelfAttention." in k)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_safetensors(path, tensors, {"ss_network_module": "networks.lora"})
    return path


# ---------------------------------------------------------------------------------------------------------
# ComfyUI's scaled fp8: the layout of Comfy-Org's *_fp8_scaled files, for tests and benchmarks.
# ---------------------------------------------------------------------------------------------------------


def linear_weight_keys(module: nn.Module) -> set[str]:
    """Module keys of the weights of ``module``'s linear layers (the ones ComfyUI's scaled fp8 stores as fp8)."""
    from ..models import ops

    return {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, ops.Linear)}


def scaled_fp8_state(
    state: Mapping[str, torch.Tensor],
    weight_keys: set[str],
    *,
    scale_name: str = "scale_weight",
    input_scale_name: str | None = None,
    fp8: torch.dtype = torch.float8_e4m3fn,
    marker: bool = True,
    fp8_biases: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(scaled, effective)``: ``state`` in ComfyUI's scaled-fp8 layout, and the plain twin it stands for.

    Each weight in ``weight_keys`` is stored as ``fp8`` with a float32 per-tensor scale ``<layer>.<scale_name>``
    (``max|w| / fp8 max``, so the fp8 range is used in full); with ``input_scale_name`` each such layer also gets a
    per-tensor activation scale; ``marker`` adds the ``scaled_fp8`` marker (an empty tensor of the fp8 dtype, as
    ComfyUI writes it). With ``fp8_biases`` those layers' biases are stored in fp8 too (unscaled): ComfyUI builds
    a scaled layer in fp8 whole, so it holds (and saves) its bias rounded to fp8 whatever the file stores.
    ``effective`` keeps every other tensor and holds each scaled weight as fp8 x scale (each fp8 bias as its
    value) in float32: the plain file with the same effective weights.
    """
    scaled: dict[str, torch.Tensor] = {}
    effective: dict[str, torch.Tensor] = {}
    fp8_max = torch.finfo(fp8).max
    biases = {k.removesuffix("weight") + "bias" for k in weight_keys} if fp8_biases else set()
    for key, value in state.items():
        if key in biases:
            scaled[key] = value.detach().to(fp8)
            effective[key] = scaled[key].to(torch.float32)
            continue
        if key not in weight_keys:
            scaled[key] = effective[key] = value
            continue
        w = value.detach().to(torch.float32)
        scale = (w.abs().max() / fp8_max).clamp(min=1e-12)
        stored = (w / scale).to(fp8)
        base = key.removesuffix("weight")
        scaled[key] = stored
        scaled[base + scale_name] = scale.reshape(())
        if input_scale_name:
            scaled[base + input_scale_name] = torch.tensor(0.5 + 0.01 * len(scaled), dtype=torch.float32)
        effective[key] = stored.to(torch.float32) * scale
    if marker:
        scaled["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return scaled, effective


@dataclass(frozen=True)
class TinyModelSet:
    """Paths of a tiny model set laid out like a ComfyUI ``models`` folder."""

    root: str
    checkpoints: dict[str, str]  # variant -> single file with VAE
    diffusion_model: str  # bare SD3.5-Medium-like diffusion model
    text_encoders: dict[str, str]  # clip_l / clip_g / t5xxl -> HF-layout file
    vae: str
    controlnets: dict[str, str]  # blur / canny / depth -> release-layout file for the Large-like model
    lora: str = ""  # kohya-format LoRA for the Large-like model and the text encoders


def write_tiny_model_set(directory: str | os.PathLike, seed: int = 0) -> TinyModelSet:
    """Write every tiny part under ``directory`` in ComfyUI's folder names (checkpoints, vae, ...)."""
    root = os.fspath(directory)
    sub = {name: os.path.join(root, name) for name in ("checkpoints", "diffusion_models", "text_encoders", "vae",
                                                          "controlnet")}
    checkpoints = {
        v: write_checkpoint(os.path.join(sub["checkpoints"], f"tiny-{v}.safetensors"), v, seed=seed)
        for v in VARIANTS
    }
    bare = write_checkpoint(os.path.join(sub["diffusion_models"], "tiny-sd3.5_medium-bare.safetensors"),
                            "sd3.5_medium", seed=seed, bare=True)
    vae_path = save_state(os.path.join(sub["vae"], "tiny-sd3_vae.safetensors"), {"": tiny_vae(seed + 1).state_dict()})
    controlnets = {
        t: write_controlnet(os.path.join(sub["controlnet"], f"tiny-sd3.5_large_controlnet_{t}.safetensors"), t,
                            seed=seed + 10 + i)
        for i, t in enumerate(("blur", "canny", "depth"))
    }
    lora = write_lora(os.path.join(root, "loras", "tiny-sd3.5_large_lora.safetensors"), "sd3.5_large", seed=seed)
    return TinyModelSet(root, checkpoints, bare, write_text_encoders(sub["text_encoders"], seed), vae_path,
                        controlnets, lora)
