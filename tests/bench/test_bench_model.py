"""bench/bench_model.py: our MMDiT-X against diffusers on the same weights, each measured in its own process."""

from __future__ import annotations

import sys

import pytest
import torch

from bench import bench_model
from bench.diffusers_convert import MissingBaseline, diffusers_class
from sd35_core.loading.tiny import randomize_, sincos_pos_embed
from sd35_core.models import ops
from sd35_core.models.mmditx import MMDiTX

TINY = ["--depth", "2", "--hidden", "128", "--size", "64", "--repeats", "1", "--threads", "1"]


def test_measures_both_implementations_on_the_same_weights():
    result = bench_model.main([*TINY, "--dtypes", "float32,fp8"])
    for key in ("step_s", "cpu_time_s", "peak_mem_mb", "weights_mb", "step_extra_mb"):
        assert set(result[key]) == {"ours", "diffusers"}
        assert set(result[key]["ours"]) == {"float32", "fp8"}
        assert set(result[key]["diffusers"]) == {"float32"}  # fp8 storage is ours only
    assert set(result["step_vs_diffusers"]) == set(result["peak_mem_vs_diffusers"]) == {"float32"}
    runs = result["runs"]  # unrounded figures
    ratio = runs["ours"]["float32"]["step_s"] / runs["diffusers"]["float32"]["step_s"]
    assert result["step_vs_diffusers"]["float32"] == pytest.approx(ratio, rel=1e-3)
    assert all(v > 0 for by in result["step_s"].values() for v in by.values())
    # At this toy size the step may not lift the process above its import-time peak: memory is only >= 0.
    assert all(v >= 0 for by in result["peak_mem_mb"].values() for v in by.values())
    # Apples to apples: the same weights in both layouts give the same output.
    assert result["max_abs_diff_dtype"] == "float32"
    assert result["max_abs_diff"] == result["max_abs_diff_by_dtype"]["float32"] < 1e-3
    assert result["rel_diff_by_dtype"]["float32"] <= bench_model.FP32_TOL
    weights = result["weights_mb"]
    assert weights["ours"]["float32"] == weights["diffusers"]["float32"]
    assert weights["ours"]["fp8"] < weights["ours"]["float32"] / 3
    assert result["config"]["depth"] == 2 and result["config"]["batch"] == 2
    for key in ("torch", "diffusers", "python", "threads", "cpu_count", "machine", "cpu", "repeats"):
        assert result[key] not in (None, "")
    assert result["threads"] == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8"])
def test_weights_are_built_in_their_storage_dtype_as_the_loader_casts_them(dtype):
    config = bench_model.model_config(depth=2, hidden=128, size=64)
    built = bench_model.build_ours(config, dtype)
    full = randomize_(MMDiTX(config), seed=0)
    with torch.no_grad():
        full.pos_embed.copy_(sincos_pos_embed(config.hidden_size, config.pos_embed_max_size))
    linear = {f"{n}.weight" for n, m in full.named_modules() if isinstance(m, ops.Linear)}
    for key, value in full.state_dict().items():
        expected = torch.float8_e4m3fn if dtype == "fp8" and key in linear else torch.bfloat16
        assert built.state_dict()[key].dtype == expected, key
        assert torch.equal(built.state_dict()[key].float(), value.to(expected).float()), key


def test_without_diffusers_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingBaseline, match="pip install"):
        bench_model.main(TINY)
    with pytest.raises(MissingBaseline, match="diffusers"):
        diffusers_class()


def test_rejects_unknown_dtypes():
    with pytest.raises(ValueError, match="--dtypes"):
        bench_model.parse_args(["--dtypes", "float32,int8"])
