"""The LoRA node through the sampler and text encode nodes: chains, strengths, and an untouched base."""

import pytest
import torch

from .test_sampling import LARGE, SIZE, sampler_inputs

LORA = "tiny-sd3.5_large_lora.safetensors"
PROMPT = "a lighthouse at dusk"


@pytest.fixture
def base(run_node):
    model, _, _ = run_node("SD35CheckpointLoader", ckpt_name=LARGE, weight_dtype="default")
    (clip,) = run_node("SD35TextEncoderLoader", clip_l_name="clip_l.safetensors", clip_g_name="clip_g.safetensors",
                       t5xxl_name="t5xxl_fp16.safetensors", device="default")
    return model, clip


def _generate(run_node, model, clip):
    (pos,) = run_node("SD35TextEncode", clip=clip, text=PROMPT)
    (neg,) = run_node("SD35TextEncode", clip=clip, text="")
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    (out,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **sampler_inputs())
    return pos[0][0], out["samples"]


def _lora(run_node, model, clip, strength_model=1.0, strength_clip=1.0):
    return run_node("SD35LoraLoader", model=model, clip=clip, lora_name=LORA, strength_model=strength_model,
                    strength_clip=strength_clip)


def test_lora_changes_model_and_text_and_leaves_the_base_alone(run_node, base):
    model, clip = base
    weights = {k: v.clone() for k, v in model.mmdit.state_dict().items()}
    base_ctx, base_out = _generate(run_node, model, clip)
    l_model, l_clip = _lora(run_node, model, clip)
    assert l_model is not model and l_model.mmdit is model.mmdit  # shares the module, no copy
    assert model.loras == () and clip.loras == () and len(l_model.loras) == len(l_clip.loras) == 1
    ctx, out = _generate(run_node, l_model, l_clip)
    assert not torch.allclose(ctx, base_ctx, atol=1e-3) and not torch.allclose(out, base_out, atol=1e-3)
    # The base elsewhere in the graph, after the LoRA'd run: bit-identical to before.
    again_ctx, again_out = _generate(run_node, model, clip)
    assert torch.equal(again_ctx, base_ctx) and torch.equal(again_out, base_out)
    assert all(torch.equal(v, weights[k]) for k, v in model.mmdit.state_dict().items())


def test_strength_zero_is_the_base_and_requeues_with_other_strengths_are_right(run_node, base):
    model, clip = base
    base_ctx, base_out = _generate(run_node, model, clip)
    zero_ctx, zero_out = _generate(run_node, *_lora(run_node, model, clip, 0.0, 0.0))
    assert torch.equal(zero_ctx, base_ctx) and torch.equal(zero_out, base_out)
    first = _generate(run_node, *_lora(run_node, model, clip, 0.8, -0.5))
    other = _generate(run_node, *_lora(run_node, model, clip, 0.3, 1.0))
    repeat = _generate(run_node, *_lora(run_node, model, clip, 0.8, -0.5))
    assert not torch.allclose(first[1], other[1], atol=1e-3)
    assert torch.equal(first[0], repeat[0]) and torch.equal(first[1], repeat[1])


def test_chained_loras_stack_in_order_and_model_only_works(run_node, base):
    model, clip = base
    once, clip_once = _lora(run_node, model, clip, 0.5, 0.5)
    twice, clip_twice = _lora(run_node, once, clip_once, 0.5, 0.5)
    full, clip_full = _lora(run_node, model, clip, 1.0, 1.0)
    assert len(twice.loras) == 2
    a, b = _generate(run_node, twice, clip_twice), _generate(run_node, full, clip_full)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-4)
    only_model, no_clip = run_node("SD35LoraLoader", model=model, lora_name=LORA, strength_model=1.0,
                                   strength_clip=1.0)
    assert no_clip is None and len(only_model.loras) == 1


def test_wrong_inputs_are_clear_errors(run_node, base):
    model, clip = base
    with pytest.raises(ValueError, match="SD3.5 LoRA Loader: the model input"):
        run_node("SD35LoraLoader", model=clip, lora_name=LORA, strength_model=1.0, strength_clip=1.0)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        run_node("SD35LoraLoader", model=model, lora_name="missing.safetensors", strength_model=1.0,
                 strength_clip=1.0)


def test_a_lora_model_bridges_only_inside_comfyui(run_node, base):
    # Inside ComfyUI the LoRA stack rides into the MODEL as weight patches (tests/host/test_bridge_host.py).
    model, clip = base
    l_model, _ = _lora(run_node, model, clip)
    with pytest.raises(ValueError, match="only inside ComfyUI"):
        run_node("SD35ToComfyModel", model=l_model, shift=0.0)
