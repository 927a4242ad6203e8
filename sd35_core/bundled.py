"""Where the bundled tiny shapes model lives: ``assets/tiny_shapes`` of the pack (see ``sd35_train``).

A source checkout (and ComfyUI's ``custom_nodes/<pack>``) has it at ``<pack>/assets/tiny_shapes``; a wheel
install carries the same files as package data of ``sd35_train`` (``sd35_train/assets/tiny_shapes``).
"""

from __future__ import annotations

import importlib.util
import os

TINY_SHAPES = "tiny_shapes"
CHECKPOINT_NAME = "tiny_shapes_sd35.safetensors"
CONTROLNET_NAME = "tiny_shapes_controlnet_canny.safetensors"

_PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _candidates() -> list[str]:
    dirs = [os.path.join(_PACK_DIR, "assets", TINY_SHAPES)]
    spec = importlib.util.find_spec("sd35_train") if __package__ == "sd35_core" else None
    if spec is not None and spec.submodule_search_locations:
        dirs += [os.path.join(p, "assets", TINY_SHAPES) for p in spec.submodule_search_locations]
    return dirs


def tiny_shapes_dir() -> str:
    """The folder holding the bundled checkpoint, its ControlNet and ``tokenizers/``.

    Raises :class:`FileNotFoundError` naming the places looked at when the files are not installed.
    """
    tried = _candidates()
    for d in tried:
        if os.path.isfile(os.path.join(d, CHECKPOINT_NAME)):
            return d
    raise FileNotFoundError(
        f"bundled tiny shapes model: {CHECKPOINT_NAME} not found in " + ", ".join(tried)
        + " (reinstall the pack, or rebuild it with `python -m sd35_train`)"
    )


def tiny_shapes_checkpoint() -> str:
    """Path of the bundled checkpoint (diffusion model, VAE and the three text encoders in one file)."""
    return os.path.join(tiny_shapes_dir(), CHECKPOINT_NAME)


def tiny_shapes_controlnet() -> str:
    """Path of the bundled canny ControlNet for the bundled checkpoint."""
    return os.path.join(tiny_shapes_dir(), CONTROLNET_NAME)
