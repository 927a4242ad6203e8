"""CONDITIONING -> CondEntry: ComfyUI's area, mask and strength options are honoured; every option the sampler
does not honour is refused by name with what to use instead (never dropped)."""

import pytest
import torch


@pytest.fixture(scope="module")
def to_entries(pack):
    return pack.nodes.conditioning.to_entries


def conditioning(**options):
    return [[torch.zeros(1, 4, 8), {"pooled_output": torch.zeros(1, 6), **options}]]


def test_area_mask_and_strength_options_reach_the_entry(to_entries):
    mask = torch.ones(1, 32, 32)
    (area,), _ = to_entries(conditioning(area=(8, 8, 0, 8), strength=0.5, set_area_to_bounds=False), "positive")
    assert area.area == (8, 8, 0, 8) and area.strength == 0.5 and area.mask is None
    (pct,), _ = to_entries(conditioning(area=("percentage", 0.5, 0.25, 0.0, 0.5)), "positive")
    assert pct.area == ("percentage", 0.5, 0.25, 0.0, 0.5)
    (masked,), _ = to_entries(conditioning(mask=mask, mask_strength=0.7, set_area_to_bounds=True), "positive")
    assert masked.mask is mask and masked.mask_strength == 0.7 and masked.set_area_to_bounds
    (plain,), _ = to_entries(conditioning(start_percent=0.2, end_percent=0.8), "negative")
    assert (plain.area, plain.mask, plain.start_percent, plain.end_percent) == (None, None, 0.2, 0.8)


@pytest.mark.parametrize("key, expected", [
    ("control", "use SD3.5 Apply ControlNet: it loads the same files"),
    ("gligen", "GLIGEN"),
    ("hooks", "hook nodes"),
    ("clip_start_percent", "hook nodes"),
    ("default", "Conditioning (Combine)"),
    ("guidance", "not an option SD3 sampling reads"),
])
def test_options_the_sampler_does_not_honour_are_refused_by_name(to_entries, key, expected):
    with pytest.raises(ValueError) as err:
        to_entries(conditioning(**{key: object()}), "positive")
    message = str(err.value)
    assert f"'{key}'" in message and expected in message and "positive[0]" in message
    assert message.startswith("SD3.5 Sampler:")


def test_unset_and_inert_options_pass(to_entries):
    to_entries(conditioning(control=None, hooks=None, attention_mask=torch.ones(1, 4)), "positive")


def test_a_mask_that_is_not_a_mask_is_refused(to_entries):
    with pytest.raises(ValueError, match=r"positive\[0\] mask: expected a MASK"):
        to_entries(conditioning(mask=torch.ones(1, 1, 1, 8)), "positive")
