import pytest
import torch

from sd35_core.latent import (
    LATENT_RGB_FACTORS,
    SD3_LATENT_SCALE,
    SD3_LATENT_SHIFT,
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
