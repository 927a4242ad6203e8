"""Tiny tokenizer files for the demo, trained offline with the ``tokenizers`` library.

The real CLIP and T5 tokenizer files are several megabytes and not everyone has them; the demo must run on a
fresh machine with no network. These files have the same formats and conventions as the real ones, so the
same tokenizer code reads them:

- CLIP: byte-level BPE as ``vocab.json`` + ``merges.txt`` (words end in ``</w>``), the 256 byte symbols and
  their ``</w>`` forms first, then one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` last.
  ``<|endoftext|>`` must hold the largest id, because the CLIP pooled output is read at ``argmax(token ids)``.
- T5: a SentencePiece-style Unigram ``tokenizer.json`` with ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 and a
  post-processor that appends ``</s>``, like ``google/t5-v1_1``.

The layout on disk mirrors the usual one: ``<dir>/clip/{vocab.json,merges.txt}`` and ``<dir>/t5/tokenizer.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CLIP_VOCAB_LIMIT = 49408  # embedding rows of every CLIP text model (real and tiny): ids must stay below
T5_VOCAB_LIMIT = 32128
_FINAL_BASE = 0xE000  # private-use code points standing in for word-final byte symbols while training
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
# OpenAI CLIP's word splitting pattern (lower-cased text; letters, single digits, punctuation runs).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

CORPUS = (
    "a photo of a cat sitting on a wooden table next to a window",
    "a painting of a mountain lake at sunset, oil on canvas, highly detailed",
    "portrait of an old man with a grey beard, dramatic lighting, 85mm lens",
    "a red sports car driving through a neon city at night, rain, reflections",
    "a bowl of fresh fruit: apples, oranges, bananas and grapes",
    "an astronaut riding a horse on the moon, digital art",
    "a cozy cabin in a snowy forest, warm light in the windows",
    "a futuristic robot reading a book in a library, cinematic",
    "a watercolor illustration of a small village by the sea",
    "close-up of a dew drop on a green leaf, macro photography",
    "a dragon flying over a medieval castle, fantasy, epic scale",
    "a minimalist logo of a fox, flat vector, orange and white",
    "the quick brown fox jumps over the lazy dog",
    "street food market in tokyo, crowded, vibrant colors, 4k",
    "a black and white photograph of a lighthouse during a storm",
    "an isometric render of a tiny island with palm trees and a hut",
    "a cup of coffee with latte art on a marble counter, morning light",
    "a sign that says 'hello world' in bold letters",
    "blueprint of a steam engine, technical drawing, white lines",
    "a field of sunflowers under a blue sky with white clouds",
    "an owl perched on a branch, moonlight, 35mm film grain",
    "a bustling harbor with sailing ships, 18th century, oil painting",
    "abstract shapes in pastel colours: circles, squares & triangles",
    "a knight in shining armor holding a sword, studio lighting",
    "a cat and a dog sleeping together on a sofa",
    "numbers 0 1 2 3 4 5 6 7 8 9 and symbols ! ? . , ; : - _ ( ) [ ] { } @ # $ % ^ * + = / \\ | < > ~ \" '",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
    "a high quality photo, best quality, masterpiece, sharp focus, bokeh",
    "low quality, blurry, distorted, ugly, bad anatomy, watermark, text",
    "a macro shot of a ladybug on a daisy in a summer garden",
)


@dataclass(frozen=True)
class TinyTokenizerFiles:
    """Paths of a written tiny tokenizer set."""

    directory: str
    clip_dir: str  # holds vocab.json and merges.txt
    clip_vocab: str
    clip_merges: str
    t5_tokenizer_json: str


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE, in CLIP's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_pipeline(tok: Tokenizer) -> Tokenizer:
    """Give ``tok`` CLIP's normalisation (NFC, collapsed whitespace, lower case) and word splitting."""
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tok


def _clip_words(corpus: tuple[str, ...]) -> list[str]:
    """Every word of ``corpus`` as CLIP sees it: normalised, split, bytes mapped to their symbols."""
    tok = clip_pipeline(Tokenizer(models.BPE()))
    words = []
    for text in corpus:
        words += [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))]
    return words


