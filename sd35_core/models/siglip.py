"""SigLIP vision tower: the image encoder of the SD3.5 Large IP-Adapter (``siglip-so400m-patch14-384``).

The IP-Adapter takes ``hidden_states[-2]`` of transformers' ``SiglipVisionModel``: the output of the
second-to-last encoder layer, before the post-layernorm. So this module builds only the layers that output
needs (all but the last one); the last layer, the post-layernorm and the pooling head of a file are not part
of it (the loader names them as unused on purpose, see :data:`UNUSED_PARTS`).

Module names mirror transformers' keys under ``vision_model.`` (``embeddings.patch_embedding``,
``encoder.layers.{i}.self_attn.q_proj`` ...), so ``state_dict()`` keys are the file keys without the prefix.
Every size comes from tensor shapes: width and patch from the patch embedding, the position grid (hence the
image size) from the position embedding, the MLP width from ``fc1``; heads = width / 72 as in so400m.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from . import ops

SIGLIP_HEAD_DIM = 72  # so400m: 1152 = 16 heads x 72
LAYER_NORM_EPS = 1e-6
# (position grid side, patch) -> the size the processor resizes to, where the patch grid does not cover it
# exactly: so400m-patch14-384 has 27 patches of 14 (378 pixels), and its processor resizes to 384 (the
# convolution's stride then leaves the last 6 pixels out, as in training).
NOMINAL_IMAGE_SIZES = {(27, 14): 384}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.")
# Parts of a full SiglipVisionModel file that hidden_states[-2] never reaches, with why (regexes on the keys
# without the ``vision_model.`` prefix; ``{last}`` is the index of the final encoder layer).
UNUSED_PARTS: dict[str, str] = {
    r"encoder\.layers\.{last}\..+": "the last encoder layer (the IP-Adapter reads the layer before it)",
    r"post_layernorm\..+": "the post-layernorm (the IP-Adapter reads the states before it)",
    r"head\..+": "the attention-pooling head (unused by the IP-Adapter)",
}


@dataclass(frozen=True)
class SiglipConfig:
    """Sizes of a SigLIP vision tower, all read from tensor shapes by :meth:`from_shapes`.

    ``layers`` is the depth of the file's encoder; the tower runs ``layers - 1`` of them.
    """

    width: int
    layers: int
    heads: int
    mlp_width: int
    patch_size: int
    image_size: int
    channels: int = 3

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> SiglipConfig:
        """Config from ``{key: shape}`` of the vision-model tensors (``vision_model.`` prefix removed)."""

        def need(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"expected the SigLIP vision tensor '{key}'; it is missing")
            return tuple(shapes[key])

        width, channels, patch, _ = need("embeddings.patch_embedding.weight")
        if width % SIGLIP_HEAD_DIM:
            raise CheckpointError(
                f"'embeddings.patch_embedding.weight': expected a width divisible by {SIGLIP_HEAD_DIM} "
                f"(SigLIP heads of {SIGLIP_HEAD_DIM}), got {width}"
            )
        n_pos = need("embeddings.position_embedding.weight")[0]
        grid = math.isqrt(n_pos)
        if grid * grid != n_pos:
            raise CheckpointError(
                f"'embeddings.position_embedding.weight': expected a square number of positions, got {n_pos}"
            )
        layers = sorted({int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))})
        if len(layers) < 2 or layers != list(range(len(layers))):
            raise CheckpointError(f"expected encoder layers numbered 0..N-1 (N >= 2); found {layers}")
        return cls(
            width=width,
            layers=len(layers),
            heads=width // SIGLIP_HEAD_DIM,
            mlp_width=need("encoder.layers.0.mlp.fc1.weight")[0],
            patch_size=patch,
            image_size=NOMINAL_IMAGE_SIZES.get((grid, patch), grid * patch),
            channels=channels,
        )

    @property
    def tokens(self) -> int:
        """Image tokens per picture (no class token): ``(image_size / patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2  # floor: the stride-patch convolution drops a remainder

    def unused_key_patterns(self) -> dict[str, str]:
        """:data:`UNUSED_PARTS` with this config's last layer filled in."""
        return {p.replace("{last}", str(self.layers - 1)): why for p, why in UNUSED_PARTS.items()}


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig, device=None, dtype=None):
        super().__init__()
        self.patch_embedding = ops.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size,
                                          device=device, dtype=dtype)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.width, device=device, dtype=dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        return tokens + self.position_embedding.weight.to(tokens.dtype)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig, device=None, dtype=None):
        super().__init__()
        self.heads = cfg.heads
        w = cfg.width
        self.q_proj = ops.Linear(w, w, device=device, dtype=dtype)
        self.k_proj = ops.Linear(w, w, device=device, dtype=dtype)
        self.v_proj = ops.Linear(w, w, device=device, dtype=dtype)
        self.out_proj = ops.Linear(w, w, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(ops.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig, device=None, dtype=None):
        super().__init__()
        self.fc1 = ops.Linear(cfg.width, cfg.mlp_width, device=device, dtype=dtype)
        self.fc2 = ops.Linear(cfg.mlp_width, cfg.width, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig, device=None, dtype=None):
        super().__init__()
        self.layer_norm1 = ops.LayerNorm(cfg.width, eps=LAYER_NORM_EPS, device=device, dtype=dtype)
        self.self_attn = SiglipAttention(cfg, device=device, dtype=dtype)
        self.layer_norm2 = ops.LayerNorm(cfg.width, eps=LAYER_NORM_EPS, device=device, dtype=dtype)
        self.mlp = SiglipMLP(cfg, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig, device=None, dtype=None):
        super().__init__()
        # The last layer is left out: its output is never read (see the module doc).
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg, device=device, dtype=dtype)
                                    for _ in range(cfg.layers - 1))


class SiglipVisionTower(nn.Module):
    """The encoder part of ``SiglipVisionModel`` up to ``hidden_states[-2]``; keys without ``vision_model.``."""

    def __init__(self, config: SiglipConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config, device=device, dtype=dtype)
        self.encoder = SiglipEncoder(config, device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.position_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.position_embedding.weight.device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``hidden_states[-2]`` ``[B, tokens, width]`` for preprocessed ``pixels`` ``[B, 3, size, size]``
        (see :mod:`~..image.siglip_input`), in the tower's dtype."""
        cfg = self.config
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"SigLIP pixels: expected [B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}], "
                f"got {tuple(pixels.shape)}"
            )
        x = self.embeddings(pixels.to(device=self.device, dtype=self.dtype))
        for layer in self.encoder.layers:
            x = layer(x)
        return x
