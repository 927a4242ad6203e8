"""CLIP text encoders (CLIP-L and CLIP-G) in the HuggingFace ``CLIPTextModel`` key layout.

SD3 reads two things from each CLIP: the hidden states of the penultimate layer *without* the final
layer norm (the per-token conditioning), and the final-layer-normed state at the first end token (the
pooled vector). CLIP-G's pooled vector goes through its ``text_projection``; CLIP-L's does not. Which
activation a model uses (``quick_gelu`` for CLIP-L, ``gelu`` for CLIP-G) is not visible in the weights,
so the caller states it from the role the file plays.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..models import ops

HEAD_DIM = 64
ACTIVATIONS = ("quick_gelu", "gelu")
_LAYER_RE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class CLIPConfig:
    """Sizes of a CLIP text transformer, read from its tensor shapes."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    hidden_act: str
    projection_dim: int | None = None  # width of ``text_projection`` when the file has one
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], hidden_act: str) -> CLIPConfig:
        """Derive the config from HF-layout key shapes (prefix already stripped).

        ``hidden_act`` is ``"quick_gelu"`` for CLIP-L and ``"gelu"`` for CLIP-G; heads = hidden / 64.
        """
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act: expected one of {', '.join(ACTIVATIONS)}; got {hidden_act!r}")

        def need(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"expected a CLIP text encoder with tensor '{key}'; it is missing")
            return tuple(shapes[key])

        vocab, hidden = need("text_model.embeddings.token_embedding.weight")
        positions, _ = need("text_model.embeddings.position_embedding.weight")
        layers = sorted({int(m.group(1)) for k in shapes if (m := _LAYER_RE.match(k))})
        if not layers or layers != list(range(len(layers))):
            raise CheckpointError(
                "expected a CLIP text encoder with layers text_model.encoder.layers.0..N-1; "
                f"found layer indices {layers}"
            )
        intermediate = need("text_model.encoder.layers.0.mlp.fc1.weight")[0]
        need("text_model.final_layer_norm.weight")
        if hidden % HEAD_DIM:
            raise CheckpointError(f"expected a CLIP hidden width divisible by {HEAD_DIM}; found {hidden}")
        projection = shapes.get("text_projection.weight")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=len(layers),
            num_heads=hidden // HEAD_DIM,
            intermediate_size=intermediate,
            max_positions=positions,
            hidden_act=hidden_act,
            projection_dim=None if projection is None else projection[0],
        )


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPConfig, device=None, dtype=None):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_heads
        self.q_proj = ops.Linear(d, d, device=device, dtype=dtype)
        self.k_proj = ops.Linear(d, d, device=device, dtype=dtype)
        self.v_proj = ops.Linear(d, d, device=device, dtype=dtype)
        self.out_proj = ops.Linear(d, d, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = ops.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPConfig, device=None, dtype=None):
        super().__init__()
        self.fc1 = ops.Linear(config.hidden_size, config.intermediate_size, device=device, dtype=dtype)
        self.fc2 = ops.Linear(config.intermediate_size, config.hidden_size, device=device, dtype=dtype)
        self.act = _quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPConfig, device=None, dtype=None):
        super().__init__()
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config, device=device, dtype=dtype)
        self.layer_norm1 = ops.LayerNorm(config.hidden_size, eps=eps, device=device, dtype=dtype)
        self.mlp = CLIPMLP(config, device=device, dtype=dtype)
        self.layer_norm2 = ops.LayerNorm(config.hidden_size, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig, device=None, dtype=None):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size, device=device, dtype=dtype)

    def forward(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = F.embedding(tokens, self.token_embedding.weight).to(dtype)
        return x + self.position_embedding.weight[: tokens.shape[1]].to(dtype)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPConfig, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(config, device=device, dtype=dtype) for _ in range(config.num_layers)
        )


class CLIPTransformer(nn.Module):
    """The ``text_model`` part: embeddings, causal encoder stack, final layer norm."""

    def __init__(self, config: CLIPConfig, device=None, dtype=None):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config, device=device, dtype=dtype)
        self.encoder = CLIPEncoder(config, device=device, dtype=dtype)
        self.final_layer_norm = ops.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device, dtype=dtype)


class CLIPTextModel(nn.Module):
    """CLIP text transformer; ``state_dict`` keys equal the HF ``CLIPTextModel[WithProjection]`` keys.

    ``text_projection`` exists only when the config has a ``projection_dim`` (the file carries one).
    """

    def __init__(self, config: CLIPConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.text_model = CLIPTransformer(config, device=device, dtype=dtype)
        self.text_projection = (
            ops.Linear(config.hidden_size, config.projection_dim, bias=False, device=device, dtype=dtype)
            if config.projection_dim is not None
            else None
        )

    def default_dtype(self) -> torch.dtype:
        """The compute dtype when none is given: the stored dtype, or bfloat16 for fp8 storage."""
        dtype = self.text_model.encoder.layers[0].mlp.fc1.weight.dtype
        return dtype if dtype.itemsize > 1 else torch.bfloat16

    def forward(
        self, tokens: torch.Tensor, *, project_pooled: bool = False, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode token ids ``[B, L]`` into ``(penultimate [B, L, hidden], pooled [B, P])``.

        The penultimate hidden state is the output of the second-to-last layer, without the final layer
        norm. ``pooled`` is the final-layer-normed last state at the first end token (the position of the
        largest token id, as the reference finds it), passed through ``text_projection`` when
        ``project_pooled`` (CLIP-G). Activations run in ``dtype`` (default: :meth:`default_dtype`).
        """
        if project_pooled and self.text_projection is None:
            raise ValueError("project_pooled=True, but this CLIP model has no text_projection weight")
        dtype = dtype or self.default_dtype()
        tm = self.text_model
        x = tm.embeddings(tokens, dtype)
        length = tokens.shape[1]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=dtype).triu_(1)
        layers = tm.encoder.layers
        penultimate = x
        for i, layer in enumerate(layers):
            x = layer(x, mask)
            if i == len(layers) - 2:
                penultimate = x
        x = tm.final_layer_norm(x)
        eot = tokens.to(torch.int64).argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot.to(x.device)]
        if project_pooled:
            pooled = self.text_projection(pooled)
        return penultimate, pooled
