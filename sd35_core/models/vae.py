"""The SD3 / SD3.5 autoencoder (16 latent channels), as in Stability's reference ``SDVAE``.

Module names mirror the official checkpoint keys under ``first_stage_model.`` (``encoder.down.N.block.M``,
``decoder.up.N.upsample.conv``, ``*.mid.attn_1.q`` ...), so the state dict loads without renaming.

Pixels are ``[B, 3, H, W]`` in ``[-1, 1]``; latents are raw VAE space ``[B, z, H/8, W/8]`` (the SD3 latent
format of :mod:`.latent` is applied by the sampler, not here). Encoding returns the mean of the latent
distribution rather than a sample: the reference draws ``mean + std * randn`` from the global RNG, which
makes img2img and ControlNet runs unrepeatable; the mean is deterministic and is what ComfyUI uses.

Tiled encode/decode bound memory on large images by running overlapping tiles and blending them with a
raised-cosine weight, so the seams do not show. Tiles see their own GroupNorm statistics and attention
context, so tiled results are close to, not identical with, untiled ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..models import ops
from .numerics import check_vae_input, check_vae_output, weights_label

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of the autoencoder. ``ch * ch_mult[i]`` is the width of level ``i``; ``len(ch_mult) - 1``
    levels downsample by 2 each (SD3: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, z 16)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3

    @property
    def downscale(self) -> int:
        """Pixels per latent position along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> VAEConfig:
        """Derive the config from tensor shapes keyed as in the official file minus ``first_stage_model.``."""

        def shape(key: str, ndim: int = 4) -> tuple[int, ...]:
            s = shapes.get(key)
            if s is None:
                raise CheckpointError(f"VAE weights: expected tensor '{key}'; it is missing")
            if len(s) != ndim:
                raise CheckpointError(f"VAE weights: expected '{key}' to have {ndim} dimensions; got {s}")
            return tuple(s)

        ch, in_channels = shape("encoder.conv_in.weight")[:2]
        levels = _count(shapes, "encoder.down.")
        if levels == 0:
            raise CheckpointError("VAE weights: expected encoder.down.0.* tensors; found none")
        num_res_blocks = _count(shapes, "encoder.down.0.block.")
        ch_mult = []
        for i in range(levels):
            width = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
            if width % ch:
                raise CheckpointError(
                    f"VAE weights: expected the width of encoder.down.{i} ({width}) to be a multiple of "
                    f"encoder.conv_in's width ({ch})"
                )
            ch_mult.append(width // ch)
        z_channels = shape("decoder.conv_in.weight")[1]
        out_channels = shape("decoder.conv_out.weight")[0]
        enc_out = shape("encoder.conv_out.weight")[0]
        if enc_out != 2 * z_channels:
            raise CheckpointError(
                f"VAE weights: expected encoder.conv_out to give mean and log-variance "
                f"(2 x {z_channels} channels); it gives {enc_out}"
            )
        return cls(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            in_channels=in_channels,
            out_channels=out_channels,
        )


def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """Number of consecutive integer children ``prefix{0,1,...}`` present among the keys."""
    found = set()
    for k in shapes:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    n = 0
    while n in found:
        n += 1
    return n


def _norm(channels: int, device, dtype) -> ops.GroupNorm:
    return ops.GroupNorm(32, channels, eps=1e-6, affine=True, device=device, dtype=dtype)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = _norm(in_channels, **kw)
        self.conv1 = ops.Conv2d(in_channels, out_channels, 3, padding=1, **kw)
        self.norm2 = _norm(out_channels, **kw)
        self.conv2 = ops.Conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.nin_shortcut = ops.Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm = _norm(channels, **kw)
        self.q = ops.Conv2d(channels, channels, 1, **kw)
        self.k = ops.Conv2d(channels, channels, 1, **kw)
        self.v = ops.Conv2d(channels, channels, 1, **kw)
        self.proj_out = ops.Conv2d(channels, channels, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        q, k, v = (proj(hidden).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = ops.attention(q, k, v, heads=1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only: the trained weights expect this asymmetric padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, device, dtype) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, device=device, dtype=dtype)
    mid.attn_1 = AttnBlock(channels, device=device, dtype=dtype)
    mid.block_2 = ResnetBlock(channels, channels, device=device, dtype=dtype)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image ``[B, in, H, W]`` -> ``[B, 2*z, H/f, W/f]`` (mean and log-variance stacked on channels)."""

    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        ch, mult = config.ch, config.ch_mult
        self.conv_in = ops.Conv2d(config.in_channels, ch, 3, padding=1, **kw)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * m, **kw))
                block_in = ch * m
            if i != len(mult) - 1:
                level.downsample = Downsample(block_in, **kw)
            self.down.append(level)
        self.mid = _mid(block_in, **kw)
        self.norm_out = _norm(block_in, **kw)
        self.conv_out = ops.Conv2d(block_in, 2 * config.z_channels, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z, h, w]`` -> image ``[B, out, h*f, w*f]``. ``up[i]`` is level ``i``; they run last to first."""

    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        ch, mult = config.ch, config.ch_mult
        block_in = ch * mult[-1]
        self.conv_in = ops.Conv2d(config.z_channels, block_in, 3, padding=1, **kw)
        self.mid = _mid(block_in, **kw)
        levels = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[i], **kw))
                block_in = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(block_in, **kw)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(block_in, **kw)
        self.conv_out = ops.Conv2d(block_in, config.out_channels, 3, padding=1, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """The SD3 autoencoder: ``encode`` pixels to mean latents, ``decode`` latents to pixels.

    Arithmetic runs in :attr:`compute_dtype` (the dtype the weights are stored in, unless overridden)
    on the weights' device; inputs are moved there and outputs come back as float32 on that device.
    The batch runs one image at a time: images are independent in this network and peak memory then
    stays that of one image.
    """

    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, device=device, dtype=dtype)
        self.decoder = Decoder(config, device=device, dtype=dtype)
        self._compute_dtype: torch.dtype | None = None

    @property
    def downscale(self) -> int:
        """Pixels per latent position along each side (8 for SD3)."""
        return self.config.downscale

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype activations run in: the weights' dtype unless set explicitly."""
        return self._compute_dtype or self.encoder.conv_in.weight.dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        self._compute_dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    # -- whole images -------------------------------------------------------------------------------

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in ``[-1, 1]`` -> mean latent ``[B, z, H/8, W/8]`` (raw VAE space, float32).

        ``H`` and ``W`` must be multiples of :attr:`downscale`; otherwise a ``ValueError`` says so.
        """
        self._check_image(image)
        return self._each(image, self._encode_one)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE-space latent ``[B, z, h, w]`` -> pixels ``[B, 3, 8h, 8w]``, about ``[-1, 1]``, unclamped, float32."""
        self._check_latent(latent)
        check_vae_input(latent)
        pixels = self._each(latent, self._decode_one)
        check_vae_output(pixels, weights_label(self.decoder), self.compute_dtype)
        return pixels

    # -- tiles --------------------------------------------------------------------------------------

    def encode_tiled(
        self,
        image: torch.Tensor,
        tile: int = 512,
        overlap: int = 64,
        callback: ProgressCallback | None = None,
    ) -> torch.Tensor:
        """Like :meth:`encode`, through overlapping ``tile``-pixel tiles blended over ``overlap`` pixels.

        ``tile`` and ``overlap`` are in pixels and multiples of :attr:`downscale`, ``0 <= overlap < tile``.
        An image that fits in one tile is encoded whole (same result as :meth:`encode`). ``callback(done,
        total)`` is called after each tile (it may raise to interrupt).
        """
        self._check_image(image)
        f = self.downscale
        self._check_tiling(tile, overlap)
        return self._tiled(image, self._encode_one, tile, overlap, align=f, scale=1 / f, callback=callback)

    def decode_tiled(
        self,
        latent: torch.Tensor,
        tile: int = 512,
        overlap: int = 64,
        callback: ProgressCallback | None = None,
    ) -> torch.Tensor:
        """Like :meth:`decode`, through overlapping tiles of ``tile`` output pixels blended over ``overlap``.

        Sizes are in output pixels (``tile / 8`` latent positions) and multiples of :attr:`downscale`,
        ``0 <= overlap < tile``. A latent that fits in one tile is decoded whole (same result as
        :meth:`decode`). ``callback(done, total)`` is called after each tile (it may raise to interrupt).
        """
        self._check_latent(latent)
        check_vae_input(latent)
        f = self.downscale
        self._check_tiling(tile, overlap)
        pixels = self._tiled(latent, self._decode_one, tile // f, overlap // f, align=1, scale=f, callback=callback)
        check_vae_output(pixels, weights_label(self.decoder), self.compute_dtype)
        return pixels

    # -- internals ----------------------------------------------------------------------------------

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x.to(device=self.device, dtype=self.compute_dtype))
        return moments[:, : self.config.z_channels].float()

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.to(device=self.device, dtype=self.compute_dtype)).float()

    @staticmethod
    def _each(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])

    def _check_image(self, image: torch.Tensor) -> None:
        c = self.config.in_channels
        if image.ndim != 4 or image.shape[1] != c:
            raise ValueError(f"VAE encode: expected pixels of shape [B, {c}, H, W]; got {tuple(image.shape)}")
        f = self.downscale
        h, w = image.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"VAE encode: image size {w}x{h} (width x height) is not a multiple of {f}; "
                f"crop or resize it to a multiple of {f} (e.g. {w - w % f}x{h - h % f})"
            )

    def _check_latent(self, latent: torch.Tensor) -> None:
        z = self.config.z_channels
        if latent.ndim != 4 or latent.shape[1] != z:
            raise ValueError(
                f"VAE decode: expected a latent of shape [B, {z}, h, w]; got {tuple(latent.shape)}"
                + (" (is this a latent from another model family?)" if latent.ndim == 4 else "")
            )

    def _check_tiling(self, tile: int, overlap: int) -> None:
        f = self.downscale
        if tile <= 0 or tile % f:
            raise ValueError(f"VAE tiling: tile size must be a positive multiple of {f} pixels; got {tile}")
        if overlap < 0 or overlap % f or overlap >= tile:
            raise ValueError(
                f"VAE tiling: overlap must be a multiple of {f} pixels from 0 to less than the tile size "
                f"({tile}); got {overlap}"
            )

    def _tiled(
        self,
        x: torch.Tensor,
        fn: Callable[[torch.Tensor], torch.Tensor],
        tile: int,
        overlap: int,
        align: int,
        scale: float,
        callback: ProgressCallback | None,
    ) -> torch.Tensor:
        """Run ``fn`` over overlapping tiles of ``x`` (sizes in ``x``'s units) and blend the results.

        ``fn`` maps an input region of size ``s`` to an output region of size ``s * scale``; tile starts
        are multiples of ``align`` so that every tile lands on whole output positions.
        """
        h, w = x.shape[-2:]
        if h <= tile and w <= tile:
            return self._each(x, fn)
        ys, th = _tile_starts(h, tile, overlap, align)
        xs, tw = _tile_starts(w, tile, overlap, align)
        wy = _blend_weights(ys, th, scale)
        wx = _blend_weights(xs, tw, scale)
        total = len(ys) * len(xs) * x.shape[0]
        done = 0
        outs = []
        with torch.no_grad():
            for b in range(x.shape[0]):
                out = None
                norm = None
                for y0, ry in zip(ys, wy, strict=True):
                    for x0, rx in zip(xs, wx, strict=True):
                        part = fn(x[b : b + 1, :, y0 : y0 + th, x0 : x0 + tw])
                        if out is None:
                            oh, ow = round(h * scale), round(w * scale)
                            out = part.new_zeros(1, part.shape[1], oh, ow)
                            norm = part.new_zeros(1, 1, oh, ow)
                        weight = (ry.to(part.device)[:, None] * rx.to(part.device)[None, :])[None, None]
                        oy, ox = round(y0 * scale), round(x0 * scale)
                        out[..., oy : oy + part.shape[-2], ox : ox + part.shape[-1]] += part * weight
                        norm[..., oy : oy + part.shape[-2], ox : ox + part.shape[-1]] += weight
                        done += 1
                        if callback is not None:
                            callback(done, total)
                outs.append(out / norm)
        return torch.cat(outs)


