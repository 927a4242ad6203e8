"""The torch dequantizers agree bit for bit with the gguf package's own ``gguf.quants.dequantize``."""

import gguf
import numpy as np
import pytest
import torch

from sd35_core.quant.dequant import DEQUANTIZERS, dequantize
from sd35_core.quant.quant_types import BY_NAME, SUPPORTED, TYPES

# The types the gguf package can also quantize (its K-quants are dequantize-only).
QUANTIZABLE = ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _bit_equal(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Same float32 bits everywhere, NaN payloads aside (random scale bytes make a few NaN blocks)."""
    both_nan = np.isnan(ours) & np.isnan(theirs)
    return ours.shape == theirs.shape and bool(((ours.view(np.uint32) == theirs.view(np.uint32)) | both_nan).all())


def test_every_supported_type_has_a_dequantizer_and_the_geometry_of_the_gguf_package():
    assert set(SUPPORTED) == set(DEQUANTIZERS)
    for t in TYPES.values():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.id)] == (t.block_size, t.type_size), t.name
        assert gguf.GGMLQuantizationType(t.id).name == t.name


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blocks_dequantize_bit_for_bit_like_the_gguf_package(name, seed):
    qtype = BY_NAME[name]
    rows, blocks = 4, 6
    raw = np.random.default_rng(seed).integers(0, 256, size=(rows, blocks * qtype.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float32)
    ours = dequantize(torch.from_numpy(raw), qtype, (rows, blocks * qtype.block_size)).numpy()
    assert np.isfinite(theirs).mean() > 0.5  # the comparison is mostly over real numbers
    assert _bit_equal(ours, theirs)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantized_weights_round_trip_like_the_gguf_package(name):
    weights = np.random.default_rng(3).standard_normal((8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[name])
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float32)
    ours = dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8)), BY_NAME[name], (8, 256))
    assert _bit_equal(ours.numpy(), theirs)
    assert np.abs(theirs - weights).max() < 0.5  # a real quantization, not noise


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output_is_the_float32_result_rounded_once(dtype):
    weights = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).astype(np.float32))
    ours = dequantize(torch.from_numpy(raw), BY_NAME["Q8_0"], (4, 64), dtype)
    assert ours.dtype == dtype and torch.equal(ours, theirs.to(dtype))


def test_a_byte_count_that_does_not_match_the_shape_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"Q4_0 tensor of shape \(2, 64\): expected 72 bytes"):
        dequantize(torch.zeros(70, dtype=torch.uint8), BY_NAME["Q4_0"], (2, 64))
