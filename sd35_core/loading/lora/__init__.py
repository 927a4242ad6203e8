"""LoRA and LyCORIS for SD3 / SD3.5: every trainer's key format onto one patch mechanism.

:mod:`.formats` maps module names to our parameters, :mod:`.patches` computes the updates,
:mod:`.loading` reads and resolves files, :mod:`.apply` applies a stack of them for one run.
"""

from .apply import applied
from .loading import LoadedLora, LoraError, LoraFile, LoraPatches, load_lora, read_lora

__all__ = ["LoadedLora", "LoraError", "LoraFile", "LoraPatches", "applied", "load_lora", "read_lora"]
