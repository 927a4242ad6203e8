"""comfyui-sd35: Stable Diffusion 3.5 and SD3 Medium for ComfyUI from self-contained model code.

ComfyUI imports this folder as a package and reads the mappings below; nothing else happens at import.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes import routes as _routes

    _routes.register_routes()  # GET /sd35/defaults for the frontend; does nothing outside ComfyUI
else:
    # Imported as a lone file, outside any package: pytest does this with the checkout's folder, whose name
    # need not be a valid package name. There is nothing to register then.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
