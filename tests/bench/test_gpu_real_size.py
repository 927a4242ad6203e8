"""bench/gpu_real_size.py runs end to end at tiny shapes on the CPU (the GPU run uses the same code paths)."""

import os

import pytest

from bench import gpu_real_size


def test_the_tiny_smoke_run_times_every_row_it_is_asked_for(capsys):
    # Two rows (one worker process each) keep this quick; the GPU run adds the other variants and storages.
    assert gpu_real_size.main(["--tiny", "--variants", "sd3.5_large", "--storages", "fp8",
                               "--impls", "ours_eager,ours_cache_hit", "--calls", "1"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [(r["variant"], r["storage"], r["impl"]) for r in rows] == [
        ("sd3.5_large", "fp8", "ours_eager"), ("sd3.5_large", "fp8", "ours_cache_hit")]
    assert all(r.get("step_s", 0) > 0 for r in rows), [r.get("error") for r in rows]


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set: no ComfyUI row")
def test_the_comfyui_row_runs_on_its_native_model(capsys):
    assert gpu_real_size.main(["--tiny", "--variants", "sd3.5_medium", "--storages", "bf16",
                               "--impls", "ours_eager,comfyui", "--calls", "1"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[1]["impl"] == "comfyui" and rows[1].get("step_s", 0) > 0, rows[1].get("error")
    assert rows[0]["step_vs_comfyui"] > 0
