"""SD3.5 Checkpoint Loader offers a diffusers model folder found in the checkpoint folders and loads it whole."""

import json

import torch

from ..sd35_core.loading.test_diffusers_layout import write_transformer, write_vae


def test_a_diffusers_folder_is_listed_by_name_and_loads_its_transformer_and_vae(run_node, node_classes,
                                                                                tmp_path, monkeypatch):
    from sd35_core.loading import loader, tiny

    folder = tmp_path / "diffusion_models" / "sd35-large-diffusers"
    write_transformer(folder / "transformer", "sd3.5_large")
    write_vae(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (tmp_path / "checkpoints" / "not-a-model").mkdir(parents=True)
    (tmp_path / "checkpoints" / "not-a-model" / "model_index.json").write_text("{}")  # no transformer/: not listed
    monkeypatch.setenv("SD35_MODELS_DIR", str(tmp_path))
    names = node_classes["SD35CheckpointLoader"].INPUT_TYPES()["required"]["ckpt_name"][0]
    assert names[-1] == "sd35-large-diffusers (diffusers folder)"
    assert not any("not-a-model" in n for n in names)
    model, clip, vae = run_node("SD35CheckpointLoader", ckpt_name=names[-1], weight_dtype="fp32")
    assert model.variant == "sd3.5_large" and clip is None and vae is not None
    expected = loader.load_checkpoint(tiny.write_checkpoint(tmp_path / "o.safetensors", "sd3.5_large"), "fp32").model
    for key, value in expected.mmdit.state_dict().items():
        assert torch.equal(model.mmdit.state_dict()[key], value), key
