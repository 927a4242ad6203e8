"""The pieces ``tools/make_workflows.py`` builds the shipped workflows from.

- ``pack``: imports the pack as ComfyUI does and reads its recommended-settings table.
- ``node_specs``: the sockets, widgets and outputs of each node type (the pack's and a few ComfyUI core nodes).
- ``graph``: a workflow as nodes and links, written in the UI and the API format.
- ``inputs``: the model files, example image, prompts and seed the workflows name.
- ``notes``: the text of each workflow's "Read me" note.
- ``layout``: columns of nodes, node heights and colours.
- ``node_blocks``: the runs of nodes most workflows share (loaders, prompts, sampler, decode and save).
- ``text_to_image``, ``image_to_image``, ``controlnet``, ``ip_adapter``, ``regional``: one builder per kind of
  workflow.
"""