def _tile_starts(size: int, tile: int, overlap: int, align: int) -> tuple[list[int], int]:
    """Evenly spread tile starts covering ``size`` with at least ``overlap`` between neighbours.

    Returns the starts and the tile length along this axis (``size`` itself when one tile covers it).
    """
    if size <= tile:
        return [0], size
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    span = size - tile
    # Flooring each evenly spaced start to the alignment keeps neighbours at most `stride` apart.
    starts = [(i * span // (n - 1)) // align * align for i in range(n)]
    return starts, tile


def _ramp(n: int) -> torch.Tensor:
    """Raised-cosine rise over ``n`` positions, never 0 or 1: a rise and its mirror sum to exactly 1."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.sin(t * (math.pi / 2)) ** 2


def _blend_weights(starts: list[int], length: int, scale: float) -> list[torch.Tensor]:
    """Per-tile 1-D output weights: rise over the overlap with the previous tile, fall over the next's."""
    out_len = round(length * scale)
    weights = []
    for i, s in enumerate(starts):
        w = torch.ones(out_len, dtype=torch.float64)
        if i > 0:
            n = round((starts[i - 1] + length - s) * scale)
            if n > 0:
                w[:n] *= _ramp(n)
        if i + 1 < len(starts):
            n = round((s + length - starts[i + 1]) * scale)
            if n > 0:
                w[out_len - n :] *= _ramp(n).flip(0)
        weights.append(w.float())
    return weights


def image_to_vae_input(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``IMAGE`` ``[B, H, W, C]`` in ``0..1`` -> VAE pixels ``[B, 3, H, W]`` in ``[-1, 1]`` (float32).

    Channels beyond the first three (an alpha channel) are dropped.
    """
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"image: expected shape [B, H, W, 3] with values 0..1; got {tuple(images.shape)}")
    return images[..., :3].movedim(-1, 1).float() * 2 - 1


def vae_output_to_image(x: torch.Tensor) -> torch.Tensor:
    """VAE pixels ``[B, 3, H, W]`` in about ``[-1, 1]`` -> ComfyUI ``IMAGE`` ``[B, H, W, 3]`` clamped to ``0..1``."""
    if x.ndim != 4:
        raise ValueError(f"VAE output: expected shape [B, 3, H, W]; got {tuple(x.shape)}")
    return ((x.float() + 1) / 2).clamp(0, 1).movedim(1, -1).contiguous()
