"""Prompt tokenization for SD3: CLIP-L, CLIP-G and T5-XXL, with ComfyUI-style prompt weights.

Built on the ``tokenizers`` library alone, from the real tokenizer files (``vocab.json`` and
``merges.txt`` for CLIP, ``tokenizer.json`` for T5), so no ``transformers`` is needed at run time.

What it reproduces (the reference's ``SDTokenizer.tokenize_with_weights``):

* Weight syntax: ``(words)`` multiplies the weight by 1.1 per level of nesting, ``(words:1.3)`` sets it,
  ``\\(`` and ``\\)`` are literal parentheses.
* The prompt is split into words on spaces and newlines and every word is tokenized on its own.
* CLIP sequences are 77 tokens: start token, tokens, end token, then padding (the end token for CLIP-L,
  0 for CLIP-G). A word of fewer than 8 tokens that does not fit is moved whole to the next sequence;
  longer words are split.
* T5 has no start token; the end token is 1 and padding is 0, to at least 77 tokens.

Where it goes further than the reference:

* Prompts longer than one CLIP sequence become several 77-token chunks (as ComfyUI does) instead of the
  reference silently dropping everything after the first chunk.
* T5 is capped at ``t5_max_length`` tokens (77 by default, at most 512). Longer T5 prompts are truncated
  to that many tokens, the last of which is the end token; a warning is logged. (The reference instead
  cuts the prompt *text* to 226 characters for T5 and never truncates tokens; for prompts up to 226
  characters whose T5 tokens fit the cap, both give the same tokens.)

Token ids equal transformers' ``CLIPTokenizer`` and ``T5Tokenizer`` word for word. transformers 4's
pure-Python ``CLIPTokenizer`` (without ``ftfy``) also split CJK ideographs into single characters and
dropped control characters, so prompts in those scripts tokenized differently there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

WeightedTokens = list[tuple[int, float]]
"""One token sequence: ``(token id, weight)`` pairs."""

CLIP_LENGTH = 77
T5_MIN_LENGTH = 77
T5_MAX_LENGTH = 512
LARGE_WORD = 8  # words of at least this many tokens may be split across chunks
CLIP_START = "<|startoftext|>"
CLIP_END = "<|endoftext|>"
# CLIP's pre-tokenization: contractions, runs of letters, single digits, runs of other symbols.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

_ESCAPED_CLOSE, _ESCAPED_OPEN = "\0\1", "\0\2"


# ---------------------------------------------------------------------------------------------------
# weight syntax


def _split_parentheses(text: str) -> list[str]:
    """Split ``text`` into top-level parenthesised groups (kept with their parentheses) and plain runs."""
    parts: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "(":
            if depth == 0 and current:
                parts.append(current)
                current = ""
            current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ch)
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        parts.append(current)
    return parts


def parse_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` segments following the weight syntax.

    ``(a)`` is ``a`` at 1.1 times the surrounding weight; ``(a:w)`` is ``a`` at weight ``w`` (absolute,
    not relative to the surroundings); anything after the last ``:`` that is not a number stays text.
    Escaped parentheses must already be replaced (see :func:`weighted_segments`).
    """
    out: list[tuple[str, float]] = []
    for part in _split_parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += parse_weights(inner, inner_weight)
        else:
            out.append((part, weight))
    return out


def weighted_segments(text: str) -> list[tuple[str, float]]:
    """Weighted text segments of a prompt, with ``\\(`` and ``\\)`` restored as literal parentheses."""
    text = text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)
    return [(seg.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "("), w) for seg, w in parse_weights(text, 1.0)]


def weighted_words(text: str) -> list[tuple[str, float]]:
    """The words the reference tokenizes one by one: segments split on spaces and newlines."""
    words = []
    for segment, weight in weighted_segments(text):
        words += [(w, weight) for w in segment.replace("\n", " ").split(" ") if w]
    return words


# ---------------------------------------------------------------------------------------------------
# per-encoder sequence building


@dataclass(frozen=True)
class SequenceRules:
    """How one encoder's token sequences are framed and padded."""

    start: int | None
    end: int
    pad: int
    length: int | None  # fixed chunk length (CLIP); None: one sequence of any length (T5)
    min_length: int = 0


