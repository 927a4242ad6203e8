"""Stage 3: a canny ControlNet for the shapes model, trained with the same flow loss, the base frozen.

It takes the reference's path for ControlNets of the smaller models (its own patch embedding of the noisy
latent, the diffusion model's embedded pooled vector); the 8b path belongs to SD3.5 Large.

Control latents are made exactly as at inference: canny edges (:func:`sd35_core.image.preprocess.canny`), the
reference's canny scaling (:func:`sd35_core.image.control_image.prepare_control_image`), the VAE mean, the SD3
latent format. The ControlNet's output heads start at zero, so training starts from the base model.
"""

from __future__ import annotations

import logging
import os

import torch

from sd35_core.image.control_image import prepare_control_image
from sd35_core.image.preprocess import canny
from sd35_core.loading.tiny import randomize_
from sd35_core.models.controlnet import ControlNet, ControlNetConfig
from sd35_core.models.latent import process_in
from sd35_core.models.mmditx import MMDiTX
from sd35_core.models.vae import VAE
from sd35_core.sampling.control import controlnet_residuals, expand_residuals

from .config import RecipeConfig
from .flow import FlowData, flow_batch, flow_loss, run_steps, zero_init_modulations
from .state import TrainState, make_state

log = logging.getLogger(__name__)


def controlnet_config(cfg: RecipeConfig) -> ControlNetConfig:
    # The reference's path for ControlNets of the smaller models ("2b"): its own patch embedding, and the
    # diffusion model's embedded pooled vector (input width = hidden). The 8b path is for SD3.5 Large only.
    return ControlNetConfig(hidden_size=cfg.hidden, num_heads=cfg.hidden // 64, num_layers=cfg.cn_layers,
                            patch_size=cfg.patch_size, in_channels=16, pooled_dim=cfg.hidden, has_x_embedder=True)


def new_controlnet(cfg: RecipeConfig) -> ControlNet:
    cn = randomize_(ControlNet(controlnet_config(cfg)), cfg.seed + 300)
    zero_init_modulations(cn)
    with torch.no_grad():
        for head in cn.controlnet_blocks:
            head.weight.zero_()
            head.bias.zero_()
    return cn


def control_latents(vae: VAE, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Model-space control latents of ``uint8 [N, H, W, 3]`` images, as the inference path makes them."""
    from .vae_train import encode_all

    h, w = images.shape[1:3]

    def pixels(a: int, b: int) -> torch.Tensor:
        return prepare_control_image(canny(images[a:b].float() / 255.0), w, h, "canny")

    return process_in(encode_all(vae, pixels, images.shape[0], batch))


def train_controlnet(cfg: RecipeConfig, base: MMDiTX, data: FlowData, controls: torch.Tensor,
                     state_path: str | None = None) -> tuple[ControlNet, TrainState]:
    """Train the ControlNet on top of the frozen ``base``; returns it with its EMA weights, and the state."""
    base.eval().requires_grad_(False)
    cn = new_controlnet(cfg).train()
    state = make_state(cn, cfg.cn_lr, cfg.seed + 301, ema=True)
    if state_path and os.path.isfile(state_path):
        state.load(state_path)
        log.info("ControlNet: resumed at step %d", state.step)

    def step_loss() -> torch.Tensor:
        x0, ctx, pooled, t, noise, idx = flow_batch(data, cfg.cn_batch, cfg.caption_dropout, state.generator)
        cond = controls[idx]

        def predict(xt: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            outs = controlnet_residuals(base, cn, xt, timestep / 1000, pooled, cond)
            return base(xt, timestep, ctx, pooled, block_residuals=expand_residuals(outs, base.config.depth))

        return flow_loss(predict, x0, t, noise)

    run_steps(state, cfg.cn_steps, cfg.cn_lr, cfg, step_loss, state_path, "ControlNet")
    with torch.no_grad():
        for name, p in cn.named_parameters():
            p.copy_(state.ema[name])
    return cn.eval(), state
