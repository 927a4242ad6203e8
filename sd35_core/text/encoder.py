"""SD3 text conditioning: CLIP-L + CLIP-G + T5-XXL into ``(context, pooled)``.

Assembled as the reference's ``get_cond``: the CLIP-L and CLIP-G penultimate hidden states are
concatenated on the feature axis and zero-padded to the T5 width, then concatenated with the T5 states
along the sequence; ``pooled`` is CLIP-L's pooled vector followed by CLIP-G's projected one.

Beyond the reference, as ComfyUI does it:

* Long CLIP prompts: every 77-token chunk is encoded and the chunks' hidden states are concatenated
  along the sequence; ``pooled`` comes from the first chunk. When CLIP-L and CLIP-G are given different
  prompts, the one with fewer chunks is padded with empty-prompt chunks.
* Prompt weights: at every token whose weight ``w`` is not 1, the hidden state ``z`` becomes
  ``(z - z_empty) * w + z_empty``, where ``z_empty`` is the same encoder's output for the empty prompt
  at the same position. This applies to CLIP-L, CLIP-G and T5 alike; pooled vectors are not weighted.
  With every weight 1 nothing changes and the result is the reference's.
* Without a T5 model the context is the padded CLIP states alone, as ComfyUI's SD3 encoder builds it, so
  a workflow without T5 gives the same image here as in native ComfyUI. (diffusers instead appends zeros
  where T5's states would be; with joint attention those extra tokens change the result.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models.clip import CLIPTextModel
from ..models.t5 import T5Encoder
from .tokenization import T5_MIN_LENGTH, SD3Tokenizer, WeightedTokens, WordTokenizer


def apply_token_weights(hidden: torch.Tensor, empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(z - z_empty) * w + z_empty`` where ``w != 1``; ``hidden`` ``[N, L, D]``, ``empty`` ``[L, D]``,
    ``weights`` ``[N, L]``."""
    w = weights.to(hidden.dtype)[..., None]
    return torch.where((weights != 1.0)[..., None], (hidden - empty) * w + empty, hidden)


def _check_vocab(kind: str, tokens: int, rows: dict[str, int]) -> None:
    """A tokenizer whose ids run past an encoder's embedding table does not belong to it: say so up front."""
    for name, n in rows.items():
        if tokens > n:
            raise ValueError(
                f"tokenizers: the {kind} tokenizer has {tokens} tokens but the {name} text encoder's embedding "
                f"has {n} rows, so these tokenizer files do not belong to it (a model that ships its own "
                "tokenizers keeps them in a 'tokenizers' folder beside the checkpoint)"
            )


