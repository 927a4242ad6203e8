"""Tokenizers and frozen, seeded text encoders for the shapes model, and the conditioning cache.

The tokenizers are trained (deterministically, with the ``tokenizers`` library) on the shapes captions plus a
small general corpus, so their vocabularies, and the encoders' embedding tables, stay a few hundred rows:
that keeps the bundled encoders small. The encoders keep their seeded random weights, as SD3 keeps its
encoders frozen; the diffusion model learns to read them. Conditioning is computed once per distinct caption
from the encoders as stored in the shipped file (fp16-rounded), so training sees exactly what inference sees.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from sd35_core.loading.tiny import randomize_
from sd35_core.models.clip import CLIPConfig, CLIPTextModel
from sd35_core.models.t5 import T5Config, T5Encoder
from sd35_core.text.encoder import SD3TextEncoder
from sd35_core.text.tokenization import SD3Tokenizer

from .data import all_captions

CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 64, 128, 256
STORAGE_DTYPE = torch.float16  # what the shipped file stores


@dataclass(frozen=True)
class TextConfig:
    """Sizes of the three text encoders (vocabularies come from the trained tokenizers)."""

    clip_vocab: int
    t5_vocab: int
    clip_l_layers: int = 2
    clip_g_layers: int = 3
    t5_layers: int = 1
    t5_ff: int = 512

    def clip(self, role: str) -> CLIPConfig:
        wide = role == "clip_g"
        width = CLIP_G_WIDTH if wide else CLIP_L_WIDTH
        return CLIPConfig(vocab_size=self.clip_vocab, hidden_size=width,
                          num_layers=self.clip_g_layers if wide else self.clip_l_layers, num_heads=width // 64,
                          intermediate_size=4 * width, max_positions=77, hidden_act="gelu" if wide else "quick_gelu",
                          projection_dim=width if wide else None)

    def t5(self) -> T5Config:
        return T5Config(vocab_size=self.t5_vocab, d_model=T5_WIDTH, d_kv=64, num_heads=T5_WIDTH // 64,
                        d_ff=self.t5_ff, num_layers=self.t5_layers)


def tokenizer_corpus() -> tuple[str, ...]:
    """What the tokenizers are trained on: every shapes caption and a general corpus."""
    from sd35_cli.tiny_tokenizers import CORPUS

    return tuple(all_captions()) + CORPUS


def write_tokenizers(directory: str) -> tuple[str, str]:
    """Train and write ``clip/{vocab.json,merges.txt}`` and ``t5/tokenizer.json``; returns (clip_dir, t5_json)."""
    from sd35_cli.tiny_tokenizers import CLIP_BOS, CLIP_EOS, train_clip_bpe, train_t5_unigram

    corpus = tokenizer_corpus()
    clip_dir, t5_dir = os.path.join(directory, "clip"), os.path.join(directory, "t5")
    os.makedirs(clip_dir, exist_ok=True)
    os.makedirs(t5_dir, exist_ok=True)
    vocab, merges = train_clip_bpe(corpus, vocab_size=900)
    with open(os.path.join(clip_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(clip_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    with open(os.path.join(clip_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    t5_json = os.path.join(t5_dir, "tokenizer.json")
    train_t5_unigram(corpus, vocab_size=400).save(t5_json)
    return clip_dir, t5_json


def load_tokenizer(directory: str) -> SD3Tokenizer:
    return SD3Tokenizer.from_files(os.path.join(directory, "clip"), os.path.join(directory, "t5", "tokenizer.json"))


def text_config_for(directory: str) -> TextConfig:
    """Embedding sizes that fit the tokenizers in ``directory``."""
    with open(os.path.join(directory, "clip", "vocab.json"), encoding="utf-8") as f:
        clip_vocab = max(json.load(f).values()) + 1
    from tokenizers import Tokenizer

    t5_vocab = Tokenizer.from_file(os.path.join(directory, "t5", "tokenizer.json")).get_vocab_size()
    return TextConfig(clip_vocab=clip_vocab, t5_vocab=t5_vocab)


def _rounded(module: torch.nn.Module) -> torch.nn.Module:
    """Round every weight to the storage dtype and back, as loading the shipped file gives them."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(STORAGE_DTYPE).float())
    return module.eval().requires_grad_(False)


def t5_file_state(t5: T5Encoder) -> dict[str, torch.Tensor]:
    """T5 state dict with the token embedding as ``shared.weight``, as real T5 files carry it."""
    state = dict(t5.state_dict())
    for key in [k for k in state if k.endswith("embed_tokens.weight")]:
        state["shared.weight"] = state.pop(key)
    return state


def build_text_encoders(config: TextConfig, seed: int) -> dict[str, torch.nn.Module]:
    """The seeded CLIP-L, CLIP-G and T5 encoders, weights already rounded to the storage dtype."""
    return {
        "clip_l": _rounded(randomize_(CLIPTextModel(config.clip("clip_l")), seed + 1)),
        "clip_g": _rounded(randomize_(CLIPTextModel(config.clip("clip_g")), seed + 2)),
        "t5xxl": _rounded(randomize_(T5Encoder(config.t5()), seed + 3)),
    }


@dataclass
class ConditioningCache:
    """Context and pooled vectors of every caption (row 0: the empty prompt, for caption dropout and CFG)."""

    captions: list[str]
    context: torch.Tensor  # [N, L, context_dim]
    pooled: torch.Tensor  # [N, pooled_dim]

    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.captions)}


def encode_captions(encoders: dict[str, torch.nn.Module], tokenizer: SD3Tokenizer, captions: list[str],
                    batch: int = 64) -> ConditioningCache:
    """Encode ``[""] + captions`` as :meth:`SD3TextEncoder.encode` does, many captions per encoder call.

    The assembly is that of ``encode_tokens`` for single-chunk, unweighted prompts (every caption here);
    batching only changes the order of float additions (tests compare it with the one-prompt path).
    """
    import torch.nn.functional as F

    text = SD3TextEncoder(encoders["clip_l"], encoders["clip_g"], encoders["t5xxl"], tokenizer)
    rows = [""] + list(captions)
    contexts, pooled = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            tokens = [text.tokenize(c) for c in rows[start : start + batch]]
            for t in tokens:
                if len(t["l"]) != 1 or any(w != 1.0 for chunk in t.values() for _, w in chunk[0]):
                    raise ValueError("encode_captions: captions must fit one 77-token chunk and carry no weights")

            def ids(key: str, tokens=tokens) -> torch.Tensor:
                return torch.tensor([[i for i, _ in t[key][0]] for t in tokens], dtype=torch.long)

            l_out, l_pooled = encoders["clip_l"](ids("l"))
            g_out, g_pooled = encoders["clip_g"](ids("g"), project_pooled=True)
            lg = torch.cat([l_out, g_out], dim=-1).float()
            lg = F.pad(lg, (0, text.context_dim - lg.shape[-1]))
            t5_out = encoders["t5xxl"](ids("t5xxl")).float()
            contexts.append(torch.cat([lg, t5_out], dim=-2))
            pooled.append(torch.cat([l_pooled, g_pooled], dim=-1).float())
    return ConditioningCache(rows, torch.cat(contexts), torch.cat(pooled))
