"""SigLIP vision-tower files (ComfyUI's ``clip_vision/sigclip_vision_patch14_384.safetensors``, transformers'
``SiglipVisionModel`` keys under ``vision_model.``), loaded into :class:`~..models.siglip.SiglipVisionTower`.

The tower keeps only what ``hidden_states[-2]`` needs; the file's last encoder layer, post-layernorm and
pooling head are the named parts it leaves out on purpose (:data:`~..models.siglip.UNUSED_PARTS`). Any other
tensor fails the load with its name.
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import CheckpointError
from ..models.siglip import SiglipConfig, SiglipVisionTower
from .checkpoint import DTypePolicy, load_weights, open_safetensors

VISION_PREFIX = "vision_model."
# Buffers transformers may save next to the weights (rebuilt by the model, harmless).
_HARMLESS = (re.compile(r"embeddings\.position_ids"),)


def load_siglip_vision(path: str | os.PathLike, dtype: str = "default",
                       device: str | torch.device = "cpu") -> SiglipVisionTower:
    """Load a SigLIP vision tower (sizes read from its shapes) for the IP-Adapter; ``dtype`` as
    :meth:`~.checkpoint.DTypePolicy.named` (fp8 names keep the tower in its bf16 compute dtype)."""
    file = open_safetensors(path)
    keys = file.keys()
    prefix = VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in keys) else ""
    shapes = file.shapes(prefix)
    try:
        config = SiglipConfig.from_shapes(shapes)
    except CheckpointError as e:
        raise file.error(f"a SigLIP vision tower (transformers' SiglipVisionModel keys under '{VISION_PREFIX}'); "
                         f"{e}") from None
    policy = DTypePolicy.named(dtype, device)
    policy = DTypePolicy(policy.compute, policy.compute)
    with torch.device("meta"):
        tower = SiglipVisionTower(config)
    load_weights(tower, file, prefix, policy, device)
    skipped = [re.compile(p) for p in config.unused_key_patterns()]
    unused = [k for k in keys if k not in file.used and not (
        k.startswith(prefix) and any(p.fullmatch(k[len(prefix):]) for p in (*skipped, *_HARMLESS)))]
    if unused:
        shown = ", ".join(f"'{k}'" for k in unused[:5])
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise file.error(f"only the SigLIP vision tower's tensors (under '{prefix}'); {len(unused)} would be "
                         f"ignored: {shown}{more}")
    return tower
