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
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import ops
from .checkpoint import CheckpointError
from .fit import Fit, fit_image
from .mmditx import DismantledBlock, MMDiTConfig, MMDiTX, PatchEmbed, TimestepEmbedder, VectorEmbedder

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


def expand_residuals(outputs: Sequence[torch.Tensor], depth: int) -> list[torch.Tensor]:
    """One residual per joint block: block ``i`` gets ``outputs[i // (depth // len(outputs))]`` (reference)."""
    n = len(outputs)
    if n == 0 or n > depth or (depth - 1) // (depth // n) >= n:
        raise ValueError(f"cannot spread {n} ControlNet outputs over {depth} joint blocks")
    interval = depth // n
    return [outputs[i // interval] for i in range(depth)]


def controlnet_residuals(
    model: MMDiTX,
    controlnet: ControlNet,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    pooled: torch.Tensor,
    cond_latent: torch.Tensor,
    strength: float = 1.0,
) -> list[torch.Tensor]:
    """ControlNet outputs for one model call, times ``strength`` (the reference's ``apply_model`` part).

    ``x`` is the diffusion model's input latent ``[B, C, H, W]`` (cond and uncond batched, as the reference
    runs them), ``sigma`` a scalar or ``[B]``, ``pooled`` ``[B, P]``, and ``cond_latent`` the control latent
    ``[n, C, H, W]`` in diffusion-model space, tiled over the batch (``n`` = 1 as in the reference, or the
    image batch when ``x`` stacks cond and uncond copies of it). Returns one tensor per ControlNet layer, in
    the model's compute dtype; spread them over the blocks with :func:`expand_residuals`.
    """
    path = check_controlnet_fits(controlnet.config, model.config)
    dtype = model.compute_dtype
    b = x.shape[0]
    if cond_latent.ndim != 4 or cond_latent.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"control latent of shape {tuple(cond_latent.shape)} does not fit the latent being sampled "
            f"{tuple(x.shape)}: the control image must be resized to the generation size before encoding"
        )
    n = cond_latent.shape[0]
    if n == 0 or b % n:
        raise ValueError(f"control latent batch {n}: expected 1 or a divisor of the model batch {b}")
    cond = cond_latent.to(device=x.device, dtype=dtype).repeat(b // n, 1, 1, 1)
    timestep = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1) * 1000).expand(b)
    if path == PATH_8B:
        hidden = model.patch_embed(x)
        y = pooled.to(device=x.device, dtype=dtype)
    else:
        hidden = x.to(dtype)
        y = model.y_embedder(pooled.to(device=x.device, dtype=dtype))
    outputs = controlnet(hidden, cond, y, timestep)
    if strength != 1.0:
        outputs = [o * strength for o in outputs]
    return outputs


@dataclass
class ControlHint:
    """One ControlNet applied to a sampling run.

    ``cond_latent`` is the encoded control image in diffusion-model space (latent format applied),
    ``[1, 16, h, w]``. ``start``/``end`` are fractions of the sampling steps: step ``i`` of ``steps`` is
    controlled when ``start * steps <= i < end * steps`` (start inclusive, end exclusive), so the default
    0..1 covers every step and ``start == end`` none.
    """

    controlnet: ControlNet
    cond_latent: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ValueError(
                f"ControlNet window: expected 0 <= start <= end <= 1, got start={self.start}, end={self.end}"
            )
        if not math.isfinite(self.strength):
            raise ValueError(f"ControlNet strength: expected a finite number, got {self.strength}")

    def active(self, step_index: int, steps: int) -> bool:
        """Whether the ControlNet runs at ``step_index`` (0-based) of ``steps`` sampling steps.

        Never at strength 0: its residuals would be zeros, and skipping them keeps the result bit-identical
        to a run without the ControlNet.
        """
        return self.strength != 0.0 and self.start * steps <= step_index < self.end * steps


def _control_type_name(control_type: str | int) -> str:
    if isinstance(control_type, str) and control_type.lower() in CONTROL_TYPES:
        return control_type.lower()
    if isinstance(control_type, int) and control_type in CONTROL_TYPE_NAMES:
        return CONTROL_TYPE_NAMES[control_type]
    raise ValueError(f"control type: expected one of {', '.join(CONTROL_TYPES)} (or 0, 1, 2); got {control_type!r}")


