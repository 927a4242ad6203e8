"""Fixtures for the host tests: a real ComfyUI with this pack and tiny checkpoints (see comfyui_server.py).

The test modules skip themselves, visibly, without ``COMFYUI_PATH``; a fixture here starts nothing until a test
that is not skipped asks for it. With ``SD35_REQUIRE_HOST_TESTS=1`` (CI sets it through ``.ci/host-setup``) a host
test or module that skips is reported as failed instead: a run prepared for the real host must not pass by skipping.
"""

import os
import shutil

import pytest

from .comfyui_server import SHARED, start_server

GGUF_MODEL = "tiny-sd3.5_large-Q8_0.gguf"
REQUIRE_HOST_TESTS = os.environ.get("SD35_REQUIRE_HOST_TESTS") == "1"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_if_skipped(report) -> None:
    if REQUIRE_HOST_TESTS and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"skipped although SD35_REQUIRE_HOST_TESTS=1 (the run was prepared for the real host): "
                           f"{_skip_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A ComfyUI for one test module, with the tiny model set, a truncated ``corrupt.safetensors`` checkpoint,
    a Q8_0 GGUF of the Large-like diffusion model and a 64x64 ``photo.png`` in its input folder."""
    from PIL import Image

    from bench.gguf_write import write_gguf
    from sd35_core.loading.tiny import tiny_mmdit, write_tiny_model_set

    base = tmp_path_factory.mktemp("comfy_base")
    models = write_tiny_model_set(tmp_path_factory.mktemp("comfy_models"), seed=0)
    corrupt = os.path.join(models.root, "checkpoints", "corrupt.safetensors")
    shutil.copy(models.checkpoints["sd3.5_medium"], corrupt)
    with open(corrupt, "r+b") as f:
        f.truncate(os.path.getsize(corrupt) // 2)
    large = tiny_mmdit("sd3.5_large").state_dict()
    write_gguf(os.path.join(models.root, "diffusion_models", GGUF_MODEL), large, "Q8_0")
    os.makedirs(base / "input")
    photo = Image.open(os.path.join(SHARED, "images", "canny.png")).convert("RGB").resize((64, 64))
    photo.save(base / "input" / "photo.png")
    srv = start_server(base, models)
    try:
        yield srv
    finally:
        srv.close()
