"""comfyui-sd35: Stable Diffusion 3.5 and SD3 Medium for ComfyUI from self-contained model code.

ComfyUI imports this folder as a package and reads the mappings below; nothing else happens at import.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
