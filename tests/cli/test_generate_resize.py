"""`sd35 generate --resize_mode crop|stretch|pad`: init and control images of another aspect ratio, and
the warning for a colour photo given to the depth ControlNet."""

import logging

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.cli.test_generate import run_json


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _latent(capsys, gen_args, tmp_path, tag, *extra):
    summary, err = run_json(capsys, gen_args("--prompt", "x", "--denoise", "0.5", "--postfix", f"_{tag}",
                                             "--save_latent", str(tmp_path / f"{tag}.safetensors"), *extra))
    return load_file(tmp_path / f"{tag}.safetensors")["latent"], err


def test_an_init_image_of_another_aspect_is_center_cropped_by_default_padded_or_stretched(capsys, gen_args,
                                                                                           tmp_path):
    wide = _picture(128, 48)  # the output is 64 x 48
    wide.save(tmp_path / "wide.png")
    wide.crop((32, 0, 96, 48)).save(tmp_path / "middle.png")
    cropped, err = _latent(capsys, gen_args, tmp_path, "crop", "--init_image", str(tmp_path / "wide.png"))
    assert f"note: --init_image {tmp_path / 'wide.png'}: 128x48 -> 64x48: center-cropped to 64x48" in err
    middle, err = _latent(capsys, gen_args, tmp_path, "middle", "--init_image", str(tmp_path / "middle.png"))
    assert torch.equal(cropped, middle) and "note: --init_image" not in err  # same aspect: no note

    padded_by_hand = Image.new("RGB", (64, 48))
    padded_by_hand.paste(wide.resize((64, 24), Image.LANCZOS), (0, 12))
    padded_by_hand.save(tmp_path / "padded.png")
    pad, err = _latent(capsys, gen_args, tmp_path, "pad", "--init_image", str(tmp_path / "wide.png"),
                       "--resize_mode", "pad")
    assert "resized to 64x24 and padded with black" in err
    assert torch.equal(pad, _latent(capsys, gen_args, tmp_path, "byhand", "--init_image",
                                    str(tmp_path / "padded.png"))[0])
    wide.resize((64, 48), Image.LANCZOS).save(tmp_path / "squashed.png")  # the reference's stretch
    stretch, err = _latent(capsys, gen_args, tmp_path, "stretch", "--init_image", str(tmp_path / "wide.png"),
                           "--resize_mode", "stretch")
    assert "stretched (aspect ratio not kept)" in err
    assert torch.equal(stretch, _latent(capsys, gen_args, tmp_path, "squashed", "--init_image",
                                        str(tmp_path / "squashed.png"))[0])


def test_a_control_image_of_another_aspect_is_cropped_and_a_colour_photo_for_depth_is_warned_about(
        capsys, caplog, gen_args, tmp_path, tiny_models):
    wide = _picture(128, 48, seed=1)
    wide.save(tmp_path / "photo.png")
    with caplog.at_level(logging.WARNING):  # the CLI prints WARNING records to stderr (LEVEL logger: message)
        summary, err = run_json(capsys, gen_args(
            "--prompt", "x", "--postfix", "_depth", "--controlnet_ckpt", tiny_models.controlnets["depth"],
            "--controlnet_cond_image", str(tmp_path / "photo.png"), "--controlnet_preprocess", "auto",
            model="sd3.5_large"))
    assert "128x48 -> 64x48: center-cropped to 64x48" in err
    assert any(r.levelname == "WARNING" and "does not look like a depth map: its three colour channels differ"
               in r.getMessage() for r in caplog.records)
    with Image.open(summary["control_image_file"]) as im:
        assert np.array_equal(np.asarray(im), np.asarray(wide.crop((32, 0, 96, 48))))
