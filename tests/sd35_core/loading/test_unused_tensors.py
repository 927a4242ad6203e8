"""Nothing in a user's file is silently ignored: a tensor no part reads fails the load with its name, unless it
is one of the named harmless extras or belongs to another part of the same file that another loader reads."""

import pytest
import torch
from safetensors.torch import load_file

from bench.gguf_write import write_gguf
from sd35_core.errors import CheckpointError
from sd35_core.loading import loader, tiny
from sd35_core.loading.checkpoint import write_safetensors
from sd35_core.loading.unused_tensors import HARMLESS_EXTRAS, is_harmless


def _with(src, dst, extra: dict[str, torch.Tensor], drop=()):
    state = load_file(src)
    for k in drop:
        state.pop(k)
    return write_safetensors(dst, {**state, **extra})


def test_an_unknown_tensor_in_a_checkpoint_is_refused_naming_it_and_the_files_parts(tmp_path):
    path = _with(tiny.write_checkpoint(tmp_path / "a.safetensors", "sd3.5_medium"), tmp_path / "b.safetensors",
                 {"model.diffusion_model.joint_blocks.0.x_block.attn.lora_hint.weight": torch.zeros(2, 2),
                  "conditioner.embedders.0.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError) as info:
        loader.load_checkpoint(path)
    message = str(info.value)
    assert "b.safetensors: expected every tensor to be read by the parts this pack loads; 2 would be ignored" in message
    assert "'conditioner.embedders.0.weight'" in message
    assert "'model.diffusion_model.joint_blocks.0.x_block.attn.lora_hint.weight'" in message
    assert "an SD3/SD3.5 diffusion model under 'model.diffusion_model.'" in message
    assert "a VAE under 'first_stage_model.'" in message and "1 tensors outside any part" in message


def test_a_lone_bundled_text_encoder_is_reported_not_dropped(tmp_path):
    full = tiny.write_checkpoint(tmp_path / "a.safetensors", "sd3.5_medium", text_encoders=True)
    state = load_file(full)
    path = write_safetensors(tmp_path / "b.safetensors",
                             {k: v for k, v in state.items() if not k.startswith("text_encoders.clip_g.")})
    with pytest.raises(CheckpointError, match=r"would be ignored: 'text_encoders\.clip_l\.transformer\..*CLIP-L under "
                                              r"'text_encoders\.clip_l\.transformer\.'"):
        loader.load_checkpoint(path)


def test_harmless_extras_load_and_each_is_named(tmp_path):
    assert all(isinstance(why, str) and why for why in HARMLESS_EXTRAS.values())
    full = tiny.write_checkpoint(tmp_path / "a.safetensors", "sd3.5_medium", text_encoders=True)
    t5 = load_file(full)["text_encoders.t5xxl.transformer.shared.weight"]
    extras = {"text_encoders.clip_l.logit_scale": torch.tensor(4.6),
              "text_encoders.clip_g.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
              "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight": t5}
    assert all(is_harmless(k) for k in extras)
    parts = loader.load_checkpoint(_with(full, tmp_path / "b.safetensors", extras))
    assert parts.text_encoders is not None and parts.text_encoders.t5 is not None
    assert not is_harmless("model.diffusion_model.logit_scale") and not is_harmless("encoder.embed_tokens.bias")


def test_a_vae_or_text_encoder_read_from_a_full_checkpoint_leaves_the_other_parts_to_their_loaders(tmp_path):
    full = tiny.write_checkpoint(tmp_path / "a.safetensors", "sd3.5_medium", text_encoders=True)
    assert loader.load_vae(full) is not None
    assert loader.load_text_encoder(full, "clip_g") is not None
    bad = _with(full, tmp_path / "b.safetensors", {"stray": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 would be ignored: 'stray'"):
        loader.load_vae(bad)


@pytest.mark.parametrize("role", ["clip_l", "clip_g", "t5xxl"])
def test_a_separate_text_encoder_with_an_unknown_tensor_is_refused(tmp_path, role):
    paths = tiny.write_text_encoders(tmp_path / "te")
    key = "encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" if role == "t5xxl" else "text_model.extra.weight"
    path = _with(paths[role], tmp_path / "b.safetensors", {key: torch.zeros(2)})
    with pytest.raises(CheckpointError, match=rf"b\.safetensors: .*1 would be ignored: '{key}'.*without a prefix"):
        loader.load_text_encoder(path, role)


def test_a_controlnet_with_an_unknown_tensor_is_refused(tmp_path):
    model = loader.load_checkpoint(tiny.write_checkpoint(tmp_path / "m.safetensors", "sd3.5_large",
                                                         bare=True)).model
    good = tiny.write_controlnet(tmp_path / "cn.safetensors")
    assert loader.load_controlnet(good, model).control_type == 1
    bad = _with(good, tmp_path / "bad.safetensors", {"controlnet_blocks.0.scale": torch.ones(1)})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*1 would be ignored: 'controlnet_blocks\.0\.scale'"):
        loader.load_controlnet(bad, model)


def test_a_gguf_file_with_an_unknown_tensor_is_refused(tmp_path):
    state = {k: v.half() for k, v in tiny.tiny_mmdit("sd3.5_medium").state_dict().items()}
    assert loader.load_checkpoint(write_gguf(tmp_path / "ok.gguf", state, "F16")).model is not None
    bad = write_gguf(tmp_path / "bad.gguf", {**state, "vae_hint.weight": torch.zeros(32, dtype=torch.float16)}, "F16")
    with pytest.raises(CheckpointError, match=r"bad\.gguf: .*1 would be ignored: 'vae_hint\.weight'"):
        loader.load_checkpoint(bad)
