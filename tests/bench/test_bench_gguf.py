"""bench/bench_gguf.py: each storage loaded by the real loader from its own file, measured in its own process."""

from __future__ import annotations

from bench import bench_gguf

TINY = ["--depth", "2", "--hidden", "128", "--size", "64", "--repeats", "1", "--threads", "1"]


def test_measures_each_storage_from_its_own_file():
    result = bench_gguf.main([*TINY, "--storages", "fp32,fp16,Q8_0,Q4_0"])
    storages = {"fp32", "fp16", "Q8_0", "Q4_0"}
    keys = ("step_s", "materialize_s", "resident_mb", "weights_mb", "peak_increase_mb", "file_mb", "rel_err_vs_fp32")
    for key in keys:
        assert set(result[key]) == storages, key
    assert all(v > 0 for v in result["step_s"].values())
    assert result["step_vs_fp16"]["fp16"] == 1.0
    w, f = result["weights_mb"], result["file_mb"]
    # GGUF weights sit in memory as the file stores them; fp16 storage halves fp32's.
    assert w["Q4_0"] < w["Q8_0"] < w["fp16"] < w["fp32"]
    assert abs(w["Q8_0"] - f["Q8_0"]) < 0.05 * f["Q8_0"] and abs(w["Q4_0"] - f["Q4_0"]) < 0.05 * f["Q4_0"]
    err = result["rel_err_vs_fp32"]
    assert err["fp32"] == 0 < err["fp16"] < err["Q8_0"] < err["Q4_0"] < 0.5
    assert result["config"]["compute"] == "float32" and result["config"]["depth"] == 2
