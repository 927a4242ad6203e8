"""The independent shape reader (two-means binarisation, fill ratio, IoU) and the VAE reconstruction check."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sd35_train.config import MICRO
from sd35_train.data import SHAPES, random_spec, render, render_mask, spec_for
from sd35_train.recipe import ReconstructionError, check_reconstruction
from sd35_train.recon import (
    FILL_REFERENCE,
    binarise,
    fill_class,
    fill_ratio,
    iou,
    read_independent,
    reconstruct,
    reconstruction_check,
)
from sd35_train.vae_train import new_vae


def test_the_renderers_pictures_are_read_back_by_fill_ratio_and_match_its_mask():
    ious = []
    for i in range(300):
        spec = spec_for(12, i)
        image, mask = render(spec), render_mask(spec)
        assert read_independent(image) == spec.shape, (i, spec, fill_ratio(binarise(image)))
        ious.append(iou(binarise(image), mask))
    # Only anti-aliased edge pixels may fall either way (an edge row exactly half covered is a tie: a small
    # square loses up to two rows of its 23).
    assert np.mean(ious) > 0.98 and min(ious) > 0.8, (np.mean(ious), min(ious))


def test_close_colours_are_still_told_apart():
    rng = __import__("random").Random(5)
    for shape in SHAPES:
        spec = random_spec(rng, color="orange", shape=shape, background="yellow")
        assert read_independent(render(spec)) == shape
        spec = random_spec(rng, color="black", shape=shape, background="purple")
        assert read_independent(render(spec)) == shape


def test_fill_ratio_follows_the_geometry_of_each_kind():
    yy, xx = np.mgrid[0:64, 0:64]
    box = (abs(yy - 30) <= 12) & (abs(xx - 33) <= 12)
    disc = (yy - 30.5) ** 2 + (xx - 33.5) ** 2 <= 20**2
    # upright triangle: apex at row 10, base at row 50, half-width growing linearly to 20
    tri = (yy >= 10) & (yy <= 50) & (abs(xx - 32) <= (yy - 10) * 20 / 40)
    assert fill_ratio(box) == 1.0 and fill_class(box) == "square"
    assert abs(fill_ratio(disc) - math.pi / 4) < 0.02 and fill_class(disc) == "circle"
    assert abs(fill_ratio(tri) - 0.5) < 0.04 and fill_class(tri) == "triangle"
    assert fill_ratio(np.zeros((8, 8), bool)) == 0.0 and fill_class(np.zeros((8, 8), bool)) is None
    # Rounding a square's corners (radius half its half side) moves it towards the circle.
    dy, dx = np.maximum(abs(yy - 30) - 6, 0), np.maximum(abs(xx - 33) - 6, 0)
    rounded = box & (dy**2 + dx**2 <= 6.5**2)
    assert fill_ratio(box) > fill_ratio(rounded) > FILL_REFERENCE["circle"]


def test_iou_of_masks():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert iou(a, a) == 1.0 and iou(a, b) == 4 / 12 and iou(a, ~a) == 0.0
    assert iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def _fake_vae(decode):
    """An object with the VAE's encoder/decoder/config surface: the latent is the picture itself."""
    return SimpleNamespace(encoder=lambda x: torch.cat([x, torch.zeros_like(x)], dim=1), decoder=decode,
                           config=SimpleNamespace(z_channels=3))


def test_a_perfect_autoencoder_keeps_every_class_and_scores_the_readers_own_iou():
    n = 24
    result = reconstruction_check(_fake_vae(lambda z: z), n=n, split=4)
    specs = [spec_for(4, i) for i in range(n)]
    expected_iou = np.mean([iou(binarise(render(s)), render_mask(s)) for s in specs])
    assert result["class_kept"] == result["class_kept_originals"] == 1.0
    assert result["mean_iou"] == round(float(expected_iou), 4) and result["images"] == n


def test_a_blurring_autoencoder_loses_corners_and_tips():
    def blur(z):  # only the 8 x 8 grid's averages survive, smoothly upsampled: soft blobs
        return F.interpolate(F.avg_pool2d(z, 8), scale_factor=8, mode="bilinear")

    sharp = reconstruction_check(_fake_vae(lambda z: z), n=48, split=4)
    soft = reconstruction_check(_fake_vae(blur), n=48, split=4)
    assert soft["class_kept"] < sharp["class_kept"] and soft["mean_iou"] < sharp["mean_iou"]
    kept = soft["class_kept_per_kind"]
    assert kept["circle"] == 1.0 and kept["square"] < 1.0 and kept["triangle"] < 1.0, kept


def test_reconstruct_runs_the_real_vae_at_the_mean():
    vae = new_vae(0).eval()
    images = np.stack([render(spec_for(4, i)) for i in range(3)])
    out = reconstruct(vae, images)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        direct = vae.decoder(vae.encoder(x)[:, :16])
    expected = ((direct.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert out.shape == images.shape and np.array_equal(out, expected)


def test_the_recipe_stops_on_a_vae_that_does_not_keep_the_shapes():
    vae = new_vae(0).eval()  # untrained: decodes grey mush
    strict = dataclasses.replace(MICRO, recon_images=12, recon_min_class_kept=0.97)
    with pytest.raises(ReconstructionError, match=r"keep their shape class.*needs 97%"):
        check_reconstruction(vae, strict)
    report = check_reconstruction(vae, dataclasses.replace(strict, recon_min_class_kept=0.0))
    assert report["class_kept"] < 0.97 and report["images"] == 12


def test_a_vae_that_keeps_the_shapes_passes_the_check():
    identity = _fake_vae(lambda z: z)
    report = check_reconstruction(identity, dataclasses.replace(MICRO, recon_images=12, recon_min_class_kept=0.97))
    assert report["class_kept"] == 1.0 and set(report["class_kept_per_kind"]) == set(SHAPES)


def test_render_mask_is_where_the_picture_is_more_shape_than_background():
    for i in range(60):
        spec = spec_for(4, i)
        image, mask = render(spec).astype(float), render_mask(spec)
        bg, fg = np.array(spec.background_rgb, float), np.array(spec.color_rgb, float)
        # Coverage of each pixel, from where its colour lies between the two (anti-aliased edges are mixtures).
        coverage = ((image - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        clear = np.abs(coverage - 0.5) > 0.02  # half-covered pixels may round either way
        assert np.array_equal(mask[clear], coverage[clear] > 0.5), (i, spec)
        assert 0 < mask.sum() < mask.size


def test_the_evaluator_scores_the_shape_by_both_readers():
    from sd35_train.evaluate import INDEPENDENT, score

    specs = [spec_for(6, i) for i in range(30)]
    images = [render(s) for s in specs]
    right = score(specs, images)
    assert right["shape"] == right[INDEPENDENT] == right["all"] == 1.0
    # The same pictures under specs naming another kind: both readers say so.
    swapped = [dataclasses.replace(s, shape=SHAPES[(SHAPES.index(s.shape) + 1) % 3]) for s in specs]
    wrong = score(swapped, images)
    assert wrong["shape"] == wrong[INDEPENDENT] == wrong["all"] == 0.0 and wrong["color"] == 1.0
    # Squares softened to blobs: the fill-ratio reader no longer calls them squares.
    squares = [s for s in specs if s.shape == "square"]
    blobs = [F.interpolate(F.avg_pool2d(torch.tensor(render(s)).permute(2, 0, 1)[None].float(), 8),
                           scale_factor=8, mode="bilinear")[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
             for s in squares]
    assert squares and score(squares, blobs)[INDEPENDENT] < 0.5
