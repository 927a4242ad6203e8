"""What an SD3/SD3.5 diffusion model looks like as a GGUF file, and what every other GGUF is.

city96's ComfyUI-GGUF tools write SD3/SD3.5 files with ``general.architecture = "sd3"`` and the official
diffusion-model keys without the ``model.diffusion_model.`` prefix; the VAE and the text encoders are not
in the file. Files from stable-diffusion.cpp carry no architecture; those are accepted when their keys are
SD3's. Every other architecture is refused with a message that says what the file is.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from ...errors import CheckpointError
from ..checkpoint import find_prefix
from .reader import GGUFFile

log = logging.getLogger(__name__)

ARCHITECTURE = "sd3"
MMDIT_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"
# general.architecture values that other tools write, and what such a file holds.
KNOWN_ARCHITECTURES = {
    "flux": "a Flux diffusion model",
    "sdxl": "an SDXL UNet",
    "sd1": "an SD1.x UNet",
    "aura": "an AuraFlow diffusion model",
    "hidream": "a HiDream diffusion model",
    "cosmos": "a Cosmos diffusion model",
    "ltxv": "an LTX-Video diffusion model",
    "hyvid": "a HunyuanVideo diffusion model",
    "wan": "a Wan video diffusion model",
    "lumina2": "a Lumina 2 diffusion model",
    "qwen_image": "a Qwen-Image diffusion model",
    "t5": "a T5 text encoder",
    "t5encoder": "a T5 text encoder",
    "clip": "a CLIP model",
}


def describe(file: GGUFFile) -> str:
    """What a GGUF file that is not an SD3/SD3.5 diffusion model holds, for error messages."""
    arch = file.architecture
    if arch is None:
        return f"a GGUF file without general.architecture or SD3 diffusion-model keys ({len(file.keys())} tensors)"
    if arch == ARCHITECTURE:
        return f"a GGUF file of architecture 'sd3' without the MMDiT tensor '{MMDIT_MARKER}'"
    what = KNOWN_ARCHITECTURES.get(arch, "a language model or another model that is not an image model")
    return f"a GGUF file of architecture '{arch}' ({what})"


def open_sd3_gguf(path: str | os.PathLike) -> tuple[GGUFFile, str]:
    """Open an SD3/SD3.5 diffusion-model GGUF; returns the file and the key prefix of its MMDiT tensors."""
    file = GGUFFile(path)
    try:
        prefix = find_prefix(file.keys(), MMDIT_MARKER)
        arch = file.architecture
        if prefix is None or arch not in (ARCHITECTURE, None):
            raise file.error(f"an SD3/SD3.5 diffusion model (GGUF architecture 'sd3'); this file is {describe(file)}")
        if arch is None:
            log.warning("%s: GGUF file without general.architecture; loading it as SD3 (its keys are SD3's)",
                        file.name)
        _restore_pos_embed(file, prefix)
    except BaseException:
        file.close()
        raise
    return file, prefix


def _restore_pos_embed(file: GGUFFile, prefix: str) -> None:
    """Give ``pos_embed`` back its leading batch dimension of 1 when the file dropped it.

    llama.cpp's quantizer writes each tensor with its trailing size-1 ggml dims dropped, which turns
    ``pos_embed`` [1, N, hidden] into [N, hidden]; city96's SD3 patch forces the third dim back, files made
    without the patch lack it. Both hold the same values.
    """
    key = prefix + "pos_embed"
    info = file.tensors.get(key)
    if info is not None and len(info.shape) == 2:
        file.tensors[key] = dataclasses.replace(info, shape=(1, *info.shape))
    elif info is not None and len(info.shape) != 3:
        raise CheckpointError(f"{file.path}: 'pos_embed': expected shape [1, positions, hidden], got {info.shape}")
