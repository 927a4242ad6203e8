"""Stage 2: the MMDiT-X trained with rectified flow, as the SD3 paper defines it.

``x_t = (1 - t) x0 + t eps`` with ``t`` from the logit-normal distribution (m = 0, s = 1), the model
(given ``t * 1000``, the timestep the samplers pass) predicts the velocity ``eps - x0``, MSE loss.
Captions are replaced by the empty prompt with probability ``caption_dropout``, which is what lets
classifier-free guidance work; an EMA of the weights is what ships.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sd35_core.loading.tiny import randomize_, sincos_pos_embed
from sd35_core.models.mmditx import LATENT_DOWNSCALE, MMDiTConfig, MMDiTX

from .config import RecipeConfig
from .state import TrainState, cosine_lr, make_state
from .text import CLIP_G_WIDTH, CLIP_L_WIDTH, T5_WIDTH, ConditioningCache

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 512  # pixels: the largest image the position embedding covers, as the tiny test models


def pos_embed_grid(cfg: RecipeConfig) -> int:
    """Side of the position-embedding grid, in patches, for images up to :data:`MAX_IMAGE_SIDE`."""
    return MAX_IMAGE_SIDE // (LATENT_DOWNSCALE * cfg.patch_size)


def mmdit_config(cfg: RecipeConfig) -> MMDiTConfig:
    """SD3.5 Medium's structure at toy size: qk-norm, the second image self-attention in the first half."""
    return MMDiTConfig(patch_size=cfg.patch_size, in_channels=16, out_channels=16, hidden_size=cfg.hidden,
                       depth=cfg.depth, num_heads=cfg.hidden // 64, pos_embed_max_size=pos_embed_grid(cfg),
                       pooled_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, context_dim=T5_WIDTH, qk_norm=True,
                       x_block_self_attn_layers=tuple(range(cfg.depth // 2)))


def zero_init_modulations(module: torch.nn.Module) -> None:
    """Zero the adaLN projections and the output layer (DiT's init): every block starts as the identity."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".adaLN_modulation." in f".{name}" or name.startswith("final_layer.linear."):
                p.zero_()


def new_mmdit(cfg: RecipeConfig) -> MMDiTX:
    model = randomize_(MMDiTX(mmdit_config(cfg)), cfg.seed + 200)
    zero_init_modulations(model)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(cfg.hidden, pos_embed_grid(cfg)))
    return model


@dataclass
class FlowData:
    """Cached inputs of the diffusion stages: latents in model space and caption rows per image."""

    latents: torch.Tensor  # [N, 16, 8, 8], process_in applied
    caption_rows: torch.Tensor  # [N, wordings] rows into the conditioning cache
    cond: ConditioningCache


def flow_batch(data: FlowData, batch: int, dropout: float, gen: torch.Generator):
    """Draw ``(x0, context, pooled, t, noise, index)`` for one step from ``gen``."""
    idx = torch.randint(data.latents.shape[0], (batch,), generator=gen)
    r = torch.rand(batch, generator=gen)
    wording = (r > 0.6).long() + (r > 0.8).long()  # template 60 %, each rewording 20 %
    rows = data.caption_rows[idx, wording]
    rows = torch.where(torch.rand(batch, generator=gen) < dropout, torch.zeros_like(rows), rows)
    t = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal, m = 0, s = 1
    noise = torch.randn(data.latents[idx].shape, generator=gen)
    return data.latents[idx], data.cond.context[rows], data.cond.pooled[rows], t, noise, idx


def flow_loss(predict, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE between ``predict(x_t, t * 1000)`` and the velocity ``noise - x0``."""
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    return F.mse_loss(predict(xt, t * 1000), noise - x0)


def ema_decay(step: int, peak: float) -> float:
    """EMA decay with warm-up, so the average is not dominated by the random initialisation."""
    return min(peak, (1 + step) / (10 + step))


def run_steps(state: TrainState, total: int, peak_lr: float, cfg: RecipeConfig, step_loss, state_path: str | None,
              label: str, schedule_steps: int = 0) -> None:
    """The shared loop: lr schedule (cosine over ``schedule_steps``, default ``total``), step, clip, EMA, log,
    periodic save."""
    running = 0.0
    params = list(state.trainable().values())
    while state.step < total:
        lr = cosine_lr(state.step, schedule_steps or total, peak_lr, cfg.warmup)
        for g in state.optimizer.param_groups:
            g["lr"] = lr
        loss = step_loss()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: loss became {float(loss)} at step {state.step}")
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        state.optimizer.step()
        state.update_ema(ema_decay(state.step, cfg.ema_decay))
        state.step += 1
        running += loss.item()
        if state.step % cfg.log_every == 0:
            state.losses.append((state.step, running / cfg.log_every))
            running = 0.0
            log.info("%s step %d/%d loss %.4f lr %.2e", label, state.step, total, state.losses[-1][1], lr)
        if state_path and (state.step % cfg.checkpoint_every == 0 or state.step == total):
            state.save(state_path)


def train_mmdit(cfg: RecipeConfig, data: FlowData, state_path: str | None = None) -> tuple[MMDiTX, TrainState]:
    """Train the MMDiT-X; returns the model holding the EMA weights, and the state."""
    model = new_mmdit(cfg).train()
    state = make_state(model, cfg.flow_lr, cfg.seed + 201, ema=True)
    if state_path and os.path.isfile(state_path):
        state.load(state_path)
        log.info("MMDiT: resumed at step %d", state.step)

    def step_loss() -> torch.Tensor:
        x0, ctx, pooled, t, noise, _ = flow_batch(data, cfg.flow_batch, cfg.caption_dropout, state.generator)
        return flow_loss(lambda xt, ts: model(xt, ts, ctx, pooled), x0, t, noise)

    run_steps(state, cfg.flow_steps, cfg.flow_lr, cfg, step_loss, state_path, "MMDiT", cfg.flow_schedule_steps)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state.ema[name])
    return model.eval(), state
