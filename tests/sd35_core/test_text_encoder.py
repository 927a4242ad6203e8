"""SD3 conditioning: equals the reference's get_cond, computed here with transformers models and tokenizers
holding the same weights; long prompts, per-encoder prompts, prompt weights, T5 length, no T5."""

import os
import random

import pytest
import torch
import transformers
from transformers import CLIPTokenizer, T5TokenizerFast

from sd35_core.loading import tiny
from sd35_core.text.encoder import SD3TextEncoder
from sd35_core.text.tokenization import SD3Tokenizer

CONTEXT = 256  # the tiny T5 width
START, END = 49406, 49407
_rng = random.Random(0)
LONG = " ".join(_rng.choice("a photo of the cat, on moon detailed painting 4k".split()) for _ in range(150))


def _close(ours, theirs, rel=1e-4):
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x {scale:.3g}"
    return err


def _into_hf(hf_model, state):
    own = set(hf_model.state_dict())
    if not any(k.startswith("text_model.") for k in own):  # transformers 5 drops CLIPTextModel's prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert set(missing) <= {"encoder.embed_tokens.weight"} and not unexpected  # T5: tied to shared.weight
    return hf_model.eval()


class Reference:
    """The reference's get_cond, with transformers' models and tokenizers, for prompts of one chunk."""

    def __init__(self, ours: SD3TextEncoder, tokenizer_dirs):
        l_cfg, g_cfg, t_cfg = ours.clip_l.config, ours.clip_g.config, ours.t5.config
        common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=START, eos_token_id=END)
        self.clip_l = _into_hf(
            transformers.CLIPTextModel(
                transformers.CLIPTextConfig(
                    hidden_size=l_cfg.hidden_size,
                    intermediate_size=l_cfg.intermediate_size,
                    num_hidden_layers=l_cfg.num_layers,
                    num_attention_heads=l_cfg.num_heads,
                    hidden_act="quick_gelu",
                    **common,
                )
            ),
            ours.clip_l.state_dict(),
        )
        self.clip_g = _into_hf(
            transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(
                    hidden_size=g_cfg.hidden_size,
                    intermediate_size=g_cfg.intermediate_size,
                    num_hidden_layers=g_cfg.num_layers,
                    num_attention_heads=g_cfg.num_heads,
                    projection_dim=g_cfg.projection_dim,
                    hidden_act="gelu",
                    **common,
                )
            ),
            ours.clip_g.state_dict(),
        )
        self.t5 = _into_hf(
            transformers.T5EncoderModel(
                transformers.T5Config(
                    vocab_size=t_cfg.vocab_size,
                    d_model=t_cfg.d_model,
                    d_kv=t_cfg.d_kv,
                    num_heads=t_cfg.num_heads,
                    d_ff=t_cfg.d_ff,
                    num_layers=t_cfg.num_layers,
                    feed_forward_proj="gated-gelu",
                    dropout_rate=0.0,
                )
            ),
            ours.t5.state_dict(),
        )
        self.clip_tok = CLIPTokenizer.from_pretrained(tokenizer_dirs[0])
        self.t5_tok = T5TokenizerFast.from_pretrained(os.path.dirname(tokenizer_dirs[1]))

    def word_ids(self, prompt, t5=False):
        words = [w for w in prompt.replace("\n", " ").split(" ") if w]
        if t5:
            return [self.t5_tok(w)["input_ids"][:-1] for w in words]
        return [self.clip_tok(w)["input_ids"][1:-1] for w in words]

    def clip_ids(self, prompt, pad):
        ids = [START] + sum(self.word_ids(prompt), []) + [END]
        return ids + [pad] * (77 - len(ids))

    def t5_ids(self, prompt, max_length=None):
        ids = sum(self.word_ids(prompt, t5=True), [])
        if max_length is not None:
            ids = ids[: max_length - 1]
        ids = ids + [1]
        return ids + [0] * (77 - len(ids))

    @torch.no_grad()
    def run_l(self, ids):
        out = self.clip_l(torch.tensor([ids]), output_hidden_states=True)
        return out.hidden_states[-2], out.pooler_output

    @torch.no_grad()
    def run_g(self, ids):
        out = self.clip_g(torch.tensor([ids]), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    @torch.no_grad()
    def run_t5(self, ids):
        return self.t5(input_ids=torch.tensor([ids])).last_hidden_state

    def get_cond(self, prompt):
        l_out, l_pooled = self.run_l(self.clip_ids(prompt, pad=END))
        g_out, g_pooled = self.run_g(self.clip_ids(prompt, pad=0))
        lg = torch.nn.functional.pad(torch.cat([l_out, g_out], dim=-1), (0, CONTEXT - 192))
        return torch.cat([lg, self.run_t5(self.t5_ids(prompt))], dim=-2), torch.cat([l_pooled, g_pooled], dim=-1)


@pytest.fixture(scope="module")
def encoder(tokenizer_dirs):
    return SD3TextEncoder(
        tiny.tiny_clip("clip_l", 2),
        tiny.tiny_clip("clip_g", 3),
        tiny.tiny_t5(4),
        SD3Tokenizer.from_files(*tokenizer_dirs),
    )


@pytest.fixture(scope="module")
def ref(encoder, tokenizer_dirs):
    return Reference(encoder, tokenizer_dirs)


@pytest.mark.parametrize("prompt", ["a photo of a cat, highly detailed", "", "two\nlines  and   spaces"])
def test_unweighted_prompts_equal_the_reference_get_cond(encoder, ref, prompt):
    context, pooled = encoder.encode(prompt)
    expected_context, expected_pooled = ref.get_cond(prompt)
    assert context.shape == (1, 154, CONTEXT) and pooled.shape == (1, 192)
    assert context.dtype == pooled.dtype == torch.float32 and context.device.type == "cpu"
    _close(context, expected_context)
    _close(pooled, expected_pooled)
    assert torch.count_nonzero(context[:, :77, 192:]) == 0  # CLIP states zero-padded to the T5 width


def test_long_prompts_concatenate_every_chunk_and_pool_the_first(encoder, ref):
    tokens = encoder.tokenize(LONG)
    n = len(tokens["l"])
    assert n >= 2 and len(tokens["g"]) == n
    context, pooled = encoder.encode(LONG)
    assert context.shape == (1, 77 * n + 77, CONTEXT)
    for i in range(n):
        l_out, l_pooled = ref.run_l([t for t, _ in tokens["l"][i]])
        g_out, g_pooled = ref.run_g([t for t, _ in tokens["g"][i]])
        _close(context[:, 77 * i : 77 * (i + 1), :64], l_out)
        _close(context[:, 77 * i : 77 * (i + 1), 64:192], g_out)
        if i == 0:
            _close(pooled, torch.cat([l_pooled, g_pooled], dim=-1))
    _close(context[:, 77 * n :], ref.run_t5(ref.t5_ids(LONG, max_length=77)))


def test_separate_prompts_pad_the_shorter_clip_with_empty_chunks(encoder, ref):
    n = len(encoder.tokenize(LONG)["l"])
    context, pooled = encoder.encode("ignored", clip_l_prompt=LONG, clip_g_prompt="a cat", t5_prompt="a dog")
    assert context.shape == (1, 77 * n + 77, CONTEXT)
    g_first, g_pooled = ref.run_g(ref.clip_ids("a cat", pad=0))
    g_empty, _ = ref.run_g(ref.clip_ids("", pad=0))
    _close(context[:, :77, 64:192], g_first)
    for i in range(1, n):
        _close(context[:, 77 * i : 77 * (i + 1), 64:192], g_empty)
    _close(pooled[:, 64:], g_pooled)
    _close(context[:, 77 * n :], ref.run_t5(ref.t5_ids("a dog")))


def test_weight_one_changes_nothing(encoder):
    plain = encoder.encode("a photo of a cat")
    for weighted in ("a photo of a (cat:1.0)", "(a photo of a cat:1)"):
        context, pooled = encoder.encode(weighted)
        assert torch.equal(context, plain[0]) and torch.equal(pooled, plain[1])


@pytest.mark.parametrize("weight", [1.5, 0.5])
def test_weighted_tokens_move_from_the_empty_prompt_by_their_weight(encoder, ref, weight):
    # ComfyUI's semantics: z' = (z - z_empty) * w + z_empty at weighted tokens, for CLIP-L, CLIP-G and T5.
    context, pooled = encoder.encode(f"a photo of a (cat:{weight})")
    plain = "a photo of a cat"
    words_before = ref.word_ids("a photo of a")
    cat_clip = slice(1 + len(sum(words_before, [])), 1 + len(sum(ref.word_ids(plain), [])))
    cat_t5 = slice(len(sum(ref.word_ids("a photo of a", t5=True), [])), len(sum(ref.word_ids(plain, t5=True), [])))
    parts = [
        (slice(0, 64), ref.run_l(ref.clip_ids(plain, END))[0], ref.run_l(ref.clip_ids("", END))[0], cat_clip, 0),
        (slice(64, 192), ref.run_g(ref.clip_ids(plain, 0))[0], ref.run_g(ref.clip_ids("", 0))[0], cat_clip, 0),
        (slice(0, CONTEXT), ref.run_t5(ref.t5_ids(plain)), ref.run_t5(ref.t5_ids("")), cat_t5, 77),
    ]
    for features, z, z_empty, cat, offset in parts:
        expected = z.clone()
        expected[:, cat] = (z[:, cat] - z_empty[:, cat]) * weight + z_empty[:, cat]
        _close(context[:, offset : offset + 77, features], expected)
        assert not torch.allclose(expected[:, cat], z[:, cat])  # the weight really did something
    _close(pooled, ref.get_cond(plain)[1])  # pooled vectors are not weighted


@pytest.mark.parametrize("max_length", [77, 256, 512])
def test_t5_length_option(encoder, ref, max_length):
    prompt = LONG + " " + LONG + " " + LONG
    assert len(sum(ref.word_ids(prompt, t5=True), [])) > 512
    n = len(encoder.tokenize(prompt)["l"])
    context, _ = encoder.encode(prompt, t5_max_length=max_length)
    assert context.shape == (1, 77 * n + max_length, CONTEXT)
    _close(context[:, 77 * n :], ref.run_t5(ref.t5_ids(prompt, max_length=max_length)))


@pytest.mark.parametrize("max_length", [77, 256])
def test_without_t5_the_context_is_the_clip_part_alone_as_comfyui_builds_it(encoder, max_length):
    no_t5 = SD3TextEncoder(encoder.clip_l, encoder.clip_g, None, encoder.tokenizer, context_dim=CONTEXT)
    prompt = LONG + " " + LONG
    n = len(encoder.tokenize(prompt)["l"])
    context, pooled = no_t5.encode(prompt, t5_max_length=max_length)
    with_t5, with_t5_pooled = encoder.encode(prompt, t5_max_length=max_length)
    assert with_t5.shape == (1, 77 * n + max_length, CONTEXT)
    assert context.shape == (1, 77 * n, CONTEXT)
    assert torch.equal(context, with_t5[:, : 77 * n]) and torch.equal(pooled, with_t5_pooled)


def test_settings_errors(encoder):
    with pytest.raises(ValueError, match="context_dim"):
        SD3TextEncoder(encoder.clip_l, encoder.clip_g, None, encoder.tokenizer)
    with pytest.raises(ValueError, match="context_dim"):
        SD3TextEncoder(encoder.clip_l, encoder.clip_g, None, encoder.tokenizer, context_dim=128)
    with pytest.raises(ValueError, match="text_projection"):
        SD3TextEncoder(encoder.clip_l, encoder.clip_l, encoder.t5, encoder.tokenizer)


def test_runs_in_the_requested_dtype_and_returns_float32(encoder):
    bf16 = SD3TextEncoder(encoder.clip_l, encoder.clip_g, encoder.t5, encoder.tokenizer, dtype=torch.bfloat16)
    context, pooled = bf16.encode("a photo of a cat")
    reference, reference_pooled = encoder.encode("a photo of a cat")
    assert context.dtype == pooled.dtype == torch.float32
    assert context.shape == reference.shape and torch.isfinite(context).all()
    _close(context[:, :77], reference[:, :77], rel=5e-2)
    _close(pooled, reference_pooled, rel=5e-2)
