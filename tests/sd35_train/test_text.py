import torch

from sd35_core.text.encoder import SD3TextEncoder
from sd35_train.text import build_text_encoders, encode_captions, load_tokenizer, text_config_for, write_tokenizers


def test_batched_captions_equal_the_one_prompt_path(tmp_path):
    write_tokenizers(str(tmp_path))
    encoders = build_text_encoders(text_config_for(str(tmp_path)), seed=0)
    tok = load_tokenizer(str(tmp_path))
    captions = ["a red circle on the left of a blue background", "green square, top, on a black background"]
    cache = encode_captions(encoders, tok, captions, batch=2)
    assert cache.captions == ["", *captions]
    text = SD3TextEncoder(encoders["clip_l"], encoders["clip_g"], encoders["t5xxl"], tok)
    for i, c in enumerate(cache.captions):
        ctx, pooled = text.encode(c)
        torch.testing.assert_close(cache.context[i], ctx[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(cache.pooled[i], pooled[0], rtol=0, atol=1e-5)


def test_tokenizers_are_small_and_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_tokenizers(str(a))
    write_tokenizers(str(b))
    for name in ("clip/vocab.json", "clip/merges.txt", "t5/tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    cfg = text_config_for(str(a))
    assert cfg.clip_vocab < 2000 and cfg.t5_vocab < 1000
