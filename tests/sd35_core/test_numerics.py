"""The non-finite guard: NaN weights and half-precision overflow stop sampling and decoding with a clear error
instead of a silent black image."""

import pytest
import torch

from sd35_core.errors import NonFiniteError
from sd35_core.loading.tiny import tiny_mmdit, tiny_vae
from sd35_core.models.numerics import has_non_finite, weights_label
from sd35_core.sampling.pipeline import txt2img
from sd35_core.sampling.request import SampleRequest

from .sampling_common import cond

SIZE = 32


def _run(model, steps=3, sampler="euler"):
    return txt2img(model, cond(model, 1), cond(model, 2),
                   SampleRequest(steps=steps, cfg=4.0, sampler=sampler, shift=3.0, seed=7), width=SIZE, height=SIZE)


def test_the_check_sees_nan_and_infinity_and_nothing_else():
    x = torch.randn(2, 16, 8, 8)
    assert not has_non_finite(x) and not has_non_finite(x.half()) and not has_non_finite(x.bfloat16())
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 3, 4, 5] = bad
        assert has_non_finite(y) and has_non_finite(y.bfloat16())


def test_nan_weights_stop_sampling_at_the_first_step_naming_dtype_and_what_to_try():
    model = tiny_mmdit("sd3.5_large", seed=0).requires_grad_(False)
    with torch.no_grad():
        # One damaged value, as a bad merge leaves: it reaches every value through the next layer norm. (A NaN
        # inside attention's q/k may instead be dropped by the CPU attention kernel's running max.)
        model.joint_blocks[1].x_block.mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"sampling: the model's output at step 1 of 3 holds NaN \(\d+ of 256 "
                                             r"values\) \(weights float32, computing in float32\); weights in bf16 or "
                                             r"fp32 do not overflow, so the file may be damaged"):
        _run(model)


def test_a_half_precision_overflow_names_the_step_and_float16_and_fp32_weights_cure_it():
    model = tiny_mmdit("sd3.5_large", seed=0).requires_grad_(False)
    with torch.no_grad():
        # Outputs just under fp16's largest value (65504): finite in fp32, past it in fp16 once anything is added.
        model.final_layer.linear.bias.fill_(6.5e4)
    assert not has_non_finite(_run(model, steps=2))
    model = model.half()
    model.compute_dtype = torch.float16
    with pytest.raises(NonFiniteError, match=r"step [12] of 2 holds (NaN|infinite values).*\(weights float16, "
                                             r"computing in float16\); try loading the weights in bf16 or fp32 "
                                             r"\(fp16 overflows"):
        _run(model, steps=2)


def test_weights_label_names_the_storage_of_the_large_matrices():
    model = tiny_mmdit("sd3.5_large", seed=0)
    assert weights_label(model) == "float32"
    assert weights_label(model.to(torch.bfloat16)) == "bfloat16"


def test_weights_label_reads_the_marks_of_a_native_comfyui_scaled_fp8_layer():
    # ComfyUI's scaled-fp8 Linear holds its fp8 weight and a float32 ``scale_weight`` parameter beside it.
    model = tiny_mmdit("sd3.5_large", seed=0)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
            layer.scale_weight = torch.nn.Parameter(torch.ones(()), requires_grad=False)
    assert weights_label(model) == "float8_e4m3fn with per-tensor scales (scaled fp8)"


def _write_and_load(tmp_path, storage: str):
    from bench.gguf_write import write_gguf
    from sd35_core.loading import loader, tiny

    state = tiny_mmdit("sd3.5_large", seed=0).state_dict()
    if storage == "scaled fp8":
        mmdit = tiny_mmdit("sd3.5_large", seed=0)
        scaled, _ = tiny.scaled_fp8_state(state, tiny.linear_weight_keys(mmdit))
        path = tiny.save_state(tmp_path / "m.safetensors", {"": scaled})
        return loader.load_checkpoint(path, "fp32").model.mmdit
    if storage == "gguf":
        path = write_gguf(tmp_path / "m.gguf", {k: v.half() for k, v in state.items()}, "Q8_0")
        return loader.load_checkpoint(path, "fp32").model.mmdit
    path = tiny.save_state(tmp_path / "m.safetensors", {"": state})
    return loader.load_checkpoint(path, "fp8_e4m3fn").model.mmdit


@pytest.mark.parametrize("storage,label,advice", [
    ("scaled fp8", r"float8_e4m3fn with per-tensor scales \(scaled fp8\)",
     r"the per-tensor scales keep fp8 weights in range, so the scaled file itself is the suspect"),
    ("gguf", r"GGUF Q8_0", r"try a less quantized GGUF \(Q8_0\) or the fp16/bf16 file"),
    ("fp8", r"float8_e4m3fn", r"fp8 without per-tensor scales clips .* use a scaled-fp8 file"),
])
def test_the_guard_names_the_storage_and_suggests_what_could_help_for_it(tmp_path, storage, label, advice):
    model = _write_and_load(tmp_path, storage)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=rf"\(weights {label}, computing in \w+\); {advice}"):
        _run(model)


@pytest.mark.parametrize("tiled", [False, True])
def test_a_non_finite_latent_is_refused_by_the_vae_decoder(tiled):
    vae = tiny_vae(seed=0).requires_grad_(False)
    latent = torch.randn(1, 16, 8, 8)
    latent[0, 0, 0, 0] = float("nan")
    decode = (lambda z: vae.decode_tiled(z, 32, 8)) if tiled else vae.decode
    with pytest.raises(NonFiniteError, match=r"VAE decode: the latent to decode holds NaN \(1 of 1024 values\): the "
                                             r"sampler that made it went wrong"):
        decode(latent)


@pytest.mark.parametrize("tiled", [False, True])
def test_a_decoder_with_nan_weights_is_named_as_the_culprit(tiled):
    vae = tiny_vae(seed=0).requires_grad_(False)
    with torch.no_grad():
        vae.decoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    decode = (lambda z: vae.decode_tiled(z, 32, 8)) if tiled else vae.decode
    with pytest.raises(NonFiniteError, match=r"VAE decode: the decoded image holds NaN .* although the latent was "
                                             r"finite \(VAE weights float32, computing in float32\)"):
        decode(torch.randn(1, 16, 8, 8))
