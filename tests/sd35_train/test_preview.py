"""The latent preview map fitted for a VAE trained here."""

import torch

from sd35_core.models.latent import latent_to_rgb_preview
from sd35_train.preview import fit_latent_preview


def test_the_fit_recovers_an_affine_map_from_latents_to_the_averaged_pictures():
    gen = torch.Generator().manual_seed(0)
    factors, bias = 0.05 * torch.randn(16, 3, generator=gen), torch.tensor([0.1, -0.2, 0.05])
    latents = torch.randn(40, 16, 4, 4, generator=gen)
    rgb = latents.permute(0, 2, 3, 1) @ factors + bias  # [N, 4, 4, 3]: one colour per latent position
    assert rgb.abs().max() < 1  # inside the picture's range: nothing clipped
    pixels = rgb.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # 8 x 8 pixels per latent position
    images = ((pixels + 1) * 127.5).round().to(torch.uint8)
    fitted = fit_latent_preview(latents, images)
    torch.testing.assert_close(torch.tensor(fitted.factors), factors, atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(fitted.bias), bias, atol=1e-3, rtol=0)
    preview = latent_to_rgb_preview(latents[0], fitted).to(torch.int16)
    assert (preview - images[0, ::8, ::8].to(torch.int16)).abs().max() <= 1  # the preview truncates, not rounds
