"""ComfyUI's scaled fp8 (Comfy-Org's *_fp8_scaled files): fp8 weights times a per-tensor scale, everywhere it occurs.

Each file is built in the layout ComfyUI writes and reads (``comfy/ops.py`` scaled_fp8_ops: effective weight =
fp8 x ``scale_weight``; ``comfy/model_detection.py``: the ``scaled_fp8`` marker at the part's prefix), next to a
plain float32 file holding the same effective weights; both must sample the same latents.
"""

import re

import pytest
import torch

from sd35_core.errors import CheckpointError
from sd35_core.loading import loader
from sd35_core.loading.checkpoint import write_safetensors
from sd35_core.loading.lora import applied, load_lora
from sd35_core.loading.tiny import write_lora
from sd35_core.models.latent import process_in
from sd35_core.sampling.control import ControlHint
from sd35_core.sampling.guidance import CondEntry
from sd35_core.sampling.pipeline import txt2img
from sd35_core.sampling.request import SampleRequest

from . import scaled_files as files

SIZE = 32
TOL = 1e-4


def _request(**kw):
    return SampleRequest(steps=3, cfg=4.0, sampler="euler", shift=3.0, seed=7, **kw)


def _cond(model, seed, context=None):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ctx = torch.randn(1, 8, cfg.context_dim, generator=g) if context is None else context
    return CondEntry(ctx, torch.randn(1, cfg.pooled_dim, generator=g))


def _latents(mmdit, context=None, **kw):
    with torch.no_grad():
        return txt2img(mmdit, _cond(mmdit, 1, context), _cond(mmdit, 2), _request(**kw), width=SIZE, height=SIZE)


def _diff(a, b) -> float:
    """Max abs difference, within the parity bar; printed for the record (``pytest -s``)."""
    d = (a - b).abs().max().item()
    print(f"parity: max abs diff {d:.2e}")
    assert d <= TOL, d
    return d


def _scaled_layers(module):
    return [m for m in module.modules() if getattr(m, "weight_scale", None) is not None]


def test_a_scaled_checkpoint_samples_as_its_plain_twin_and_keeps_fp8(tmp_path):
    scaled_path, plain_path = files.checkpoint_pair(tmp_path)
    scaled, plain = loader.load_checkpoint(scaled_path, "fp32"), loader.load_checkpoint(plain_path, "fp32")
    layers = _scaled_layers(scaled.model.mmdit)
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert not _scaled_layers(plain.model.mmdit)
    tokens = torch.randint(0, 32128, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # fp8 storage computes in bf16 unless told (as for unscaled fp8 files); parity is measured in float32
        f32 = torch.float32
        ctx_scaled, ctx_plain = scaled.text_encoders.t5(tokens, dtype=f32), plain.text_encoders.t5(tokens, dtype=f32)
    assert _scaled_layers(scaled.text_encoders.t5)
    _diff(ctx_scaled, ctx_plain)
    _diff(_latents(scaled.model.mmdit, ctx_scaled), _latents(plain.model.mmdit, ctx_plain))


@pytest.mark.parametrize("names", [("scale_weight", "scale_input"), ("weight_scale", "input_scale"),
                                   ("scale_weight", None)])
def test_bare_diffusion_models_with_either_scale_name_and_input_scales(tmp_path, names):
    scaled_path, plain_path = files.pair(tmp_path, "mmdit", files.mmdit_states(
        "sd3.5_medium", scale_name=names[0], input_scale_name=names[1], marker=names[0] == "scale_weight"))
    scaled, plain = loader.load_checkpoint(scaled_path, "fp32"), loader.load_checkpoint(plain_path, "fp32")
    _diff(_latents(scaled.model.mmdit), _latents(plain.model.mmdit))


def test_bf16_compute_rounds_the_effective_weight_once_as_the_plain_file_in_bf16(tmp_path):
    scaled_path, plain_path = files.pair(tmp_path, "mmdit", files.mmdit_states("sd3_medium"))
    scaled, plain = loader.load_checkpoint(scaled_path, "bf16"), loader.load_checkpoint(plain_path, "bf16")
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in _scaled_layers(scaled.model.mmdit))
    a, b = _latents(scaled.model.mmdit), _latents(plain.model.mmdit)
    assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("role,seed", [("t5xxl", 4), ("clip_l", 2), ("clip_g", 3)])
def test_separate_scaled_text_encoders_encode_as_their_plain_twins(tmp_path, role, seed):
    states = files.t5_states(seed) if role == "t5xxl" else files.clip_states(role, seed)
    scaled_path, plain_path = files.pair(tmp_path, role, states)
    scaled = loader.load_text_encoder(scaled_path, role, "fp32")
    plain = loader.load_text_encoder(plain_path, role, "fp32")
    assert _scaled_layers(scaled)
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = scaled(tokens, dtype=torch.float32), plain(tokens, dtype=torch.float32)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
        if isinstance(x, torch.Tensor):
            _diff(x, y)
    if role == "t5xxl":  # the states as the sampler's context: the latents agree too
        model = loader.load_checkpoint(tiny_bare(tmp_path), "fp32").model.mmdit
        _diff(_latents(model, a), _latents(model, b))


