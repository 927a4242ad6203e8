"""Prompt tokenization: ids equal transformers' tokenizers on the real files, framing, chunks, weights."""

import os
import random
import shutil

import pytest
from transformers import CLIPTokenizer, T5TokenizerFast

from sd35_core.text.tokenization import SD3Tokenizer, find_tokenizer_files, weighted_words

VOCAB = (
    "a photo of the cat dog astronaut riding horse on moon highly detailed painting by artist, cinematic "
    "lighting 4k 8k ultra realistic portrait woman man city night neon rain reflections forest mist "
    "golden hour bokeh sharp focus octane render trending artstation masterpiece intricate ornate"
).split()
_rng = random.Random(0)
LONG = " ".join(_rng.choice(VOCAB) for _ in range(300))

# Prompts without weight syntax (literal parentheses escaped): words are the space/newline pieces.
PLAIN = {
    "ascii": "a photo of a cat",
    "case": "A Photo of a CAT, sitting on a Mat!",
    "unicode": "café crème brûlée, Ångström naïve façade 🐱🚀 emoji 👍🏽 猫が好きです 한국어 텍스트 Ελληνικά ΣΑΣ",
    "newlines": "line one\nline two\n\nline  three   with  spaces\tand\ttabs",
    "punctuation": "commas, periods. \\(parens\\) [brackets] {braces} <angles> \"quotes\" it's don't "
    "— - ~x~ #1 @at $5.99 100% a/b\\c ...!!!??",
    "empty": "",
    "spaces": "   ",
    "long": LONG,
    "long word at a chunk boundary": "cat " * 70 + "pneumonoultramicroscopicsilicovolcanoconiosis dog",
    "short word at a chunk boundary": "cat " * 74 + "supercalifragilistic cat",
}


def _plain_words(prompt):
    text = prompt.replace("\\(", "(").replace("\\)", ")").replace("\n", " ")
    return [w for w in text.split(" ") if w]


@pytest.fixture(scope="module")
def ours(tokenizer_dirs):
    return SD3Tokenizer.from_files(*tokenizer_dirs)


@pytest.fixture(scope="module")
def hf_clip(tokenizer_dirs):
    return CLIPTokenizer.from_pretrained(tokenizer_dirs[0])


@pytest.fixture(scope="module")
def hf_t5(tokenizer_dirs):
    return T5TokenizerFast.from_pretrained(os.path.dirname(tokenizer_dirs[1]))


def _hf_word_ids(hf, words, strip_start):
    # The reference tokenizes each word alone and drops the framing tokens.
    return [hf(w)["input_ids"][(1 if strip_start else 0) : -1] for w in words]


def _check_clip_chunks(chunks, word_ids, start, end, pad):
    """Chunk structure: 77 tokens each; start, content, end, padding; whole words kept together."""
    contents = []
    for chunk in chunks:
        ids = [t for t, _ in chunk]
        assert len(ids) == 77 and ids[0] == start
        n = ids.index(end, 1)
        assert ids[n + 1 :] == [pad] * (76 - n)
        contents.append(ids[1:n])
    assert sum(contents, []) == sum(word_ids, [])
    # Walk the words through the chunks: a word under 8 tokens never straddles two chunks, a chunk is
    # only closed when the next word does not fit (a longer word then fills the chunk to the brim).
    position = [0, 0]  # chunk, offset
    for ids in word_ids:
        if not ids:
            continue
        c, o = position
        room = 75 - o
        if len(ids) > room:
            if len(ids) < 8:
                assert len(contents[c]) == o, "a short word was split or a chunk closed early"
                c, o = c + 1, 0
            else:
                assert len(contents[c]) == 75, "a long word must fill the chunk before continuing"
                ids = ids[room:]
                c, o = c + 1, 0
                while len(ids) > 75:
                    assert len(contents[c]) == 75
                    ids, c = ids[75:], c + 1
        assert contents[c][o : o + len(ids)] == ids
        position = [c, o + len(ids)]
    assert position[0] == len(chunks) - 1


# -- ids equal transformers' ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PLAIN))
def test_clip_chunks_hold_transformers_ids_word_by_word(ours, hf_clip, name):
    words = _plain_words(PLAIN[name])
    word_ids = _hf_word_ids(hf_clip, words, strip_start=True)
    start, end = hf_clip.bos_token_id, hf_clip.eos_token_id
    l_chunks, g_chunks = ours.tokenize_clip_l(PLAIN[name]), ours.tokenize_clip_g(PLAIN[name])
    _check_clip_chunks(l_chunks, word_ids, start, end, pad=end)  # CLIP-L pads with the end token
    _check_clip_chunks(g_chunks, word_ids, start, end, pad=0)  # CLIP-G pads with 0
    assert all(w == 1.0 for chunk in l_chunks + g_chunks for _, w in chunk)


