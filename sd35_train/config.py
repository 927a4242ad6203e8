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
    vae_steps: int = 1400
    vae_batch: int = 8
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4
    vae_schedule_steps: int = 0  # length of the cosine learning-rate schedule (0: vae_steps); longer = cut short
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
                     warmup=2, checkpoint_every=3, log_every=2, depth=2)
"""A config small enough for tests: every stage runs, in seconds."""
