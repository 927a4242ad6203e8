"""Shared pieces of the LoRA tests: tiny MMDiT-X models with their diffusers twins, and PEFT LoRAs on
them saved with diffusers' own LoRA saving."""

from __future__ import annotations

import os

import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from bench.diffusers_convert import diffusers_model, to_diffusers
from sd35_core.loading.tiny import mmdit_config, randomize_
from sd35_core.models.mmditx import MMDiTX

# Every linear / conv module of SD3Transformer2DModel that diffusers' SD3 LoRA loading patches.
TRANSFORMER_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "proj_out", "norm_out.linear", "context_embedder", "pos_embed.proj",
    "linear_1", "linear_2",
]
SHAPES = {"sd3.5_medium": dict(variant="sd3.5_medium", depth=4), "sd3.5_large": dict(variant="sd3.5_large", depth=3)}


def tiny_pair(shape: str, seed: int = 0) -> tuple[MMDiTX, torch.nn.Module]:
    """Our tiny MMDiT-X (``shape``: sd3.5_medium with attn2, or sd3.5_large) and diffusers' with equal weights."""
    cfg = mmdit_config(**SHAPES[shape])
    ours = randomize_(MMDiTX(cfg), seed).requires_grad_(False).eval()
    theirs = diffusers_model(cfg)
    with torch.no_grad():
        ours.pos_embed.copy_(theirs.pos_embed.pos_embed)
    theirs.load_state_dict(to_diffusers(ours.state_dict(), cfg), strict=True)
    return ours, theirs


def diffusers_twin(ours: MMDiTX) -> torch.nn.Module:
    """A fresh diffusers model with ``ours``' weights."""
    theirs = diffusers_model(ours.config)
    theirs.load_state_dict(to_diffusers(ours.state_dict(), ours.config), strict=True)
    return theirs


def load_with_diffusers(transformer: torch.nn.Module, path: str, strength: float = 1.0, name: str = "style"):
    """diffusers' own SD3 LoRA loading (state dict and its adapter metadata) into ``transformer``."""
    state, metadata = StableDiffusion3Pipeline.lora_state_dict(path, return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(
        {k: v for k, v in state.items() if k.startswith("transformer.")}, transformer=transformer,
        adapter_name=name, metadata=metadata)
    transformer.set_adapters([name], weights=[strength])
    return transformer


def add_peft_lora(model: torch.nn.Module, r: int = 4, alpha: float = 8.0, seed: int = 1, targets=None,
                  std: float = 0.05, **config) -> torch.nn.Module:
    """Add a PEFT LoRA with seeded non-zero A and B (a trained-looking update) to ``model``."""
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or TRANSFORMER_TARGETS,
                                 init_lora_weights="gaussian", **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def save_diffusers_lora(directory, transformer=None, **text_encoders) -> str:
    """Write the PEFT LoRAs of ``transformer`` (and ``text_encoder=...`` models) with
    ``StableDiffusion3Pipeline.save_lora_weights``: diffusers' own format, with each adapter's config as
    metadata, as diffusers' SD3 training script saves it."""
    kwargs = {}
    for name, model in (("transformer", transformer), *text_encoders.items()):
        if model is not None:
            kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
            kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    StableDiffusion3Pipeline.save_lora_weights(os.fspath(directory), safe_serialization=True, **kwargs)
    return os.path.join(os.fspath(directory), "pytorch_lora_weights.safetensors")


def inputs(cfg, hw=(8, 8), batch: int = 2, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=gen)
    t = torch.linspace(900.0, 150.0, batch)
    context = torch.randn(batch, 5, cfg.context_dim, generator=gen)
    y = torch.randn(batch, cfg.pooled_dim, generator=gen)
    return x, t, context, y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()