def test_long_prompts_become_several_chunks(ours):
    assert len(ours.tokenize_clip_l(LONG)) >= 4
    boundary = ours.tokenize_clip_l(PLAIN["long word at a chunk boundary"])
    assert len(boundary) == 2 and [t for t, _ in boundary[0]][-1] == 49407  # filled to the brim
    assert len(ours.tokenize_clip_g(PLAIN["short word at a chunk boundary"])) == 2


@pytest.mark.parametrize("name", list(PLAIN))
def test_t5_sequence_holds_transformers_ids_word_by_word(ours, hf_t5, name):
    content = sum(_hf_word_ids(hf_t5, _plain_words(PLAIN[name]), strip_start=False), [])
    assert len(content) < 511  # fits, so nothing is truncated
    (seq,) = ours.tokenize_t5(PLAIN[name], max_length=512)
    expected = content + [hf_t5.eos_token_id]
    expected += [hf_t5.pad_token_id] * (77 - len(expected))  # padded to at least 77
    assert [t for t, _ in seq] == expected


def test_words_match_transformers_across_unicode(ours, hf_clip, hf_t5):
    rng = random.Random(1)
    alphabet = list(
        "abcXYZ éÉüßçñ'’\"!?.,;:-_[]{}<>|/\\@#$%^&*+=~`0123456789\t\u00a0\u3000猫が好きです한국어😀👍🏽ΣΑσας\u0301"
        "\u200b\ufeffİı"
    ) + ["<|endoftext|>", "<|startoftext|>", "</s>", "<unk>", "<extra_id_3>"]
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(400)]
    assert ours.clip_l.word_ids(words) == _hf_word_ids(hf_clip, words, strip_start=True)
    assert ours.t5xxl.word_ids(words) == _hf_word_ids(hf_t5, words, strip_start=False)


def test_empty_prompt_framing(ours, hf_clip):
    start, end = hf_clip.bos_token_id, hf_clip.eos_token_id
    assert [t for t, _ in ours.tokenize_clip_l("")[0]] == [start, end] + [end] * 75
    assert [t for t, _ in ours.tokenize_clip_g("")[0]] == [start, end] + [0] * 75
    assert [t for t, _ in ours.tokenize_t5("")[0]] == [1] + [0] * 76
    assert ours.clip_g.empty(77) == [start, end] + [0] * 75
    assert ours.t5xxl.empty(100) == [1] + [0] * 99


# -- T5 length -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [77, 256, 512])
def test_t5_max_length_truncates_keeping_the_end_token(ours, hf_t5, max_length):
    prompt = LONG + " " + LONG  # longer than 512 T5 tokens
    content = sum(_hf_word_ids(hf_t5, _plain_words(prompt), strip_start=False), [])
    assert len(content) >= 512
    (seq,) = ours.tokenize_t5(prompt, max_length=max_length)
    assert [t for t, _ in seq] == content[: max_length - 1] + [1]
    short = ours.tokenize_with_weights("a cat", t5_max_length=max_length)["t5xxl"][0]
    assert len(short) == 77  # short prompts are padded to 77, whatever the cap


@pytest.mark.parametrize("max_length", [76, 513])
def test_t5_max_length_outside_77_to_512_is_refused(ours, max_length):
    with pytest.raises(ValueError, match="t5_max_length"):
        ours.tokenize_t5("a cat", max_length=max_length)


# -- weight syntax -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a (red:1.3) cat", [("a", 1.0), ("red", 1.3), ("cat", 1.0)]),
        ("(cat)", [("cat", 1.1)]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("((cat:1.5))", [("cat", 1.5)]),  # an explicit weight is absolute, not relative to the nesting
        ("a (b (c:0.5) d) e", [("a", 1.0), ("b", 1.1), ("c", 0.5), ("d", 1.1), ("e", 1.0)]),
        ("(cat:abc)", [("cat:abc", 1.1)]),  # not a number: stays text
        ("\\(cat\\) \\(dog:2\\)", [("(cat)", 1.0), ("(dog:2)", 1.0)]),  # escaped: literal
        ("(unclosed cat", [("(unclosed", 1.0), ("cat", 1.0)]),
        ("(a red\ncat:0.8)", [("a", 0.8), ("red", 0.8), ("cat", 0.8)]),
    ],
)
def test_weight_syntax(prompt, expected):
    got = weighted_words(prompt)
    assert [w for w, _ in got] == [w for w, _ in expected]
    assert [x for _, x in got] == pytest.approx([x for _, x in expected])


