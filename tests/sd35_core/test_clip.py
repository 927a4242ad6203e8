"""CLIP text encoders: HF key layout, shape-derived config, parity with transformers' CLIP text models."""

import pytest
import torch
import transformers

from sd35_core.errors import CheckpointError
from sd35_core.loading.checkpoint import DTypePolicy, load_weights, open_safetensors
from sd35_core.loading.tiny import randomize_, save_state
from sd35_core.models.clip import CLIPConfig, CLIPTextModel
from sd35_core.text.tokenization import SD3Tokenizer

# Shared tiny shapes (common brief) and the released sizes.
TINY_L = dict(hidden=64, layers=2, intermediate=256, act="quick_gelu", projection=None)
TINY_G = dict(hidden=128, layers=3, intermediate=512, act="gelu", projection=128)
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, 4k, detailed", ""]


def _close(ours, theirs, rel=1e-4):
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x {scale:.3g}"
    return err


def _config(spec):
    hidden = spec["hidden"]
    return CLIPConfig(
        vocab_size=49408,
        hidden_size=hidden,
        num_layers=spec["layers"],
        num_heads=hidden // 64,
        intermediate_size=spec["intermediate"],
        max_positions=77,
        hidden_act=spec["act"],
        projection_dim=spec["projection"],
    )


def _hf_model(spec, seed):
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["hidden"] // 64,
        max_position_embeddings=77,
        hidden_act=spec["act"],
        projection_dim=spec["projection"] or spec["hidden"],
        bos_token_id=49406,
        eos_token_id=49407,
    )
    cls = transformers.CLIPTextModelWithProjection if spec["projection"] else transformers.CLIPTextModel
    return randomize_(cls(config), seed).eval()


def _file_state(hf_model):
    """The HF model's weights under the keys files use (transformers 5 drops CLIPTextModel's prefix)."""
    state = hf_model.state_dict()
    if not any(k.startswith("text_model.") for k in state):
        state = {f"text_model.{k}": v for k, v in state.items()}
    return state


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dirs):
    return SD3Tokenizer.from_files(*tokenizer_dirs)


def _load_ours(hf_model, tmp_path, act):
    """Write the HF model's weights as a safetensors file and load them with our loader."""
    path = save_state(tmp_path / "clip.safetensors", {"": _file_state(hf_model)})
    file = open_safetensors(path)
    config = CLIPConfig.from_shapes(file.shapes(), hidden_act=act)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return load_weights(model, file, "", DTypePolicy()), config


# -- layout and config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        TINY_L,
        TINY_G,
        dict(hidden=768, layers=12, intermediate=3072, act="quick_gelu", projection=768),
        dict(hidden=1280, layers=32, intermediate=5120, act="gelu", projection=1280),
    ],
    ids=["tiny-l", "tiny-g", "clip-l", "clip-g"],
)
def test_config_is_derived_from_shapes_with_heads_of_width_64(spec):
    config = _config(spec)
    model = CLIPTextModel(config, device="meta")
    assert CLIPConfig.from_shapes(_shapes(model.state_dict()), hidden_act=spec["act"]) == config
    assert config.num_heads * 64 == config.hidden_size


@pytest.mark.parametrize("spec", [TINY_L, TINY_G], ids=["clip-l", "clip-g"])
def test_state_dict_keys_are_the_hf_keys(spec):
    ours = set(CLIPTextModel(_config(spec), device="meta").state_dict())
    theirs = set(_file_state(_hf_model(spec, 0)))
    assert ours == theirs


def test_clip_l_files_without_text_projection_load_without_one(tmp_path):
    assert "text_projection.weight" not in _file_state(_hf_model(TINY_L, 0))  # nor has HF's CLIPTextModel
    model, config = _load_ours(_hf_model(TINY_L, 0), tmp_path, "quick_gelu")
    assert config.projection_dim is None and model.text_projection is None
    with pytest.raises(ValueError, match="text_projection"):
        model(torch.zeros(1, 77, dtype=torch.long), project_pooled=True)


def test_missing_tensors_and_unknown_activations_are_clear_errors():
    shapes = _shapes(CLIPTextModel(_config(TINY_G), device="meta").state_dict())
    del shapes["text_model.final_layer_norm.weight"]
    with pytest.raises(CheckpointError, match="text_model.final_layer_norm.weight"):
        CLIPConfig.from_shapes(shapes, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPConfig.from_shapes(shapes, hidden_act="relu")


# -- parity with transformers --------------------------------------------------------------------------


def _tokens(tokenizer, pad_with_end):
    rules = tokenizer.clip_l if pad_with_end else tokenizer.clip_g
    chunks = [c for p in PROMPTS for c in rules.chunks(p)]
    return torch.tensor([[t for t, _ in c] for c in chunks])


def test_clip_l_matches_transformers_clip_text_model(tmp_path, tokenizer):
    # CLIP-L pads with the end token, so this also checks that pooling takes the first one.
    hf = _hf_model(TINY_L, seed=1)
    ours, _ = _load_ours(hf, tmp_path, "quick_gelu")
    tokens = _tokens(tokenizer, pad_with_end=True)
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        penultimate, pooled = ours(tokens)
    _close(penultimate, out.hidden_states[-2])
    _close(pooled, out.pooler_output)


def test_clip_g_matches_transformers_clip_text_model_with_projection(tmp_path, tokenizer):
    hf = _hf_model(TINY_G, seed=2)
    ours, config = _load_ours(hf, tmp_path, "gelu")
    assert config.projection_dim == 128
    tokens = _tokens(tokenizer, pad_with_end=False)
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        penultimate, pooled = ours(tokens, project_pooled=True)
        _, unprojected = ours(tokens)
    _close(penultimate, out.hidden_states[-2])
    _close(pooled, out.text_embeds)
    _close(unprojected, out.last_hidden_state[torch.arange(len(tokens)), tokens.argmax(-1)])


def test_computes_in_the_requested_dtype_whatever_the_storage(tokenizer):
    model = randomize_(CLIPTextModel(_config(TINY_G)), 4).eval()
    tokens = _tokens(tokenizer, pad_with_end=False)
    with torch.no_grad():
        ref_hidden, ref_pooled = model(tokens, project_pooled=True)
        hidden, pooled = model(tokens, project_pooled=True, dtype=torch.bfloat16)
        half = model.to(torch.float16)
        stored_hidden, _ = half(tokens, project_pooled=True, dtype=torch.float32)
    assert hidden.dtype == pooled.dtype == torch.bfloat16
    assert stored_hidden.dtype == torch.float32
    _close(hidden.float(), ref_hidden, rel=5e-2)
    _close(pooled.float(), ref_pooled, rel=5e-2)
    _close(stored_hidden, ref_hidden, rel=5e-3)
