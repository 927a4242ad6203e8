import numpy as np

from sd35_train.analysis import classify_kind, read_image
from sd35_train.data import COLORS, render, spec_for


def test_the_renderers_own_pictures_are_read_back_exactly():
    for i in range(600):
        spec = spec_for(11, i)
        r = read_image(render(spec))
        assert (r.color, r.shape, r.position, r.background) == (spec.color, spec.shape, spec.position,
                                                                spec.background), (i, spec, r)


def test_a_plain_picture_has_a_background_and_no_shape():
    img = np.zeros((64, 64, 3), np.uint8) + np.array(COLORS["green"], np.uint8)
    r = read_image(img)
    assert r.background == "green" and (r.color, r.shape, r.position) == (None, None, None)


def test_kinds_by_bottom_share_and_corners():
    assert classify_kind(1.0, 0.5, 1.0) == "square"
    assert classify_kind(0.78, 0.5, 0.1) == "circle"
    assert classify_kind(0.5, 0.74, 0.5) == "triangle"


def test_stray_pixels_away_from_the_shape_do_not_count():
    spec = spec_for(11, 0)
    img = render(spec).copy()
    far = (0, 0) if spec.position != "left" else (0, 63)
    img[far[0] + 1 : far[0] + 3, far[1] : far[1] + 2] = (255 - np.array(spec.background_rgb)).astype(np.uint8)
    r = read_image(img)
    assert (r.shape, r.position) == (spec.shape, spec.position)
