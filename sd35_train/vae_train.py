"""Stage 1: the 16-channel SD3 VAE trained on the shapes (L1 + L2 reconstruction, a small KL term).

After training, the latent scale is folded into the weights (encoder mean rows times ``a``, decoder input
weights divided by ``a``: exact, as zero padding stays zero) so that the SD3 latent format's fixed scale
1.5305 brings the latents to unit spread, as the diffusion model expects.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from sd35_core.loading.tiny import randomize_
from sd35_core.models.latent import SD3_LATENT_SCALE
from sd35_core.models.vae import VAE, VAEConfig

from .config import RecipeConfig
from .state import TrainState, cosine_lr, make_state
from .text import STORAGE_DTYPE

log = logging.getLogger(__name__)

VAE_CONFIG = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> VAE input ``[B, 3, H, W]`` in ``[-1, 1]``."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


INITIAL_LOGVAR = -8.0  # posterior std e^-4 at the start: the decoder first learns from the means, not the noise


def new_vae(seed: int) -> VAE:
    vae = randomize_(VAE(VAE_CONFIG), seed)
    with torch.no_grad():
        vae.encoder.conv_out.bias[VAE_CONFIG.z_channels :] = INITIAL_LOGVAR
        # Residual branches start at zero, so each block starts as the identity and the untrained net is a
        # plain stack of the input, resampling and output convolutions (much faster to train).
        for name, p in vae.named_parameters():
            if name.endswith((".conv2.weight", ".conv2.bias", ".proj_out.weight", ".proj_out.bias")):
                p.zero_()
    return vae


def shape_region(pixels: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """``[B, 1, H, W]``: 1 where a pixel differs from its picture's border colour (median of the outer ring),
    grown by ``margin`` pixels so the shape's edges are inside; 0 elsewhere."""
    border = torch.cat([pixels[:, :, 0], pixels[:, :, -1], pixels[:, :, :, 0], pixels[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    region = ((pixels - background).abs().sum(1, keepdim=True) > 0.1).float()
    return F.max_pool2d(region, 2 * margin + 1, stride=1, padding=margin)


def vae_loss(vae: VAE, pixels: torch.Tensor, noise: torch.Tensor, kl_weight: float,
             shape_weight: float = 0.0) -> torch.Tensor:
    """Reconstruction (L1 + L2) of a posterior sample, plus ``kl_weight`` times the KL to N(0, 1).

    With ``shape_weight`` > 0 each pixel of the shape and its edges (:func:`shape_region`) counts
    ``1 + shape_weight`` times as much as a background pixel (normalised by the mean weight): the shape is
    a tenth of the picture, and its corners a few pixels of that.
    """
    moments = vae.encoder(pixels)
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * noise
    rec = vae.decoder(z)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    if shape_weight <= 0:
        return F.l1_loss(rec, pixels) + F.mse_loss(rec, pixels) + kl_weight * kl
    weight = 1.0 + shape_weight * shape_region(pixels)
    err = rec - pixels
    return ((err.abs() + err * err) * weight).mean() / weight.mean() + kl_weight * kl


def train_vae(cfg: RecipeConfig, images: torch.Tensor, state_path: str | None = None,
              resume: bool = True) -> tuple[VAE, TrainState]:
    """Train the VAE on ``images`` (``uint8 [N, 64, 64, 3]``); returns the trained model (holding the EMA
    weights when ``cfg.vae_ema_decay`` > 0) and its state."""
    vae = new_vae(cfg.seed + 100).train()
    state = make_state(vae, cfg.vae_lr, cfg.seed + 101, ema=cfg.vae_ema_decay > 0)
    if resume and state_path and _exists(state_path):
        state.load(state_path)
        log.info("VAE: resumed at step %d", state.step)
    n = images.shape[0]
    running = 0.0
    while state.step < cfg.vae_steps:
        lr = cosine_lr(state.step, cfg.vae_schedule_steps or cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        for g in state.optimizer.param_groups:
            g["lr"] = lr
        idx = torch.randint(n, (cfg.vae_batch,), generator=state.generator)
        pixels = to_pixels(images[idx])
        noise = torch.randn((cfg.vae_batch, VAE_CONFIG.z_channels, 8, 8), generator=state.generator)
        loss = vae_loss(vae, pixels, noise, cfg.vae_kl, cfg.vae_shape_weight)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        state.optimizer.step()
        if cfg.vae_ema_decay > 0:
            state.update_ema(min(cfg.vae_ema_decay, (1 + state.step) / (10 + state.step)))
        state.step += 1
        running += loss.item()
        if state.step % cfg.log_every == 0:
            state.losses.append((state.step, running / cfg.log_every))
            running = 0.0
            log.info("VAE step %d/%d loss %.4f", state.step, cfg.vae_steps, state.losses[-1][1])
        if state_path and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.vae_steps):
            state.save(state_path)
    if state.ema is not None:
        with torch.no_grad():
            for name, p in vae.named_parameters():
                p.copy_(state.ema[name])
    return vae.eval(), state


def _exists(path: str) -> bool:
    import os

    return os.path.isfile(path)


def round_to_storage(module: torch.nn.Module) -> torch.nn.Module:
    """Round weights to the shipped dtype and back (what loading the file gives)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(STORAGE_DTYPE).float())
    return module


def fold_latent_scale(vae: VAE, images: torch.Tensor, samples: int = 1024) -> float:
    """Rescale the latent space so that ``std(latent) * 1.5305 == 1`` on ``images``; returns the factor."""
    z = encode_all(vae, lambda a, b: to_pixels(images[a:b]), min(samples, images.shape[0]))
    a = 1.0 / (SD3_LATENT_SCALE * float(z.std()))
    zc = VAE_CONFIG.z_channels
    with torch.no_grad():
        conv_out = vae.encoder.conv_out
        conv_out.weight[:zc] *= a
        conv_out.bias[:zc] *= a
        conv_out.bias[zc:] += 2.0 * torch.log(torch.tensor(a))
        vae.decoder.conv_in.weight /= a
    return a


def encode_all(vae: VAE, pixels_fn, n: int, batch: int = 64) -> torch.Tensor:
    """Mean latents of ``n`` images, ``pixels_fn(start, stop)`` giving VAE input batches.

    Batched through the encoder (``VAE.encode`` runs one image at a time, to bound memory at large sizes);
    the mean is the same up to float rounding.
    """
    out = []
    with torch.no_grad():
        for start in range(0, n, batch):
            out.append(vae.encoder(pixels_fn(start, min(n, start + batch)))[:, : VAE_CONFIG.z_channels])
    return torch.cat(out)
