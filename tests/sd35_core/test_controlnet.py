"""SD3.5 ControlNets: release-layout loading, parity with diffusers' SD3ControlNetModel, the 8b/2b paths
decided from the weights, residual injection into the tiny Large-like MMDiT, windows, image preparation and
the errors users can cause."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import SD3ControlNetModel
from PIL import Image

from sd35_core.errors import CheckpointError
from sd35_core.image.control_image import prepare_control_image
from sd35_core.image.preprocess import depth_near_is_bright
from sd35_core.loading.checkpoint import DTypePolicy, load_weights, open_safetensors
from sd35_core.loading.loader import DiffusionModel, load_controlnet
from sd35_core.loading.tiny import randomize_, save_state, tiny_mmdit
from sd35_core.models.controlnet import (
    CONTROL_TYPES,
    LOAD_KEY_MAP,
    SAVE_KEY_MAP,
    ControlNet,
    ControlNetConfig,
    check_controlnet_fits,
)
from sd35_core.models.mmditx import MMDiTConfig
from sd35_core.sampling.control import ControlHint, controlnet_residuals, expand_residuals
from tests.shared import IMAGES

HIDDEN, LAYERS, POOLED = 128, 2, 192


def release_keys(layers: int, x_embedder: bool = False) -> set[str]:
    """The tensor names of Stability's SD3.5 ControlNet files, as diffusers' converter
    (scripts/convert_sd3_controlnet_to_diffusers.py) and ComfyUI's loader read them."""
    keys = {f"pos_embed_input.proj.{p}" for p in ("weight", "bias")}
    for emb in ("timestep_embedder", "text_embedder"):
        keys |= {f"time_text_embed.{emb}.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    for n in range(layers):
        keys |= {f"controlnet_blocks.{n}.{p}" for p in ("weight", "bias")}
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"transformer_blocks.{n}.{layer}.{p}" for p in ("weight", "bias")}
    if x_embedder:
        keys |= {"pos_embed.proj.weight", "pos_embed.proj.bias"}
    return keys


def _config(pooled: int = POOLED, hidden: int = HIDDEN, x_embedder: bool = False, layers: int = LAYERS):
    return ControlNetConfig(
        hidden_size=hidden,
        num_heads=hidden // 64,
        num_layers=layers,
        patch_size=2,
        in_channels=16,
        pooled_dim=pooled,
        has_x_embedder=x_embedder,
    )


def _controlnet(config: ControlNetConfig, seed: int = 3) -> ControlNet:
    return randomize_(ControlNet(config), seed).requires_grad_(False).eval()


def _release_state(cn: ControlNet, control_type: str | None = "canny") -> dict[str, torch.Tensor]:
    state = {SAVE_KEY_MAP.get(k, k): v for k, v in cn.state_dict().items()}
    if control_type is not None:
        state["control_type"] = torch.tensor([CONTROL_TYPES[control_type]], dtype=torch.int32)
    return state


@pytest.fixture(scope="module")
def large():
    return tiny_mmdit("sd3.5_large", seed=0).requires_grad_(False)


@pytest.fixture(scope="module")
def cn8b():
    return _controlnet(_config())


def _inputs(batch: int = 2, hw=(8, 12), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *hw, generator=gen)
    cond = torch.randn(1, 16, *hw, generator=gen)
    pooled = torch.randn(batch, POOLED, generator=gen)
    context = torch.randn(batch, 5, 256, generator=gen)
    sigma = torch.tensor([0.9, 0.4])[:batch]
    return x, cond, pooled, context, sigma


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours.float() - theirs.float()).abs().max().item()
    assert diff <= 1e-4 * max(1.0, theirs.abs().max().item()), diff
    return diff


# ---------------------------------------------------------------------------------------------------------
# layout and config
# ---------------------------------------------------------------------------------------------------------


