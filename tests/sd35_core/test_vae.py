"""The SD3 VAE: official key layout, parity with diffusers' AutoencoderKL, tiling, image conversion."""

import pytest
import torch
from diffusers import AutoencoderKL

from sd35_core.errors import CheckpointError
from sd35_core.loading.tiny import randomize_
from sd35_core.models.vae import VAE, VAEConfig, image_to_vae_input, vae_output_to_image

TINY = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)
# Widening levels give the res blocks their 1x1 shortcut convolutions, which TINY never builds.
WIDENING = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)
SD3 = VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _image(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _vae(config=TINY, seed=0):
    return randomize_(VAE(config), seed)


def _close(ours, theirs, rel=1e-4):
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x {scale:.3g}"


# -- layout and config ---------------------------------------------------------------------------------


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("config", [TINY, WIDENING, SD3], ids=["tiny", "widening", "sd3"])
def test_config_is_derived_from_the_shapes_of_the_official_layout(config):
    vae = VAE(config, device="meta")
    assert VAEConfig.from_shapes(_shapes(vae)) == config


def test_state_dict_uses_the_official_key_names():
    keys = set(VAE(SD3, device="meta").state_dict())
    for key in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.norm2.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.bias",
        "decoder.mid.block_2.conv1.weight",
        "decoder.up.0.block.2.conv2.weight",
        "decoder.up.1.upsample.conv.bias",
        "decoder.up.3.block.0.norm1.weight",
        "decoder.conv_out.weight",
    ):
        assert key in keys, key
    # The last encoder level keeps its resolution; the first decoder level (run last) does too.
    assert not any(k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample")) for k in keys)
    assert not any("quant_conv" in k for k in keys)


def test_sd3_sizes_give_sd3_shapes():
    shapes = _shapes(VAE(SD3, device="meta"))
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)  # mean and log-variance of 16 channels
    assert shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert VAE(SD3, device="meta").downscale == 8


def test_missing_tensor_is_named():
    shapes = _shapes(VAE(TINY, device="meta"))
    del shapes["decoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match="decoder.conv_in.weight"):
        VAEConfig.from_shapes(shapes)


# -- parity with diffusers -----------------------------------------------------------------------------


def _to_diffusers(state, levels):
    """Our (official LDM) keys -> diffusers AutoencoderKL keys.

    Diffusers numbers decoder levels in execution order (reverse of ours), names the mid block's parts
    resnets.0/1 and attentions.0, and uses Linear attention projections where ours are 1x1 convolutions.
    """
    attn_names = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for key, value in state.items():
        part = key.split(".")
        side = part[0]
        if part[1] == "down":
            inner = f"resnets.{part[4]}" if part[3] == "block" else "downsamplers.0"
            rest = part[5:] if part[3] == "block" else part[4:]
            new = [side, "down_blocks", part[2], inner, *rest]
        elif part[1] == "up":
            level = str(levels - 1 - int(part[2]))
            inner = f"resnets.{part[4]}" if part[3] == "block" else "upsamplers.0"
            rest = part[5:] if part[3] == "block" else part[4:]
            new = [side, "up_blocks", level, inner, *rest]
        elif part[1] == "mid" and part[2].startswith("block_"):
            new = [side, "mid_block", f"resnets.{int(part[2][-1]) - 1}", *part[3:]]
        elif part[1] == "mid":
            new = [side, "mid_block", "attentions.0", attn_names[part[3]], part[4]]
            if value.ndim == 4:
                value = value[:, :, 0, 0]
        elif part[1] == "norm_out":
            new = [side, "conv_norm_out", *part[2:]]
        else:
            new = part
        out[".".join(new).replace("nin_shortcut", "conv_shortcut")] = value
    return out


def _diffusers_twin(vae):
    cfg = vae.config
    levels = len(cfg.ch_mult)
    ref = AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        latent_channels=cfg.z_channels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    ref.load_state_dict(_to_diffusers(vae.state_dict(), levels), strict=True)
    return ref.eval()


@pytest.mark.parametrize("config", [TINY, WIDENING], ids=["tiny", "widening"])
def test_encode_is_the_mean_of_diffusers_latent_distribution(config):
    vae = _vae(config)
    ref = _diffusers_twin(vae)
    image = _image(2, 3, 64, 48)
    with torch.no_grad():
        expected = ref.encode(image).latent_dist.mean
    ours = vae.encode(image)
    assert ours.shape == (2, 16, 8, 6) and ours.dtype == torch.float32
    _close(ours, expected)


@pytest.mark.parametrize("config", [TINY, WIDENING], ids=["tiny", "widening"])
def test_decode_matches_diffusers(config):
    vae = _vae(config)
    ref = _diffusers_twin(vae)
    latent = _rand(2, 16, 8, 6)
    with torch.no_grad():
        expected = ref.decode(latent).sample
    ours = vae.decode(latent)
    assert ours.shape == (2, 3, 64, 48) and ours.dtype == torch.float32
    _close(ours, expected)


def test_encode_is_deterministic():
    vae = _vae()
    image = _image(1, 3, 32, 40)
    assert torch.equal(vae.encode(image), vae.encode(image))


def test_half_precision_weights_compute_in_their_dtype_and_return_float32():
    full = _vae()
    half = VAE(TINY, dtype=torch.bfloat16)
    half.load_state_dict(full.state_dict())
    assert half.compute_dtype == torch.bfloat16
    latent = _rand(1, 16, 4, 5)
    out = half.decode(latent)
    assert out.dtype == torch.float32
    ref = full.decode(latent)
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()
    half.compute_dtype = torch.float32  # override: bf16-stored weights, fp32 arithmetic
    assert half.encode(_image(1, 3, 32, 40)).dtype == torch.float32


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(60, 64), (64, 36), (63, 63)])
def test_image_sizes_must_be_multiples_of_8(size):
    vae = _vae()
    image = _image(1, 3, *size)
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(image)
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode_tiled(image, tile=32, overlap=16)


