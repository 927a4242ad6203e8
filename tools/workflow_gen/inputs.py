"""What the shipped workflows fill in for the user: model file names, the example image, prompts and the seed.

The file names are the ones the model repositories use, so a user who downloads them needs to pick nothing.
"""

from __future__ import annotations

CHECKPOINTS = {
    "sd3_medium": ("sd3_medium.safetensors", "stabilityai/stable-diffusion-3-medium"),
    "sd3.5_medium": ("sd3.5_medium.safetensors", "stabilityai/stable-diffusion-3.5-medium"),
    "sd3.5_large": ("sd3.5_large.safetensors", "stabilityai/stable-diffusion-3.5-large"),
    "sd3.5_large_turbo": ("sd3.5_large_turbo.safetensors", "stabilityai/stable-diffusion-3.5-large-turbo"),
}
TEXT_ENCODERS = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
CONTROLNET_REPO = "stabilityai/stable-diffusion-3.5-controlnets"
LORA_NAME = "sd3.5_large_lora.safetensors"  # a placeholder: choose your LoRA in the node
IP_ADAPTER_NAME = "ip-adapter.bin"  # InstantX's release file, as downloaded
IP_ADAPTER_REPO = "InstantX/SD3.5-Large-IP-Adapter"
CLIP_VISION_NAME = "sigclip_vision_patch14_384.safetensors"  # ComfyUI's name for SigLIP so400m-patch14-384
TINY_CHECKPOINT = "tiny_shapes_sd35.safetensors"  # ships with the pack (assets/tiny_shapes): no download

IMAGE_NAME = "example.png"  # LoadImage's file in ComfyUI's input folder: choose your own image there
SEED = 42

PROMPT = ("a red fox sitting in a snowy birch forest at dawn, soft golden light through the trees, "
          "detailed fur, shallow depth of field, photograph")
CONTROL_PROMPT = ("a cozy cabin by a mountain lake at sunset, warm light in the windows, detailed, "
                  "photograph")
INPAINT_PROMPT = "a vase of sunflowers on the table, soft window light, photograph"
OUTPAINT_PROMPT = "a wide mountain valley at dawn, mist over a river, pine forests, photograph"
IP_PROMPT = "a cat sitting on a windowsill, in the style of the picture, detailed, soft light"
REGIONAL_PROMPT = "a quiet harbour town at dusk, two figures on the pier, soft warm light, detailed, photograph"
REGION_LEFT_PROMPT = "a red paper lantern glowing above an old fisherman in a yellow raincoat"
REGION_RIGHT_PROMPT = "a young woman in a blue dress holding a white umbrella"
TINY_PROMPT = "a red circle on the left of a blue background"
