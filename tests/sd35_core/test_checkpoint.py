"""Checkpoint files: validation of what is on disk, and loading tensors into modules by dtype policy."""

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sd35_core.errors import CheckpointError
from sd35_core.loading.checkpoint import DTypePolicy, find_prefix, load_weights, open_safetensors
from sd35_core.models import ops


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = ops.Linear(4, 3)
        self.norm = ops.LayerNorm(3)


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.fixture
def tiny_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {
        "model.lin.weight": torch.randn(3, 4, generator=gen),
        "model.lin.bias": torch.randn(3, generator=gen),
        "model.norm.weight": torch.randn(3, generator=gen),
        "model.norm.bias": torch.randn(3, generator=gen),
    }
    return _write(tmp_path / "tiny.safetensors", state, {"modelspec.title": "tiny"}), state


def test_a_valid_file_exposes_shapes_without_reading_data_and_its_metadata(tiny_file):
    path, state = tiny_file
    f = open_safetensors(path)
    assert f.shapes("model.") == {k[len("model."):]: tuple(v.shape) for k, v in state.items()}
    assert f.metadata == {"modelspec.title": "tiny"}
    assert torch.equal(f.tensor("model.lin.weight"), state["model.lin.weight"])


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_are_refused_by_name_before_anything_is_read(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=rf"model\{suffix}.*pickle.*\.safetensors"):
        open_safetensors(path)


def test_a_truncated_file_is_reported_as_truncated_with_its_path(tiny_file, tmp_path):
    path, _ = tiny_file
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        open_safetensors(cut)


@pytest.mark.parametrize(
    "content", [b"", b"abc", b"PK\x03\x04" + b"\0" * 64, b"\x10\0\0\0\0\0\0\0{not json}xxxxxxxx"]
)
def test_files_that_are_not_safetensors_are_refused_with_a_clear_message(tmp_path, content):
    path = tmp_path / "weird.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"weird\.safetensors: expected a \.safetensors file"):
        open_safetensors(path)


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        open_safetensors(tmp_path / "nope.safetensors")


def test_find_prefix_locates_a_part_by_a_marker_key():
    keys = ["model.diffusion_model.x.weight", "first_stage_model.decoder.conv_in.weight", "decoder.conv_in.weight"]
    assert find_prefix(keys, "decoder.conv_in.weight") == ""
    assert find_prefix(keys[:2], "decoder.conv_in.weight") == "first_stage_model."
    assert find_prefix(keys, "joint_blocks.0.x") is None


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_weights_load_straight_into_the_requested_dtype(tiny_file, name):
    path, state = tiny_file
    policy = DTypePolicy.named(name)
    with torch.device("meta"):
        module = Tiny()
    load_weights(module, open_safetensors(path), "model.", policy)
    assert module.lin.weight.dtype == policy.storage
    assert torch.equal(module.lin.weight, state["model.lin.weight"].to(policy.storage))
    assert module.lin(torch.randn(2, 4, dtype=policy.compute)).dtype == policy.compute


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("target", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_converted_reads_equal_a_cast_of_the_stored_tensor_whole_or_by_rows_at_any_offset(tmp_path, stored, target):
    # Odd sizes put every tensor at an offset that is not a page boundary; a large one spans several pages.
    gen = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(5, 3, generator=gen).to(stored), "b": torch.randn(1, generator=gen).to(stored),
               "c": torch.randn(1031, 7, generator=gen).to(stored)}
    file = open_safetensors(_write(tmp_path / "f.safetensors", tensors))
    for key, t in tensors.items():
        out = file.read_into(key, torch.empty(t.shape, dtype=target))
        assert torch.equal(out.float(), t.to(target).float())
    rows = file.read_into("c", torch.empty(500, 7, dtype=target), rows=(333, 833))
    assert torch.equal(rows.float(), tensors["c"][333:833].to(target).float())


def test_weights_already_in_their_storage_dtype_are_views_of_the_mapped_file(tiny_file):
    path, state = tiny_file
    with torch.device("meta"):
        module = Tiny()
    file = open_safetensors(path)
    load_weights(module, file, "model.", DTypePolicy.named("fp32"))
    # A view of the file's mapping shares its storage with every other view of the same tensor.
    mapped = file.tensor("model.lin.weight")
    assert module.lin.weight.untyped_storage().data_ptr() == mapped.untyped_storage().data_ptr()


def test_fp8_storage_keeps_linear_matrices_in_fp8_and_computes_in_bf16(tiny_file):
    path, state = tiny_file
    policy = DTypePolicy.named("fp8_e4m3fn")
    with torch.device("meta"):
        module = Tiny()
    load_weights(module, open_safetensors(path), "model.", policy)
    assert module.lin.weight.dtype == torch.float8_e4m3fn
    assert module.lin.bias.dtype == torch.bfloat16
    assert module.norm.weight.dtype == torch.bfloat16
    x = torch.randn(2, 4)
    out = module.lin(x.to(torch.bfloat16))
    expected = torch.nn.functional.linear(x, state["model.lin.weight"].to(torch.float8_e4m3fn).float(),
                                          state["model.lin.bias"])
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.05


def test_a_missing_tensor_names_the_file_and_the_key(tiny_file, tmp_path):
    path, state = tiny_file
    partial = {k: v for k, v in state.items() if k != "model.norm.bias"}
    bad = _write(tmp_path / "partial.safetensors", partial)
    with torch.device("meta"):
        module = Tiny()
    with pytest.raises(CheckpointError, match=r"partial\.safetensors.*model\.norm\.bias.*missing"):
        load_weights(module, open_safetensors(bad), "model.", DTypePolicy())


def test_a_misshaped_tensor_names_both_shapes(tiny_file, tmp_path):
    _, state = tiny_file
    state = dict(state, **{"model.lin.weight": torch.zeros(5, 4)})
    bad = _write(tmp_path / "shape.safetensors", state)
    with torch.device("meta"):
        module = Tiny()
    with pytest.raises(CheckpointError, match=r"shape\.safetensors.*\(3, 4\).*\(5, 4\)"):
        load_weights(module, open_safetensors(bad), "model.", DTypePolicy())


def test_unknown_dtype_names_are_a_clear_error():
    with pytest.raises(ValueError, match="weight dtype.*fp64"):
        DTypePolicy.named("fp64")


def test_default_dtype_is_fp32_on_cpu_and_bf16_elsewhere():
    assert DTypePolicy.named("default", "cpu").compute == torch.float32
    assert DTypePolicy.named("default", "cuda").compute == torch.bfloat16


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_safetensors_files_follow_the_umask_and_read_back(tmp_path, umask):
    from sd35_core.loading.checkpoint import write_safetensors

    previous = os.umask(umask)
    try:
        path = write_safetensors(tmp_path / "x.safetensors", {"a": torch.arange(6.0).reshape(2, 3)}, {"k": "v"})
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    f = open_safetensors(path)
    assert torch.equal(f.tensor("a"), torch.arange(6.0).reshape(2, 3))