def test_wrong_channel_counts_are_refused():
    vae = _vae()
    with pytest.raises(ValueError, match=r"\[B, 16, h, w\]"):
        vae.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vae.encode(torch.zeros(1, 64, 64, 3))


@pytest.mark.parametrize("tile,overlap", [(60, 16), (64, 12), (64, 64), (0, 0), (64, -8)])
def test_tile_settings_are_checked(tile, overlap):
    with pytest.raises(ValueError, match="VAE tiling"):
        _vae().decode_tiled(_rand(1, 16, 16, 16), tile=tile, overlap=overlap)


# -- tiling --------------------------------------------------------------------------------------------


def test_what_fits_in_one_tile_is_processed_whole():
    vae = _vae()
    latent = _rand(1, 16, 8, 12)
    assert torch.equal(vae.decode_tiled(latent, tile=96, overlap=32), vae.decode(latent))
    image = _image(1, 3, 64, 96)
    assert torch.equal(vae.encode_tiled(image, tile=96, overlap=32), vae.encode(image))


class TileGrid:
    """A 96x128 px (12x16 latent) decode through 64 px tiles with 32 px overlap, and each tile on its own.

    The stride of 4 latents fits exactly, so the tiles start at latent rows 0, 4 and columns 0, 4, 8.
    """

    rows, cols, size = (0, 4), (0, 4, 8), 8

    def __init__(self):
        self.vae = _vae()
        self.latent = _rand(1, 16, 12, 16, seed=3)
        self.progress = []
        self.tiled = self.vae.decode_tiled(
            self.latent, tile=64, overlap=32, callback=lambda done, total: self.progress.append((done, total))
        )
        self.whole = self.vae.decode(self.latent)
        n = self.size
        self.tiles = {
            (y, x): self.vae.decode(self.latent[..., y : y + n, x : x + n]) for y in self.rows for x in self.cols
        }


@pytest.fixture(scope="module")
def grid():
    return TileGrid()


def test_tiles_are_blended_as_convex_combinations_of_tile_decodes(grid):
    assert grid.progress == [(i, 6) for i in range(1, 7)]
    placed = torch.full((6, 3, 96, 128), float("nan"))
    for n, ((y, x), part) in enumerate(grid.tiles.items()):
        placed[n, :, 8 * y : 8 * y + 64, 8 * x : 8 * x + 64] = part[0]
    lo = torch.nan_to_num(placed, nan=float("inf")).amin(0)
    hi = torch.nan_to_num(placed, nan=float("-inf")).amax(0)
    assert torch.all(grid.tiled[0] >= lo - 1e-5) and torch.all(grid.tiled[0] <= hi + 1e-5)
    # Where one tile alone covers a pixel (top-left corner), the result is that tile's decode.
    torch.testing.assert_close(grid.tiled[0, :, :32, :32], placed[0, :, :32, :32], rtol=0, atol=1e-6)


def _rel_errors(tiled, whole):
    scale = whole.abs().max()
    err = (tiled - whole).abs()
    return (err.max() / scale).item(), (err.mean() / scale).item()


