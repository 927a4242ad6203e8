"""T5 v1.1 encoder: HF key layout, shape-derived config, embedding key variants, parity with transformers."""

import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from sd35_core.errors import CheckpointError
from sd35_core.loading.checkpoint import DTypePolicy, load_weights, open_safetensors
from sd35_core.loading.tiny import randomize_, save_state
from sd35_core.models.t5 import T5Config, T5Encoder, relative_position_bucket

TINY = T5Config(vocab_size=32128, d_model=256, d_kv=64, num_heads=4, d_ff=512, num_layers=2)
XXL = T5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)


def _close(ours, theirs, rel=1e-4):
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x {scale:.3g}"
    return err


def _hf_model(seed=0):
    config = transformers.T5Config(
        vocab_size=TINY.vocab_size,
        d_model=TINY.d_model,
        d_kv=TINY.d_kv,
        num_heads=TINY.num_heads,
        d_ff=TINY.d_ff,
        num_layers=TINY.num_layers,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    return randomize_(transformers.T5EncoderModel(config), seed).eval()


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def _tokens(length, seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 32000, (batch, length), generator=gen)
    tokens[:, length // 2] = 1  # end token, then padding that still takes part in attention
    tokens[:, length // 2 + 1 :] = 0
    return tokens


@pytest.fixture(scope="module")
def hf_t5():
    return _hf_model(seed=5)


# -- layout and config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, XXL], ids=["tiny", "t5-xxl"])
def test_config_is_derived_from_shapes(config):
    shapes = _shapes(T5Encoder(config, device="meta").state_dict())
    assert T5Config.from_shapes(shapes) == config
    shapes["encoder.embed_tokens.weight"] = shapes.pop("shared.weight")
    assert T5Config.from_shapes(shapes) == config


def test_state_dict_keys_are_the_hf_keys_with_the_embedding_as_shared(hf_t5):
    ours = set(T5Encoder(TINY, device="meta").state_dict())
    assert ours == set(hf_t5.state_dict()) - {"encoder.embed_tokens.weight"}
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in ours


def test_incomplete_or_original_t5_files_are_clear_errors():
    shapes = _shapes(T5Encoder(TINY, device="meta").state_dict())
    no_embed = {k: v for k, v in shapes.items() if k != "shared.weight"}
    with pytest.raises(CheckpointError, match="shared.weight"):
        T5Config.from_shapes(no_embed)
    v10 = dict(shapes)
    v10["encoder.block.0.layer.1.DenseReluDense.wi.weight"] = v10.pop(
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    )
    with pytest.raises(CheckpointError, match="v1.1"):
        T5Config.from_shapes(v10)


# -- parity with transformers --------------------------------------------------------------------------


def test_relative_position_buckets_match_transformers():
    offsets = torch.arange(-700, 701)
    theirs = HFT5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(relative_position_bucket(offsets, 32, 128), theirs)


@pytest.mark.parametrize("embedding", ["shared", "embed_tokens", "both"])
def test_loads_every_embedding_layout_and_matches_transformers(tmp_path, hf_t5, embedding):
    state = {k: v.clone() for k, v in hf_t5.state_dict().items()}  # untie: safetensors refuses shared memory
    if embedding == "shared":
        del state["encoder.embed_tokens.weight"]
    elif embedding == "embed_tokens":
        del state["shared.weight"]
    file = open_safetensors(save_state(tmp_path / "t5.safetensors", {"": state}))
    shapes = file.shapes()
    with torch.device("meta"):
        ours = T5Encoder(T5Config.from_shapes(shapes))
    load_weights(ours, file, "", DTypePolicy(), key_map=T5Encoder.key_map(shapes))
    # 77 tokens as SD3 uses; 300 reaches past max_distance, where offsets share the last buckets.
    for length in (77, 300):
        tokens = _tokens(length)
        with torch.no_grad():
            theirs = hf_t5(input_ids=tokens).last_hidden_state
            out = ours(tokens)
        _close(out, theirs)


def test_padding_is_attended_to_like_the_reference(hf_t5):
    # No attention mask: changing a padding token changes the states of the prompt tokens.
    ours = T5Encoder(TINY)
    ours.load_state_dict({k: v for k, v in hf_t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
    tokens = _tokens(77, batch=1)
    changed = tokens.clone()
    changed[0, -1] = 5
    with torch.no_grad():
        assert not torch.allclose(ours(tokens)[0, :10], ours(changed)[0, :10])


def test_float16_keeps_the_residual_stream_in_float32_so_large_activations_do_not_overflow(hf_t5):
    ours = T5Encoder(TINY)
    ours.load_state_dict({k: v for k, v in hf_t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
    with torch.no_grad():
        for block in ours.encoder.block:  # T5-XXL-like: feed-forward outputs beyond the float16 range
            block.layer[1].DenseReluDense.wo.weight.mul_(1e5)
    seen = []
    hook = ours.encoder.final_layer_norm.register_forward_hook(lambda m, i, o: seen.append(i[0].abs().max()))
    tokens = _tokens(77)
    with torch.no_grad():
        reference = ours(tokens, dtype=torch.float32)
        half = ours.half()(tokens, dtype=torch.float16)
    hook.remove()
    assert seen[0] > torch.finfo(torch.float16).max  # the float32 residual stream really is that large
    assert torch.isfinite(half).all()
    _close(half.float(), reference, rel=2e-2)


def test_bfloat16_compute_with_float32_weights_is_as_close_as_transformers_own_bfloat16(hf_t5):
    ours = T5Encoder(TINY)
    ours.load_state_dict({k: v for k, v in hf_t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
    tokens = _tokens(77)
    with torch.no_grad():
        reference = ours(tokens)
        out = ours(tokens, dtype=torch.bfloat16)
        theirs = _hf_model(seed=5).to(torch.bfloat16)(input_ids=tokens).last_hidden_state
    assert out.dtype == torch.float32  # the residual stream stays float32
    # Random tiny weights make unscaled T5 attention very peaked, so bfloat16 noise is large here; it
    # must not be larger than in transformers' bfloat16 model.
    assert (out - reference).abs().mean() <= (theirs.float() - reference).abs().mean()