def test_module_keys_are_the_release_layout_after_the_reference_rename():
    for x_embedder in (False, True):
        cn = ControlNet(_config(x_embedder=x_embedder), device="meta")
        assert {SAVE_KEY_MAP.get(k, k) for k in cn.state_dict()} == release_keys(LAYERS, x_embedder)
    # The rename is exactly the reference's CONTROLNET_MAP: embedders only, blocks keep their native names.
    assert set(LOAD_KEY_MAP.values()) == {
        f"{m}.mlp.{i}.{p}" for m in ("t_embedder", "y_embedder") for i in (0, 2) for p in ("weight", "bias")
    } | {"x_embedder.proj.weight", "x_embedder.proj.bias"}
    # ... and not diffusers' layout (split q/k/v, ff.net, norm1.linear).
    diffusers_keys = set(_diffusers(_config()).state_dict())
    ours = set(ControlNet(_config(), device="meta").state_dict())
    assert not {k for k in ours if k.startswith("transformer_blocks.")} & diffusers_keys


def test_config_from_release_shapes_and_from_renamed_shapes(tmp_path):
    cn = _controlnet(_config(), seed=5)
    path = save_state(tmp_path / "cn.safetensors", {"": _release_state(cn)})
    shapes = open_safetensors(path).shapes()
    assert set(shapes) - {"control_type"} == release_keys(LAYERS)
    config = ControlNetConfig.from_shapes(shapes)
    assert config == _config()
    assert ControlNetConfig.from_shapes({LOAD_KEY_MAP.get(k, k): v for k, v in shapes.items()}) == config
    # Layers are counted from the file, heads are hidden // 64, the 2b-path patch embedding is detected.
    wide = _release_state(_controlnet(_config(hidden=192, layers=3, x_embedder=True, pooled=192)), None)
    config3 = ControlNetConfig.from_shapes({k: tuple(v.shape) for k, v in wide.items()})
    assert (config3.num_layers, config3.num_heads, config3.hidden_size, config3.has_x_embedder) == (3, 3, 192, True)


def test_load_release_file_with_our_config_and_load_weights(tmp_path):
    cn = _controlnet(_config(), seed=5)
    path = save_state(tmp_path / "cn.safetensors", {"": _release_state(cn, "depth")})
    file = open_safetensors(path)
    config = ControlNetConfig.from_shapes(file.shapes())
    with torch.device("meta"):
        loaded = ControlNet(config)
    load_weights(loaded, file, "", DTypePolicy(), key_map=LOAD_KEY_MAP, optional=ControlNet.OPTIONAL_KEYS)
    for k, v in cn.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_loader_reads_release_file_and_control_type(tmp_path, large):
    model = DiffusionModel(large, large.config, "sd3.5_large", "tiny", DTypePolicy())
    for kind in CONTROL_TYPES:
        path = save_state(tmp_path / f"{kind}.safetensors", {"": _release_state(_controlnet(_config()), kind)})
        cn = load_controlnet(path, model, dtype="fp32")
        assert cn.control_type == CONTROL_TYPES[kind] and cn.control_type_name == kind
    bare = save_state(tmp_path / "bare.safetensors", {"": _release_state(_controlnet(_config()), None)})
    assert load_controlnet(bare, model, dtype="fp32").control_type_name is None


def test_non_controlnet_files_are_refused_clearly(tmp_path, large):
    model = DiffusionModel(large, large.config, "sd3.5_large", "tiny", DTypePolicy())
    path = save_state(tmp_path / "model.safetensors", {"model.diffusion_model.": large.state_dict()})
    with pytest.raises(CheckpointError, match="ControlNet"):
        load_controlnet(path, model)
    with pytest.raises(CheckpointError, match="pos_embed_input.proj.weight"):
        ControlNetConfig.from_shapes(open_safetensors(path).shapes("model.diffusion_model."))
    # A file with ControlNet heads but no blocks is not taken for a ControlNet either.
    state = _release_state(_controlnet(_config()), None)
    broken = {k: v for k, v in state.items() if not k.startswith("transformer_blocks.1.")}
    with pytest.raises(CheckpointError, match="controlnet_blocks"):
        ControlNetConfig.from_shapes({k: tuple(v.shape) for k, v in broken.items()})


