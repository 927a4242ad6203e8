"""Tiny files in ComfyUI's scaled-fp8 layout, each with its plain twin (same effective weights, float32)."""

from __future__ import annotations

import os

import torch

from sd35_core.loading import tiny
from sd35_core.loading.checkpoint import write_safetensors
from sd35_core.models.controlnet import SAVE_KEY_MAP

BUNDLED = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
           "t5xxl": "text_encoders.t5xxl.transformer."}


def _write(path, parts: dict[str, dict[str, torch.Tensor]]) -> str:
    out = {prefix + k: v.detach().contiguous() for prefix, state in parts.items() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    return write_safetensors(path, out)


def mmdit_states(variant="sd3.5_medium", seed=0, **kw):
    mmdit = tiny.tiny_mmdit(variant, seed)
    return tiny.scaled_fp8_state(mmdit.state_dict(), tiny.linear_weight_keys(mmdit), **kw)


def t5_states(seed=4, **kw):
    t5 = tiny.tiny_t5(seed)
    return tiny.scaled_fp8_state(tiny._t5_file_state(t5), tiny.linear_weight_keys(t5), **kw)


def clip_states(role, seed, **kw):
    clip = tiny.tiny_clip(role, seed)
    return tiny.scaled_fp8_state(clip.state_dict(), tiny.linear_weight_keys(clip), **kw)


def controlnet_states(seed=10, **kw):
    cn = tiny.tiny_controlnet(seed)
    state = {SAVE_KEY_MAP.get(k, k): v for k, v in cn.state_dict().items()}
    state["control_type"] = torch.tensor([1], dtype=torch.int32)
    keys = {SAVE_KEY_MAP.get(k, k) for k in tiny.linear_weight_keys(cn)}
    return tiny.scaled_fp8_state(state, keys, **kw)


def checkpoint_pair(directory, variant="sd3.5_large", **kw) -> tuple[str, str]:
    """A checkpoint like Comfy-Org's sd3.5_large_fp8_scaled: scaled MMDiT and T5, fp16-free CLIPs, plain VAE."""
    mm_scaled, mm_plain = mmdit_states(variant, **kw)
    t5_scaled, t5_plain = t5_states(**kw)
    vae = tiny.tiny_vae(1).state_dict()
    clips = {"clip_l": tiny.tiny_clip("clip_l", 2).state_dict(), "clip_g": tiny.tiny_clip("clip_g", 3).state_dict()}
    common = {"first_stage_model.": vae, BUNDLED["clip_l"]: clips["clip_l"], BUNDLED["clip_g"]: clips["clip_g"]}
    scaled = _write(os.path.join(directory, "scaled.safetensors"),
                    {"model.diffusion_model.": mm_scaled, BUNDLED["t5xxl"]: t5_scaled, **common})
    plain = _write(os.path.join(directory, "plain.safetensors"),
                   {"model.diffusion_model.": mm_plain, BUNDLED["t5xxl"]: t5_plain, **common})
    return scaled, plain


def pair(directory, name, states) -> tuple[str, str]:
    """``(scaled file, plain file)`` of one part without prefix, from ``(scaled, effective)`` states."""
    scaled, plain = states
    return (_write(os.path.join(directory, f"{name}_scaled.safetensors"), {"": scaled}),
            _write(os.path.join(directory, f"{name}_plain.safetensors"), {"": plain}))