class WordTokenizer:
    """A ``tokenizers.Tokenizer`` plus the framing rules of one text encoder."""

    def __init__(self, tokenizer: Tokenizer, rules: SequenceRules):
        self.tokenizer = tokenizer
        self.rules = rules

    def word_ids(self, words: Sequence[str]) -> list[list[int]]:
        """Token ids of each word alone, without start and end tokens."""
        if not words:
            return []
        return [e.ids for e in self.tokenizer.encode_batch(list(words), add_special_tokens=False)]

    def empty(self, length: int) -> list[int]:
        """The empty prompt's ids at ``length``: start (if any), end, padding."""
        r = self.rules
        ids = ([] if r.start is None else [r.start]) + [r.end]
        return ids + [r.pad] * (length - len(ids))

    def chunks(self, text: str) -> list[WeightedTokens]:
        """Weighted token sequences of a prompt: 77-token chunks (CLIP) or one sequence (T5)."""
        words = weighted_words(text)
        groups = [
            [(t, w) for t in ids] for ids, (_, w) in zip(self.word_ids([x for x, _ in words]), words, strict=True)
        ]
        r = self.rules
        head: WeightedTokens = [] if r.start is None else [(r.start, 1.0)]
        if r.length is None:
            seq = head + [tw for g in groups for tw in g] + [(r.end, 1.0)]
            return [seq + [(r.pad, 1.0)] * (r.min_length - len(seq))]

        room_total = r.length - 1  # every chunk keeps a place for its end token
        out: list[WeightedTokens] = []
        chunk = list(head)
        for group in groups:
            splittable = len(group) >= LARGE_WORD
            while group:
                if len(chunk) + len(group) <= room_total:
                    chunk += group
                    break
                room = room_total - len(chunk)
                if splittable:
                    chunk += group[:room]
                    group = group[room:]
                    chunk.append((r.end, 1.0))
                else:
                    chunk.append((r.end, 1.0))
                    chunk += [(r.pad, 1.0)] * room
                out.append(chunk)
                chunk = list(head)
        chunk.append((r.end, 1.0))
        chunk += [(r.pad, 1.0)] * (max(r.length, r.min_length) - len(chunk))
        out.append(chunk)
        return out


def _clip_tokenizer(clip_dir: str) -> Tokenizer:
    vocab_path = os.path.join(clip_dir, "vocab.json")
    merges_path = os.path.join(clip_dir, "merges.txt")
    for p in (vocab_path, merges_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"CLIP tokenizer: expected {p} (vocab.json and merges.txt); it is missing")
    vocab, merges = BPE.read_file(vocab_path, merges_path)
    tok = Tokenizer(
        BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=CLIP_END)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    # Same added-token settings as transformers' CLIPTokenizer, so literal special tokens in a prompt
    # tokenize the same way.
    tok.add_special_tokens(
        [AddedToken(CLIP_START, special=True, normalized=True), AddedToken(CLIP_END, special=True, normalized=False)]
    )
    start, end = tok.token_to_id(CLIP_START), tok.token_to_id(CLIP_END)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_START} $A {CLIP_END}", special_tokens=[(CLIP_START, start), (CLIP_END, end)]
    )
    return tok


def _t5_tokenizer(path: str) -> Tokenizer:
    tok = Tokenizer.from_file(path)
    # The file's own pre-tokenizer marks a word start only at the beginning of the text; transformers'
    # T5 tokenizer marks every piece of text, also one that follows a special token written inside a
    # word ("x</s>y"). Follow transformers: that is the only case where the two differ per word.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")]
    )
    return tok


class SD3Tokenizer:
    """Tokenizers for SD3's three text encoders, with ComfyUI's chunking and weight syntax."""

    def __init__(self, clip: Tokenizer, t5: Tokenizer):
        clip_ids = clip.encode("").ids  # [start, end]
        t5_ids = t5.encode("").ids  # [end]
        if len(clip_ids) != 2 or len(t5_ids) != 1:
            raise ValueError(
                "tokenizers: expected CLIP to frame text with a start and an end token and T5 with an end "
                f"token only; the empty prompt gives {clip_ids} (CLIP) and {t5_ids} (T5)"
            )
        start, end = clip_ids
        self.clip_l = WordTokenizer(clip, SequenceRules(start=start, end=end, pad=end, length=CLIP_LENGTH))
        self.clip_g = WordTokenizer(clip, SequenceRules(start=start, end=end, pad=0, length=CLIP_LENGTH))
        self.t5xxl = WordTokenizer(
            t5, SequenceRules(start=None, end=t5_ids[0], pad=0, length=None, min_length=T5_MIN_LENGTH)
        )

    @classmethod
    def from_files(cls, clip_dir: str | os.PathLike, t5_tokenizer_json: str | os.PathLike) -> SD3Tokenizer:
        """Load from a CLIP folder (``vocab.json``, ``merges.txt``) and a T5 ``tokenizer.json``."""
        t5_path = os.fspath(t5_tokenizer_json)
        if not os.path.isfile(t5_path):
            raise FileNotFoundError(f"T5 tokenizer: expected {t5_path} (tokenizer.json); it is missing")
        return cls(_clip_tokenizer(os.fspath(clip_dir)), _t5_tokenizer(t5_path))

    def tokenize_clip_l(self, text: str) -> list[WeightedTokens]:
        """CLIP-L chunks of 77 ``(id, weight)`` pairs, padded with the end token."""
        return self.clip_l.chunks(text)

    def tokenize_clip_g(self, text: str) -> list[WeightedTokens]:
        """CLIP-G chunks of 77 ``(id, weight)`` pairs, padded with 0."""
        return self.clip_g.chunks(text)

    def tokenize_t5(self, text: str, max_length: int = T5_MIN_LENGTH) -> list[WeightedTokens]:
        """T5 tokens as a one-element list: prompt, end token, zero padding to at least 77.

        Sequences longer than ``max_length`` (77..512) are truncated to ``max_length`` tokens, the last
        being the end token.
        """
        if not T5_MIN_LENGTH <= max_length <= T5_MAX_LENGTH:
            raise ValueError(f"t5_max_length: expected {T5_MIN_LENGTH}..{T5_MAX_LENGTH}; got {max_length}")
        (seq,) = self.t5xxl.chunks(text)
        end = self.t5xxl.rules.end
        n = next(i for i in range(len(seq) - 1, -1, -1) if seq[i][0] == end) + 1  # content + end token
        if n > max_length:
            logger.warning(
                "T5 prompt is %d tokens; truncated to t5_max_length=%d (raise it, up to %d, to keep more)",
                n,
                max_length,
                T5_MAX_LENGTH,
            )
            seq = seq[: max_length - 1] + [(end, 1.0)]
        return [seq]

    def tokenize_with_weights(
        self, text: str, *, t5_max_length: int = T5_MIN_LENGTH
    ) -> dict[str, list[WeightedTokens]]:
        """All three tokenizations of one prompt: ``{"l": ..., "g": ..., "t5xxl": ...}``."""
        return {
            "l": self.tokenize_clip_l(text),
            "g": self.tokenize_clip_g(text),
            "t5xxl": self.tokenize_t5(text, t5_max_length),
        }


