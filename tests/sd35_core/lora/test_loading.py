"""Bad LoRA files get clear errors naming the file: another architecture, another SD3 size (shape
mismatch), no LoRA keys at all; partly matching files get one warning with the count and first names."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from sd35_core.loading.lora import LoraError, load_lora, read_lora
from sd35_core.loading.tiny import tiny_clip, tiny_mmdit


@pytest.fixture(scope="module")
def medium():
    return tiny_mmdit("sd3.5_medium", depth=4)


def _file(tmp_path, groups, name="lora.safetensors"):
    tensors = {}
    for n, (rows, cols) in groups.items():
        tensors[n + ".lora_down.weight"] = torch.randn(2, cols)
        tensors[n + ".lora_up.weight"] = torch.randn(rows, 2)
    path = str(tmp_path / name)
    save_file(tensors, path)
    return path


def test_sdxl_and_flux_loras_say_what_they_are(tmp_path, medium):
    sdxl = _file(tmp_path, {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640)},
                 "sdxl.safetensors")
    with pytest.raises(LoraError, match=r"sdxl\.safetensors.*SD1\.x/SDXL") as info:
        load_lora(sdxl, mmdit=medium)
    assert str(info.value).count("it looks like") == 1
    flux = _file(tmp_path, {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072)}, "flux.safetensors")
    with pytest.raises(LoraError, match=r"flux\.safetensors.*Flux"):
        load_lora(flux, mmdit=medium)


def test_a_large_lora_on_medium_is_a_shape_error(tmp_path, medium):
    large = _file(tmp_path, {"lora_unet_joint_blocks_0_x_block_attn_qkv": (3 * 2432, 2432)}, "large.safetensors")
    with pytest.raises(LoraError, match=r"large\.safetensors.*another model size"):
        load_lora(large, mmdit=medium)


def test_a_medium_attn2_lora_on_large_matches_nothing(tmp_path):
    large_shape = tiny_mmdit("sd3.5_large", depth=3)
    path = _file(tmp_path, {"transformer.transformer_blocks.0.attn2.to_q": (128, 128)})
    with pytest.raises(LoraError, match="another model size or layout"):
        load_lora(path, mmdit=large_shape)


def test_a_file_without_lora_keys(tmp_path, medium):
    path = str(tmp_path / "model.safetensors")
    save_file({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(LoraError, match=r"model\.safetensors: expected a LoRA file"):
        read_lora(path)


def test_partial_matches_give_one_warning_with_count_and_names(tmp_path, medium, caplog):
    path = _file(tmp_path, {"lora_unet_joint_blocks_0_x_block_attn_proj": (128, 128),
                            "lora_unet_joint_blocks_7_x_block_attn_proj": (128, 128),
                            "lora_unet_something_else": (4, 4)})
    with caplog.at_level(logging.WARNING, logger="sd35_core.loading.lora.loading"):
        lora = load_lora(path, mmdit=medium)
    assert list(lora.model.patches) == ["joint_blocks.0.x_block.attn.proj.weight"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 3" in warnings[0] and "lora_unet_joint_blocks_7_x_block_attn_proj" in warnings[0]


def test_text_encoder_modules_without_a_clip_are_skipped_not_errors(tmp_path, medium, caplog):
    path = _file(tmp_path, {"lora_unet_joint_blocks_0_x_block_attn_proj": (128, 128),
                            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (64, 64)})
    with caplog.at_level(logging.INFO, logger="sd35_core.loading.lora.loading"):
        lora = load_lora(path, mmdit=medium)
    assert lora.clip is None and len(lora.model) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    encoders = torch.nn.ModuleDict({"clip_l": tiny_clip("clip_l")})
    assert len(load_lora(path, mmdit=medium, text_encoders=encoders).clip) == 1


def test_an_oft_file_says_it_is_a_kind_that_is_not_applied(tmp_path, medium):
    path = str(tmp_path / "oft.safetensors")
    save_file({"lycoris_transformer_blocks_0_attn_to_q.oft_blocks": torch.zeros(4, 32, 32)}, path)
    with pytest.raises(LoraError, match=r"oft\.safetensors.*LyCORIS OFT file"):
        read_lora(path)
