"""`sd35 generate --init_image IMG --mask MASK.png`: inpainting from the command line, on tiny checkpoints."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from sd35_cli.main import main

from .test_generate import _direct_parts, _pixels, run_json

W, H = 64, 48  # gen_args' size: a 8x6 latent


def _picture(path, mode="RGB"):
    rgb = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path)
    return path


def _expected(tiny_models, picture, mask, **settings):
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.sampling.pipeline import img2img
    from sd35_core.sampling.request import SampleRequest

    parts, text = _direct_parts(tiny_models, "sd3.5_medium")
    init = parts.vae.encode(_pixels(picture, W, H) * 2 - 1)
    request = SampleRequest(steps=4, cfg=3.0, sampler="euler", shift=3.0, seed=9, noise_mask=mask, **settings)
    latent = img2img(parts.model.mmdit, CondEntry(*text.encode("a boat")), CondEntry(*text.encode("")), request,
                     init_latent=init)
    return init, latent.float().cpu()


def _run(capsys, gen_args, tmp_path, *extra):
    out = tmp_path / "latent.safetensors"
    summary, err = run_json(capsys, gen_args("--prompt", "a boat", "--seed", "9", "--steps", "4", "--sampler",
                                             "euler", "--cfg", "3", "--shift", "3", "--save_latent", str(out),
                                             *extra))
    return summary, load_file(out)["latent"], err


def test_a_grey_mask_repaints_the_white_part_and_keeps_the_rest(capsys, gen_args, tmp_path, tiny_models):
    picture = _picture(tmp_path / "init.png")
    mask = np.zeros((24, 32), np.uint8)  # half the image size: resized to it
    mask[:, 16:] = 255  # the right half, on the 16-pixel grid of the 64x48 image
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    summary, latent, _ = _run(capsys, gen_args, tmp_path, "--init_image", str(picture), "--denoise", "1",
                              "--mask", str(tmp_path / "mask.png"))
    assert summary["settings"]["mask"] == {"file": str(tmp_path / "mask.png"), "grow": 0, "mode": "standard"}
    resized = F.interpolate(torch.from_numpy(mask / 255.0).float()[None, None], size=(H, W), mode="bilinear")
    init, expected = _expected(tiny_models, picture, resized, denoise=1.0)
    assert torch.equal(latent, expected)
    torch.testing.assert_close(latent[..., :4], init[..., :4], rtol=1e-5, atol=1e-5)  # the kept left half
    assert (latent[..., 4:] - init[..., 4:]).abs().max() > 0.1


def test_the_transparent_part_of_an_rgba_image_is_the_mask_and_grow_and_mode_apply(capsys, gen_args, tmp_path,
                                                                                  tiny_models):
    from sd35_core.sampling.mask import grow_mask, load_mask

    rgba = np.asarray(Image.open(_picture(tmp_path / "init.png", "RGBA"))).copy()
    rgba[10:30, 20:50, 3] = 0  # erased: repaint
    Image.fromarray(rgba, "RGBA").save(tmp_path / "painted.png")
    picture = tmp_path / "painted.png"
    _, latent, _ = _run(capsys, gen_args, tmp_path, "--init_image", str(picture), "--mask", str(picture),
                        "--grow_mask", "4", "--mask_mode", "differential", "--denoise", "0.75")
    mask = F.interpolate(load_mask(picture)[None], size=(H, W), mode="bilinear")
    _, expected = _expected(tiny_models, picture, grow_mask(mask, 4).round(), denoise=0.75,
                            mask_mode="differential")
    assert torch.equal(latent, expected)


def test_a_black_mask_returns_the_init_image_with_a_note(capsys, gen_args, tmp_path, tiny_models):
    picture = _picture(tmp_path / "init.png")
    Image.new("L", (W, H), 0).save(tmp_path / "black.png")
    _, latent, err = _run(capsys, gen_args, tmp_path, "--init_image", str(picture), "--mask",
                          str(tmp_path / "black.png"))
    assert "nothing to repaint" in err
    init, _ = _expected(tiny_models, picture, None)
    torch.testing.assert_close(latent, init, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--mask", "{tmp}/mask.png"), "--mask needs --init_image"),
        (("--init_image", "{tmp}/img.png", "--mask", "{tmp}/empty.png"), "empty.png: the file is empty"),
        (("--init_image", "{tmp}/img.png", "--mask", "{tmp}/text.png"), "text.png: not a readable image"),
        (("--init_image", "{tmp}/img.png", "--mask", "{tmp}/missing.png"), "--mask {tmp}/missing.png: no such file"),
        (("--init_image", "{tmp}/img.png", "--mask", "{tmp}/mask.png", "--grow_mask", "-2"), "--grow_mask -2"),
    ],
)
def test_bad_masks_give_one_clear_line(capsys, gen_args, tmp_path, change, message):
    Image.new("RGB", (W, H)).save(tmp_path / "img.png")
    Image.new("L", (W, H), 255).save(tmp_path / "mask.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    rc = main(gen_args("--prompt", "x", "--postfix", "_bad", *[c.format(tmp=tmp_path) for c in change]))
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert message.format(tmp=tmp_path) in err.split("sd35 generate: error:", 1)[1]
