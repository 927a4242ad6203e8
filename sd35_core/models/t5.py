"""T5 v1.1 encoder (T5-XXL for SD3) in the HuggingFace ``T5EncoderModel`` key layout.

As in the reference: relative position buckets (bidirectional), computed once by block 0 and reused by
every block; no 1/sqrt(d) scaling of attention scores; gated-GELU (tanh) feed-forward; RMS layer norms;
no attention mask (padding tokens are attended to, which is what the models were trained with).

Half precision: the attention and the feed-forward input projections (most of the arithmetic) run in
the caller's dtype, but with a 16-bit compute dtype the residual stream, and with it the layer norms and
the feed-forward output projection ``wo``, stays in float32. T5-XXL's residual stream outgrows the
float16 range in its later blocks (HuggingFace keeps ``wo`` in float32 for the same reason), and
bfloat16's short mantissa would otherwise accumulate error over 24 blocks. It costs little: the
residual stream is one ``[B, L, d_model]`` tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..models import ops

_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.")
_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


@dataclass(frozen=True)
class T5Config:
    """Sizes of a T5 v1.1 encoder, read from its tensor shapes."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    layer_norm_eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.d_kv * self.num_heads

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> T5Config:
        """Derive the config from HF ``T5EncoderModel`` key shapes (prefix already stripped).

        The token embedding may be stored as ``shared.weight``, ``encoder.embed_tokens.weight`` or both;
        heads come from the relative attention bias table, ``d_kv`` = inner width / heads.
        """

        def need(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"expected a T5 encoder with tensor '{key}'; it is missing")
            return tuple(shapes[key])

        embed = next((k for k in _EMBED_KEYS if k in shapes), None)
        if embed is None:
            raise CheckpointError(
                "expected a T5 encoder with a token embedding 'shared.weight' or "
                "'encoder.embed_tokens.weight'; neither is present"
            )
        vocab, d_model = shapes[embed]
        blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))})
        if not blocks or blocks != list(range(len(blocks))):
            raise CheckpointError(
                f"expected a T5 encoder with blocks encoder.block.0..N-1; found block indices {blocks}"
            )
        if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
            raise CheckpointError(
                "expected a T5 v1.1 encoder (gated feed-forward wi_0/wi_1, as T5-XXL for SD3); "
                "found the original T5's single 'wi' feed-forward"
            )
        buckets, heads = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        inner = need("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
        d_ff = need("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
        need("encoder.final_layer_norm.weight")
        if inner % heads:
            raise CheckpointError(f"expected a T5 attention width divisible by its {heads} heads; found {inner}")
        return cls(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=inner // heads,
            num_heads=heads,
            d_ff=d_ff,
            num_layers=len(blocks),
            num_buckets=buckets,
        )


def relative_position_bucket(
    relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """Bidirectional T5 bucket of each ``key - query`` offset.

    Half the buckets hold positive offsets. Within each half, offsets below a quarter of the buckets get
    their own bucket; larger ones share log-spaced buckets up to ``max_distance``, beyond which all
    offsets share the last bucket.
    """
    half = num_buckets // 2
    bucket = (relative_position > 0).to(torch.long) * half
    distance = relative_position.abs()
    exact = half // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).to(torch.long)).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, large)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool, device=None, dtype=None):
        super().__init__()
        d, inner = config.d_model, config.inner_dim
        self.config = config
        self.q = ops.Linear(d, inner, bias=False, device=device, dtype=dtype)
        self.k = ops.Linear(d, inner, bias=False, device=device, dtype=dtype)
        self.v = ops.Linear(d, inner, bias=False, device=device, dtype=dtype)
        self.o = ops.Linear(inner, d, bias=False, device=device, dtype=dtype)
        self.relative_attention_bias = (
            nn.Embedding(config.num_buckets, config.num_heads, device=device, dtype=dtype)
            if has_relative_bias
            else None
        )

    def position_bias(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive attention bias ``[1, heads, L, L]`` from the relative-position table."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None], self.config.num_buckets, self.config.max_distance
        )
        values = F.embedding(buckets, self.relative_attention_bias.weight).to(dtype)
        return values.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # T5 does not scale scores by 1/sqrt(d_kv); scaling k by sqrt(d_kv) cancels SDPA's own scaling.
        k = self.k(x) * math.sqrt(self.config.d_kv)
        return self.o(ops.attention(self.q(x), k, self.v(x), self.config.num_heads, bias))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool, device=None, dtype=None):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias, device=device, dtype=dtype)
        self.layer_norm = ops.RMSNorm(config.d_model, eps=config.layer_norm_eps, device=device, dtype=dtype)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config, device=None, dtype=None):
        super().__init__()
        self.wi_0 = ops.Linear(config.d_model, config.d_ff, bias=False, device=device, dtype=dtype)
        self.wi_1 = ops.Linear(config.d_model, config.d_ff, bias=False, device=device, dtype=dtype)
        self.wo = ops.Linear(config.d_ff, config.d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(h.to(out_dtype))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config, device=None, dtype=None):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config, device=device, dtype=dtype)
        self.layer_norm = ops.RMSNorm(config.d_model, eps=config.layer_norm_eps, device=device, dtype=dtype)


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool, device=None, dtype=None):
        super().__init__()
        self.layer = nn.ModuleList(
            [
                T5LayerSelfAttention(config, has_relative_bias, device=device, dtype=dtype),
                T5LayerFF(config, device=device, dtype=dtype),
            ]
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` is the residual stream (float32 for 16-bit compute); sublayers run in ``dtype``."""
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x).to(dtype), bias).to(x.dtype)
        return x + ff.DenseReluDense(ff.layer_norm(x).to(dtype), x.dtype).to(x.dtype)


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, device=None, dtype=None):
        super().__init__()
        self.block = nn.ModuleList(
            T5Block(config, has_relative_bias=(i == 0), device=device, dtype=dtype) for i in range(config.num_layers)
        )
        self.final_layer_norm = ops.RMSNorm(config.d_model, eps=config.layer_norm_eps, device=device, dtype=dtype)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder; ``state_dict`` keys are ``shared.weight`` and ``encoder.*`` as in HF files.

    Files that carry the embedding only as ``encoder.embed_tokens.weight`` load through
    :meth:`key_map` (pass it to :func:`sd35_core.loading.checkpoint.load_weights`).
    """

    def __init__(self, config: T5Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model, device=device, dtype=dtype)
        self.encoder = T5Stack(config, device=device, dtype=dtype)

    @staticmethod
    def key_map(file_keys) -> dict[str, str]:
        """File-key to module-key renames for ``load_weights``, given the file's keys (prefix stripped)."""
        return {} if "shared.weight" in file_keys else {"encoder.embed_tokens.weight": "shared.weight"}

    def default_dtype(self) -> torch.dtype:
        """The compute dtype when none is given: the stored dtype, or bfloat16 for fp8 storage."""
        dtype = self.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype
        return dtype if dtype.itemsize > 1 else torch.bfloat16

    def forward(self, tokens: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Encode token ids ``[B, L]`` into final-layer-normed states ``[B, L, d_model]``.

        Activations run in ``dtype`` (default: :meth:`default_dtype`); with a 16-bit dtype the residual
        stream is float32 (see the module docstring) and so is the result.
        """
        dtype = dtype or self.default_dtype()
        residual_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        x = F.embedding(tokens, self.shared.weight).to(residual_dtype)
        blocks = self.encoder.block
        bias = blocks[0].layer[0].SelfAttention.position_bias(tokens.shape[1], x.device, dtype)
        for block in blocks:
            x = block(x, bias, dtype)
        return self.encoder.final_layer_norm(x)
