"""SD3.5 ControlNets (blur, canny, depth) in Stability's release layout, and how they feed the MMDiT.

The module is the reference's ``dit_embedder.ControlNetEmbedder``: a timestep + pooled-vector embedder,
a stack of DiT blocks (``transformer_blocks.N``, without context tokens), one linear head per block
(``controlnet_blocks.N``) and a patch embedding of the control latent (``pos_embed_input``). The release
files name the embedders the diffusers way (``time_text_embed.*``, ``pos_embed.proj``); the reference loads
them through a small rename, :data:`LOAD_KEY_MAP`, and keeps every other key as it is. Module names here
follow the reference, so ``state_dict()`` keys are the release keys after that rename.

Two forward paths exist in the reference, and which one a file takes is read from its weights:

* **8b** (the released SD3.5 Large ControlNets): the y-embedder takes the raw pooled text vector (its input
  width is the diffusion model's pooled width). The ControlNet's input tokens are the diffusion model's own
  patch embedding plus its cropped position grid, and its blocks run as a chain.
* **2b** (the reference's path for smaller ControlNets): the y-embedder takes the diffusion model's
  already-embedded pooled vector (input width = its hidden width); the ControlNet patch-embeds the latent
  with its own ``x_embedder`` (``pos_embed.proj`` in the file), and, as in the reference, every block gets
  that same input rather than the previous block's output.

Outputs are added to the image tokens after every joint block, the last included, block ``i`` taking output
``i // (depth // num_layers)`` (:func:`expand_residuals`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import CheckpointError
from ..models import ops
from .mmditx import DismantledBlock, MMDiTConfig, PatchEmbed, TimestepEmbedder, VectorEmbedder

log = logging.getLogger(__name__)

HEAD_DIM = 64

# The reference's CONTROLNET_MAP (sd3_infer.py): release file key -> module key. Every other key is native.
LOAD_KEY_MAP: dict[str, str] = {
    "time_text_embed.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "time_text_embed.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "time_text_embed.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "time_text_embed.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "time_text_embed.text_embedder.linear_1.weight": "y_embedder.mlp.0.weight",
    "time_text_embed.text_embedder.linear_1.bias": "y_embedder.mlp.0.bias",
    "time_text_embed.text_embedder.linear_2.weight": "y_embedder.mlp.2.weight",
    "time_text_embed.text_embedder.linear_2.bias": "y_embedder.mlp.2.bias",
    "pos_embed.proj.weight": "x_embedder.proj.weight",
    "pos_embed.proj.bias": "x_embedder.proj.bias",
}
# Module key -> release file key, for writing files in the release layout.
SAVE_KEY_MAP: dict[str, str] = {v: k for k, v in LOAD_KEY_MAP.items()}

# The reference's ``control_type`` tensor values (dit_embedder.py: "blur = 0, canny = 1, depth = 2").
CONTROL_TYPES: dict[str, int] = {"blur": 0, "canny": 1, "depth": 2}
CONTROL_TYPE_NAMES: dict[int, str] = {v: k for k, v in CONTROL_TYPES.items()}

ControlPath = Literal["8b", "2b"]
PATH_8B: ControlPath = "8b"
PATH_2B: ControlPath = "2b"

# Only used to make error messages say which model a ControlNet was made for.
_MODELS_BY_WIDTH = {2432: "SD3.5 Large / Large Turbo", 1536: "SD3 Medium / SD3.5 Medium"}
_VARIANT_LABELS = {"sd3_medium": "SD3 Medium", "sd3.5_medium": "SD3.5 Medium", "sd3.5_large": "SD3.5 Large"}

_BLOCK_KEY = re.compile(r"transformer_blocks\.(\d+)\.")
_HEAD_KEY = re.compile(r"controlnet_blocks\.(\d+)\.weight$")


@dataclass(frozen=True)
class ControlNetConfig:
    """Sizes of an SD3.5 ControlNet, all read from tensor shapes by :meth:`from_shapes`."""

    hidden_size: int
    num_heads: int
    num_layers: int
    patch_size: int
    in_channels: int
    pooled_dim: int  # input width of the y-embedder (pooled width for 8b, hidden width for 2b)
    has_x_embedder: bool = False  # pos_embed.proj present (needed by the 2b path only)
    mlp_ratio: float = 4.0

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> ControlNetConfig:
        """Config from ``{key: shape}`` of a ControlNet file (prefix removed).

        Keys may be in the release layout (``time_text_embed.*``, ``pos_embed.proj.*``) or already renamed
        with :data:`LOAD_KEY_MAP`. Layers are counted from ``transformer_blocks.N`` (which must match the
        ``controlnet_blocks.N`` heads); heads are ``hidden // 64``.
        """
        shapes = {LOAD_KEY_MAP.get(k, k): tuple(v) for k, v in shapes.items()}

        def need(key: str, what: str) -> tuple[int, ...]:
            if key not in shapes:
                release = SAVE_KEY_MAP.get(key, key)
                raise CheckpointError(f"expected an SD3.5 ControlNet with '{release}' ({what}); it is missing")
            return shapes[key]

        hidden, in_channels, patch, patch_w = need("pos_embed_input.proj.weight", "control latent patch embedding")
        if patch != patch_w:
            raise CheckpointError(f"'pos_embed_input.proj.weight': expected square patches, got {patch}x{patch_w}")
        if hidden % HEAD_DIM:
            raise CheckpointError(
                f"'pos_embed_input.proj.weight': expected a hidden width divisible by {HEAD_DIM}, got {hidden}"
            )
        blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))})
        heads = sorted({int(m.group(1)) for k in shapes if (m := _HEAD_KEY.match(k))})
        if not blocks or blocks != list(range(len(blocks))):
            raise CheckpointError(f"expected ControlNet transformer_blocks numbered 0..N-1; found {blocks}")
        if heads != blocks:
            raise CheckpointError(
                f"expected one controlnet_blocks.N head per transformer block (0..{len(blocks) - 1}); found {heads}"
            )
        y_shape = need("y_embedder.mlp.0.weight", "pooled-vector embedder")
        need("t_embedder.mlp.0.weight", "timestep embedder")
        if y_shape[0] != hidden:
            raise CheckpointError(
                f"'time_text_embed.text_embedder.linear_1.weight': expected output width {hidden}, got {y_shape[0]}"
            )
        fc1 = need("transformer_blocks.0.mlp.fc1.weight", "block MLP")
        return cls(
            hidden_size=hidden,
            num_heads=hidden // HEAD_DIM,
            num_layers=len(blocks),
            patch_size=patch,
            in_channels=in_channels,
            pooled_dim=y_shape[1],
            has_x_embedder="x_embedder.proj.weight" in shapes,
            mlp_ratio=fc1[0] / hidden,
        )


class ControlBlock(DismantledBlock):
    """A DiT block with adaLN modulation and no context stream (the reference's ``DismantledBlock``)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, device=None, dtype=None):
        super().__init__(hidden, heads, mlp_ratio, qk_norm=False, device=device, dtype=dtype)
        self.heads = heads

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        qkv, mods, _ = self.pre_attention(x, c)
        return self.post_attention(x, ops.attention(*qkv, self.heads), None, mods)


class ControlNet(nn.Module):
    """The reference's ``ControlNetEmbedder``; ``forward`` returns one residual per layer."""

    # Module keys a release file may lack; none, since x_embedder exists only when the file has it.
    OPTIONAL_KEYS: tuple[str, ...] = ()

    def __init__(self, config: ControlNetConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg = config
        hidden = cfg.hidden_size
        self.x_embedder = (
            PatchEmbed(cfg.patch_size, cfg.in_channels, hidden, device=device, dtype=dtype)
            if cfg.has_x_embedder
            else None
        )
        self.t_embedder = TimestepEmbedder(hidden, device=device, dtype=dtype)
        self.y_embedder = VectorEmbedder(cfg.pooled_dim, hidden, device=device, dtype=dtype)
        self.transformer_blocks = nn.ModuleList(
            ControlBlock(hidden, cfg.num_heads, cfg.mlp_ratio, device=device, dtype=dtype)
            for _ in range(cfg.num_layers)
        )
        self.controlnet_blocks = nn.ModuleList(
            ops.Linear(hidden, hidden, device=device, dtype=dtype) for _ in range(cfg.num_layers)
        )
        self.pos_embed_input = PatchEmbed(cfg.patch_size, cfg.in_channels, hidden, device=device, dtype=dtype)
        # The file's control_type value (blur 0, canny 1, depth 2), set by the loader; None if the file has none.
        self.control_type: int | None = None

    @property
    def control_type_name(self) -> str | None:
        """``"blur"``, ``"canny"`` or ``"depth"`` when the file says so, else ``None`` (the caller decides)."""
        return None if self.control_type is None else CONTROL_TYPE_NAMES.get(self.control_type)

    def forward(
        self, hidden: torch.Tensor, cond_latent: torch.Tensor, y: torch.Tensor, timestep: torch.Tensor
    ) -> list[torch.Tensor]:
        """Residuals ``[B, L, hidden]``, one per layer, in the dtype of the input tokens.

        ``hidden`` is either the diffusion model's patch embedding ``[B, L, hidden]`` (8b path: blocks
        chained) or the latent ``[B, C, H, W]`` (2b path: own ``x_embedder``, every block gets the same
        input). ``cond_latent`` ``[B, C, H, W]`` is the control image's latent (latent format applied), ``y``
        the pooled vector the y-embedder expects, ``timestep`` = sigma*1000 ``[B]``.
        """
        chained = hidden.ndim == 3
        if chained:
            x = hidden
        else:
            if self.x_embedder is None:
                raise ValueError(
                    "this ControlNet has no patch embedding of its own (pos_embed.proj); it takes the diffusion "
                    "model's patch tokens [B, L, hidden], not a latent"
                )
            x = self.x_embedder(hidden)
        dtype = x.dtype
        c = self.t_embedder(timestep.float(), dtype) + self.y_embedder(y.to(dtype))
        x = x + self.pos_embed_input(cond_latent.to(dtype))
        outputs = []
        for block, head in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            out = block(x, c)
            if chained:
                x = out
            outputs.append(head(out))
        return outputs


def _model_label(config: MMDiTConfig) -> str:
    return _VARIANT_LABELS.get(config.variant, config.variant)


def _check_large_structure(m: MMDiTConfig) -> None:
    """The 8b ControlNets were trained on SD3.5 Large: qk-norm and no second image self-attention.

    Widths alone can match on another model (a Medium or SD3 Medium of the same width, as small test and
    benchmark shapes are); the structure cannot, so it is checked too.
    """
    if m.variant == "sd3.5_large":
        return
    traits = []
    if not m.qk_norm:
        traits.append("no qk-norm")
    if m.x_block_self_attn_layers:
        blocks = m.x_block_self_attn_layers
        traits.append(f"a second self-attention in joint blocks {blocks[0]}..{blocks[-1]}")
    raise ValueError(
        f"this is an SD3.5 Large (8b) ControlNet, but the diffusion model is {_model_label(m)}-shaped "
        f"({', '.join(traits)}); SD3.5 Large has qk-norm and no second self-attention. Load it with "
        "SD3.5 Large or Large Turbo."
    )


def check_controlnet_fits(config: ControlNetConfig, model_config: MMDiTConfig) -> ControlPath:
    """Which forward path a ControlNet takes with a diffusion model; ``ValueError`` if it does not fit.

    The path is decided from the widths (DESIGN.md): a y-embedder whose input is the model's pooled width
    embeds the raw pooled vector (8b); one whose input is the model's hidden width takes the model's
    embedded vector (2b). Messages name both sides and, for known widths, the model the ControlNet is for.
    """
    m = model_config
    if config.hidden_size != m.hidden_size:
        made_for = _MODELS_BY_WIDTH.get(config.hidden_size)
        hint = f"; this ControlNet is for {made_for}" if made_for else ""
        raise ValueError(
            f"ControlNet hidden width {config.hidden_size} does not match the diffusion model "
            f"({_model_label(m)}, hidden width {m.hidden_size}){hint}. Load it with a diffusion model of hidden "
            f"width {config.hidden_size}."
        )
    if (config.patch_size, config.in_channels) != (m.patch_size, m.in_channels):
        raise ValueError(
            f"ControlNet patch size {config.patch_size} / latent channels {config.in_channels} do not match the "
            f"diffusion model's {m.patch_size} / {m.in_channels}"
        )
    if config.pooled_dim == m.pooled_dim and (config.pooled_dim != m.hidden_size or not config.has_x_embedder):
        path = PATH_8B
        _check_large_structure(m)
    elif config.pooled_dim == m.hidden_size:
        path = PATH_2B
        if not config.has_x_embedder:
            raise ValueError(
                "ControlNet takes the diffusion model's embedded pooled vector (2b path) but has no patch "
                "embedding of its own (pos_embed.proj.weight), which that path needs"
            )
    else:
        raise ValueError(
            f"ControlNet pooled-vector input width {config.pooled_dim} matches neither the diffusion model's "
            f"pooled width {m.pooled_dim} (8b ControlNets, as released for SD3.5 Large) nor its hidden width "
            f"{m.hidden_size} (ControlNets that take the embedded vector); model: {_model_label(m)}"
        )
    if config.num_layers > m.depth or (m.depth - 1) // (m.depth // config.num_layers) >= config.num_layers:
        raise ValueError(
            f"ControlNet with {config.num_layers} layers cannot feed a diffusion model with {m.depth} joint "
            f"blocks: block i takes output i // (depth // layers), which must exist for every block"
        )
    return path
