"""The SigLIP vision tower and its preprocessing against transformers (SiglipVisionModel's hidden_states[-2],
SiglipImageProcessor) on tiny configs, the file layout ComfyUI's clip_vision folder holds, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from sd35_core.errors import CheckpointError
from sd35_core.image.siglip_input import encode_image, siglip_pixels
from sd35_core.loading.clip_vision import load_siglip_vision
from sd35_core.loading.tiny_ip_adapter import SIGLIP_TINY, write_siglip
from sd35_core.models.siglip import SiglipConfig, SiglipVisionTower


def _reference(path) -> SiglipVisionModel:
    c = SIGLIP_TINY
    ref = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=c.width, intermediate_size=c.mlp_width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
    )).eval()
    # the whole file, last layer, post-layernorm and head included, loads strictly into transformers' model
    ref.load_state_dict({k.removeprefix("vision_model."): v for k, v in load_file(path).items()}, strict=True)
    return ref


def _processor() -> SiglipImageProcessor:
    size = SIGLIP_TINY.image_size
    return SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def tower_file(tmp_path_factory) -> str:
    return write_siglip(tmp_path_factory.mktemp("clip_vision") / "sigclip_tiny.safetensors")


def test_config_from_shapes_and_heads_of_72(tower_file):
    tower = load_siglip_vision(tower_file, "fp32")
    assert tower.config == SIGLIP_TINY
    assert (tower.config.heads, tower.config.tokens) == (2, 16)
    assert len(tower.encoder.layers) == SIGLIP_TINY.layers - 1  # the last layer is never run
    full_size = {"embeddings.patch_embedding.weight": (1152, 3, 14, 14), "embeddings.position_embedding.weight":
                 (729, 1152), "encoder.layers.0.mlp.fc1.weight": (4304, 1152)}
    full_size.update({f"encoder.layers.{i}.layer_norm1.weight": (1152,) for i in range(27)})
    cfg = SiglipConfig.from_shapes(full_size)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.image_size, cfg.tokens) == (
        1152, 27, 16, 4304, 384, 729)


def test_tower_matches_transformers_hidden_states_minus_2(tower_file):
    tower, ref = load_siglip_vision(tower_file, "fp32"), _reference(tower_file)
    size = SIGLIP_TINY.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tower(pixels)
        theirs = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert ours.shape == (2, 16, 144)
    diff = (ours - theirs).abs().max().item()
    print("siglip max abs diff", diff)
    assert diff <= 1e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("hw", [(50, 70), (56, 56), (120, 33)])
def test_preprocessing_matches_siglip_image_processor(hw):
    pixels = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    theirs = _processor()(Image.fromarray(pixels), return_tensors="pt").pixel_values
    as_comfy_image = torch.from_numpy(pixels)[None].float() / 255.0
    ours = siglip_pixels(as_comfy_image, SIGLIP_TINY.image_size)
    assert ours.shape == theirs.shape == (1, 3, 56, 56)
    assert torch.equal(ours, theirs)
    assert torch.equal(siglip_pixels(Image.fromarray(pixels), SIGLIP_TINY.image_size), theirs)
    # RGBA and grey pictures: alpha dropped, grey repeated, as the processor's RGB conversion
    rgba = torch.cat([as_comfy_image, torch.ones_like(as_comfy_image[..., :1])], dim=-1)
    assert torch.equal(siglip_pixels(rgba, SIGLIP_TINY.image_size), theirs)


def test_encode_image_is_processor_then_tower(tower_file):
    tower, ref = load_siglip_vision(tower_file, "fp32"), _reference(tower_file)
    pictures = np.random.default_rng(5).integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    ours = encode_image(tower, torch.from_numpy(pictures).float() / 255.0)
    with torch.no_grad():
        pv = _processor()([Image.fromarray(p) for p in pictures], return_tensors="pt").pixel_values
        theirs = ref(pixel_values=pv, output_hidden_states=True).hidden_states[-2]
    assert ours.dtype == torch.float32 and ours.shape == (2, 16, 144)
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, theirs.abs().max().item())


def test_unknown_tensors_and_bad_files_are_named(tower_file, tmp_path):
    state = load_file(tower_file)
    extra = {"vision_model.encoder.layers.0.self_attn.rope.weight": torch.zeros(2)}
    save_file({**state, **extra}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="rope.weight"):
        load_siglip_vision(tmp_path / "x.safetensors")
    save_file({k: v for k, v in state.items() if "position_embedding" not in k}, tmp_path / "y.safetensors")
    with pytest.raises(CheckpointError, match="y.safetensors.*position_embedding"):
        load_siglip_vision(tmp_path / "y.safetensors")
    torch.save(state, tmp_path / "z.bin")
    with pytest.raises(CheckpointError, match="z.bin.*pickle"):
        load_siglip_vision(tmp_path / "z.bin")
    tower = SiglipVisionTower(SIGLIP_TINY)
    with pytest.raises(ValueError, match=r"SigLIP pixels: expected \[B, 3, 56, 56\]"):
        tower(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="image: expected an IMAGE"):
        siglip_pixels(torch.zeros(3, 8, 8), 56)
    with pytest.raises(ValueError, match="NaN"):
        siglip_pixels(torch.full((1, 8, 8, 3), float("nan")), 56)
