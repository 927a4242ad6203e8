"""The InstantX IP-Adapter for SD3.5 Large: a timestep-conditioned resampler and one IP attention per joint block.

Numerically diffusers' ``IPAdapterTimeImageProjection`` and ``SD3IPAdapterJointAttnProcessor2_0``:

- :class:`TimeResampler` turns SigLIP features ``[B, 729, 1152]`` and the model timestep (sigma * 1000) into
  64 IP tokens of the MMDiT width and a timestep embedding ``temb``: ``proj_in`` plus the timestep MLP of a
  cos-first sinusoid, then blocks of attention from learned latents over ``[x; latents]`` (q and k each
  scaled by ``dim_head ** -0.25``, softmax in float32) and a bias-free feed-forward, both adaLN-modulated
  from ``temb``; ``proj_out`` and ``norm_out``.
- :class:`IPJointAttention` (one per joint block, image stream only) normalises the IP tokens with a
  ``temb``-modulated LayerNorm (shift, scale), projects them to keys and values, and attends from the
  block's raw image queries (re-normalised by its ``norm_q``) over ``[image keys (norm_k); IP keys
  (norm_ip_k)]`` and ``[image values; IP values]``. The result times the scale is added to the image part
  of the joint attention output before its output projection (:meth:`IPRows.add_to`).

Module names are the release file's keys (``image_proj.layers.{i}.0.to_q``, ``ip_adapter.{i}.to_k_ip`` ...),
and every size is read from tensor shapes (:meth:`IPAdapterConfig.from_shapes`).
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

RESAMPLER_HEAD_DIM = 64  # diffusers builds the resampler's attention with 64-wide heads
RESAMPLER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as in diffusers
IP_NORM_EPS = 1e-6
_RESAMPLER_LAYER = re.compile(r"image_proj\.layers\.(\d+)\.")
_IP_BLOCK = re.compile(r"ip_adapter\.(\d+)\.")


@dataclass(frozen=True)
class IPAdapterConfig:
    """Sizes of an SD3 IP-Adapter, read from tensor shapes (keys with ``image_proj.`` / ``ip_adapter.``)."""

    embed_dim: int  # image feature width (SigLIP so400m: 1152)
    hidden: int  # resampler width (1280)
    output_dim: int  # IP token width (2432)
    depth: int  # resampler blocks (4)
    heads: int  # resampler attention heads (20)
    num_queries: int  # IP tokens per image (64)
    ffn_width: int  # resampler feed-forward width (4 x hidden)
    timestep_dim: int  # sinusoid width of the timestep (320)
    blocks: int  # joint blocks carrying an IP attention (38)
    model_hidden: int  # the MMDiT's width, what to_k_ip / to_v_ip project to (2432)
    head_dim: int  # the MMDiT's head width (norm_q's width: 64)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> IPAdapterConfig:
        """Config from ``{key: shape}`` of an adapter file in the release layout (``image_proj.`` and
        ``ip_adapter.`` prefixes)."""

        def need(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"expected the IP-Adapter tensor '{key}'; it is missing")
            return tuple(shapes[key])

        def numbered(pattern: re.Pattern, what: str) -> int:
            found = sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})
            if not found or found != list(range(len(found))):
                raise CheckpointError(f"expected {what} numbered 0..N-1; found {found}")
            return len(found)

        hidden, embed_dim = need("image_proj.proj_in.weight")
        inner = need("image_proj.layers.0.0.to_q.weight")[0]
        if inner % RESAMPLER_HEAD_DIM:
            raise CheckpointError(
                f"'image_proj.layers.0.0.to_q.weight': expected a width divisible by {RESAMPLER_HEAD_DIM}, got {inner}"
            )
        model_hidden, ip_width = need("ip_adapter.0.to_k_ip.weight")
        output_dim = need("image_proj.proj_out.weight")[0]
        if ip_width != output_dim:
            raise CheckpointError(
                f"'ip_adapter.0.to_k_ip.weight' takes tokens of width {ip_width}, but the resampler's proj_out "
                f"makes {output_dim}"
            )
        head_dim = need("ip_adapter.0.norm_q.weight")[0]
        if model_hidden % head_dim:
            raise CheckpointError(f"'ip_adapter.0.to_k_ip.weight': width {model_hidden} is not a whole number "
                                  f"of {head_dim}-wide heads")
        return cls(
            embed_dim=embed_dim,
            hidden=hidden,
            output_dim=output_dim,
            depth=numbered(_RESAMPLER_LAYER, "resampler layers (image_proj.layers.N)"),
            heads=inner // RESAMPLER_HEAD_DIM,
            num_queries=need("image_proj.latents")[1],
            ffn_width=need("image_proj.layers.0.1.1.weight")[0],
            timestep_dim=need("image_proj.time_embedding.linear_1.weight")[1],
            blocks=numbered(_IP_BLOCK, "IP attention blocks (ip_adapter.N)"),
            model_hidden=model_hidden,
            head_dim=head_dim,
        )

    def check_fits(self, hidden: int, depth: int, heads: int, image_features: int | None = None) -> None:
        """ValueError unless the adapter fits an MMDiT of ``hidden`` width, ``depth`` joint blocks and ``heads``
        heads (and, when given, an image encoder of ``image_features`` width)."""
        problems = []
        if self.model_hidden != hidden:
            problems.append(f"it projects to width {self.model_hidden}, the model is {hidden} wide")
        if self.blocks != depth:
            problems.append(f"it has {self.blocks} IP attention blocks, the model {depth} joint blocks")
        if hidden // heads != self.head_dim:
            problems.append(f"its heads are {self.head_dim} wide, the model's {hidden // heads}")
        if image_features is not None and image_features != self.embed_dim:
            problems.append(f"it takes image features of width {self.embed_dim}, the vision tower makes "
                            f"{image_features}")
        if problems:
            raise ValueError("IP-Adapter does not fit: " + "; ".join(problems)
                             + " (the InstantX adapter is for SD3.5 Large with SigLIP so400m-patch14-384)")


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Cos-first sinusoid of ``timestep`` ``[B]`` (frequency shift 0, max period 10000), float32 ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResamplerAttention(nn.Module):
    """Attention of the learned latents over ``[image features; latents]`` (``layers.{i}.0``)."""

    def __init__(self, cfg: IPAdapterConfig, device=None, dtype=None):
        super().__init__()
        inner = cfg.heads * RESAMPLER_HEAD_DIM
        self.heads = cfg.heads
        self.norm1 = ops.LayerNorm(cfg.hidden, eps=RESAMPLER_NORM_EPS, device=device, dtype=dtype)
        self.norm2 = ops.LayerNorm(cfg.hidden, eps=RESAMPLER_NORM_EPS, device=device, dtype=dtype)
        self.to_q = ops.Linear(cfg.hidden, inner, bias=False, device=device, dtype=dtype)
        self.to_kv = ops.Linear(cfg.hidden, 2 * inner, bias=False, device=device, dtype=dtype)
        self.to_out = ops.Linear(inner, cfg.hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        b = latents.shape[0]
        x = self.norm1(x)
        latents = self.norm2(latents) * (1 + scale[:, None]) + shift[:, None]
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, RESAMPLER_HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        # q and k each scaled by dim_head ** -0.25 (more stable in half precision than scaling q alone)
        s = 1 / math.sqrt(math.sqrt(RESAMPLER_HEAD_DIM))
        weight = (q * s) @ (k * s).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = (weight @ v).transpose(1, 2).reshape(b, -1, self.heads * RESAMPLER_HEAD_DIM)
        return self.to_out(out)


class TimestepMLP(nn.Module):
    def __init__(self, cfg: IPAdapterConfig, device=None, dtype=None):
        super().__init__()
        self.linear_1 = ops.Linear(cfg.timestep_dim, cfg.hidden, device=device, dtype=dtype)
        self.linear_2 = ops.Linear(cfg.hidden, cfg.hidden, device=device, dtype=dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


def _resampler_layer(cfg: IPAdapterConfig, device, dtype) -> nn.ModuleList:
    # Indices are the release keys: .0 attention, .1 feed-forward (LayerNorm, Linear, GELU, Linear), .2 adaLN.
    feed_forward = nn.Sequential(
        ops.LayerNorm(cfg.hidden, eps=RESAMPLER_NORM_EPS, device=device, dtype=dtype),
        ops.Linear(cfg.hidden, cfg.ffn_width, bias=False, device=device, dtype=dtype),
        nn.GELU(),
        ops.Linear(cfg.ffn_width, cfg.hidden, bias=False, device=device, dtype=dtype),
    )
    adaln = nn.Sequential(nn.SiLU(), ops.Linear(cfg.hidden, 4 * cfg.hidden, device=device, dtype=dtype))
    return nn.ModuleList([ResamplerAttention(cfg, device, dtype), feed_forward, adaln])


class TimeResampler(nn.Module):
    """Image features and timestep to IP tokens and ``temb`` (``image_proj.*``; see the module doc)."""

    def __init__(self, cfg: IPAdapterConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.latents = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden, device=device, dtype=dtype))
        self.proj_in = ops.Linear(cfg.embed_dim, cfg.hidden, device=device, dtype=dtype)
        self.proj_out = ops.Linear(cfg.hidden, cfg.output_dim, device=device, dtype=dtype)
        self.norm_out = ops.LayerNorm(cfg.output_dim, eps=RESAMPLER_NORM_EPS, device=device, dtype=dtype)
        self.time_embedding = TimestepMLP(cfg, device, dtype)
        self.layers = nn.ModuleList(_resampler_layer(cfg, device, dtype) for _ in range(cfg.depth))

    def forward(self, features: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, num_queries, output_dim], temb [B, hidden])`` for ``features`` ``[B, L, embed_dim]``
        at ``timestep`` ``[B]`` (sigma * 1000), in the features' dtype."""
        temb = self.time_embedding(timestep_sinusoid(timestep, self.config.timestep_dim).to(features.dtype))
        latents = self.latents.to(features.dtype).repeat(features.shape[0], 1, 1)
        x = self.proj_in(features) + temb[:, None]
        for attention, feed_forward, adaln in self.layers:
            shift_attn, scale_attn, shift_ff, scale_ff = adaln(temb).chunk(4, dim=1)
            latents = attention(x, latents, shift_attn, scale_attn) + latents
            normed = feed_forward[0](latents) * (1 + scale_ff[:, None]) + shift_ff[:, None]
            latents = feed_forward[3](feed_forward[2](feed_forward[1](normed))) + latents
        return self.norm_out(self.proj_out(latents)), temb


