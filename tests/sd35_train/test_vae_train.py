"""The VAE stage's loss weighting and its EMA, resumable bit for bit."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import torch

from sd35_train.config import MICRO
from sd35_train.data import render, render_mask, spec_for
from sd35_train.vae_train import shape_region, to_pixels, train_vae, vae_loss


def _pictures(n: int, split: int = 7) -> tuple[torch.Tensor, list]:
    specs = [spec_for(split, i) for i in range(n)]
    return torch.from_numpy(np.stack([render(s) for s in specs])), specs


def test_the_shape_region_holds_the_shape_and_its_edges_and_not_the_background():
    images, specs = _pictures(12)
    region = shape_region(to_pixels(images))[:, 0].bool().numpy()
    for spec, r in zip(specs, region, strict=True):
        mask = render_mask(spec)
        # within 3 px of the mask (2 px of margin, 1 px of anti-aliased edge), as a square neighbourhood
        near = torch.nn.functional.max_pool2d(torch.from_numpy(mask)[None, None].float(), 7, 1, 3)[0, 0].bool()
        assert r[mask].all() and r.sum() > mask.sum()  # the whole shape and a margin around it
        assert not r[~near.numpy()].any() and r.mean() < 0.5  # nothing of the background further out


def _fixed_output_vae(output: torch.Tensor):
    """Encoder: mean 0, log-variance 0 (KL 0); decoder: always ``output``."""
    zeros = torch.zeros(output.shape[0], 32, 8, 8)
    return SimpleNamespace(encoder=lambda x: zeros, decoder=lambda z: output)


def test_the_shape_weight_makes_errors_on_the_shape_cost_more_than_errors_on_the_background():
    images, _ = _pictures(4)
    pixels = to_pixels(images)
    region = shape_region(pixels)
    noise = torch.zeros(4, 16, 8, 8)
    on_shape = pixels + 0.5 * region  # the same error size, on the shape or on the background
    on_background = pixels + 0.5 * (1 - region) * (torch.rand(pixels.shape, generator=torch.Generator().manual_seed(0))
                                                    < region.mean()).float()
    plain = [float(vae_loss(_fixed_output_vae(o), pixels, noise, 0.0)) for o in (on_shape, on_background)]
    weighted = [float(vae_loss(_fixed_output_vae(o), pixels, noise, 0.0, shape_weight=3.0))
                for o in (on_shape, on_background)]
    assert weighted[0] > plain[0] and weighted[1] < plain[1]
    # No error, no loss, weighted or not.
    assert float(vae_loss(_fixed_output_vae(pixels), pixels, noise, 0.0, shape_weight=3.0)) == 0.0


def test_a_killed_vae_run_with_ema_resumes_to_the_same_weights(tmp_path):
    images, _ = _pictures(16)
    cfg = dataclasses.replace(MICRO, vae_steps=6, checkpoint_every=3, vae_ema_decay=0.9, vae_shape_weight=3.0)
    straight, state = train_vae(cfg, images)
    assert state.ema is not None
    for name, p in straight.named_parameters():
        assert torch.equal(p, state.ema[name]), name  # the returned model holds the average
    path = str(tmp_path / "vae_state.safetensors")
    train_vae(dataclasses.replace(cfg, vae_steps=3), images, path)  # "killed" after its save at step 3
    resumed, state = train_vae(cfg, images, path)
    assert state.step == 6
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    plain, _ = train_vae(dataclasses.replace(cfg, vae_ema_decay=0.0), images)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), straight.parameters(), strict=True))
