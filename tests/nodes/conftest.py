"""Fixtures for the node tests: the pack imported as a package (as ComfyUI imports it) and tiny models.

No ComfyUI here: ``nodes/host.py`` falls back to the CPU and finds model files through ``SD35_MODELS_DIR``
and the tokenizers through ``SD35_TOKENIZERS``.
"""

import importlib.util
import os
import sys

import pytest

from ..shared import ROOT, SHARED

PACK_NAME = "comfyui_sd35"


def load_pack():
    """Import the pack folder as package ``comfyui_sd35`` (never as a top-level ``nodes``: ComfyUI owns it)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def node_classes(pack):
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from sd35_core.loading.tiny import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture
def models_env(tiny_models, monkeypatch):
    """Point the pack's fallback folders at the tiny models and the shared tokenizer files."""
    monkeypatch.setenv("SD35_MODELS_DIR", tiny_models.root)
    monkeypatch.setenv("SD35_TOKENIZERS", os.path.join(SHARED, "tokenizers"))
    return tiny_models


@pytest.fixture
def run_node(node_classes, models_env):
    """Call a node the way ComfyUI does: instantiate the class, call its FUNCTION with keyword inputs."""

    def run(name, **inputs):
        cls = node_classes[name]
        out = getattr(cls(), cls.FUNCTION)(**inputs)
        if isinstance(out, dict):  # {"ui": ..., "result": (...)} as ComfyUI accepts it
            out = out["result"]
        assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES)
        return out

    return run
