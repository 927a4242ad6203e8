import os
import sys

from tests.shared import IMAGES, ROOT, SHARED, TOKENIZERS  # noqa: F401  (re-exported for the test modules)

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny models in these tests are far too small to gain from intra-op threads; on a shared two-core CI
# machine extra threads only wait for each other (measured: 240 sampler tests, 20 s vs 64-153 s).
torch.set_num_threads(1)

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny model set in the official layouts (ComfyUI folder names), written once per test session."""
    from sd35_core.loading.tiny import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tokenizer_dirs():
    """(clip_dir, t5_tokenizer_json) of the real tokenizer files shipped in ../shared."""
    return os.path.join(TOKENIZERS, "clip"), os.path.join(TOKENIZERS, "t5", "tokenizer.json")
