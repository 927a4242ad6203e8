"""The recipe's settings: one frozen dataclass, passed to every stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecipeConfig:
    """Everything that decides the shipped files (change any field and the files change)."""

    seed: int = 0
    # One thread: the arithmetic (and so every bit of the result) does not depend on the machine's core count,
    # and on a busy machine a second thread mostly waits in OpenMP barriers (measured 5-10x slower steps).
    threads: int = 1
    train_images: int = 8192  # training set: samples 0..N-1 of split seed ``seed``
    # VAE (16 latent channels, 64 px -> 8x8)
    # 1400 steps with every pixel alike: 77 % of held-out pictures kept their shape class through the VAE
    # (rounded corners and tips, a mark in each shape's centre); the shape weight and more steps fix that.
    vae_steps: int = 4800
    vae_batch: int = 8
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4
    vae_schedule_steps: int = 0  # length of the cosine learning-rate schedule (0: vae_steps); longer = cut short
    vae_ema_decay: float = 0.998  # 0: the last weights; else an exponential moving average of them
    vae_shape_weight: float = 3.0  # extra loss weight on the shape's pixels and edges (0: every pixel alike)
    # Reconstruction check after the VAE stage: held-out pictures encoded and decoded, read back by fill ratio
    recon_images: int = 192
    recon_min_class_kept: float = 0.97  # the recipe stops unless this share keeps its shape class
    # MMDiT-X (SD3.5 Medium structure: qk-norm, attn2 in the first half of the blocks)
    hidden: int = 64
    patch_size: int = 1  # 8x8 latents -> 64 tokens; with 2, 16 tokens drew squares and circles alike
    depth: int = 4
    flow_steps: int = 10800  # shape 75 % at 5400, 92 % at 10800 (sd35 eval-tiny)
    flow_batch: int = 32
    flow_lr: float = 1e-3
    flow_schedule_steps: int = 0  # as vae_schedule_steps, for the MMDiT-X
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    # ControlNet (canny, 8b-style: takes the base's patch tokens), the base frozen
    cn_layers: int = 2
    cn_steps: int = 350
    cn_batch: int = 32
    cn_lr: float = 5e-4
    checkpoint_every: int = 100
    log_every: int = 10


MICRO = RecipeConfig(train_images=64, vae_steps=6, vae_batch=4, flow_steps=6, flow_batch=4, cn_steps=4, cn_batch=4,
                     warmup=2, checkpoint_every=3, log_every=2, depth=2, recon_images=12,
                     recon_min_class_kept=0.0)
"""A config small enough for tests: every stage runs, in seconds (its VAE is too short to pass the check,
so the check reports without stopping the run)."""
