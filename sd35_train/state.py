"""Training state on disk: weights, EMA, Adam moments, RNG and loss log in one safetensors file.

No pickle: tensors go into the safetensors body and everything else (step, optimizer hyper-parameters,
loss log) into its JSON metadata, so a killed run resumes from the last save and continues bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine down to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainState:
    """What one training stage needs to stop and resume: the model, its EMA, Adam, the RNG, the log."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    ema: dict[str, torch.Tensor] | None = None
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def update_ema(self, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * weights`` for every trainable weight."""
        if self.ema is None:
            return
        with torch.no_grad():
            for name, p in self.trainable().items():
                self.ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)

    def save(self, path: str) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, p in self.trainable().items():
            tensors[f"model.{name}"] = p.detach().contiguous()
        if self.ema is not None:
            for name, t in self.ema.items():
                tensors[f"ema.{name}"] = t.contiguous()
        opt = self.optimizer.state_dict()
        for idx, slots in opt["state"].items():
            for slot, value in slots.items():
                tensors[f"opt.{idx}.{slot}"] = torch.as_tensor(value).contiguous()
        tensors["rng"] = self.generator.get_state()
        meta = {"step": str(self.step), "losses": json.dumps(self.losses),
                "param_groups": json.dumps(opt["param_groups"])}
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # a run killed while saving leaves the previous state intact

    def load(self, path: str) -> None:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
        with torch.no_grad():
            for name, p in self.trainable().items():
                p.copy_(tensors[f"model.{name}"])
        if self.ema is not None:
            for name in self.ema:
                self.ema[name].copy_(tensors[f"ema.{name}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, slot = k.split(".", 2)
                state.setdefault(int(idx), {})[slot] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        self.generator.set_state(tensors["rng"])
        self.step = int(meta["step"])
        self.losses = [tuple(x) for x in json.loads(meta["losses"])]


def make_state(model: nn.Module, lr: float, seed: int, ema: bool, betas=(0.9, 0.99)) -> TrainState:
    """Adam over ``model``'s trainable weights, a seeded generator, and an EMA copy when asked."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
    copy = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if ema else None
    return TrainState(model, optimizer, torch.Generator().manual_seed(seed), copy)
