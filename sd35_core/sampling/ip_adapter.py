"""IP-Adapters during sampling: :class:`IPAdapterHint` (one adapter and its image prompt applied to a run) and
the per-row IP tokens the model passes carry into the joint blocks (:func:`ip_rows`).

Every row the Guider batches carries its own tokens, so the adapter composes with everything else: positive
rows (cond, and the skip-layer pass, which is made of positive rows) get the image's tokens, negative rows the
tokens of zero image features, as diffusers does (not an encoded black picture). Each hint has its own
weight and start/end window; several hints, and several pictures in one hint, each add their own attention
term. The tokens depend on the timestep, so they are made per step from the stored image features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.ip_adapter import IPAdapter, IPRows, IPTokens
from ..models.mmditx import MMDiTConfig


@dataclass
class IPAdapterHint:
    """One IP-Adapter applied to a sampling run.

    ``features`` are the SigLIP ``hidden_states[-2]`` of the prompt picture(s), ``[n, tokens, width]``: each of
    the ``n`` pictures adds its own term. ``weight`` scales the terms (0 leaves the adapter out entirely, bit for
    bit); ``start``/``end`` are fractions of the sampling steps, as a ControlNet's: step ``i`` of ``steps`` uses
    the adapter when ``start * steps <= i < end * steps``.
    """

    adapter: IPAdapter
    features: torch.Tensor
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.adapter, IPAdapter):
            raise ValueError(f"IP-Adapter: expected a loaded IPAdapter, got {type(self.adapter).__name__}")
        cfg = self.adapter.config
        f = self.features
        if not isinstance(f, torch.Tensor) or f.ndim != 3 or f.shape[0] < 1 or f.shape[-1] != cfg.embed_dim:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"IP-Adapter image features: expected [n, tokens, {cfg.embed_dim}] (the vision tower's "
                             f"output), got {shape}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)):
            raise ValueError(f"IP-Adapter weight: expected a finite number, got {self.weight!r}")
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ValueError(f"IP-Adapter window: expected 0 <= start <= end <= 1, got start={self.start}, "
                             f"end={self.end}")

    def active(self, step_index: int, steps: int) -> bool:
        """Whether the adapter acts at ``step_index`` (0-based) of ``steps``; never at weight 0."""
        return self.weight != 0.0 and self.start * steps <= step_index < self.end * steps

    def check_fits(self, config: MMDiTConfig) -> None:
        """ValueError unless the adapter fits a model of ``config``."""
        self.adapter.config.check_fits(config.hidden_size, config.depth, config.num_heads)


def positive_rows(entries: Sequence[tuple[bool, int]], rows: int) -> list[bool]:
    """Per row of a batch of ``rows`` made of ``entries`` (``(positive, index)`` per conditioning, equal row
    blocks in order): whether the row is positive."""
    if not entries or rows % len(entries):
        raise ValueError(f"IP-Adapter: cannot tell positive from negative rows ({rows} rows, entries {entries!r})")
    per = rows // len(entries)
    return [positive for positive, _ in entries for _ in range(per)]


def ip_rows(hints: Sequence[IPAdapterHint], positive: Sequence[bool], timestep: torch.Tensor,
            dtype: torch.dtype, device: torch.device) -> IPRows:
    """The joint blocks' IP input for rows whose positivity and model timesteps (sigma * 1000, what the model
    is given) are ``positive`` and ``timestep`` ``[B]``: one :class:`~..models.ip_adapter.IPTokens` per hint and
    picture. The resampler runs once per distinct (picture or zeros, timestep), not once per row."""
    timesteps = timestep.float().tolist()
    terms = []
    for hint in hints:
        features = hint.features.to(device=device, dtype=dtype)
        zeros = torch.zeros_like(features[:1])
        made: dict[tuple[bool, float], tuple[torch.Tensor, torch.Tensor]] = {}
        for pos, t in zip(positive, timesteps, strict=True):
            if (pos, t) not in made:
                source = features if pos else zeros
                ts = torch.full((source.shape[0],), t, dtype=torch.float32, device=device)
                made[(pos, t)] = hint.adapter.image_proj(source, ts)
        for k in range(features.shape[0]):
            picks = [made[(pos, t)] for pos, t in zip(positive, timesteps, strict=True)]
            tokens = torch.stack([tok[k if pos else 0] for (tok, _), pos in zip(picks, positive, strict=True)])
            temb = torch.stack([emb[k if pos else 0] for (_, emb), pos in zip(picks, positive, strict=True)])
            terms.append(IPTokens(hint.adapter, tokens, temb, float(hint.weight)))
    return IPRows(tuple(terms))
