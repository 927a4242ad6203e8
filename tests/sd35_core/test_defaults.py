import dataclasses
import json

import pytest

from sd35_core.sampling.defaults import DEFAULTS, Settings, defaults_for, defaults_json
from sd35_core.sampling.request import SkipLayerGuidance
from sd35_core.sampling.samplers import SAMPLERS
from sd35_core.sampling.schedule import SCHEDULES

# The reference's CONFIGS (sd3_infer.py), transcribed.
REFERENCE_CONFIGS = {
    "sd3_medium": {"shift": 1.0, "steps": 50, "cfg": 5.0, "sampler": "dpmpp_2m"},
    "sd3.5_medium": {
        "shift": 3.0,
        "steps": 50,
        "cfg": 5.0,
        "sampler": "dpmpp_2m",
        "skip_layer_config": {"scale": 2.5, "start": 0.01, "end": 0.20, "layers": [7, 8, 9], "cfg": 4.0},
    },
    "sd3.5_large": {"shift": 3.0, "steps": 40, "cfg": 4.5, "sampler": "dpmpp_2m"},
    "sd3.5_large_turbo": {"shift": 3.0, "cfg": 1.0, "steps": 4, "sampler": "euler"},
    "sd3.5_large_controlnet_blur": {"shift": 3.0, "steps": 60, "cfg": 3.5, "sampler": "euler"},
    "sd3.5_large_controlnet_canny": {"shift": 3.0, "steps": 60, "cfg": 3.5, "sampler": "euler"},
    "sd3.5_large_controlnet_depth": {"shift": 3.0, "steps": 60, "cfg": 3.5, "sampler": "euler"},
}


@pytest.mark.parametrize("variant", sorted(REFERENCE_CONFIGS))
def test_table_matches_the_reference_configs(variant):
    ref = REFERENCE_CONFIGS[variant]
    s = defaults_for(variant)
    assert (s.shift, s.steps, s.cfg, s.sampler, s.schedule, s.slg) == (
        ref["shift"], ref["steps"], ref["cfg"], ref["sampler"], "reference", None
    )
    with_slg = defaults_for(variant, slg=True)
    if "skip_layer_config" in ref:
        slg = ref["skip_layer_config"]
        # the intended cfg with SLG (DESIGN.md), not the one the reference's main() ends up using
        assert with_slg.cfg == slg["cfg"]
        assert with_slg.slg == SkipLayerGuidance(tuple(slg["layers"]), slg["scale"], slg["start"], slg["end"], "steps")
    else:
        assert with_slg == s


TINY_ROWS = {"tiny_shapes_sd35", "tiny_shapes_controlnet_canny"}  # the bundled model's own rows


def test_every_variant_is_in_the_table_and_usable():
    assert set(DEFAULTS) == set(REFERENCE_CONFIGS) | TINY_ROWS
    for d in DEFAULTS.values():
        assert d.sampler in SAMPLERS and d.schedule in SCHEDULES


def test_the_tiny_rows_fit_the_bundled_model():
    from sd35_core.loading.loader import load_checkpoint
    from sd35_train.bundled import tiny_shapes_checkpoint

    depth = load_checkpoint(tiny_shapes_checkpoint()).model.config.depth
    slg = defaults_for("tiny_shapes_sd35", slg=True).slg
    slg.check_depth(depth)
    assert defaults_for("tiny_shapes_controlnet_canny").slg is None


def test_entries_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS["sd3.5_large"].steps = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults_for("sd3.5_large").cfg = 1.0
    assert isinstance(defaults_for("sd3.5_large"), Settings)


def test_json_dump_round_trips_and_carries_the_choices():
    data = json.loads(json.dumps(defaults_json()))
    assert data["samplers"] == list(SAMPLERS)
    assert data["schedules"] == list(SCHEDULES)
    for name, d in DEFAULTS.items():
        entry = data["variants"][name]
        assert (entry["shift"], entry["steps"], entry["cfg"], entry["sampler"]) == (d.shift, d.steps, d.cfg, d.sampler)
    assert data["variants"]["sd3.5_medium"]["slg"]["layers"] == [7, 8, 9]
    assert data["variants"]["sd3.5_large"]["slg"] is None


def test_unknown_variant():
    with pytest.raises(ValueError, match="^variant: expected one of sd3_medium"):
        defaults_for("sdxl")
