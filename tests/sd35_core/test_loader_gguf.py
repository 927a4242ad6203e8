"""GGUF diffusion models (as city96's ComfyUI-GGUF tools write them) load, stay quantized, and sample right.

The files are written by the ``gguf`` package (``bench/gguf_write.py`` mirrors the tools' type rules); the
references are the same weights in safetensors, and for quantized files the gguf package's own
dequantization of the file, run in float32.
"""

import gguf
import pytest
import torch

from bench.gguf_write import dequantized_state, patch_tensor_type, write_gguf
from sd35_core.errors import CheckpointError
from sd35_core.loading import loader, tiny
from sd35_core.models import ops
from sd35_core.sampling.pipeline import txt2img
from sd35_core.sampling.request import SampleRequest

from .sampling_common import cond

VARIANTS = ("sd3.5_medium", "sd3.5_large")
QKV = "joint_blocks.0.x_block.attn.qkv.weight"


def _latents(model):
    """A short CFG sampling run; the latents are what the comparisons are about."""
    m = model.mmdit
    settings = SampleRequest(steps=3, cfg=3.0, sampler="euler", shift=3.0, seed=7)
    return txt2img(m, cond(m, 1), cond(m, 2), settings, width=64, height=64)


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def state(variant):
    return tiny.tiny_mmdit(variant, seed=0).state_dict()


def test_f16_gguf_gives_the_latents_of_the_same_weights_in_safetensors(tmp_path, variant, state):
    half = {k: v.half() for k, v in state.items()}
    st = tiny.save_state(tmp_path / "m.safetensors", {"": half})
    gg = write_gguf(tmp_path / "m-F16.gguf", half, "F16")
    a, b = loader.load_checkpoint(gg, dtype="fp32").model, loader.load_checkpoint(st, dtype="fp32").model
    assert a.variant == b.variant == variant and a.config == b.config == tiny.mmdit_config(variant)
    assert torch.equal(_latents(a), _latents(b))


def test_q8_0_latents_stay_close_to_float32(tmp_path, variant, state):
    st = tiny.save_state(tmp_path / "m.safetensors", {"": state})
    gg = write_gguf(tmp_path / "m-Q8_0.gguf", state, "Q8_0")
    ours, ref = _latents(loader.load_checkpoint(gg, dtype="fp32").model), _latents(loader.load_checkpoint(st).model)
    rel = ((ours - ref).norm() / ref.norm()).item()
    # Q8_0 rounds each weight by about 0.55% RMS (a step of max/127 per 32 values); through untrained random
    # blocks that compounds to about 1.0% (tiny Large, 4 blocks) and 1.3% (tiny Medium, 10 blocks) here.
    # Exactness itself is pinned by the test on the file's own dequantized weights below.
    assert 0 < rel < 0.02, rel


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantized_latents_equal_float32_on_the_files_own_dequantized_weights(tmp_path, variant, state, qtype):
    gg = write_gguf(tmp_path / f"m-{qtype}.gguf", state, qtype)
    st = tiny.save_state(tmp_path / "deq.safetensors", {"": dequantized_state(gg)})
    ours, ref = loader.load_checkpoint(gg, dtype="fp32").model, loader.load_checkpoint(st, dtype="fp32").model
    assert torch.equal(_latents(ours), _latents(ref))


def test_quantized_weights_stay_quantized_under_their_official_keys(tmp_path, state):
    gg = write_gguf(tmp_path / "m-Q4_0.gguf", state, "Q4_0")
    mmdit = loader.load_checkpoint(gg, dtype="fp32").model.mmdit
    reader = gguf.GGUFReader(gg)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(mmdit.state_dict()) == set(state) == set(types)
    qkv = mmdit.get_submodule(QKV.removesuffix(".weight"))
    assert qkv.weight.dtype == torch.uint8 and qkv.weight_quant.qtype.name == "Q4_0"
    assert qkv.weight_quant.shape == state[QKV].shape
    for key, t in mmdit.state_dict().items():
        assert (t.dtype == torch.uint8) == (types[key] == "Q4_0"), key
    # Resident weights are the file's tensor data as stored (blocks, F16, F32), not a float copy of it.
    resident = sum(t.numel() * t.element_size() for t in mmdit.state_dict().values())
    assert resident == sum(int(t.n_bytes) for t in reader.tensors)
    dense = {k: t.dtype for k, t in mmdit.state_dict().items() if types[k] != "Q4_0"}
    assert dense == {k: {"F16": torch.float16, "F32": torch.float32}[types[k]] for k in dense}
    quantized = [k for k, t in types.items() if t == "Q4_0"]
    assert len(quantized) > len(types) // 4
    # 18 bytes per 32 weights: 4.5 bits each, against fp32's 32.
    assert sum(mmdit.state_dict()[k].numel() for k in quantized) * 32 == sum(state[k].numel() for k in quantized) * 18


def test_the_compute_dtype_is_the_policys_and_dequantization_happens_in_it(tmp_path, state):
    gg = write_gguf(tmp_path / "m-Q8_0.gguf", state, "Q8_0")
    model = loader.load_checkpoint(gg, dtype="bf16").model
    qkv = model.mmdit.get_submodule(QKV.removesuffix(".weight"))
    dense = ops.materialize_weight(qkv, torch.bfloat16, torch.device("cpu"))
    assert dense.dtype == torch.bfloat16 and dense.shape == state[QKV].shape
    assert torch.equal(dense, dequantized_state(gg)[QKV].to(torch.bfloat16))
    assert torch.isfinite(_latents(model)).all()