# ---------------------------------------------------------------------------------------------------
# finding the tokenizer files

def _is_clip_dir(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))


TOKENIZER_HINT = "Pass the folder holding clip/vocab.json, clip/merges.txt and t5/tokenizer.json."


MODEL_TOKENIZER_DIR = "tokenizers"  # beside a checkpoint: the tokenizer files its bundled encoders were made for


def model_tokenizer_dir(model_path: str | os.PathLike) -> str | None:
    """``<folder of model_path>/tokenizers`` when it holds ``clip/`` and ``t5/tokenizer.json``, else ``None``.

    A checkpoint whose bundled text encoders use their own (small) vocabularies, as the bundled tiny shapes
    model does, ships its tokenizer files there; no other tokenizer fits its embedding tables.
    """
    base = os.path.join(os.path.dirname(os.path.abspath(os.fspath(model_path))), MODEL_TOKENIZER_DIR)
    if _is_clip_dir(os.path.join(base, "clip")) and os.path.isfile(os.path.join(base, "t5", "tokenizer.json")):
        return base
    return None


def find_tokenizer_files(
    *folders: str | os.PathLike | None,
    model_path: str | os.PathLike | None = None,
    hint: str = TOKENIZER_HINT,
) -> tuple[str, str]:
    """Locate ``(clip_dir, t5_tokenizer_json)``.

    Search order: the tokenizers shipped beside ``model_path`` (:func:`model_tokenizer_dir`), then each of
    ``folders`` in turn (``None`` entries are skipped). A folder may hold ``clip/`` and ``t5/tokenizer.json``
    (as ``sd35 demo`` writes them), ``sd1_tokenizer/`` and ``t5_tokenizer/``, or the files themselves, so a
    caller can pass a host's own tokenizer folders as they are. Raises :class:`FileNotFoundError` listing
    every place tried, then ``hint`` (how the caller's user points at the files).
    """
    clip_candidates: list[str] = []
    t5_candidates: list[str] = []
    # A checkpoint's own tokenizers come first: no other tokenizer fits its encoders' embedding tables.
    beside = None if model_path is None else model_tokenizer_dir(model_path)
    bases = [] if beside is None else [beside]
    bases += [os.path.abspath(os.fspath(f)) for f in folders if f is not None]
    for base in bases:
        clip_candidates += [os.path.join(base, "clip"), os.path.join(base, "sd1_tokenizer"), base]
        t5_candidates += [
            os.path.join(base, "t5", "tokenizer.json"),
            os.path.join(base, "t5_tokenizer", "tokenizer.json"),
            os.path.join(base, "tokenizer.json"),
        ]

    clip_dir = next((c for c in clip_candidates if _is_clip_dir(c)), None)
    t5_json = next((c for c in t5_candidates if os.path.isfile(c)), None)
    if clip_dir is not None and t5_json is not None:
        return clip_dir, t5_json
    lines = []
    if clip_dir is None:
        lines.append("CLIP tokenizer (vocab.json + merges.txt) not found in:")
        lines += [f"  {c}" for c in clip_candidates] or ["  (no folder given)"]
    if t5_json is None:
        lines.append("T5 tokenizer (tokenizer.json) not found at:")
        lines += [f"  {c}" for c in t5_candidates] or ["  (no folder given)"]
    lines.append(hint)
    raise FileNotFoundError("\n".join(lines))
