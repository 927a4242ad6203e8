"""diffusers layouts load by key onto the official layout: transformer files, VAE files and whole model folders.

The diffusers files are written by diffusers itself: its single-file converters
(``convert_sd3_transformer_checkpoint_to_diffusers``, ``convert_ldm_vae_checkpoint``) turn a tiny official
checkpoint into diffusers' names, its models load them strictly and ``save_pretrained`` writes the folders. Each
must give what the official file gives.
"""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from bench.diffusers_convert import diffusers_model
from sd35_core.errors import CheckpointError
from sd35_core.loading import loader, tiny
from sd35_core.loading.mapped_file import MappedFile
from sd35_core.sampling.guidance import CondEntry
from sd35_core.sampling.pipeline import txt2img
from sd35_core.sampling.request import SampleRequest

SIZE = 32


def _latents(mmdit):
    g = torch.Generator().manual_seed(1)
    cfg = mmdit.config
    pos = CondEntry(torch.randn(1, 8, cfg.context_dim, generator=g), torch.randn(1, cfg.pooled_dim, generator=g))
    neg = CondEntry(torch.randn(1, 8, cfg.context_dim, generator=g), torch.randn(1, cfg.pooled_dim, generator=g))
    request = SampleRequest(steps=3, cfg=4.0, sampler="euler", shift=3.0, seed=7)
    with torch.no_grad():
        return txt2img(mmdit, pos, neg, request, width=SIZE, height=SIZE)


def write_transformer(folder, variant, seed=0, **save_kw) -> str:
    """The tiny official MMDiT converted by diffusers' converter and saved by ``save_pretrained``."""
    mmdit = tiny.tiny_mmdit(variant, seed)
    converted = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in mmdit.state_dict().items()})
    model = diffusers_model(mmdit.config)
    model.load_state_dict(converted, strict=True)
    model.save_pretrained(os.fspath(folder), **save_kw)
    return os.fspath(folder)


VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32, 32),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                  scaling_factor=1.5305, shift_factor=0.0609)


def write_vae(folder, seed=1) -> str:
    vae = tiny.tiny_vae(seed)
    converted = convert_ldm_vae_checkpoint({k: v.clone() for k, v in vae.state_dict().items()}, VAE_CONFIG)
    model = AutoencoderKL(**VAE_CONFIG)
    model.load_state_dict(converted, strict=True)
    model.save_pretrained(os.fspath(folder))
    return os.fspath(folder)


@pytest.mark.parametrize("variant", tiny.VARIANTS)
def test_a_diffusers_transformer_file_samples_as_the_official_file(tmp_path, variant):
    official = tiny.write_checkpoint(tmp_path / "official.safetensors", variant, bare=True)
    folder = write_transformer(tmp_path / "transformer", variant)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    ours = loader.load_checkpoint(path, "fp32").model
    expected = loader.load_checkpoint(official, "fp32").model
    assert ours.config == expected.config and ours.variant == variant
    assert torch.equal(_latents(ours.mmdit), _latents(expected.mmdit))


def test_the_map_reads_fused_and_swapped_tensors_without_a_second_copy(tmp_path):
    folder = write_transformer(tmp_path / "transformer", "sd3.5_medium")
    view = loader.open_model_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    assert isinstance(view, MappedFile)
    assert [p.key for p in view.sources("joint_blocks.0.x_block.attn2.qkv.weight")] == [
        f"transformer_blocks.0.attn2.to_{c}.weight" for c in "qkv"]
    last = tiny.mmdit_config("sd3.5_medium").depth - 1
    swapped = view.sources(f"joint_blocks.{last}.context_block.adaLN_modulation.1.weight")
    assert [p.rows for p in swapped] == [(128, 256), (0, 128)]
    assert view.sources("joint_blocks.0.context_block.adaLN_modulation.1.weight")[0].rows is None
    # A whole stored tensor is a zero-copy view of the mapped file.
    a, b = view.tensor("final_layer.linear.weight"), view.file.tensor("proj_out.weight")
    assert a.data_ptr() == b.data_ptr()


def test_a_diffusers_vae_file_decodes_as_the_official_vae(tmp_path):
    official = tiny.save_state(tmp_path / "vae.safetensors", {"": tiny.tiny_vae(1).state_dict()})
    folder = write_vae(tmp_path / "vae")
    ours = loader.load_vae(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "fp32")
    expected = loader.load_vae(official, "fp32")
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(ours.decode(latent), expected.decode(latent))
        assert torch.equal(ours.encode(image), expected.encode(image))


def _write_text_encoders(folder):
    for sub, role, seed in (("text_encoder", "clip_l", 2), ("text_encoder_2", "clip_g", 3)):
        cfg = tiny.clip_config(role)
        hf = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, max_position_embeddings=77,
            hidden_act=cfg.hidden_act, projection_dim=cfg.hidden_size))
        torch.manual_seed(seed)
        hf.save_pretrained(os.path.join(folder, sub))
    cfg = tiny.t5_config()
    T5EncoderModel(T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                            num_layers=cfg.num_layers, num_heads=cfg.num_heads, feed_forward_proj="gated-gelu",
                            is_encoder_decoder=False)).save_pretrained(os.path.join(folder, "text_encoder_3"))


def test_a_diffusers_model_folder_is_a_model_path_sharded_or_not(tmp_path):
    folder = tmp_path / "sd35"
    write_transformer(folder / "transformer", "sd3.5_large", max_shard_size="100KB")
    write_vae(folder / "vae")
    _write_text_encoders(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert any(n.endswith(".index.json") for n in os.listdir(folder / "transformer"))
    parts = loader.load_checkpoint(folder, "fp32")
    official = loader.load_checkpoint(tiny.write_checkpoint(tmp_path / "o.safetensors", "sd3.5_large"), "fp32")
    assert parts.model.variant == "sd3.5_large" and parts.model.path == os.fspath(folder)
    assert torch.equal(_latents(parts.model.mmdit), _latents(official.model.mmdit))
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(parts.vae.decode(latent), official.vae.decode(latent))
    assert parts.text_encoders is not None and parts.text_encoders.t5 is not None
    assert loader.checkpoint_parts(folder) == {p: "" for p in ("mmdit", "vae", "clip_l", "clip_g", "t5xxl")}


def test_a_folder_without_a_transformer_or_with_pickles_only_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: expected a diffusers SD3/SD3\.5 model folder"):
        loader.load_checkpoint(tmp_path / "empty")
    pickled = tmp_path / "pickled" / "transformer"
    pickled.mkdir(parents=True)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=r"transformer: expected the part's weights as \.safetensors; found only "
                                              r"diffusion_pytorch_model\.bin \(pickle"):
        loader.load_checkpoint(tmp_path / "pickled")


def test_an_unknown_key_in_a_diffusers_file_is_named_in_its_own_layout(tmp_path):
    from safetensors.torch import load_file

    from sd35_core.loading.checkpoint import write_safetensors

    folder = write_transformer(tmp_path / "transformer", "sd3_medium")
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    state["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(4, 128)
    bad = write_safetensors(tmp_path / "bad.safetensors", state)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*1 would be ignored: "
                                              r"'transformer_blocks\.0\.attn\.to_q\.lora_A\.weight'"):
        loader.load_checkpoint(bad)
