"""Extra tiny files for the bridge host tests, written next to the tiny model set (plain code, no fixtures).

- ``comfy-sd3.5_large.safetensors``: an SD3.5-Large-like checkpoint (what the 8b ControlNets are for) whose
  width is 64 x its block count, the only shape ComfyUI's own MMDiT can load (its detection sizes a model as
  ``hidden = 64 * depth``). No VAE: ComfyUI's VAE builder knows only the full-size layout.
- LoRA files in the kohya layout (``lora_unet_<key>.lora_down/lora_up/alpha``) for both diffusion models, and
  for each a checkpoint with that LoRA merged by plain arithmetic, ``W + strength * alpha / rank * up @ down``:
  the independent reference for what a LoRA loader must compute.
- A canny ControlNet in Stability's release layout that fits the ComfyUI-loadable model.
"""

import os
from dataclasses import dataclass

import torch

from sd35_core.loading.tiny import CLIP_G_WIDTH, CLIP_L_WIDTH, randomize_, save_state, tiny_mmdit
from sd35_core.models.controlnet import CONTROL_TYPES, SAVE_KEY_MAP, ControlNet, ControlNetConfig

COMFY_DEPTH = 4
COMFY_WIDTH = 64 * COMFY_DEPTH
LORA_STRENGTH = 0.8
LORA_RANK = 4
LORA_ALPHA = 2.0
LORA_TARGETS = ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.mlp.fc1",
                "joint_blocks.2.x_block.adaLN_modulation.1", "final_layer.linear")


@dataclass(frozen=True)
class BridgeFiles:
    """Names (as ComfyUI lists them) of the extra files."""

    comfy_checkpoint: str = "comfy-sd3.5_large.safetensors"
    comfy_merged: str = "comfy-sd3.5_large-lora.safetensors"
    comfy_lora: str = "comfy-lora.safetensors"
    medium_merged: str = "tiny-sd3.5_medium-lora.safetensors"
    medium_lora: str = "medium-lora.safetensors"
    controlnet: str = "comfy-controlnet_canny.safetensors"


def lora_state(mmdit, seed: int) -> dict[str, torch.Tensor]:
    """A seeded LoRA for ``LORA_TARGETS`` of ``mmdit``, in the kohya key layout."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    weights = mmdit.state_dict()
    for target in LORA_TARGETS:
        out_dim, in_dim = weights[target + ".weight"].shape
        name = "lora_unet_" + target.replace(".", "_")
        state[name + ".lora_down.weight"] = torch.randn(LORA_RANK, in_dim, generator=gen) / in_dim**0.5
        state[name + ".lora_up.weight"] = torch.randn(out_dim, LORA_RANK, generator=gen) * 0.5
        state[name + ".alpha"] = torch.tensor(LORA_ALPHA)
    return state


def merged_state(mmdit, lora: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """``mmdit``'s weights with ``lora`` merged: ``W + strength * alpha / rank * up @ down``."""
    state = {k: v.clone() for k, v in mmdit.state_dict().items()}
    for target in LORA_TARGETS:
        name = "lora_unet_" + target.replace(".", "_")
        down, up = lora[name + ".lora_down.weight"], lora[name + ".lora_up.weight"]
        scale = strength * float(lora[name + ".alpha"]) / down.shape[0]
        state[target + ".weight"] += scale * (up @ down)
    return state


def controlnet_state(seed: int) -> dict[str, torch.Tensor]:
    config = ControlNetConfig(hidden_size=COMFY_WIDTH, num_heads=COMFY_WIDTH // 64, num_layers=2, patch_size=2,
                              in_channels=16, pooled_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, has_x_embedder=False)
    state = {SAVE_KEY_MAP.get(k, k): v for k, v in randomize_(ControlNet(config), seed).state_dict().items()}
    state["control_type"] = torch.tensor([CONTROL_TYPES["canny"]], dtype=torch.int32)
    return state


def write_bridge_models(root: str, seed: int = 0) -> BridgeFiles:
    """Write the extra files into the ComfyUI-style folders under ``root`` (see the module doc)."""
    names = BridgeFiles()
    ckpts, loras = os.path.join(root, "checkpoints"), os.path.join(root, "loras")
    prefix = "model.diffusion_model."
    comfy = tiny_mmdit("sd3.5_large", seed + 5, depth=COMFY_DEPTH, hidden=COMFY_WIDTH)
    save_state(os.path.join(ckpts, names.comfy_checkpoint), {prefix: comfy.state_dict()})
    medium = tiny_mmdit("sd3.5_medium", seed)  # the weights of the tiny set's tiny-sd3.5_medium.safetensors
    for model, lora_name, merged_name, lora_seed in ((comfy, names.comfy_lora, names.comfy_merged, seed + 6),
                                                      (medium, names.medium_lora, names.medium_merged, seed + 7)):
        lora = lora_state(model, lora_seed)
        save_state(os.path.join(loras, lora_name), {"": lora})
        save_state(os.path.join(ckpts, merged_name), {prefix: merged_state(model, lora, LORA_STRENGTH)})
    save_state(os.path.join(root, "controlnet", names.controlnet), {"": controlnet_state(seed + 8)})
    return names