def test_weights_follow_their_tokens_into_every_chunk(ours, hf_clip, hf_t5):
    prompt = "a photo of a (red cat:1.3), ((best quality))"
    clip_ids = _hf_word_ids(hf_clip, ["a", "photo", "of", "a", "red", "cat", ",", "best", "quality"], True)
    weights = [1.0, 1.0, 1.0, 1.0, 1.3, 1.3, 1.0, 1.21, 1.21]
    expected = [(t, w) for ids, w in zip(clip_ids, weights, strict=True) for t in ids]
    for chunk in (ours.tokenize_clip_l(prompt)[0], ours.tokenize_clip_g(prompt)[0]):
        content = chunk[1 : 1 + len(expected)]
        assert [t for t, _ in content] == [t for t, _ in expected]
        assert [w for _, w in content] == pytest.approx([w for _, w in expected])
        assert all(w == 1.0 for _, w in chunk[1 + len(expected) :])  # end and padding
    t5_ids = _hf_word_ids(hf_t5, ["a", "photo", "of", "a", "red", "cat", ",", "best", "quality"], False)
    t5_expected = [w for ids, w in zip(t5_ids, weights, strict=True) for _ in ids]
    assert [w for _, w in ours.tokenize_t5(prompt)[0][: len(t5_expected)]] == pytest.approx(t5_expected)


# -- finding the files ---------------------------------------------------------------------------------


def _fake_comfyui(root, tokenizer_dirs):
    clip_dir, t5_json = tokenizer_dirs
    shutil.copytree(clip_dir, root / "comfy" / "sd1_tokenizer")
    (root / "comfy" / "text_encoders" / "t5_tokenizer").mkdir(parents=True)
    shutil.copy(t5_json, root / "comfy" / "text_encoders" / "t5_tokenizer" / "tokenizer.json")
    return root


def test_explicit_folder_comes_first(tokenizer_dirs, tmp_path):
    clip_dir, t5_json = find_tokenizer_files(os.path.dirname(tokenizer_dirs[0]), tmp_path / "later")
    assert os.path.samefile(clip_dir, tokenizer_dirs[0]) and os.path.samefile(t5_json, tokenizer_dirs[1])


def test_a_hosts_own_tokenizer_folders_are_taken_as_they_are(tmp_path, tokenizer_dirs):
    root = _fake_comfyui(tmp_path / "ComfyUI", tokenizer_dirs)
    clip, t5 = root / "comfy" / "sd1_tokenizer", root / "comfy" / "text_encoders" / "t5_tokenizer"
    assert find_tokenizer_files(None, clip, t5) == (str(clip), str(t5 / "tokenizer.json"))
    tok = SD3Tokenizer.from_files(*find_tokenizer_files(clip, t5))
    assert [t for t, _ in tok.tokenize_clip_l("a cat")[0][:4]] == [49406, 320, 2368, 49407]


def test_missing_tokenizer_files_raise_an_error_listing_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        find_tokenizer_files(tmp_path / "mine", tmp_path / "theirs")
    message = str(info.value)
    for place in (tmp_path / "mine" / "clip", tmp_path / "mine" / "t5" / "tokenizer.json",
                  tmp_path / "theirs" / "sd1_tokenizer", tmp_path / "theirs" / "t5_tokenizer" / "tokenizer.json"):
        assert str(place) in message
    assert "clip/vocab.json" in message  # the default hint says what a folder must hold
    with pytest.raises(FileNotFoundError, match="use --tokenizers"):
        find_tokenizer_files(tmp_path / "mine", hint="use --tokenizers")


def test_the_core_reads_no_environment_variable(tmp_path, tokenizer_dirs, monkeypatch):
    root = _fake_comfyui(tmp_path / "ComfyUI", tokenizer_dirs)
    monkeypatch.setenv("COMFYUI_PATH", str(root))
    with pytest.raises(FileNotFoundError, match="no folder given"):
        find_tokenizer_files()


def test_from_files_names_a_missing_file(tmp_path, tokenizer_dirs):
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        SD3Tokenizer.from_files(tmp_path, tokenizer_dirs[1])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SD3Tokenizer.from_files(tokenizer_dirs[0], tmp_path / "tokenizer.json")
