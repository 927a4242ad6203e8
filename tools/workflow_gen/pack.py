"""The pack itself, imported the way ComfyUI imports it, and its recommended-settings table."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

# tools/workflow_gen/pack.py -> the pack's root folder (the repository root).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_NAME = "comfyui_sd35"


def load_pack() -> ModuleType:
    """Import the pack folder as package ``comfyui_sd35`` (as ComfyUI does; never as a top-level ``nodes``)."""
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


def defaults_table() -> dict:
    """The recommended settings (``sd35_core.sampling.defaults.DEFAULTS``), from the imported pack."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.sd35_core.sampling.defaults").DEFAULTS
