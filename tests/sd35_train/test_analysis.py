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


def test_kinds_by_fill_and_bottom_share():
    assert classify_kind(1.0, 0.5) == "square"
    assert classify_kind(0.78, 0.5) == "circle"
    assert classify_kind(0.5, 0.74) == "triangle"