class TimestepLayerNorm(nn.Module):
    """LayerNorm without affine, then ``* (1 + scale) + shift`` from ``SiLU(temb)`` (``norm_ip``)."""

    def __init__(self, temb_dim: int, width: int, device=None, dtype=None):
        super().__init__()
        self.width = width
        self.linear = ops.Linear(temb_dim, 2 * width, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)
        return F.layer_norm(x, (self.width,), eps=IP_NORM_EPS) * (1 + scale[:, None]) + shift[:, None]


class IPJointAttention(nn.Module):
    """One joint block's IP attention (``ip_adapter.{i}.*``; see the module doc)."""

    def __init__(self, cfg: IPAdapterConfig, device=None, dtype=None):
        super().__init__()
        self.norm_ip = TimestepLayerNorm(cfg.hidden, cfg.output_dim, device, dtype)
        self.to_k_ip = ops.Linear(cfg.output_dim, cfg.model_hidden, bias=False, device=device, dtype=dtype)
        self.to_v_ip = ops.Linear(cfg.output_dim, cfg.model_hidden, bias=False, device=device, dtype=dtype)
        self.norm_q = ops.RMSNorm(cfg.head_dim, eps=IP_NORM_EPS, device=device, dtype=dtype)
        self.norm_k = ops.RMSNorm(cfg.head_dim, eps=IP_NORM_EPS, device=device, dtype=dtype)
        self.norm_ip_k = ops.RMSNorm(cfg.head_dim, eps=IP_NORM_EPS, device=device, dtype=dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor, temb: torch.Tensor,
                heads: int) -> torch.Tensor:
        """The IP attention output ``[B, L, hidden]`` for the block's raw image ``q``, ``k``, ``v``
        ``[B, L, hidden]`` (before the block's own qk-norm) and IP ``tokens`` / ``temb`` of the same rows."""
        normed = self.norm_ip(tokens.to(q.dtype), temb.to(q.dtype))
        ip_k, ip_v = self.to_k_ip(normed), self.to_v_ip(normed)

        def per_head(norm: ops.RMSNorm, t: torch.Tensor) -> torch.Tensor:
            return norm(t.unflatten(-1, (heads, -1))).flatten(-2)

        keys = torch.cat([per_head(self.norm_k, k), per_head(self.norm_ip_k, ip_k)], dim=1)
        return ops.attention(per_head(self.norm_q, q), keys, torch.cat([v, ip_v], dim=1), heads)


