"""MMDiT / MMDiT-X: the diffusion transformer of SD3 Medium, SD3.5 Medium and SD3.5 Large.

Numerically the same computation as Stability's reference ``mmditx.py`` (as its ``sd3_impls.BaseModel``
builds it), with every size derived from the checkpoint's tensor shapes. Module names mirror the official
keys, so ``state_dict()`` keys are the file keys without their prefix.

The forward pass is split into :meth:`MMDiTX.embed`, :meth:`MMDiTX.run_blocks` and :meth:`MMDiTX.unembed`
so that skip-layer guidance can run the blocks before the first skipped one once and fork from there.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..models import ops

HEAD_DIM = 64
LATENT_DOWNSCALE = 8  # image pixels per latent pixel (the SD3 VAE)
_BLOCK_KEY = re.compile(r"joint_blocks\.(\d+)\.")


@dataclass(frozen=True)
class MMDiTConfig:
    """Sizes of an MMDiT(-X), all read from tensor shapes by :meth:`from_shapes`."""

    patch_size: int
    in_channels: int
    out_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    pos_embed_max_size: int
    pooled_dim: int
    context_dim: int
    qk_norm: bool
    x_block_self_attn_layers: tuple[int, ...]
    mlp_ratio: float = 4.0

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> MMDiTConfig:
        """Config from ``{key: shape}`` of the diffusion-model tensors (file prefix already removed)."""

        def need(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"expected the SD3/SD3.5 diffusion-model tensor '{key}'; it is missing")
            return tuple(shapes[key])

        hidden, in_channels, patch_size, _ = need("x_embedder.proj.weight")
        if hidden % HEAD_DIM:
            raise CheckpointError(f"'x_embedder.proj.weight': expected a width divisible by {HEAD_DIM}, got {hidden}")
        blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))})
        if not blocks or blocks != list(range(len(blocks))):
            raise CheckpointError(f"expected joint_blocks numbered 0..N-1; found block indices {blocks}")
        n_pos = need("pos_embed")[1]
        grid = math.isqrt(n_pos)
        if grid * grid != n_pos:
            raise CheckpointError(f"'pos_embed': expected a square number of positions, got {n_pos}")
        return cls(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=need("final_layer.linear.weight")[0] // (patch_size * patch_size),
            hidden_size=hidden,
            depth=len(blocks),
            num_heads=hidden // HEAD_DIM,
            pos_embed_max_size=grid,
            pooled_dim=need("y_embedder.mlp.0.weight")[1],
            context_dim=need("context_embedder.weight")[1],
            qk_norm="joint_blocks.0.context_block.attn.ln_k.weight" in shapes,
            x_block_self_attn_layers=tuple(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes),
            mlp_ratio=need("joint_blocks.0.x_block.mlp.fc1.weight")[0] / hidden,
        )

    @property
    def variant(self) -> str:
        """``sd3_medium`` (no qk-norm), ``sd3.5_medium`` (second image self-attention) or ``sd3.5_large``."""
        if not self.qk_norm:
            return "sd3_medium"
        return "sd3.5_medium" if self.x_block_self_attn_layers else "sd3.5_large"

    @property
    def max_image_size(self) -> int:
        """Largest image side in pixels that the position-embedding grid covers."""
        return self.pos_embed_max_size * self.patch_size * LATENT_DOWNSCALE

    def check_image_size(self, width: int, height: int) -> None:
        """Raise ``ValueError`` if a ``width`` x ``height`` pixel image is larger than the model supports."""
        largest = self.max_image_size
        if width > largest or height > largest:
            raise ValueError(
                f"image size {width}x{height}: this {self.variant} model supports at most {largest}x{largest} pixels"
            )


@dataclass
class JointState:
    """Activations between joint blocks: image tokens, context tokens, conditioning vector, latent size."""

    x: torch.Tensor  # [B, L, hidden]
    context: torch.Tensor | None  # [B, Lc, hidden]; None after the last (pre-only) context block
    c: torch.Tensor  # [B, hidden]
    hw: tuple[int, int]  # latent height, width
    # Per-row IP-Adapter input of the joint blocks (an ``ip_adapter.IPRows``), or None without one.
    ip: Any = None

    def select(self, idx: slice) -> JointState:
        """The same state for a slice of the batch (views, no copies)."""
        context = None if self.context is None else self.context[idx]
        ip = None if self.ip is None else self.ip.select(idx)
        return JointState(self.x[idx], context, self.c[idx], self.hw, ip)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x * (1 + scale)).add_(shift)


def _adaln(hidden: int, n: int, device, dtype) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), ops.Linear(hidden, n * hidden, device=device, dtype=dtype))


def _mlp(d_in: int, d_hidden: int, d_out: int, device, dtype) -> nn.Sequential:
    # Indices 0 and 2 are the official key names of the timestep and pooled-vector embedders.
    return nn.Sequential(
        ops.Linear(d_in, d_hidden, device=device, dtype=dtype),
        nn.SiLU(),
        ops.Linear(d_hidden, d_out, device=device, dtype=dtype),
    )


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.proj = ops.Conv2d(in_channels, hidden, patch_size, stride=patch_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_embedding_size: int = 256, device=None, dtype=None):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = _mlp(frequency_embedding_size, hidden, hidden, device, dtype)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        # Frequencies computed on the CPU, as the reference does, so they are bit-identical on every device.
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))


class VectorEmbedder(nn.Module):
    def __init__(self, input_dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.mlp = _mlp(input_dim, hidden, hidden, device, dtype)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = ops.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = ops.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.qkv = ops.Linear(dim, 3 * dim, device=device, dtype=dtype)
        self.proj = None if pre_only else ops.Linear(dim, dim, device=device, dtype=dtype)
        self.ln_q = ops.RMSNorm(dim // heads, eps=1e-6, device=device, dtype=dtype) if qk_norm else None
        self.ln_k = ops.RMSNorm(dim // heads, eps=1e-6, device=device, dtype=dtype) if qk_norm else None

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.normalize(*self.qkv(x).chunk(3, dim=-1))

    def normalize(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The qk-norm of projected ``q``, ``k`` (new tensors; the inputs stay as they were)."""
        if self.ln_q is not None:
            q = self.ln_q(q.unflatten(-1, (self.heads, -1))).flatten(-2)
            k = self.ln_k(k.unflatten(-1, (self.heads, -1))).flatten(-2)
        return q, k, v


