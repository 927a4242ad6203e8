"""Masks: reading them from images, checks, resizing to the latent, the inpaint-encode preparation."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sd35_core.sampling.mask import (
    check_mask,
    differential_threshold,
    grow_mask,
    latent_mask,
    load_mask,
    mask_from_image,
    prepare_inpaint,
)
from sd35_core.sampling.schedule import comfy_sigma_table, sigmas_for


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---- reading masks ---------------------------------------------------------------------------------------


def test_a_grey_png_is_read_as_white_repaints(tmp_path):
    grey = ((np.arange(12 * 20).reshape(12, 20) * 7) % 256).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.shape == (1, 12, 20) and mask.dtype == torch.float32
    assert torch.equal(mask[0], torch.from_numpy(grey.astype(np.float32) / 255.0))


def test_an_rgb_mask_uses_its_grey_levels(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:5, 3:6] = 255
    Image.fromarray(rgb, "RGB").save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")[0]
    assert mask[2:5, 3:6].eq(1).all() and mask.sum() == 9


def test_transparency_is_the_repainted_part_as_in_comfyuis_load_image(tmp_path):
    rgba = np.full((8, 10, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[1:4, 2:7, 3] = 0  # erased in the mask editor: repaint
    rgba[5, 5, 3] = 64
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")[0]
    expected = 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0)
    assert torch.equal(mask, expected)


def test_an_opaque_rgba_image_falls_back_to_its_grey_levels():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, :3] = 255
    mask = mask_from_image(Image.fromarray(rgba, "RGBA"))[0]
    assert mask[0, 0] == 1 and mask.sum() == 1


def test_sixteen_bit_grey_keeps_its_precision(tmp_path):
    grey = np.array([[0, 1, 32768, 65535]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "m16.png")
    mask = load_mask(tmp_path / "m16.png")[0]
    torch.testing.assert_close(mask, torch.tensor([[0.0, 1 / 65535, 32768 / 65535, 1.0]]))


def test_empty_missing_and_non_image_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png: the file is empty"):
        load_mask(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="nope.png: no such file"):
        load_mask(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(ValueError, match="text.png: not a readable image"):
        load_mask(tmp_path / "text.png")


# ---- checks and the latent mask ----------------------------------------------------------------------------


def test_masks_of_comfyui_shapes_become_b_1_h_w():
    assert check_mask(torch.zeros(5, 6)).shape == (1, 1, 5, 6)
    assert check_mask(torch.zeros(2, 5, 6)).shape == (2, 1, 5, 6)
    assert check_mask(torch.zeros(2, 1, 5, 6)).shape == (2, 1, 5, 6)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.full((1, 8, 8), float("nan")), "NaN"),
        (torch.full((1, 8, 8), 1.5), r"expected values in 0..1"),
        (torch.zeros(1, 3, 8, 8), r"expected a MASK"),
        (torch.zeros(1, 0, 8), "empty"),
        ([[0.0]], r"expected a MASK"),
    ],
)
def test_bad_masks_are_refused_with_what_was_expected(mask, message):
    with pytest.raises(ValueError, match=message):
        check_mask(mask, "noise_mask")


def test_latent_mask_resizes_bilinearly_and_broadcasts_channels_and_batch():
    mask = _rand(1, 64, 48)
    out = latent_mask(mask, (3, 16, 8, 6))
    assert out.shape == (3, 16, 8, 6)
    # Bilinear without corner alignment at an exact factor 8 averages the two middle pixels of each 8x8 cell.
    m = mask[0]
    expected = (m[3::8, 3::8] + m[4::8, 3::8] + m[3::8, 4::8] + m[4::8, 4::8]) / 4
    torch.testing.assert_close(out[1, 7], expected, rtol=0, atol=1e-6)
    assert torch.equal(out[0], out[2])


def test_a_mask_on_the_16_pixel_grid_stays_hard_in_the_latent():
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 32:64] = 1
    out = latent_mask(mask, (1, 16, 8, 8))[0, 0]
    expected = torch.zeros(8, 8)
    expected[2:6, 4:8] = 1
    assert torch.equal(out, expected)


def test_a_mask_batch_must_be_one_or_the_latent_batch():
    assert latent_mask(torch.ones(2, 16, 16), (2, 16, 2, 2)).shape == (2, 16, 2, 2)
    with pytest.raises(ValueError, match=r"mask batch \(2\) must be 1 or the latent batch \(3\)"):
        latent_mask(torch.ones(2, 16, 16), (3, 16, 2, 2))


def test_a_mask_of_another_size_is_resized_with_a_note(caplog):
    with caplog.at_level(logging.INFO, logger="sd35_core.sampling.mask"):
        out = latent_mask(torch.ones(1, 30, 50), (1, 16, 4, 4))
    assert out.shape == (1, 16, 4, 4) and out.eq(1).all()
    assert "noise_mask of 50x30 resized to the 4x4 latent of a 32x32 image" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sd35_core.sampling.mask"):
        latent_mask(torch.ones(1, 32, 32), (1, 16, 4, 4))
        latent_mask(torch.ones(1, 4, 4), (1, 16, 4, 4))
    assert "resized" not in caplog.text  # the image's own size and the latent's size are the normal cases


# ---- grow and the inpaint-encode preparation -------------------------------------------------------------


@pytest.mark.parametrize("by", [1, 2, 3, 6, 7])
def test_grow_makes_a_box_around_each_masked_pixel(by):
    mask = torch.zeros(1, 1, 20, 20)
    mask[0, 0, 9, 11] = 0.6  # rounds to 1
    mask[0, 0, 2, 2] = 0.4  # rounds to 0
    grown = grow_mask(mask, by)[0, 0]
    # A box of `by` pixels; when `by` is even the extra pixel goes down and right (ComfyUI's padding).
    lo = (by - 1) // 2
    expected = torch.zeros(20, 20)
    expected[9 - lo : 9 - lo + by, 11 - lo : 11 - lo + by] = 1
    assert torch.equal(grown, expected)


def test_grow_zero_keeps_a_soft_mask_and_bad_amounts_are_refused():
    mask = _rand(1, 1, 6, 6)
    assert torch.equal(grow_mask(mask, 0), mask)
    with pytest.raises(ValueError, match="grow_mask_by"):
        grow_mask(mask, -1)


def test_prepare_inpaint_greys_the_masked_pixels_and_crops_to_the_patch_grid():
    pixels = _rand(2, 37, 50, 3)
    mask = torch.zeros(1, 37, 50)
    mask[:, 10:20, 5:30] = 1
    mask[:, 25, 40] = 0.3  # soft: rounds to 0, the pixel is kept
    prepared = prepare_inpaint(pixels, mask, grow_by=0)
    # 37x50 -> 32x48, centred: rows 2..33, columns 1..48
    assert prepared.pixels.shape == (2, 32, 48, 3)
    assert prepared.noise_mask.shape == (1, 1, 32, 48)
    crop = pixels[:, 2:34, 1:49]
    inside = torch.zeros(32, 48, dtype=torch.bool)
    inside[8:18, 4:29] = True
    assert prepared.pixels[:, inside].eq(0.5).all()
    assert torch.equal(prepared.pixels[:, ~inside], crop[:, ~inside])
    assert torch.equal(prepared.noise_mask[0, 0].bool(), inside)


def test_prepare_inpaint_resizes_a_mask_of_another_size_and_grows_it():
    pixels = _rand(1, 32, 32, 3)
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:8, 4:8] = 1
    prepared = prepare_inpaint(pixels, mask, grow_by=3)
    assert prepared.noise_mask.shape == (1, 1, 32, 32)
    nm = prepared.noise_mask[0, 0]
    assert set(nm.unique().tolist()) <= {0.0, 1.0}
    grey = prepared.pixels[0].eq(0.5).all(-1)
    # The grown mask covers the greyed pixels and one more pixel around them.
    assert nm[grey].eq(1).all() and nm.sum() > grey.sum()


def test_prepare_inpaint_refuses_a_mismatched_batch():
    with pytest.raises(ValueError, match=r"mask batch \(2\) must be 1 or the image batch \(3\)"):
        prepare_inpaint(_rand(3, 16, 16, 3), torch.zeros(2, 16, 16), 0)


# ---- the differential rule's threshold --------------------------------------------------------------------


def test_the_differential_threshold_falls_from_one_to_the_smallest_sigma():
    sigmas = sigmas_for("normal", 8, 3.0, 1.0)
    thresholds = [float(differential_threshold(s[None], sigmas, 3.0)) for s in sigmas[:-1]]
    assert thresholds[0] == 1.0
    assert all(a > b for a, b in zip(thresholds, thresholds[1:], strict=False))
    sigma_min = float(comfy_sigma_table(3.0)[0])
    last = float(sigmas[-2])
    assert thresholds[-1] == pytest.approx((last - sigma_min) / (float(sigmas[0]) - sigma_min), rel=1e-5)