def _resize_lanczos(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize ``[H, W, 3]`` 0..1 with PIL's LANCZOS, as the reference does on the loaded file.

    8-bit images (anything loaded from a PNG/JPEG) go through PIL's 8-bit path, so results are bit-identical
    with the reference; others are resized per channel in float so no precision is lost.
    """
    arr = image.detach().to("cpu", torch.float32).numpy()
    scaled = arr * 255.0
    rounded = np.rint(scaled)
    if np.abs(scaled - rounded).max(initial=0.0) < 1e-3:
        pil = Image.fromarray(rounded.clip(0, 255).astype(np.uint8), "RGB")
        out = np.asarray(pil.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0
    else:
        chans = [
            np.asarray(Image.fromarray(arr[..., i], "F").resize((width, height), Image.LANCZOS)) for i in range(3)
        ]
        out = np.stack(chans, axis=-1).clip(0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(out))


def _fit_tensor(img: torch.Tensor, fit: Fit) -> torch.Tensor:
    """``[H, W, 3]`` fitted into the frame as ``fit`` says (crop box, LANCZOS resize, black padding)."""
    left, top, right, bottom = fit.crop
    img = img[top:bottom, left:right]
    if (img.shape[1], img.shape[0]) != fit.size:
        img = _resize_lanczos(img, *fit.size)
    if fit.size == fit.frame:
        return img
    canvas = torch.zeros(fit.frame[1], fit.frame[0], 3, dtype=img.dtype, device=img.device)
    x, y = fit.offset
    canvas[y:y + fit.size[1], x:x + fit.size[0]] = img
    return canvas


def prepare_control_image(
    image: torch.Tensor,
    width: int,
    height: int,
    control_type: str | int,
    invert: bool | Literal["auto"] = False,
    *,
    path: ControlPath = PATH_8B,
    resize_mode: str = "stretch",
) -> torch.Tensor:
    """Turn a control ``IMAGE`` ``[B, H, W, 3]`` (0..1) into the VAE input ``[B, 3, height, width]``.

    As the reference's ``_image_to_latent``/``vae_encode``: resize to ``width`` x ``height`` with LANCZOS
    (``resize_mode`` says how an image of another aspect ratio is fitted, see :mod:`.fit`: ``stretch`` as
    the reference by default; the node and the CLI default to ``crop``; the log says what was done), then
    scale per type: canny ``x*255*0.5+0.5`` (what the canny ControlNet was trained on),
    blur and depth ``2x-1``; the 2b path always ``2x-1``.

    ``invert`` maps depth ``x -> 1 - x`` first. The SD3.5 depth ControlNet takes near = dark (the depth map
    shipped with it, ``shared/images/depth.png``, has dark foreground and bright sky, and the reference feeds
    it as given), while common depth estimators (Depth Anything, MiDaS, Zoe nodes) output near = bright; the
    diffusers model card inverts Depth Anything's map, and ComfyUI inverts every map. ``False`` feeds the map
    as given (reference), ``True`` inverts, ``"auto"`` inverts each map whose foreground is bright according
    to :func:`sd35_core.preprocess.depth_near_is_bright`.
    """
    from .preprocess import depth_map_problem, depth_near_is_bright  # local: preprocess imports nothing from here

    kind = _control_type_name(control_type)
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"control image: expected an RGB IMAGE tensor [B, H, W, 3] with values 0..1; got {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"control image: it is empty (shape {tuple(image.shape)})")
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % 16:
            raise ValueError(f"control image {name}: expected a positive multiple of 16 pixels, got {v!r}")
    if invert not in (True, False, "auto"):
        raise ValueError(f"invert: expected True, False or 'auto'; got {invert!r}")
    if path not in (PATH_8B, PATH_2B):
        raise ValueError(f"path: expected '8b' or '2b'; got {path!r}")

    fit = fit_image((image.shape[2], image.shape[1]), (width, height), resize_mode)
    if fit.changes_aspect:
        log.info("control image %s (resize_mode %s)", fit.describe(), resize_mode)
    if kind == "depth":
        problem = depth_map_problem(image[..., :3])
        if problem:
            log.warning("control image for the depth ControlNet: %s", problem)
    out = []
    for img in image.float().clamp(0.0, 1.0):
        if (img.shape[0], img.shape[1]) != (height, width):
            img = _fit_tensor(img, fit).to(image.device)
        if kind == "depth" and (invert is True or (invert == "auto" and depth_near_is_bright(img[None]))):
            img = 1.0 - img
        out.append(img)
    x = torch.stack(out).permute(0, 3, 1, 2).contiguous()
    if path == PATH_2B or kind != "canny":
        return x * 2.0 - 1.0
    return x * 255 * 0.5 + 0.5
