"""The bundled tiny shapes model: found, loaded by the standard loader, drawing with its own tokenizers."""

import numpy as np
import pytest
import torch

from sd35_core.loading.loader import load_checkpoint, load_controlnet
from sd35_core.text.encoder import SD3TextEncoder
from sd35_core.text.tokenization import SD3Tokenizer, find_tokenizer_files
from sd35_train.bundled import tiny_shapes_checkpoint, tiny_shapes_controlnet, tiny_shapes_dir


def test_the_bundled_files_load_with_the_standard_loaders():
    parts = load_checkpoint(tiny_shapes_checkpoint())
    assert parts.model.variant == "sd3.5_medium"  # SD3.5 Medium's structure at toy size
    assert parts.vae is not None and parts.text_encoders is not None and parts.text_encoders.t5 is not None
    cn = load_controlnet(tiny_shapes_controlnet(), parts.model)
    assert cn.control_type_name == "canny"


def test_its_tokenizers_are_found_beside_it_before_any_others(tmp_path):
    clip_dir, t5_json = find_tokenizer_files(tmp_path, model_path=tiny_shapes_checkpoint())
    assert clip_dir.startswith(tiny_shapes_dir()) and t5_json.startswith(tiny_shapes_dir())


def test_foreign_tokenizers_are_refused_with_a_clear_message(tokenizer_dirs):
    te = load_checkpoint(tiny_shapes_checkpoint()).text_encoders
    with pytest.raises(ValueError, match="tokenizers: the CLIP tokenizer has 49408 tokens .* 'tokenizers' folder"):
        SD3TextEncoder(te.clip_l, te.clip_g, te.t5, SD3Tokenizer.from_files(*tokenizer_dirs))


def test_it_draws_the_asked_background():
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.sampling.pipeline import txt2img
    from sd35_core.sampling.request import SampleRequest
    from sd35_train.analysis import read_image

    path = tiny_shapes_checkpoint()
    parts = load_checkpoint(path)
    te = parts.text_encoders
    text = SD3TextEncoder(te.clip_l, te.clip_g, te.t5, SD3Tokenizer.from_files(*find_tokenizer_files(model_path=path)))
    pos, neg = text.encode("a red circle on the left of a blue background"), text.encode("")
    request = SampleRequest(steps=10, cfg=5.0, sampler="euler", shift=3.0, seed=1)
    latent = txt2img(parts.model.mmdit, CondEntry(*pos), CondEntry(*neg), request, width=64, height=64)
    image = ((parts.vae.decode(latent)[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    assert read_image(np.asarray(image)).background == "blue"


def test_its_own_latent_preview_map_shows_its_pictures_closer_than_sd3s_factors():
    from sd35_core.models.latent import SD3_PREVIEW, latent_to_rgb_preview, process_in
    from sd35_train.data import render
    from sd35_train.evaluate import eval_specs

    parts = load_checkpoint(tiny_shapes_checkpoint())
    assert parts.model.preview != SD3_PREVIEW
    errors = {"own": [], "sd3": []}
    for spec in eval_specs(12):
        pixels = torch.from_numpy(render(spec).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        latent = process_in(parts.vae.encode(pixels))
        target = torch.nn.functional.avg_pool2d(pixels, 8)[0].permute(1, 2, 0)  # what one latent position covers
        for name, preview in (("own", parts.model.preview), ("sd3", SD3_PREVIEW)):
            shown = latent_to_rgb_preview(latent, preview).float() / 127.5 - 1
            errors[name].append(float((shown - target).abs().mean()))
    assert sum(errors["own"]) < 0.8 * sum(errors["sd3"])