def tiny_bare(tmp_path):
    from sd35_core.loading.tiny import write_checkpoint

    return write_checkpoint(tmp_path / "bare.safetensors", "sd3.5_large", bare=True)


def test_a_scaled_controlnet_controls_as_its_plain_twin(tmp_path):
    scaled_path, plain_path = files.pair(tmp_path, "controlnet", files.controlnet_states())
    model = loader.load_checkpoint(tiny_bare(tmp_path), "fp32").model
    hint_latent = process_in(torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(9)))
    out = []
    for path in (scaled_path, plain_path):
        cn = loader.load_controlnet(path, model, "fp32")
        out.append(_latents(model.mmdit, controls=(ControlHint(cn, hint_latent),)))
    assert _scaled_layers(loader.load_controlnet(scaled_path, model, "fp32"))
    _diff(*out)
    assert (out[0] - _latents(model.mmdit)).abs().max() > 1e-3  # the ControlNet did act


def test_a_lora_on_a_scaled_model_applies_to_the_effective_weights(tmp_path):
    scaled_path, plain_path = files.pair(tmp_path, "mmdit", files.mmdit_states("sd3.5_large"))
    lora_path = write_lora(tmp_path / "lora.safetensors", "sd3.5_large", text_encoders=False)
    out = []
    for path in (scaled_path, plain_path):
        mmdit = loader.load_checkpoint(path, "fp32").model.mmdit
        with applied(mmdit, [(load_lora(lora_path, mmdit=mmdit).model, 0.8)]):
            out.append(_latents(mmdit))
        if path == scaled_path:  # the hook is gone afterwards and the fp8 weights untouched
            assert all(getattr(m, "weight_patch", None) is None for m in mmdit.modules())
    _diff(*out)
    base = _latents(loader.load_checkpoint(plain_path, "fp32").model.mmdit)
    assert (out[0] - base).abs().max() > 1e-3  # the LoRA did act


def _rewrite(src, dst, edit):
    from safetensors.torch import load_file

    state = load_file(src)
    edit(state)
    return write_safetensors(dst, state)


def test_a_missing_scale_is_refused_naming_the_weight(tmp_path):
    scaled_path, _ = files.pair(tmp_path, "mmdit", files.mmdit_states("sd3_medium"))
    bad = _rewrite(scaled_path, tmp_path / "bad.safetensors",
                   lambda s: s.pop("joint_blocks.1.x_block.mlp.fc2.scale_weight"))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: expected a per-tensor scale "
                                              r"\('joint_blocks\.1\.x_block\.mlp\.fc2\.scale_weight'\)"):
        loader.load_checkpoint(bad)


@pytest.mark.parametrize("shape,kind", [((1, 128), "per-channel scale"), ((128,), "per-channel scale"),
                                        ((2,), "scale of another shape")])
def test_a_per_channel_or_misshaped_scale_is_refused_by_name(tmp_path, shape, kind):
    scaled_path, _ = files.pair(tmp_path, "mmdit", files.mmdit_states("sd3_medium"))
    key = "joint_blocks.0.x_block.attn.proj.scale_weight"
    shape = (128, 1) if shape == (1, 128) else shape
    bad = _rewrite(scaled_path, tmp_path / "bad.safetensors", lambda s: s.__setitem__(key, torch.ones(shape)))
    pattern = rf"'{re.escape(key)}' as a per-tensor scale .*shape {re.escape(str(list(shape)))}, a {kind}"
    with pytest.raises(CheckpointError, match=pattern):
        loader.load_checkpoint(bad)


def test_a_scale_without_its_weight_or_on_a_norm_is_refused(tmp_path):
    scaled_path, _ = files.pair(tmp_path, "mmdit", files.mmdit_states("sd3_medium"))
    orphan = _rewrite(scaled_path, tmp_path / "orphan.safetensors",
                      lambda s: s.__setitem__("joint_blocks.0.x_block.nothing.scale_weight", torch.tensor(1.0)))
    with pytest.raises(CheckpointError, match=r"'joint_blocks\.0\.x_block\.nothing\.weight' beside the per-tensor "
                                              r"scale 'joint_blocks\.0\.x_block\.nothing\.scale_weight'"):
        loader.load_checkpoint(orphan)
    scaled_path, _ = files.pair(tmp_path, "qk", files.mmdit_states("sd3.5_medium"))  # with qk-norm weights
    norm = _rewrite(scaled_path, tmp_path / "norm.safetensors",
                    lambda s: s.__setitem__("joint_blocks.0.x_block.attn.ln_q.scale_weight", torch.tensor(1.0)))
    with pytest.raises(CheckpointError, match=r"per-tensor scales only beside linear or convolution weights"):
        loader.load_checkpoint(norm)
    zero = _rewrite(scaled_path, tmp_path / "zero.safetensors",
                    lambda s: s.__setitem__("joint_blocks.0.x_block.attn.proj.scale_weight", torch.tensor(0.0)))
    with pytest.raises(CheckpointError, match=r"'joint_blocks\.0\.x_block\.attn\.proj\.scale_weight' as a finite "
                                              r"positive per-tensor scale; it is 0\.0"):
        loader.load_checkpoint(zero)
