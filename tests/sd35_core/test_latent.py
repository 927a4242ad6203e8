import json

import pytest
import torch

from sd35_core.models.latent import (
    LATENT_RGB_FACTORS,
    PACK_METADATA_KEY,
    SD3_LATENT_SCALE,
    SD3_LATENT_SHIFT,
    SD3_PREVIEW,
    LatentPreview,
    latent_to_rgb_preview,
    process_in,
    process_out,
)


def _latent(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_process_in_and_out_are_inverses():
    x = _latent(2, 16, 5, 7)
    torch.testing.assert_close(process_out(process_in(x)), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(process_in(process_out(x)), x, rtol=0, atol=1e-6)


def test_process_in_centres_on_the_shift_and_scales_deviations():
    shift = torch.full((1, 16, 2, 2), SD3_LATENT_SHIFT)
    assert process_in(shift).abs().max() < 1e-7
    torch.testing.assert_close(process_in(shift + 1.0), torch.full_like(shift, SD3_LATENT_SCALE))


def test_rgb_factors_map_every_latent_channel_to_rgb():
    assert len(LATENT_RGB_FACTORS) == 16
    assert all(len(row) == 3 for row in LATENT_RGB_FACTORS)
    assert torch.tensor(LATENT_RGB_FACTORS).abs().sum() > 0


def test_preview_is_one_uint8_rgb_pixel_per_latent_position():
    rgb = latent_to_rgb_preview(_latent(16, 6, 9))
    assert rgb.shape == (6, 9, 3)
    assert rgb.dtype == torch.uint8
    assert rgb.device.type == "cpu"


def test_preview_maps_zero_to_mid_grey_and_saturates():
    mid = latent_to_rgb_preview(torch.zeros(16, 2, 3))
    assert torch.all(mid == 127)  # (0 + 1) / 2 * 255 = 127.5, truncated as the reference does
    factors = torch.tensor(LATENT_RGB_FACTORS)
    # Pushing the latent along each colour's factor column drives that colour to full scale.
    for c in range(3):
        x = (100.0 * factors[:, c])[:, None, None].expand(16, 2, 2)
        assert torch.all(latent_to_rgb_preview(x)[..., c] == 255)
        assert torch.all(latent_to_rgb_preview(-x)[..., c] == 0)


def test_preview_of_a_batch_shows_its_first_image_and_accepts_any_float_dtype():
    batch = _latent(3, 16, 4, 5)
    assert torch.equal(latent_to_rgb_preview(batch), latent_to_rgb_preview(batch[0]))
    bf16 = batch[0].to(torch.bfloat16)
    assert torch.equal(latent_to_rgb_preview(bf16), latent_to_rgb_preview(bf16.float()))


def test_preview_rejects_latents_of_other_shapes():
    with pytest.raises(ValueError, match=r"\[16, h, w\]"):
        latent_to_rgb_preview(torch.zeros(4, 8, 8))


def _own_map() -> LatentPreview:
    return LatentPreview(tuple((0.01 * i, -0.02 * i, 0.5) for i in range(16)), (0.25, -0.5, 0.0))


def test_a_models_own_preview_map_applies_its_factors_and_bias():
    preview = _own_map()
    assert torch.all(latent_to_rgb_preview(torch.zeros(16, 2, 2), preview)
                     == torch.tensor([159, 63, 127], dtype=torch.uint8))  # the bias alone: (b + 1) / 2 * 255
    x = torch.ones(16, 1, 1)
    expected = torch.tensor(preview.factors).sum(0) + torch.tensor(preview.bias)
    assert torch.equal(latent_to_rgb_preview(x, preview)[0, 0],
                       ((expected + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8))


def test_a_preview_map_travels_in_the_packs_metadata_entry():
    preview = _own_map()
    metadata = {PACK_METADATA_KEY: json.dumps({"model": "x", "latent_preview": preview.to_json()})}
    assert LatentPreview.from_metadata(metadata, "m.safetensors") == preview
    assert LatentPreview.from_metadata({}, "m.safetensors") is None  # SD3's VAE: the default factors
    assert LatentPreview.from_metadata({PACK_METADATA_KEY: json.dumps({"model": "x"})}, "m.safetensors") is None
    assert SD3_PREVIEW.factors == LATENT_RGB_FACTORS and SD3_PREVIEW.bias == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("value, match", [
    ("{not json", "is not JSON"),
    (json.dumps({"latent_preview": {"factors": [[0.1, 0.2, 0.3]] * 15}}), "16 rows of 3 factors .* got \\[3, 3"),
    (json.dumps({"latent_preview": {"factors": [[0.1, 0.2]] * 16}}), "16 rows of 3 factors"),
    (json.dumps({"latent_preview": {"factors": [["a", 0, 0]] * 16}}), "field 'latent_preview': expected"),
    (json.dumps({"latent_preview": [1, 2, 3]}), "field 'latent_preview': expected"),
])
def test_a_malformed_preview_map_is_refused_naming_the_file_and_field(value, match):
    with pytest.raises(ValueError, match="m.safetensors: metadata 'sd35'.*" + match):
        LatentPreview.from_metadata({PACK_METADATA_KEY: value}, "m.safetensors")
