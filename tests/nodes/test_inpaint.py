"""Inpainting through the nodes: SD35 VAE Encode (for inpaint), and noise masks in SD35 Sampler."""

import pytest
import torch

SIZE = 32
LARGE = "tiny-sd3.5_large.safetensors"


@pytest.fixture
def vae(run_node):
    return run_node("SD35CheckpointLoader", ckpt_name=LARGE, weight_dtype="default")[2]


def _image(b=1, h=SIZE, w=SIZE, seed=1):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_encode_for_inpaint_greys_the_masked_pixels_and_attaches_the_grown_mask(run_node, vae):
    image = _image(h=SIZE + 5, w=SIZE + 3)
    mask = torch.zeros(1, SIZE + 5, SIZE + 3)  # LoadImage's MASK layout [B, H, W]
    mask[:, 10:20, 12:22] = 1.0
    (latent,) = run_node("SD35VAEEncodeForInpaint", pixels=image, vae=vae, mask=mask, grow_mask_by=4)
    assert latent["samples"].shape == (1, 16, SIZE // 8, SIZE // 8)
    noise_mask = latent["noise_mask"]
    assert noise_mask.shape == (1, 1, SIZE, SIZE)  # the cropped image's size, as ComfyUI's node returns it
    # Centre crop 37x35 -> 32x32 starts at row 2, column 1; the mask grows by 4 (one more down/right).
    expected = torch.zeros(SIZE, SIZE)
    expected[8 - 1 : 18 + 2, 11 - 1 : 21 + 2] = 1
    assert torch.equal(noise_mask[0, 0], expected)
    # The latent is the plain encode of the image with the (ungrown) masked pixels set to grey.
    grey = image[:, 2 : 2 + SIZE, 1 : 1 + SIZE].clone()
    grey[:, 8:18, 11:21] = 0.5
    (plain,) = run_node("SD35VAEEncode", pixels=grey, vae=vae)
    torch.testing.assert_close(latent["samples"], plain["samples"], rtol=0, atol=1e-6)


def test_encode_for_inpaint_takes_an_outpaint_mask_for_a_batch(run_node, vae):
    # What ImagePadForOutpaint gives: the image padded with grey and a [1, H, W] mask with feathered edges.
    image = _image(b=2)
    mask = torch.ones(1, SIZE, SIZE)
    mask[:, :, :16] = torch.linspace(0.0, 0.9, 16)
    (latent,) = run_node("SD35VAEEncodeForInpaint", pixels=image, vae=vae, mask=mask, grow_mask_by=0)
    assert latent["samples"].shape == (2, 16, 4, 4)
    assert torch.equal(latent["noise_mask"][0, 0], mask[0].round())


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.full((1, SIZE, SIZE), float("nan")), "NaN"),
        (torch.ones(3, SIZE, SIZE), r"mask batch \(3\) must be 1 or the image batch \(2\)"),
    ],
)
def test_encode_for_inpaint_bad_masks_are_node_errors(run_node, vae, mask, message):
    with pytest.raises(ValueError, match=r"SD35 VAE Encode \(for inpaint\): .*" + message):
        run_node("SD35VAEEncodeForInpaint", pixels=_image(b=2), vae=vae, mask=mask, grow_mask_by=6)