def test_module_dtype_casts_leave_the_blocks_alone(tmp_path, state):
    gg = write_gguf(tmp_path / "m-Q8_0.gguf", state, "Q8_0")
    mmdit = loader.load_checkpoint(gg, dtype="fp32").model.mmdit
    qkv = mmdit.get_submodule(QKV.removesuffix(".weight"))
    before = qkv.weight.clone()
    mmdit.to(torch.float16).to("cpu")
    assert qkv.weight.dtype == torch.uint8 and torch.equal(qkv.weight, before)
    assert qkv.weight_quant.qtype.name == "Q8_0"


def test_pos_embed_stored_without_its_leading_dim_loads_the_same(tmp_path, state):
    # llama.cpp's quantizer drops the size-1 dim unless city96's SD3 patch puts it back.
    flat = {**state, "pos_embed": state["pos_embed"][0]}
    a = loader.load_checkpoint(write_gguf(tmp_path / "a.gguf", flat, "Q8_0")).model
    b = loader.load_checkpoint(write_gguf(tmp_path / "b.gguf", state, "Q8_0")).model
    assert a.config == b.config and torch.equal(a.mmdit.pos_embed, b.mmdit.pos_embed)


def test_turbo_is_told_apart_by_metadata_as_for_safetensors(tmp_path):
    large = tiny.tiny_mmdit("sd3.5_large").state_dict()
    gg = write_gguf(tmp_path / "t.gguf", large, "Q8_0", metadata={"general.name": "sd3.5_large_turbo"})
    assert loader.load_checkpoint(gg).model.variant == "sd3.5_large_turbo"


@pytest.mark.parametrize("arch,what", [
    ("flux", r"a GGUF file of architecture 'flux' \(a Flux diffusion model\)"),
    ("llama", r"a GGUF file of architecture 'llama' \(a language model"),
    ("sdxl", r"a GGUF file of architecture 'sdxl' \(an SDXL UNet\)"),
])
def test_a_gguf_of_another_architecture_is_refused_saying_what_it_is(tmp_path, state, arch, what):
    gg = write_gguf(tmp_path / "other.gguf", state, "F16", arch=arch)
    expected = rf"other.gguf: expected an SD3/SD3.5 diffusion model .*; this file is {what}"
    with pytest.raises(CheckpointError, match=expected):
        loader.load_checkpoint(gg)


def test_an_sd3_gguf_without_mmdit_tensors_is_refused(tmp_path):
    gg = write_gguf(tmp_path / "vae.gguf", tiny.tiny_vae().state_dict(), "F16")
    with pytest.raises(CheckpointError, match=r"architecture 'sd3' without the MMDiT tensor"):
        loader.load_checkpoint(gg)


def test_a_truncated_gguf_is_refused_at_load(tmp_path, state):
    gg = write_gguf(tmp_path / "m.gguf", state, "Q8_0")
    data = open(gg, "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut.gguf: file is truncated"):
        loader.load_checkpoint(tmp_path / "cut.gguf")


@pytest.mark.parametrize("type_id,message", [
    (20, r"is stored as IQ4_NL, which this loader cannot dequantize; supported types: F32, F16, Q4_0"),
    (99, r"has GGML type id 99, which is not a known GGML type"),
])
def test_an_unsupported_or_unknown_quant_type_is_refused_at_load(tmp_path, state, type_id, message):
    gg = write_gguf(tmp_path / "m.gguf", state, "Q4_0")
    patch_tensor_type(gg, QKV, type_id)  # IQ4_NL has Q4_0's block geometry: a well-formed file otherwise
    with pytest.raises(CheckpointError, match=rf"m.gguf: tensor '{QKV}' {message}"):
        loader.load_checkpoint(gg)


def test_rows_that_are_not_whole_blocks_are_refused_at_load(tmp_path, state):
    gg = write_gguf(tmp_path / "m.gguf", state, "Q4_0")
    patch_tensor_type(gg, QKV, 12)  # Q4_K needs rows of 256 values; qkv's have 128
    with pytest.raises(CheckpointError, match=rf"tensor '{QKV}': its rows of 128 values are not whole Q4_K blocks"):
        loader.load_checkpoint(gg)


def test_other_parts_refuse_gguf_files_with_a_clear_message(tmp_path, state):
    gg = write_gguf(tmp_path / "m.gguf", state, "Q8_0")
    with pytest.raises(CheckpointError, match=r"this is a GGUF file, which loads only as an SD3/SD3.5 diffusion model"):
        loader.load_vae(gg)


def test_the_header_alone_tells_parts_config_and_variant(tmp_path, variant, state):
    gg = write_gguf(tmp_path / "m.gguf", state, "Q4_0")
    assert loader.checkpoint_parts(gg) == {"mmdit": ""}
    assert loader.inspect_diffusion_model(gg) == (tiny.mmdit_config(variant), variant)
    st = tiny.write_checkpoint(tmp_path / "m.safetensors", variant)
    assert set(loader.checkpoint_parts(st)) == {"mmdit", "vae"}
    assert loader.inspect_diffusion_model(st) == (tiny.mmdit_config(variant), variant)
