"""The GGUF reader against the gguf package's writer and reader: same metadata, shapes, types and bytes."""

import gguf
import numpy as np
import pytest
import torch

from bench.gguf_write import patch_tensor_type
from sd35_core.errors import CheckpointError
from sd35_core.loading.gguf.reader import GGUFFile, is_gguf
from sd35_core.quant.tensor import QuantizedTensor


def _write(path, tensors, *, alignment=None, kv=None, endianess=gguf.GGUFEndian.LITTLE, arch="sd3"):
    """``tensors``: name -> (float32 array, GGML type name)."""
    writer = gguf.GGUFWriter(str(path), arch=arch, endianess=endianess)
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint64(key, value)
        else:
            writer.add_array(key, value)
    for name, (values, qtype) in tensors.items():
        t = gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, gguf.quants.quantize(values, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _values(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


TENSORS = {
    "pos_embed": (_values(1, 16, 64), "F16"),
    "a.bias": (_values(64, seed=1), "F32"),
    "a.weight": (_values(96, 64, seed=2), "Q8_0"),
    "b.weight": (_values(32, 128, seed=3), "Q4_1"),
    "c.weight": (_values(8, 32, seed=4), "BF16"),
}


@pytest.mark.parametrize("alignment", [None, 64, 4096])
def test_metadata_shapes_types_and_bytes_match_the_gguf_package(tmp_path, alignment):
    kv = {"general.name": "tiny sd3", "x.count": 7, "x.scale": 0.5, "x.flag": True, "x.list": [1, 2, 3]}
    path = _write(tmp_path / "m.gguf", TENSORS, alignment=alignment, kv=kv)
    theirs = gguf.GGUFReader(str(path))
    with GGUFFile(path) as ours:
        assert ours.architecture == "sd3" and ours.version == 3
        assert {k: ours.metadata[k] for k in kv} == {**kv, "x.list": (1, 2, 3)}
        assert ours.keys() == [t.name for t in theirs.tensors]
        for t in theirs.tensors:
            info = ours.tensors[t.name]
            assert info.shape == tuple(int(d) for d in reversed(t.shape))
            assert info.qtype.name == t.tensor_type.name
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            got = ours.tensor(t.name)
            raw = got.data if isinstance(got, QuantizedTensor) else got.contiguous().view(torch.uint8)
            assert raw.numpy().tobytes() == np.asarray(t.data).tobytes()


def test_float_tensors_come_back_dense_and_quantized_ones_stay_blocks(tmp_path):
    path = _write(tmp_path / "m.gguf", TENSORS)
    with GGUFFile(path) as f:
        pos = f.tensor("pos_embed")
        assert pos.dtype == torch.float16 and pos.shape == (1, 16, 64)
        assert torch.equal(pos, torch.from_numpy(TENSORS["pos_embed"][0]).half())
        assert f.tensor("c.weight").dtype == torch.bfloat16
        q = f.tensor("a.weight")
        assert isinstance(q, QuantizedTensor) and q.data.dtype == torch.uint8
        assert q.data.shape == (96, 2 * 34) and q.shape == (96, 64)
        assert f.shapes("a.") == {"bias": (64,), "weight": (96, 64)}


def test_orig_shape_metadata_gives_the_torch_shape(tmp_path):
    # city96's converter stores some tensors flattened to rows of 256 and records their real shape.
    values = _values(4, 8, 8, 8, seed=5)
    path = _write(tmp_path / "m.gguf", {"conv.weight": (values.reshape(8, 256), "Q8_0")},
                  kv={"comfy.gguf.orig_shape.conv.weight": [4, 8, 8, 8]})
    with GGUFFile(path) as f:
        t = f.tensor("conv.weight")
        assert f.shape("conv.weight") == (4, 8, 8, 8) and t.shape == (4, 8, 8, 8)
        expected = gguf.quants.dequantize(gguf.quants.quantize(values.reshape(8, 256), gguf.GGMLQuantizationType.Q8_0),
                                          gguf.GGMLQuantizationType.Q8_0).reshape(4, 8, 8, 8)
        assert torch.equal(t.dequantize(), torch.from_numpy(expected))


def test_content_decides_what_is_gguf(tmp_path):
    path = _write(tmp_path / "model.safetensors", TENSORS)  # misnamed, still GGUF
    other = tmp_path / "x.gguf"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(32))
    assert is_gguf(path) and not is_gguf(other) and not is_gguf(tmp_path / "missing.gguf")
    with pytest.raises(CheckpointError, match="x.gguf: expected a GGUF file; its first bytes are not the GGUF magic"):
        GGUFFile(other)


@pytest.mark.parametrize("keep", [40, 200, 0.2, 0.999])  # bytes (inside the header) or a fraction of the file
def test_a_truncated_file_is_an_error_that_says_so(tmp_path, keep):
    path = _write(tmp_path / "m.gguf", TENSORS)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.gguf"
    cut_path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut.gguf: file is truncated.*download it again"):
        GGUFFile(cut_path)


def test_an_unknown_type_id_is_an_error_naming_the_tensor_and_the_id(tmp_path):
    path = _write(tmp_path / "m.gguf", TENSORS)
    patch_tensor_type(path, "b.weight", 99)
    with pytest.raises(CheckpointError, match=r"tensor 'b.weight' has GGML type id 99, which is not a known GGML type"):
        GGUFFile(path)


def test_a_known_type_without_a_dequantizer_is_an_error_naming_it(tmp_path):
    writer_path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(writer_path), arch="sd3")
    iq = gguf.GGMLQuantizationType.IQ2_XXS
    _, size = gguf.GGML_QUANT_SIZES[iq]
    writer.add_tensor("a.weight", np.zeros((4, size), dtype=np.uint8), raw_dtype=iq)  # 4 rows of one block
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"tensor 'a.weight' is stored as IQ2_XXS, which this loader cannot "
                                              r"dequantize; supported types: F32, F16, Q4_0"):
        GGUFFile(writer_path)


def test_big_endian_files_are_refused_as_such(tmp_path):
    path = _write(tmp_path / "be.gguf", {"a.bias": (_values(64), "F32")}, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(CheckpointError, match="expected a little-endian GGUF file of version 2 or 3; it is a big-end"):
        GGUFFile(path)