class IPAdapter(nn.Module):
    """The whole adapter: ``image_proj`` (:class:`TimeResampler`) and ``ip_adapter`` (one
    :class:`IPJointAttention` per joint block); ``state_dict()`` keys are the release file's."""

    def __init__(self, config: IPAdapterConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.image_proj = TimeResampler(config, device, dtype)
        self.ip_adapter = nn.ModuleList(IPJointAttention(config, device, dtype) for _ in range(config.blocks))

    @property
    def dtype(self) -> torch.dtype:
        return self.image_proj.latents.dtype


@dataclass(frozen=True)
class IPTokens:
    """One adapter's IP tokens for every row of a model batch: ``tokens`` ``[B, num_queries, output_dim]``,
    ``temb`` ``[B, hidden]``, and the scale its attention term is added with."""

    adapter: IPAdapter
    tokens: torch.Tensor
    temb: torch.Tensor
    scale: float


class IPRows:
    """The IP attention input of the joint blocks for a batch of rows: one :class:`IPTokens` per active
    adapter image, each adding its own term (so applications and images stack)."""

    def __init__(self, terms: tuple[IPTokens, ...]):
        self.terms = tuple(terms)

    def select(self, idx: slice) -> IPRows:
        """The same terms for a slice of the batch's rows."""
        return IPRows(tuple(IPTokens(t.adapter, t.tokens[idx], t.temb[idx], t.scale) for t in self.terms))

    def add_to(self, block: int, attn: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               heads: int) -> torch.Tensor:
        """``attn`` (the image part of joint block ``block``'s attention output) plus every term's IP attention
        times its scale, added one after the other."""
        for t in self.terms:
            attn = attn + t.adapter.ip_adapter[block](q, k, v, t.tokens, t.temb, heads) * t.scale
        return attn
