"""Where the bundled tiny shapes model, the training recipe's output, lives.

A source checkout (and ComfyUI's ``custom_nodes/<pack>``) has it at ``<pack>/assets/tiny_shapes``; a wheel
install carries the same files as package data of this package (``sd35_train/assets/tiny_shapes``). This
module imports nothing of the pack, so the nodes can import it without the training code's dependencies.
"""

from __future__ import annotations

import os

TINY_SHAPES = "tiny_shapes"
CHECKPOINT_NAME = "tiny_shapes_sd35.safetensors"
CONTROLNET_NAME = "tiny_shapes_controlnet_canny.safetensors"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _candidates() -> list[str]:
    return [os.path.join(os.path.dirname(_HERE), "assets", TINY_SHAPES), os.path.join(_HERE, "assets", TINY_SHAPES)]


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