# ---------------------------------------------------------------------------------------------------------
# parity with diffusers
# ---------------------------------------------------------------------------------------------------------


def _diffusers(config: ControlNetConfig) -> SD3ControlNetModel:
    # The converter's settings for the released 8b files, at tiny widths: no context stream, no own
    # patch embedding or position grid (the model's tokens come in), raw pooled vector.
    return SD3ControlNetModel(
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        num_layers=config.num_layers,
        attention_head_dim=64,
        num_attention_heads=config.num_heads,
        joint_attention_dim=None,
        caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.pooled_dim,
        out_channels=config.in_channels,
        pos_embed_max_size=None,
        pos_embed_type=None,
        use_pos_embed=False,
        force_zeros_for_pooled_projection=False,
    ).eval()


def _to_diffusers(release: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """diffusers' convert_sd3_controlnet_checkpoint_to_diffusers mapping, written out again."""
    out = {k: v for k, v in release.items() if k.startswith(("controlnet_blocks.", "pos_embed_input.", "time_text"))}
    for i in range(layers):
        b = f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            q, k, v = release[f"{b}attn.qkv.{p}"].chunk(3, dim=0)
            out |= {f"{b}attn.to_q.{p}": q, f"{b}attn.to_k.{p}": k, f"{b}attn.to_v.{p}": v}
            out[f"{b}attn.to_out.0.{p}"] = release[f"{b}attn.proj.{p}"]
            out[f"{b}ff.net.0.proj.{p}"] = release[f"{b}mlp.fc1.{p}"]
            out[f"{b}ff.net.2.{p}"] = release[f"{b}mlp.fc2.{p}"]
            out[f"{b}norm1.linear.{p}"] = release[f"{b}adaLN_modulation.1.{p}"]
    return out


def test_8b_forward_matches_diffusers_every_block_output(large, cn8b):
    x, cond, pooled, _, sigma = _inputs()
    theirs_model = _diffusers(cn8b.config)
    theirs_model.load_state_dict(_to_diffusers(_release_state(cn8b, None), LAYERS), strict=True)
    with torch.no_grad():
        tokens = large.patch_embed(x)
        ours = cn8b(tokens, cond.expand(2, -1, -1, -1), pooled, sigma * 1000)
        theirs = theirs_model(
            hidden_states=tokens, controlnet_cond=cond.expand(2, -1, -1, -1), pooled_projections=pooled,
            timestep=sigma * 1000,
        ).controlnet_block_samples
        # The full per-step path (strength 1) is the same computation, fed from the latent.
        residuals = controlnet_residuals(large, cn8b, x, sigma, pooled, cond, 1.0)
    assert len(ours) == len(theirs) == LAYERS
    diffs = [_assert_close(a, b) for a, b in zip(ours, theirs, strict=True)]
    diffs += [_assert_close(a, b) for a, b in zip(residuals, theirs, strict=True)]
    print(f"8b ControlNet vs diffusers, max abs diff per output: {max(diffs):.2e}")
    # Chained blocks: the second output depends on the first block's output, not only on the input tokens.
    with torch.no_grad():
        unchained = cn8b.controlnet_blocks[1](cn8b.transformer_blocks[1](
            tokens + cn8b.pos_embed_input(cond.expand(2, -1, -1, -1)),
            cn8b.t_embedder(sigma * 1000, torch.float32) + cn8b.y_embedder(pooled)))
    assert not torch.allclose(unchained, ours[1], atol=1e-3)


def test_2b_path_embeds_latent_itself_and_feeds_every_block_the_same_input(large):
    """The reference's smaller-ControlNet path, assembled from diffusers' parts with the reference wiring."""
    config = _config(pooled=HIDDEN, x_embedder=True)
    cn = _controlnet(config, seed=7)
    assert check_controlnet_fits(config, large.config) == "2b"
    release = _release_state(cn, None)
    parts = SD3ControlNetModel(
        patch_size=2, in_channels=16, num_layers=LAYERS, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=None, pooled_projection_dim=HIDDEN, out_channels=16, pos_embed_max_size=None,
        pos_embed_type=None, use_pos_embed=True, force_zeros_for_pooled_projection=False,
    ).eval()
    conv = _to_diffusers(release, LAYERS)
    conv |= {f"pos_embed.proj.{p}": release[f"pos_embed.proj.{p}"] for p in ("weight", "bias")}
    parts.load_state_dict(conv, strict=True)
    x, cond, pooled, _, sigma = _inputs()
    with torch.no_grad():
        ours = controlnet_residuals(large, cn, x, sigma, pooled, cond, 1.0)
        y = large.y_embedder(pooled)  # the diffusion model's embedded vector
        h = parts.pos_embed(x) + parts.pos_embed_input(cond.expand(2, -1, -1, -1))
        temb = parts.time_text_embed(sigma * 1000, y)
        # Every block sees the same input h (no chaining): the reference's non-8b wiring.
        pairs = zip(parts.transformer_blocks, parts.controlnet_blocks, strict=True)
        theirs = [head(block(h, temb)) for block, head in pairs]
    diffs = [_assert_close(a, b) for a, b in zip(ours, theirs, strict=True)]
    print(f"2b ControlNet path vs diffusers parts, max abs diff: {max(diffs):.2e}")


# ---------------------------------------------------------------------------------------------------------
# with the tiny Large-like model
# ---------------------------------------------------------------------------------------------------------


def test_residual_shapes_and_spreading_over_blocks(large, cn8b):
    x, cond, pooled, _, sigma = _inputs()
    with torch.no_grad():
        outputs = controlnet_residuals(large, cn8b, x, sigma, pooled, cond, 0.5)
    tokens = (x.shape[2] // 2) * (x.shape[3] // 2)
    assert [tuple(o.shape) for o in outputs] == [(2, tokens, HIDDEN)] * LAYERS
    per_block = expand_residuals(outputs, large.config.depth)
    assert [id(t) for t in per_block] == [id(outputs[i // 2]) for i in range(4)]  # depth 4, 2 layers: 0,0,1,1
    assert [id(t) for t in expand_residuals(outputs[:1], 4)] == [id(outputs[0])] * 4
    with pytest.raises(ValueError, match="3 ControlNet outputs over 4"):
        expand_residuals(outputs + outputs[:1], 4)
    with pytest.raises(ValueError):
        expand_residuals(outputs * 3, 4)


def test_strength_scales_and_zero_strength_leaves_the_model_output_unchanged(large, cn8b):
    x, cond, pooled, context, sigma = _inputs()
    t = sigma * 1000
    with torch.no_grad():
        plain = large(x, t, context, pooled)
        full = controlnet_residuals(large, cn8b, x, sigma, pooled, cond, 1.0)
        half = controlnet_residuals(large, cn8b, x, sigma, pooled, cond, 0.5)
        zero = controlnet_residuals(large, cn8b, x, sigma, pooled, cond, 0.0)
        out_zero = large(x, t, context, pooled, block_residuals=expand_residuals(zero, 4))
        out_full = large(x, t, context, pooled, block_residuals=expand_residuals(full, 4))
    for a, b in zip(half, full, strict=True):
        assert torch.allclose(a, 0.5 * b, rtol=0, atol=1e-6)
    assert torch.equal(out_zero, plain)
    assert not torch.allclose(out_full, plain, atol=1e-3)


def test_control_latents_are_tiled_over_the_batch(large, cn8b):
    x, cond, pooled, _, sigma = _inputs()
    with torch.no_grad():
        one = controlnet_residuals(large, cn8b, x, sigma, pooled, cond, 1.0)
        two = controlnet_residuals(large, cn8b, x, sigma, pooled, cond.repeat(2, 1, 1, 1), 1.0)
        scalar = controlnet_residuals(large, cn8b, x[:1], 0.9, pooled[:1], cond, 1.0)
        # Two images, each with its own control latent, run as [cond rows; uncond rows].
        conds = torch.cat([cond, -cond])
        stacked = controlnet_residuals(large, cn8b, torch.cat([x, x]), sigma.repeat(2), pooled.repeat(2, 1), conds, 1.0)
        first = controlnet_residuals(large, cn8b, x[:1], sigma[:1], pooled[:1], cond, 1.0)
        second = controlnet_residuals(large, cn8b, x[1:], sigma[1:], pooled[1:], -cond, 1.0)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    assert torch.allclose(scalar[0], one[0][:1], atol=1e-5)
    for s, f, g in zip(stacked, first, second, strict=True):
        assert torch.allclose(s[0::2], f.expand(2, -1, -1), atol=1e-5)
        assert torch.allclose(s[1::2], g.expand(2, -1, -1), atol=1e-5)


def test_mismatched_controlnets_are_refused_naming_both_widths(large):
    x, cond, pooled, _, sigma = _inputs()
    wide = _controlnet(_config(hidden=192, pooled=POOLED))
    with pytest.raises(ValueError, match=r"hidden width 192.*hidden width 128"):
        controlnet_residuals(large, wide, x, sigma, pooled, cond, 1.0)
    odd = _controlnet(_config(pooled=100))
    with pytest.raises(ValueError, match=r"input width 100.*pooled width 192.*hidden width 128"):
        controlnet_residuals(large, odd, x, sigma, pooled, cond, 1.0)
    no_embedder = _config(pooled=HIDDEN, x_embedder=False)
    with pytest.raises(ValueError, match="pos_embed.proj"):
        check_controlnet_fits(no_embedder, large.config)
    with pytest.raises(ValueError, match="3 layers"):
        check_controlnet_fits(_config(layers=3), large.config)


def test_8b_controlnet_on_sd35_medium_says_it_is_for_large():
    # The released widths, as configs only: SD3.5 Large ControlNet (2432 wide, pooled 2048) on SD3.5 Medium.
    medium = MMDiTConfig(
        patch_size=2, in_channels=16, out_channels=16, hidden_size=1536, depth=24, num_heads=24,
        pos_embed_max_size=384, pooled_dim=2048, context_dim=4096, qk_norm=True,
        x_block_self_attn_layers=tuple(range(13)),
    )
    cn = ControlNetConfig(hidden_size=2432, num_heads=38, num_layers=19, patch_size=2, in_channels=16,
                          pooled_dim=2048)
    with pytest.raises(ValueError, match=r"2432.*SD3\.5 Medium.*1536.*for SD3\.5 Large"):
        check_controlnet_fits(cn, medium)
    large = MMDiTConfig(
        patch_size=2, in_channels=16, out_channels=16, hidden_size=2432, depth=38, num_heads=38,
        pos_embed_max_size=192, pooled_dim=2048, context_dim=4096, qk_norm=True, x_block_self_attn_layers=(),
    )
    assert check_controlnet_fits(cn, large) == "8b"


def test_control_latent_of_the_wrong_size_is_refused(large, cn8b):
    x, cond, pooled, _, sigma = _inputs()
    with pytest.raises(ValueError, match="control latent"):
        controlnet_residuals(large, cn8b, x, sigma, pooled, cond[..., :-2], 1.0)
    with pytest.raises(ValueError, match="batch 3.*divisor"):
        controlnet_residuals(large, cn8b, x, sigma, pooled, cond.repeat(3, 1, 1, 1), 1.0)


def test_control_hint_window_is_a_fraction_of_the_steps(cn8b):
    cond = torch.zeros(1, 16, 8, 8)

    def active(**kw):
        hint = ControlHint(cn8b, cond, **kw)
        return [i for i in range(10) if hint.active(i, 10)]

    assert active() == list(range(10))
    assert active(start=0.2, end=0.5) == [2, 3, 4]  # start inclusive, end exclusive
    assert active(start=0.0, end=0.05) == [0]
    assert active(start=0.5, end=0.5) == []  # a window outside the run
    assert active(strength=0.0) == []
    with pytest.raises(ValueError, match="start"):
        ControlHint(cn8b, cond, start=0.6, end=0.3)


# ---------------------------------------------------------------------------------------------------------
# control image preparation
# ---------------------------------------------------------------------------------------------------------


def _load(name: str) -> tuple[Image.Image, torch.Tensor]:
    im = Image.open(os.path.join(IMAGES, f"{name}.png")).convert("RGB")
    return im, torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]


@pytest.mark.parametrize("kind", list(CONTROL_TYPES))
def test_prepare_control_image_matches_the_reference_scaling(kind):
    im, image = _load(kind)
    width, height = 256, 192
    # The reference: PIL LANCZOS on the file, /255, then the per-type scaling.
    ref = torch.from_numpy(np.asarray(im.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0)
    ref = ref.permute(2, 0, 1)[None]
    ref = ref * 255 * 0.5 + 0.5 if kind == "canny" else 2.0 * ref - 1.0
    out = prepare_control_image(image, width, height, kind)
    assert out.shape == (1, 3, height, width)
    assert torch.equal(out, ref)
    assert torch.equal(prepare_control_image(image, width, height, CONTROL_TYPES[kind]), ref)
    # The 2b path scales every type as 2x-1.
    two = prepare_control_image(image, width, height, kind, path="2b")
    assert torch.allclose(two, (ref - 0.5) / 127.5 * 2 - 1 if kind == "canny" else ref, atol=1e-5)


def test_prepare_keeps_size_and_float_precision_when_no_resize_is_needed():
    image = torch.rand(2, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    out = prepare_control_image(image, 48, 32, "blur")
    assert torch.equal(out, image.permute(0, 3, 1, 2) * 2.0 - 1.0)
    resized = prepare_control_image(image, 64, 48, "blur")
    assert resized.shape == (2, 3, 48, 64) and resized.min() >= -1 and resized.max() <= 1


def test_depth_png_is_near_dark_and_auto_inversion_gets_both_conventions_right():
    _, depth = _load("depth")
    # The shipped depth map: dark rocks and dancer in front, bright sky behind (the models' convention).
    assert not depth_near_is_bright(depth)
    as_given = prepare_control_image(depth, 256, 256, "depth")
    assert torch.equal(prepare_control_image(depth, 256, 256, "depth", invert="auto"), as_given)
    inverted = prepare_control_image(depth, 256, 256, "depth", invert=True)
    assert torch.allclose(inverted, -as_given, atol=1e-6)  # 2(1-x)-1 = -(2x-1)
    # A near-bright map (what Depth Anything / MiDaS nodes output) is flipped by "auto".
    # (At the file's own size, so no resampling rounds the two differently.)
    near_bright = 1.0 - depth
    assert depth_near_is_bright(near_bright)
    size = depth.shape[2], depth.shape[1]
    assert torch.allclose(
        prepare_control_image(near_bright, *size, "depth", invert="auto"),
        prepare_control_image(depth, *size, "depth"),
        atol=1e-6,
    )


def test_bad_control_images_are_refused_clearly():
    good = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*\(1, 32, 32, 4\)"):
        prepare_control_image(torch.rand(1, 32, 32, 4), 32, 32, "canny")
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        prepare_control_image(torch.rand(32, 32, 3), 32, 32, "canny")
    with pytest.raises(ValueError, match="width"):
        prepare_control_image(good, 30, 32, "canny")
    with pytest.raises(ValueError, match="height"):
        prepare_control_image(good, 32, 0, "canny")
    with pytest.raises(ValueError, match="blur, canny, depth"):
        prepare_control_image(good, 32, 32, "pose")
