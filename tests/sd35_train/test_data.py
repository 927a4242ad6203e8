import re

import numpy as np
import pytest

from sd35_train.data import (
    ANCHORS,
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    TEMPLATE,
    all_captions,
    random_spec,
    render,
    spec_for,
)


def test_samples_are_a_function_of_split_seed_and_index():
    assert spec_for(0, 5) == spec_for(0, 5)
    assert np.array_equal(render(spec_for(0, 5)), render(spec_for(0, 5)))
    assert spec_for(0, 5) != spec_for(1, 5) and spec_for(0, 5) != spec_for(0, 6)


def test_pictures_are_64px_rgb_with_the_background_at_the_border_and_the_shape_at_its_anchor():
    for i in range(50):
        spec = spec_for(3, i)
        img = render(spec)
        assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img.dtype == np.uint8
        assert tuple(img[0, 0]) == spec.background_rgb
        cx, cy = (round(v) for v in spec.centre)
        assert tuple(img[cy, cx]) == spec.color_rgb
        ax, ay = ANCHORS[spec.position]
        assert abs(spec.centre[0] / IMAGE_SIZE - ax) <= 0.04 + 1e-9 and abs(spec.centre[1] / IMAGE_SIZE - ay) <= 0.04


def test_captions_follow_the_template_and_colours_never_repeat():
    words = "|".join(COLORS)
    shapes, positions = "|".join(SHAPES), "|".join(POSITIONS)
    pattern = re.compile(rf"^a ({words}) ({shapes}) on the ({positions}) of a ({words}) background$")
    for i in range(200):
        spec = spec_for(0, i)
        m = pattern.match(spec.caption())
        assert m is not None, spec.caption()
        assert m.groups() == (spec.color, spec.shape, spec.position, spec.background)
        assert spec.color != spec.background
        assert spec.caption(0) == TEMPLATE.format(color=spec.color, shape=spec.shape, position=spec.position,
                                                  background=spec.background)
        assert len({spec.caption(w) for w in range(3)}) == 3  # two rewordings besides the template


def test_every_combination_and_wording_is_a_known_caption():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 8 * 7 * 3 * 5 * 3
    assert {spec_for(0, i).caption(i % 3) for i in range(300)} <= set(captions)


def test_explicit_attributes_are_kept_and_equal_colours_refused():
    import random

    spec = random_spec(random.Random(1), color="red", shape="square", position="top", background="blue")
    assert (spec.color, spec.shape, spec.position, spec.background) == ("red", "square", "top", "blue")
    with pytest.raises(ValueError, match="background: must differ"):
        random_spec(random.Random(1), color="red", background="red")
