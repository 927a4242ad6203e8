"""Fitting an image into a frame of another aspect ratio: crop (ComfyUI ImageScale crop=center), stretch
(the reference), pad; and the control image prepared with each."""

import logging

import pytest
import torch

from sd35_core.image.control_image import prepare_control_image
from sd35_core.image.fit import RESIZE_MODES, fit_image


@pytest.mark.parametrize("source, frame", [((1000, 600), (64, 48)), ((600, 1000), (64, 48)), ((333, 777), (96, 32)),
                                           ((128, 48), (64, 48))])
def test_crop_keeps_the_middle_at_the_frames_aspect_and_pad_keeps_everything(source, frame):
    (sw, sh), (fw, fh) = source, frame
    crop = fit_image(source, frame, "crop")
    left, top, right, bottom = crop.crop
    assert left == sw - right and top == sh - bottom  # centred
    cw, ch = right - left, bottom - top
    assert abs(cw * fh - ch * fw) <= max(fw, fh)  # the frame's aspect, to the pixel
    assert crop.size == frame and crop.offset == (0, 0)
    pad = fit_image(source, frame, "pad")
    assert pad.crop == (0, 0, sw, sh) and (pad.size[0] == fw or pad.size[1] == fh)
    assert abs(pad.size[0] * sh - pad.size[1] * sw) <= max(sw, sh)  # the source's aspect
    assert pad.offset == ((fw - pad.size[0]) // 2, (fh - pad.size[1]) // 2)
    stretch = fit_image(source, frame, "stretch")
    assert stretch.crop == (0, 0, sw, sh) and stretch.size == frame
    assert crop.changes_aspect and "center-cropped" in crop.describe() and "padded" in pad.describe()


def test_at_the_frames_aspect_every_mode_is_a_plain_resize():
    fits = {m: fit_image((128, 96), (64, 48), m) for m in RESIZE_MODES}
    assert {(f.crop, f.size, f.offset) for f in fits.values()} == {((0, 0, 128, 96), (64, 48), (0, 0))}
    assert not fits["crop"].changes_aspect
    with pytest.raises(ValueError, match="resize mode: expected one of crop, stretch, pad"):
        fit_image((1, 1), (1, 1), "fill")


def test_control_image_modes_crop_the_sides_pad_with_black_or_stretch(caplog):
    # 96 x 32: a red band on the left and right thirds, green in the middle; the frame is 32 x 32.
    image = torch.zeros(1, 32, 96, 3)
    image[:, :, :32, 0] = image[:, :, 64:, 0] = 1.0
    image[:, :, 32:64, 1] = 1.0
    with caplog.at_level(logging.INFO, logger="sd35_core.image.control_image"):
        cropped = prepare_control_image(image, 32, 32, "blur", resize_mode="crop")
    assert torch.equal(cropped, prepare_control_image(image[:, :, 32:64], 32, 32, "blur"))  # just the middle
    assert any("96x32 -> 32x32: center-cropped to 32x32" in r.getMessage() for r in caplog.records)
    padded = prepare_control_image(image, 32, 32, "blur", resize_mode="pad")
    fit = fit_image((96, 32), (32, 32), "pad")
    x, y = fit.offset
    assert torch.equal(padded[:, :, :y], torch.full_like(padded[:, :, :y], -1.0))  # black bars (2x-1 of 0)
    assert torch.equal(padded[:, :, y + fit.size[1]:], torch.full_like(padded[:, :, y + fit.size[1]:], -1.0))
    assert padded[:, 0, y:y + fit.size[1]].mean() > 0  # the red sides are still in
    stretched = prepare_control_image(image, 32, 32, "blur", resize_mode="stretch")
    assert torch.equal(stretched, prepare_control_image(image, 32, 32, "blur"))  # the reference's default


def test_a_colour_photo_for_the_depth_controlnet_is_warned_about_and_a_grey_map_is_not(caplog):
    photo = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    grey = photo.mean(-1, keepdim=True).expand(1, 32, 32, 3)
    with caplog.at_level(logging.WARNING, logger="sd35_core.image.control_image"):
        prepare_control_image(grey, 32, 32, "depth")
        assert not caplog.records
        prepare_control_image(photo, 32, 32, "depth")
        prepare_control_image(photo, 32, 32, "canny")  # only the depth ControlNet reads channels as distance
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "does not look like a depth map: its three colour channels differ" in messages[0]
