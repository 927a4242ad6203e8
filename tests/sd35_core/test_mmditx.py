"""MMDiT-X: shape-derived configs, parity with diffusers' SD3Transformer2DModel, the embed/run_blocks/unembed
split, skip-layer and block-residual semantics, dtypes, size limits and loading onto the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from bench.diffusers_convert import to_diffusers  # our (official) keys -> diffusers'; every key used
from sd35_core.errors import CheckpointError
from sd35_core.loading.checkpoint import DTypePolicy, load_weights, open_safetensors
from sd35_core.loading.tiny import randomize_, save_state
from sd35_core.models import ops
from sd35_core.models.mmditx import JointState, MMDiTConfig, MMDiTX

_COMMON = dict(
    patch_size=2,
    in_channels=16,
    out_channels=16,
    hidden_size=128,
    num_heads=2,
    pos_embed_max_size=32,
    pooled_dim=192,
    context_dim=256,
)
CONFIGS = {
    "sd3_medium": MMDiTConfig(**_COMMON, depth=4, qk_norm=False, x_block_self_attn_layers=()),
    "sd3.5_large": MMDiTConfig(**_COMMON, depth=4, qk_norm=True, x_block_self_attn_layers=()),
    "sd3.5_medium": MMDiTConfig(**_COMMON, depth=10, qk_norm=True, x_block_self_attn_layers=(0, 1, 2, 3, 4)),
}


def _diffusers_model(cfg: MMDiTConfig) -> SD3Transformer2DModel:
    # sample_size = grid * patch makes diffusers' sin-cos grid unscaled, as in the reference.
    return SD3Transformer2DModel(
        sample_size=cfg.pos_embed_max_size * cfg.patch_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.x_block_self_attn_layers,
        qk_norm="rms_norm" if cfg.qk_norm else None,
    ).eval()


def _model(name: str, seed: int = 0) -> MMDiTX:
    cfg = CONFIGS[name]
    # Inference mode, as the loader leaves a model; CPU kernels differ in the last bit with grad-tracked weights.
    model = randomize_(MMDiTX(cfg), seed).requires_grad_(False).eval()
    with torch.no_grad():
        # The real 2D sin-cos grid, as diffusers computes it, so both implementations share it.
        model.pos_embed.copy_(_diffusers_model(cfg).pos_embed.pos_embed)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request) -> MMDiTX:
    return _model(request.param)


def _inputs(cfg: MMDiTConfig, hw=(8, 8), batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=gen)
    t = torch.linspace(900.0, 150.0, batch)
    context = torch.randn(batch, 5, cfg.context_dim, generator=gen)
    y = torch.randn(batch, cfg.pooled_dim, generator=gen)
    return x, t, context, y


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-4) -> None:
    err = (ours - theirs).abs().max().item()
    assert err <= tol * max(1.0, theirs.abs().max().item()), err


# --- configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_derives_from_shapes(name):
    cfg = CONFIGS[name]
    model = MMDiTX(cfg, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    derived = MMDiTConfig.from_shapes(shapes)
    assert derived == cfg
    assert derived.variant == name
    assert shapes["pos_embed"] == (1, cfg.pos_embed_max_size**2, cfg.hidden_size)
    assert derived.max_image_size == cfg.pos_embed_max_size * cfg.patch_size * 8


def test_config_reads_depth_heads_attn2_and_widths_from_keys():
    shapes = {k: tuple(v.shape) for k, v in MMDiTX(CONFIGS["sd3.5_medium"], device="meta").state_dict().items()}
    cfg = MMDiTConfig.from_shapes(shapes)
    assert (cfg.depth, cfg.num_heads, cfg.hidden_size) == (10, 2, 128)
    assert cfg.x_block_self_attn_layers == (0, 1, 2, 3, 4) and cfg.qk_norm
    assert (cfg.pooled_dim, cfg.context_dim, cfg.mlp_ratio) == (192, 256, 4.0)
    # The last block's context stream is pre-only: attention inputs and a 2-way modulation, nothing else.
    assert shapes["joint_blocks.9.context_block.adaLN_modulation.1.weight"] == (2 * 128, 128)
    assert not any(
        k.startswith(("joint_blocks.9.context_block.mlp", "joint_blocks.9.context_block.attn.proj")) for k in shapes
    )
    assert shapes["joint_blocks.4.x_block.adaLN_modulation.1.weight"] == (9 * 128, 128)
    assert shapes["joint_blocks.5.x_block.adaLN_modulation.1.weight"] == (6 * 128, 128)
    without = {k: v for k, v in shapes.items() if not k.startswith("joint_blocks.0.context_block.attn.ln_")}
    assert not MMDiTConfig.from_shapes(without).qk_norm
    with pytest.raises(CheckpointError, match="y_embedder.mlp.0.weight"):
        MMDiTConfig.from_shapes({k: v for k, v in shapes.items() if not k.startswith("y_embedder")})


# --- parity with diffusers --------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(8, 8), (12, 8)])
def test_matches_diffusers(model, hw):
    cfg = model.config
    ref = _diffusers_model(cfg)
    ref.load_state_dict(to_diffusers(model.state_dict(), cfg), strict=True)
    x, t, context, y = _inputs(cfg, hw)
    with torch.no_grad():
        ours = model(x, t, context, y)
        theirs = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t).sample
        assert ours.dtype == torch.float32 and ours.shape == x.shape
        assert_close(ours, theirs)
        # Skipped blocks are left out entirely, in both implementations.
        skip = (1, cfg.depth - 2)
        assert_close(
            model(x, t, context, y, skip_layers=skip),
            ref(x, context, y, t, skip_layers=list(skip)).sample,
        )


# --- the embed / run_blocks / unembed split -------------------------------------------------------------


def test_split_equals_forward(model):
    x, t, context, y = _inputs(model.config)
    with torch.no_grad():
        full = model(x, t, context, y)
        state = model.embed(x, t, context, y)
        middle = model.config.depth // 2
        state = model.run_blocks(model.run_blocks(state, 0, middle), middle)
        assert state.context is None  # the last block's context stream is pre-only
        assert torch.equal(model.unembed(state), full)


def test_state_select_forks_a_batch_half(model):
    x, t, context, y = _inputs(model.config)
    with torch.no_grad():
        prefix = model.run_blocks(model.embed(x, t, context, y), 0, 2)
        first = model.unembed(model.run_blocks(prefix.select(slice(0, 1)), 2))
        alone = model(x[:1], t[:1], context[:1], y[:1])
    assert isinstance(prefix, JointState) and prefix.select(slice(0, 1)).x.shape[0] == 1
    assert_close(first, alone, tol=1e-6)


def test_skip_layers_equals_running_without_that_block(model):
    x, t, context, y = _inputs(model.config)
    k = model.config.depth // 2
    with torch.no_grad():
        state = model.embed(x, t, context, y)
        for i in range(model.config.depth):
            if i != k:
                state = model.run_blocks(state, i, i + 1)
        manual = model.unembed(state)
        skipped = model(x, t, context, y, skip_layers=[k])
        assert torch.equal(skipped, manual)
        assert not torch.allclose(skipped, model(x, t, context, y))


def test_block_residuals(model):
    cfg = model.config
    x, t, context, y = _inputs(cfg)
    tokens = (x.shape[-2] // cfg.patch_size) * (x.shape[-1] // cfg.patch_size)
    gen = torch.Generator().manual_seed(5)
    residual = torch.randn(x.shape[0], tokens, cfg.hidden_size, generator=gen)
    k = 1
    only_k = [None] * cfg.depth
    only_k[k] = residual
    with torch.no_grad():
        plain = model(x, t, context, y)
        zeros = [torch.zeros_like(residual)] * cfg.depth
        assert torch.equal(model(x, t, context, y, block_residuals=zeros), plain)
        # Residual i is added to the image tokens right after block i.
        state = model.run_blocks(model.embed(x, t, context, y), 0, k + 1)
        state.x = state.x + residual
        expected = model.unembed(model.run_blocks(state, k + 1))
        assert torch.equal(model(x, t, context, y, block_residuals=only_k), expected)
        assert not torch.allclose(expected, plain)
        # A skipped block gets no residual either.
        skipped = model(x, t, context, y, skip_layers=[k])
        assert torch.equal(model(x, t, context, y, skip_layers=[k], block_residuals=only_k), skipped)
        with pytest.raises(ValueError, match=f"expected {cfg.depth} entries"):
            model(x, t, context, y, block_residuals=only_k[:-1])


# --- dtypes -----------------------------------------------------------------------------------------


def test_bf16_close_to_fp32(model):
    x, t, context, y = _inputs(model.config)
    half = MMDiTX(model.config, dtype=torch.bfloat16).requires_grad_(False)
    half.load_state_dict(model.state_dict())
    assert half.compute_dtype == torch.bfloat16
    with torch.no_grad():
        full = model(x, t, context, y)
        low = half(x, t, context, y)
        assert low.dtype == torch.float32
        assert (low - full).abs().max() <= 0.05 * full.abs().max()
        # fp32-stored weights computing in bf16 cast exactly as bf16-stored ones.
        model.compute_dtype = torch.bfloat16
        try:
            assert torch.equal(model(x, t, context, y), low)
        finally:
            model.compute_dtype = None
    assert model.compute_dtype == torch.float32


def test_fp8_weights_compute_in_bf16():
    model = _model("sd3.5_large")
    fp8 = MMDiTX(model.config, dtype=torch.bfloat16).requires_grad_(False)
    fp8.load_state_dict(model.state_dict())
    for m in fp8.modules():
        if isinstance(m, ops.Linear):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    assert fp8.context_embedder.weight.dtype == torch.float8_e4m3fn
    assert fp8.compute_dtype == torch.bfloat16
    x, t, context, y = _inputs(model.config)
    with torch.no_grad():
        full, low = model(x, t, context, y), fp8(x, t, context, y)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().max() <= 0.25 * full.abs().max()


# --- sizes ------------------------------------------------------------------------------------------


def test_too_large_image_raises_value_error_naming_the_limit():
    model = _model("sd3_medium")
    cfg = model.config
    largest = cfg.max_image_size
    assert largest == 512
    cfg.check_image_size(largest, largest)
    with pytest.raises(ValueError, match=f"{largest}x{largest} pixels"):
        cfg.check_image_size(largest + 16, 256)
    x, t, context, y = _inputs(cfg, hw=(8, largest // 8 + 2))
    with pytest.raises(ValueError, match=f"at most {largest}x{largest}"):
        model(x, t, context, y)
    x, t, context, y = _inputs(cfg, hw=(8, 7))
    with pytest.raises(ValueError, match="divisible by the patch size 2"):
        model(x, t, context, y)


def test_full_grid_and_non_square_sizes_run():
    model = _model("sd3.5_large")
    side = model.config.pos_embed_max_size * model.config.patch_size
    for hw in ((side, side), (side, 4), (6, side)):
        x, t, context, y = _inputs(model.config, hw=hw, batch=1)
        with torch.no_grad():
            assert model(x, t, context, y).shape == x.shape


# --- construction and loading -----------------------------------------------------------------------


def test_builds_on_meta_and_loads_from_a_file(tmp_path):
    model = _model("sd3.5_medium")
    path = save_state(tmp_path / "mmdit.safetensors", {"model.diffusion_model.": model.state_dict()})
    file = open_safetensors(path)
    prefix = "model.diffusion_model."
    meta = MMDiTX(MMDiTConfig.from_shapes(file.shapes(prefix)), device="meta")
    assert all(p.is_meta for p in meta.parameters()) and meta.pos_embed.is_meta
    loaded = load_weights(meta, file, prefix, DTypePolicy())
    assert not loaded.pos_embed.is_meta
    assert torch.equal(loaded.pos_embed, model.pos_embed)
    x, t, context, y = _inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context, y), model(x, t, context, y))
