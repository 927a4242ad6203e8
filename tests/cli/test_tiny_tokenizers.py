"""The demo's tiny tokenizer files: the real files' formats and conventions, readable by sd35_core."""

import json

import pytest
from transformers import CLIPTokenizer, T5TokenizerFast

from sd35_cli.tiny_tokenizers import CLIP_VOCAB_LIMIT, T5_VOCAB_LIMIT, write_tiny_tokenizers

PROMPTS = ["a photo of a cat", "A Red Sports-Car, at NIGHT!! 42", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_tokenizers(tmp_path_factory.mktemp("tok"))


def test_clip_vocab_layout(files):
    vocab = json.load(open(files.clip_vocab, encoding="utf-8"))
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab)))  # dense, no gaps
    # The pooled CLIP output is read at argmax(token ids): the end token must have the largest id.
    assert vocab["<|endoftext|>"] == max(ids) < CLIP_VOCAB_LIMIT
    assert vocab["<|startoftext|>"] == max(ids) - 1
    merges = open(files.clip_merges, encoding="utf-8").read().splitlines()
    assert merges[0].startswith("#version")
    for line in merges[1:]:
        a, b = line.split(" ")
        assert a in vocab and b in vocab and a + b in vocab


def test_clip_tokens_match_transformers_and_sd35_core(files):
    from sd35_core.text.tokenization import SD3Tokenizer

    ours = SD3Tokenizer.from_files(files.clip_dir, files.t5_tokenizer_json)
    theirs = CLIPTokenizer(files.clip_vocab, files.clip_merges)
    end = theirs.eos_token_id
    for prompt in PROMPTS:
        expected = theirs(prompt).input_ids
        (chunk,) = ours.tokenize_clip_l(prompt)
        ids = [t for t, _ in chunk]
        assert ids[: len(expected)] == expected
        assert len(ids) == 77 and set(ids[len(expected):]) == {end}
        assert ids.index(max(ids)) == len(expected) - 1  # argmax lands on the first end token
        assert end not in expected[1:-1]  # real words, not unknown tokens


def test_t5_conventions(files):
    from sd35_core.text.tokenization import SD3Tokenizer

    hf = T5TokenizerFast(tokenizer_file=files.t5_tokenizer_json)
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    assert len(hf) <= T5_VOCAB_LIMIT
    ours = SD3Tokenizer.from_files(files.clip_dir, files.t5_tokenizer_json)
    for prompt in PROMPTS:
        expected = hf(prompt).input_ids
        assert expected[-1] == 1 and 2 not in expected
        (seq,) = ours.tokenize_t5(prompt)
        ids = [t for t, _ in seq]
        assert ids[: len(expected)] == expected and set(ids[len(expected):]) <= {0}


def test_files_are_deterministic(files, tmp_path):
    again = write_tiny_tokenizers(tmp_path)
    for a, b in ((files.clip_vocab, again.clip_vocab), (files.clip_merges, again.clip_merges),
                 (files.t5_tokenizer_json, again.t5_tokenizer_json)):
        assert open(a, "rb").read() == open(b, "rb").read()
