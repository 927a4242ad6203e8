import os

import pytest

from tests.conftest import ROOT, TOKENIZERS


@pytest.fixture
def gen_args(tiny_models, tmp_path):
    """Arguments common to every `sd35 generate` test run: tiny files, real tokenizers, small and fast."""

    def make(*extra: str, model: str = "sd3.5_medium") -> list[str]:
        return [
            "generate",
            "--model", tiny_models.checkpoints[model],
            "--model_folder", os.path.dirname(tiny_models.text_encoders["clip_l"]),
            "--tokenizers", TOKENIZERS,
            "--out_dir", str(tmp_path / "out"),
            "--width", "64", "--height", "48",
            "--steps", "2",
            "--seed_type", "fixed",
            "--device", "cpu",
            *extra,
        ]

    return make


@pytest.fixture
def root():
    return ROOT