def train_clip_bpe(corpus: tuple[str, ...] = CORPUS, vocab_size: int = 1200) -> tuple[dict[str, int], list[str]]:
    """Train a CLIP-style byte-level BPE on ``corpus``; returns ``(vocab, merges)`` in CLIP's file order.

    CLIP marks a word's last symbol with ``</w>`` (``t`` vs ``t</w>``). The ``tokenizers`` trainer can do that
    itself, but then its tie-breaking between equally frequent pairs depends on hash order and the merges
    change from run to run. So each word-final symbol is written as its own stand-in character (one per
    byte, from a private-use range) and the trainer, which is deterministic on a fixed alphabet, learns the
    merges; the stand-ins are then renamed to ``<symbol></w>``.
    """
    symbols = _byte_symbols()
    final = {s: chr(_FINAL_BASE + i) for i, s in enumerate(symbols)}
    back = {v: k + "</w>" for k, v in final.items()}
    lines = [" ".join(w[:-1] + final[w[-1]] for w in _clip_words(corpus) if w)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=symbols + list(final.values()), show_progress=False
    )
    tok.train_from_iterator(lines, trainer=trainer)
    trained = json.loads(tok.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained]

    def rename(token: str) -> str:
        return token[:-1] + back[token[-1]] if token and token[-1] in back else token

    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for a, b in pairs:
        a, b = rename(a), rename(b)
        if a not in vocab or b not in vocab or a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append(f"{a} {b}")
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    if vocab[CLIP_EOS] >= CLIP_VOCAB_LIMIT:
        raise ValueError(f"tiny CLIP vocab: {len(vocab)} tokens exceed the {CLIP_VOCAB_LIMIT} embedding rows")
    return vocab, merges


def train_t5_unigram(corpus: tuple[str, ...] = CORPUS, vocab_size: int = 600) -> Tokenizer:
    """Train a T5-style Unigram tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``</s>`` appended)."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # The trainer sums piece scores in parallel, so their last bits vary between runs, and it appends the
    # characters it had dropped with scores just below the lowest piece in hash order. Round the scores,
    # hand those appended characters their scores in character order, and sort, so that the file and every
    # token id are reproducible.
    data = json.loads(tok.to_str())
    specials = data["model"]["vocab"][:3]
    pieces = [[p, round(score, 6)] for p, score in data["model"]["vocab"][3:]]
    floor = min(score for _, score in pieces)
    tail = [ps for ps in pieces if len(ps[0]) == 1 and ps[1] <= floor + 1e-3]
    for ps, score in zip(sorted(tail), sorted((s for _, s in tail), reverse=True), strict=True):
        ps[1] = score
    pieces.sort(key=lambda ps: (-ps[1], ps[0]))
    data["model"]["vocab"] = specials + pieces
    tok = Tokenizer.from_str(json.dumps(data))
    ids = {t: tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")}
    if ids != {"<pad>": 0, "</s>": 1, "<unk>": 2}:
        raise RuntimeError(f"tiny T5 tokenizer: special token ids came out as {ids}, expected 0, 1, 2")
    if tok.get_vocab_size() > T5_VOCAB_LIMIT:
        raise ValueError(f"tiny T5 vocab: {tok.get_vocab_size()} tokens exceed {T5_VOCAB_LIMIT}")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return tok


def write_tiny_tokenizers(directory: str | os.PathLike) -> TinyTokenizerFiles:
    """Train and write the tiny CLIP and T5 tokenizer files under ``directory`` (deterministic, offline)."""
    directory = os.fspath(directory)
    clip_dir = os.path.join(directory, "clip")
    t5_dir = os.path.join(directory, "t5")
    os.makedirs(clip_dir, exist_ok=True)
    os.makedirs(t5_dir, exist_ok=True)

    vocab, merges = train_clip_bpe()
    vocab_path = os.path.join(clip_dir, "vocab.json")
    merges_path = os.path.join(clip_dir, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(merges) + "\n")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    with open(os.path.join(clip_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)

    t5_path = os.path.join(t5_dir, "tokenizer.json")
    train_t5_unigram().save(t5_path)
    return TinyTokenizerFiles(directory, clip_dir, vocab_path, merges_path, t5_path)


def load_clip_bpe(clip_dir: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers`` CLIP tokenizer over ``vocab.json``/``merges.txt`` (no start/end tokens added)."""
    clip_dir = os.fspath(clip_dir)
    model = models.BPE.from_file(
        os.path.join(clip_dir, "vocab.json"),
        os.path.join(clip_dir, "merges.txt"),
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        unk_token=CLIP_EOS,
    )
    return clip_pipeline(Tokenizer(model))
