"""Control-image preprocessors (torch, no OpenCV at run time) against OpenCV on the shipped ControlNet inputs."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sd35_core.image.preprocess import (
    BLUR_KERNEL,
    CANNY_HIGH,
    CANNY_LOW,
    blur,
    canny,
    depth_near_is_bright,
    gray8,
    normalize_depth,
)
from tests.shared import IMAGES

NAMES = ("canny", "blur", "depth")
SIZE = 256  # the shipped files are 1024 px; a quarter keeps the comparisons fast


def _image(name: str, size: int = SIZE) -> tuple[np.ndarray, torch.Tensor]:
    im = Image.open(os.path.join(IMAGES, f"{name}.png")).convert("RGB").resize((size, size), Image.LANCZOS)
    arr = np.array(im)
    return arr, torch.from_numpy(arr.astype(np.float32) / 255.0)[None]


def test_model_card_settings():
    # stabilityai/stable-diffusion-3.5-large-controlnet-canny / -blur model cards.
    assert (CANNY_LOW, CANNY_HIGH, BLUR_KERNEL) == (100, 200, 50)


@pytest.mark.parametrize("name", NAMES)
def test_gray_matches_opencv(name):
    arr, image = _image(name)
    ours = gray8(image)[0].numpy()
    theirs = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY).astype(np.int32)
    # OpenCV 4 and 5 round a few pixels differently; never by more than one level.
    assert np.abs(ours - theirs).max() <= 1
    assert (ours == theirs).mean() >= 0.99


@pytest.mark.parametrize("name", NAMES)
def test_canny_matches_opencv(name):
    arr, image = _image(name)
    edges = canny(image)
    assert edges.shape == (1, SIZE, SIZE, 3)
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(edges[..., 0], edges[..., 2])
    gray = gray8(image)[0].numpy().astype(np.uint8)
    theirs = cv2.Canny(gray, CANNY_LOW, CANNY_HIGH) > 0
    ours = edges[0, ..., 0].numpy() > 0
    agreement = (ours == theirs).mean()
    iou = (ours & theirs).sum() / max(1, (ours | theirs).sum())
    print(f"{name}: canny agreement with cv2.Canny {agreement:.6f}, edge IoU {iou:.6f}, {theirs.sum()} edge px")
    # Measured: identical edge maps (agreement 1.0) on all three shipped images.
    assert agreement >= 0.9999
    assert iou >= 0.999 or theirs.sum() == ours.sum() == 0


def test_canny_other_thresholds_and_batches_match_opencv():
    arr, image = _image("blur", 128)
    batch = torch.cat([image, image.flip(2)])
    for low, high in ((20, 60), (60, 20), (50.7, 120.2)):
        edges = canny(batch, low, high)
        for i in range(2):
            gray = gray8(batch[i : i + 1])[0].numpy().astype(np.uint8)
            theirs = cv2.Canny(gray, min(low, high), max(low, high)) > 0
            assert ((edges[i, ..., 0].numpy() > 0) == theirs).mean() >= 0.9999
    with pytest.raises(ValueError, match="non-negative"):
        canny(image, -1, 10)


@pytest.mark.parametrize("name", NAMES)
def test_blur_matches_opencv_gaussian_blur(name):
    arr, image = _image(name)
    ours = blur(image)[0].numpy()
    # The card's 50 px kernel is taken as 51 (Gaussian kernels are odd), sigma by OpenCV's rule.
    theirs = cv2.GaussianBlur(arr.astype(np.float32) / 255.0, (51, 51), 0)
    diff = np.abs(ours - theirs).max()
    print(f"{name}: blur max abs diff vs cv2.GaussianBlur {diff:.2e}")
    assert diff <= 1e-5
    assert torch.equal(blur(image, 50), blur(image, 51))


def test_blur_small_kernels_explicit_sigma_and_tiny_images():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 20, 30, 3, generator=gen)
    # OpenCV's fixed small kernels, an explicit sigma, and 41 > the image height (the reflection repeats).
    for kernel, sigma in ((3, None), (5, None), (9, None), (7, 2.5), (41, None)):
        ours = blur(image, kernel, sigma)
        for i in range(2):
            theirs = cv2.GaussianBlur(image[i].numpy(), (kernel, kernel), sigma or 0)
            assert np.abs(ours[i].numpy() - theirs).max() <= 1e-5
    assert torch.equal(blur(image, 1), image)
    with pytest.raises(ValueError, match="kernel"):
        blur(image, 0)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        blur(image[..., :1], 5)


def test_normalize_depth_stretches_each_map_to_full_range():
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 16, 24, generator=gen) * torch.tensor([3.0, 0.2]).view(2, 1, 1) + 5.0
    for form in (raw, raw[..., None], raw[..., None].expand(-1, -1, -1, 3)):
        out = normalize_depth(form)
        assert out.shape == (2, 16, 24, 3)
        assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2])
        flat = out[..., 0].flatten(1)
        assert torch.allclose(flat.min(1).values, torch.zeros(2)) and torch.allclose(flat.max(1).values, torch.ones(2))
        expected = (raw - raw.flatten(1).min(1).values.view(2, 1, 1)) / (
            raw.flatten(1).max(1).values - raw.flatten(1).min(1).values
        ).view(2, 1, 1)
        assert torch.allclose(out[..., 0], expected, atol=1e-6)
    assert torch.equal(normalize_depth(torch.full((1, 4, 4, 3), 0.7)), torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match="depth map"):
        normalize_depth(torch.rand(1, 4, 4, 2))


def test_depth_convention_guess_on_the_shipped_depth_map():
    _, depth = _image("depth")
    assert not depth_near_is_bright(depth)  # dark foreground, bright sky: already what the model takes
    assert depth_near_is_bright(1.0 - depth)  # what Depth Anything / MiDaS would draw