class SD3TextEncoder:
    """Turns prompts into SD3 conditioning with the given CLIP-L, CLIP-G and (optional) T5 models.

    The models must already be on ``device``; activations run in ``dtype`` (``None``: each model's own
    default, its stored dtype). ``context_dim`` is the width of the context (the T5 width, 4096 for the
    released models); it is taken from T5 when T5 is present and must be given when it is not.
    """

    def __init__(
        self,
        clip_l: CLIPTextModel,
        clip_g: CLIPTextModel,
        t5: T5Encoder | None,
        tokenizer: SD3Tokenizer,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        *,
        context_dim: int | None = None,
    ):
        if clip_g.text_projection is None:
            raise ValueError("CLIP-G: expected a text_projection weight (its pooled output is projected); none loaded")
        if t5 is not None:
            if context_dim is not None and context_dim != t5.config.d_model:
                raise ValueError(f"context_dim: T5 has width {t5.config.d_model}, but {context_dim} was given")
            context_dim = t5.config.d_model
        if context_dim is None:
            raise ValueError("context_dim: required without a T5 model (the diffusion model's context width)")
        clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
        if context_dim < clip_width:
            raise ValueError(
                f"context_dim: {context_dim} is narrower than the CLIP-L + CLIP-G hidden width {clip_width}"
            )
        _check_vocab("CLIP", tokenizer.clip_l.tokenizer.get_vocab_size(),
                     {"CLIP-L": clip_l.config.vocab_size, "CLIP-G": clip_g.config.vocab_size})
        if t5 is not None:
            _check_vocab("T5", tokenizer.t5xxl.tokenizer.get_vocab_size(), {"T5": t5.config.vocab_size})
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.context_dim = context_dim

    @property
    def pooled_dim(self) -> int:
        """Width of ``pooled``: CLIP-L hidden + CLIP-G projection."""
        return self.clip_l.config.hidden_size + self.clip_g.config.projection_dim

    def tokenize(
        self,
        prompt: str,
        *,
        clip_l_prompt: str | None = None,
        clip_g_prompt: str | None = None,
        t5_prompt: str | None = None,
        t5_max_length: int = T5_MIN_LENGTH,
    ) -> dict[str, list[WeightedTokens]]:
        """Token chunks per encoder (``l``, ``g``, ``t5xxl``); CLIP-L and CLIP-G get equal chunk counts."""
        tok = self.tokenizer
        l_chunks = tok.tokenize_clip_l(prompt if clip_l_prompt is None else clip_l_prompt)
        g_chunks = tok.tokenize_clip_g(prompt if clip_g_prompt is None else clip_g_prompt)
        n = max(len(l_chunks), len(g_chunks))
        l_chunks += [tok.tokenize_clip_l("")[0] for _ in range(n - len(l_chunks))]
        g_chunks += [tok.tokenize_clip_g("")[0] for _ in range(n - len(g_chunks))]
        t5_chunks = tok.tokenize_t5(prompt if t5_prompt is None else t5_prompt, t5_max_length)
        return {"l": l_chunks, "g": g_chunks, "t5xxl": t5_chunks}

    @torch.no_grad()
    def encode(
        self,
        prompt: str,
        *,
        clip_l_prompt: str | None = None,
        clip_g_prompt: str | None = None,
        t5_prompt: str | None = None,
        t5_max_length: int = T5_MIN_LENGTH,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``prompt`` (or a separate prompt per encoder) into ``(context [1, L, context_dim],
        pooled [1, pooled_dim])``, float32 on the CPU. ``L`` = 77 per CLIP chunk + the T5 length."""
        tokens = self.tokenize(
            prompt,
            clip_l_prompt=clip_l_prompt,
            clip_g_prompt=clip_g_prompt,
            t5_prompt=t5_prompt,
            t5_max_length=t5_max_length,
        )
        return self.encode_tokens(tokens)

    @torch.no_grad()
    def encode_tokens(self, tokens: dict[str, list[WeightedTokens]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the output of :meth:`tokenize` (see :meth:`encode`)."""
        if len(tokens["l"]) != len(tokens["g"]):
            raise ValueError(
                f"CLIP-L and CLIP-G need the same number of chunks; got {len(tokens['l'])} and {len(tokens['g'])}"
            )
        tok = self.tokenizer
        l_out, l_pooled = self._encode(lambda t: self.clip_l(t, dtype=self.dtype), tokens["l"], tok.clip_l)
        g_out, g_pooled = self._encode(
            lambda t: self.clip_g(t, project_pooled=True, dtype=self.dtype), tokens["g"], tok.clip_g
        )
        lg = torch.cat([l_out, g_out], dim=-1)
        lg = F.pad(lg, (0, self.context_dim - lg.shape[-1]))
        pooled = torch.cat([l_pooled, g_pooled], dim=-1)
        if self.t5 is None:
            return lg, pooled
        t5_out, _ = self._encode(lambda t: (self.t5(t, dtype=self.dtype), None), tokens["t5xxl"], tok.t5xxl)
        return torch.cat([lg, t5_out], dim=-2), pooled

    def _encode(
        self,
        run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
        chunks: list[WeightedTokens],
        rules: WordTokenizer,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one encoder on all chunks (plus the empty prompt when weights need it) in one batch."""
        ids = [[t for t, _ in c] for c in chunks]
        weights = torch.tensor([[w for _, w in c] for c in chunks], dtype=torch.float64)
        weighted = bool((weights != 1.0).any())
        if weighted:
            ids.append(rules.empty(len(ids[0])))
        hidden, pooled = run(torch.tensor(ids, dtype=torch.long, device=self.device))
        hidden = hidden.float().cpu()
        if weighted:
            hidden = apply_token_weights(hidden[:-1], hidden[-1], weights)
        pooled = None if pooled is None else pooled[:1].float().cpu()
        return hidden.reshape(1, -1, hidden.shape[-1]), pooled