def test_tiled_decode_is_close_to_whole_decode():
    # Tiles normalise with their own GroupNorm statistics and attend only within themselves, so tiling
    # is an approximation whose error shrinks as tiles grow. Measured on this seed (256x384 px):
    # 192 px tiles: max 0.096, mean 0.011; 128 px tiles: max 0.205, mean 0.025 (relative to output scale).
    vae = _vae()
    latent = _rand(1, 16, 32, 48, seed=3)
    whole = vae.decode(latent)
    big_max, big_mean = _rel_errors(vae.decode_tiled(latent, tile=192, overlap=64), whole)
    small_max, small_mean = _rel_errors(vae.decode_tiled(latent, tile=128, overlap=32), whole)
    assert big_max <= 0.15 and big_mean <= 0.02
    assert big_max < small_max and big_mean < small_mean


def test_tiled_encode_is_close_to_whole_encode():
    # Measured on this seed (256x384 px, 192 px tiles, 64 px overlap): max 0.076, mean 0.012.
    vae = _vae()
    image = _image(1, 3, 256, 384, seed=3)
    whole = vae.encode(image)
    tiled = vae.encode_tiled(image, tile=192, overlap=64)
    assert tiled.shape == whole.shape
    err_max, err_mean = _rel_errors(tiled, whole)
    assert err_max <= 0.12 and err_mean <= 0.02


def _seam_score(error, cols, rows):
    """Largest mean jump of ``error`` across the given pixel lines, over the median jump of all lines.

    A seam is a step along a whole line, so its mean jump stands out from the typical line even when
    the error field itself is rough.
    """
    jx = (error[..., :, 1:] - error[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    jy = (error[..., 1:, :] - error[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    lines = torch.cat([jx[[c - 1 for c in cols]], jy[[r - 1 for r in rows]]])
    return (lines.max() / torch.cat([jx, jy]).median()).item()


def test_tiled_decode_shows_no_seams(grid):
    # Control: the same tiles pasted side by side, cut at the middle of each overlap.
    row_cuts, col_cuts = [0, 6, 12], [0, 6, 10, 16]
    pasted = torch.empty_like(grid.whole)
    for i, y in enumerate(grid.rows):
        for j, x in enumerate(grid.cols):
            a, b, c, d = row_cuts[i], row_cuts[i + 1], col_cuts[j], col_cuts[j + 1]
            part = grid.tiles[(y, x)]
            pasted[..., 8 * a : 8 * b, 8 * c : 8 * d] = part[..., 8 * (a - y) : 8 * (b - y), 8 * (c - x) : 8 * (d - x)]
    cut_cols, cut_rows = [8 * c for c in col_cuts[1:-1]], [8 * r for r in row_cuts[1:-1]]
    pasted_score = _seam_score(pasted - grid.whole, cut_cols, cut_rows)
    # Every line where a tile begins or ends, and the cut lines, blend in: measured at most 1.36x the
    # median line (pasted tiles: 2.46x).
    edge_cols, edge_rows = [32, 64, 96], [32, 64]
    blended_edges = _seam_score(grid.tiled - grid.whole, edge_cols, edge_rows)
    blended_cuts = _seam_score(grid.tiled - grid.whole, cut_cols, cut_rows)
    assert blended_edges <= 1.6 and blended_cuts <= 1.6
    assert pasted_score >= 1.4 * max(blended_edges, blended_cuts)


def test_sizes_not_divisible_by_the_tile_are_covered():
    vae = _vae()
    latent = _rand(1, 16, 13, 11, seed=2)  # 104x88 px with 64 px tiles
    tiled = vae.decode_tiled(latent, tile=64, overlap=16)
    assert tiled.shape == (1, 3, 104, 88)
    assert torch.isfinite(tiled).all()
    image = _image(1, 3, 104, 88, seed=2)
    assert vae.encode_tiled(image, tile=64, overlap=16).shape == (1, 16, 13, 11)


def test_tiled_batches_match_one_image_at_a_time():
    vae = _vae()
    latent = _rand(2, 16, 8, 12, seed=4)
    batch = vae.decode_tiled(latent, tile=64, overlap=32)
    torch.testing.assert_close(batch[1:], vae.decode_tiled(latent[1:], tile=64, overlap=32), rtol=0, atol=1e-6)


# -- image conversion ----------------------------------------------------------------------------------


def test_image_conversion_round_trips():
    images = torch.rand(2, 24, 32, 3, generator=torch.Generator().manual_seed(0))
    pixels = image_to_vae_input(images)
    assert pixels.shape == (2, 3, 24, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(vae_output_to_image(pixels), images)


def test_image_conversion_drops_alpha_and_clamps():
    rgba = torch.rand(1, 8, 8, 4)
    assert image_to_vae_input(rgba).shape == (1, 3, 8, 8)
    out = vae_output_to_image(torch.tensor([-3.0, 0.0, 3.0]).view(1, 3, 1, 1))
    assert out.shape == (1, 1, 1, 3)
    assert out.flatten().tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="B, H, W, 3"):
        image_to_vae_input(torch.rand(1, 8, 8))