class DismantledBlock(nn.Module):
    """One stream (context or image) of a joint block: adaLN-modulated attention inputs and outputs, MLP."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        pre_only: bool = False,
        self_attn2: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.pre_only = pre_only
        self.n_mods = 9 if self_attn2 else 2 if pre_only else 6
        self.norm1 = ops.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, device=device, dtype=dtype)
        self.attn = SelfAttention(hidden, heads, qk_norm, pre_only, device=device, dtype=dtype)
        self.attn2 = SelfAttention(hidden, heads, qk_norm, device=device, dtype=dtype) if self_attn2 else None
        if not pre_only:
            self.norm2 = ops.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, device=device, dtype=dtype)
            self.mlp = Mlp(hidden, int(hidden * mlp_ratio), device=device, dtype=dtype)
        self.adaLN_modulation = _adaln(hidden, self.n_mods, device, dtype)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor, raw: bool = False):
        """``(q, k, v)`` of the main attention, the modulations, and the normed input (for :meth:`attn2_qkv`).

        ``raw=True`` returns the projections before the qk-norm instead (what an IP-Adapter attends from).
        """
        # mods: shift, scale, gate (attention); shift, scale, gate (MLP); shift, scale, gate (attn2)
        mods = self.adaLN_modulation(c).unsqueeze(1).chunk(self.n_mods, dim=-1)
        x_norm = self.norm1(x)
        modulated = _modulate(x_norm, mods[0], mods[1])
        qkv = self.attn.qkv(modulated).chunk(3, dim=-1) if raw else self.attn.pre_attention(modulated)
        return qkv, mods, x_norm

    def attn2_qkv(self, x_norm: torch.Tensor, mods) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attn2.pre_attention(_modulate(x_norm, mods[6], mods[7]))

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, attn2: torch.Tensor | None, mods) -> torch.Tensor:
        # The first sum is a new tensor, so at inference the later residual adds can run in place on it;
        # training keeps them out of place, since norm2 saves its input for the backward pass.
        x = x + mods[2] * self.attn.proj(attn)
        if torch.is_grad_enabled():
            if attn2 is not None:
                x = x + mods[8] * self.attn2.proj(attn2)
            return x + mods[5] * self.mlp(_modulate(self.norm2(x), mods[3], mods[4]))
        if attn2 is not None:
            x += mods[8] * self.attn2.proj(attn2)
        x += mods[5] * self.mlp(_modulate(self.norm2(x), mods[3], mods[4]))
        return x


class JointBlock(nn.Module):
    """Context and image streams attending jointly (context tokens first), plus the optional attn2."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        pre_only: bool,
        self_attn2: bool,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.heads = heads
        self.context_block = DismantledBlock(
            hidden, heads, mlp_ratio, qk_norm, pre_only=pre_only, device=device, dtype=dtype
        )
        self.x_block = DismantledBlock(
            hidden, heads, mlp_ratio, qk_norm, self_attn2=self_attn2, device=device, dtype=dtype
        )

    def forward(
        self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, ip=None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Both streams through the block; ``ip(attn, q, k, v, heads)``, when given, returns the image part of
        the attention output with the IP-Adapter's terms added, from the image stream's raw ``q, k, v``."""
        # Peak memory is set here: each intermediate is dropped as soon as what follows no longer needs it,
        # and attn2's q, k, v are made only after the joint attention, never alive together with its own.
        ctx_qkv, ctx_mods, _ = self.context_block.pre_attention(context, c)
        raw = None
        if ip is None:
            x_qkv, x_mods, x_norm = self.x_block.pre_attention(x, c)
        else:
            raw, x_mods, x_norm = self.x_block.pre_attention(x, c, raw=True)
            x_qkv = self.x_block.attn.normalize(*raw)
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(ctx_qkv, x_qkv, strict=True))
        del ctx_qkv, x_qkv
        attn = ops.attention(q, k, v, self.heads)
        del q, k, v
        n_ctx = context.shape[1]
        if self.context_block.pre_only:
            context = None
        else:
            context = self.context_block.post_attention(context, attn[:, :n_ctx], None, ctx_mods)
        attn2 = None
        if self.x_block.attn2 is not None:
            attn2 = ops.attention(*self.x_block.attn2_qkv(x_norm, x_mods), self.heads)
        del x_norm
        x_attn = attn[:, n_ctx:]
        if raw is not None:
            x_attn = ip(x_attn, *raw, self.heads)
            del raw
        return context, self.x_block.post_attention(x, x_attn, attn2, x_mods)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int, out_channels: int, device=None, dtype=None):
        super().__init__()
        self.norm_final = ops.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, device=device, dtype=dtype)
        self.linear = ops.Linear(hidden, patch_size * patch_size * out_channels, device=device, dtype=dtype)
        self.adaLN_modulation = _adaln(hidden, 2, device, dtype)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class MMDiTX(nn.Module):
    """The SD3 / SD3.5 diffusion transformer; ``forward`` returns the float32 velocity prediction."""

    def __init__(self, config: MMDiTConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg = config
        hidden = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, hidden, device=device, dtype=dtype)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size**2, hidden, device=device, dtype=dtype))
        self.t_embedder = TimestepEmbedder(hidden, device=device, dtype=dtype)
        self.y_embedder = VectorEmbedder(cfg.pooled_dim, hidden, device=device, dtype=dtype)
        self.context_embedder = ops.Linear(cfg.context_dim, hidden, device=device, dtype=dtype)
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                hidden,
                cfg.num_heads,
                cfg.mlp_ratio,
                cfg.qk_norm,
                pre_only=i == cfg.depth - 1,
                self_attn2=i in cfg.x_block_self_attn_layers,
                device=device,
                dtype=dtype,
            )
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(hidden, cfg.patch_size, cfg.out_channels, device=device, dtype=dtype)
        self._compute_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype activations run in: set explicitly, else the weights' dtype (bfloat16 for fp8 weights)."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        dtype = self.context_embedder.weight.dtype
        return torch.bfloat16 if dtype.itemsize == 1 else dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        self._compute_dtype = dtype

    def cropped_pos_embed(self, hw: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The centre crop of the position grid for a latent of size ``hw``, as ``[1, h*w, hidden]``."""
        p, m = self.config.patch_size, self.config.pos_embed_max_size
        h, w = hw[0] // p, hw[1] // p
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.reshape(1, m, m, -1)[:, top : top + h, left : left + w]
        return grid.reshape(1, h * w, -1).to(dtype)

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus the cropped position embedding of latent ``x`` ``[B, C, H, W]``."""
        h, w = x.shape[-2:]
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {w}x{h}: expected both sides divisible by the patch size {p}")
        self.config.check_image_size(w * LATENT_DOWNSCALE, h * LATENT_DOWNSCALE)
        tokens = self.x_embedder(x.to(self.compute_dtype))
        # Position grid first: the sum then takes its contiguous [B, L, hidden] layout, not the
        # transposed layout of the patch tokens.
        return self.cropped_pos_embed((h, w), tokens.dtype) + tokens

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> JointState:
        """Embed latent ``x`` ``[B, C, H, W]``, ``timestep`` (sigma*1000, ``[B]``), context and pooled ``y``."""
        dtype = self.compute_dtype
        tokens = self.patch_embed(x)
        t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        c = self.t_embedder(t, dtype) + self.y_embedder(y.to(dtype))
        return JointState(tokens, self.context_embedder(context.to(dtype)), c, (x.shape[-2], x.shape[-1]))

    def run_blocks(
        self,
        state: JointState,
        start: int = 0,
        stop: int | None = None,
        skip_layers: Sequence[int] = (),
        block_residuals: Sequence[torch.Tensor | None] | None = None,
    ) -> JointState:
        """Run joint blocks ``start`` .. ``stop - 1`` (global indices), leaving out ``skip_layers``.

        ``block_residuals[i]`` (e.g. a ControlNet output) is added to the image tokens after block ``i``;
        a skipped block gets no residual either, as in the reference.
        """
        depth = self.config.depth
        if block_residuals is not None and len(block_residuals) != depth:
            raise ValueError(
                f"block_residuals: expected {depth} entries (one per joint block), got {len(block_residuals)}"
            )
        skip = set(skip_layers)
        x, context = state.x, state.context
        for i in range(start, depth if stop is None else stop):
            if i in skip:
                continue
            if context is None:
                raise ValueError(f"joint block {i}: no context tokens left (the last block has already run)")
            if state.ip is None:
                context, x = self.joint_blocks[i](context, x, state.c)
            else:
                context, x = self.joint_blocks[i](context, x, state.c, functools.partial(state.ip.add_to, i))
            if block_residuals is not None and block_residuals[i] is not None:
                x = x + block_residuals[i].to(x.dtype)
        return JointState(x, context, state.c, state.hw, state.ip)

    def unembed(self, state: JointState) -> torch.Tensor:
        """Final layer and unpatchify: ``[B, out_channels, H, W]`` in float32."""
        x = self.final_layer(state.x, state.c)
        p, c = self.config.patch_size, self.config.out_channels
        b, (h, w) = x.shape[0], (state.hw[0] // p, state.hw[1] // p)
        out = x.new_empty((b, c, h, p, w, p), dtype=torch.float32)
        out.copy_(x.view(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4))
        return out.view(b, c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        skip_layers: Sequence[int] = (),
        block_residuals: Sequence[torch.Tensor | None] | None = None,
        ip=None,
    ) -> torch.Tensor:
        """Velocity prediction for latent ``x`` at ``timestep`` = sigma*1000 (float32 ``[B, C, H, W]``);
        ``ip`` is the rows' IP-Adapter input (``ip_adapter.IPRows``) or ``None``."""
        state = self.embed(x, timestep, context, y)
        state.ip = ip
        state = self.run_blocks(state, skip_layers=skip_layers, block_residuals=block_residuals)
        return self.unembed(state)
