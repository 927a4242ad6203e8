"""bench/bench_ip_adapter.py: the adapter's share of a CFG step, on a toy shape (the figures only need to be
consistent: the script's arithmetic, not the machine's speed, is what is checked)."""

from __future__ import annotations

import pytest

from bench import bench_ip_adapter

TINY = ["--depth", "2", "--hidden", "128", "--size", "64", "--resampler-hidden", "128", "--context-tokens", "8",
        "--repeats", "1", "--threads", "1"]


def test_reports_the_adapter_share_of_a_step():
    result = bench_ip_adapter.main([*TINY, "--slg", "--layers", "1"])
    cpu = result["cpu_time_s"]
    assert set(cpu) == {"cfg", "cfg_ip", "slg", "slg_ip", "resampler"} and all(v > 0 for v in cpu.values())
    assert result["ip_share_of_cfg_step"] == pytest.approx(1 - cpu["cfg"] / cpu["cfg_ip"], abs=0.05)
    assert result["ip_step_vs_plain"] == pytest.approx(cpu["cfg_ip"] / cpu["cfg"], rel=0.05)
    assert result["resampler_share_of_cfg_step"] + result["ip_attention_share_of_cfg_step"] == pytest.approx(
        result["ip_share_of_cfg_step"], abs=2e-3)  # both from the same unrounded times
    assert "ip_share_of_slg_step" in result
    assert result["config"]["siglip_features"] == [729, 1152] and result["config"]["ip_tokens"] == 64
