"""Where nodes go on the canvas: columns of nodes, the room each node type takes, and the colours."""

from __future__ import annotations

from .graph import Node, Workflow

POSITIVE_COLORS = {"color": "#232", "bgcolor": "#353"}
NEGATIVE_COLORS = {"color": "#322", "bgcolor": "#533"}
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}
GROUP_COLORS = {"models": "#3f789e", "prompt": "#3f7e4c", "image": "#88698a", "sample": "#8a6e3f", "save": "#444"}

# Vertical room between nodes in a column: the next node's title bar plus the badge the frontend draws over it.
GAP = 70
COLUMN_GAP = 60

# Node heights leave room for the lines the frontend extension adds once a loader has run.
HEIGHTS = {"CheckpointLoaderSimple": 130, "LoraLoaderModelOnly": 110, "VAEDecode": 80,
           "SD35CheckpointLoader": 200, "SD35TextEncoderLoader": 200, "SD35ControlNetLoader": 130,
           "SD35TextEncode": 300, "SD35EmptyLatent": 130, "SD35Sampler": 560, "SD35VAEDecode": 140,
           "SD35VAEEncode": 140, "SD35ControlNetApply": 260, "SaveImage": 560, "LoadImage": 420,
           "ImageScale": 160, "PreviewImage": 380, "SD35CannyPreprocessor": 110, "SD35BlurPreprocessor": 90,
           "SD35DepthNormalize": 90, "SD35LoraLoader": 200, "SD35VAEEncodeForInpaint": 170,
           "ImagePadForOutpaint": 200, "SD35IPAdapterLoader": 130, "SD35CLIPVisionLoader": 130,
           "SD35ApplyIPAdapter": 230, "ConditioningSetArea": 200, "ConditioningCombine": 80}


class Column:
    """Stacks nodes top to bottom at one x position."""

    def __init__(self, wf: Workflow, x: float, width: float, y: float = 0.0):
        self.wf, self.x, self.width, self.y = wf, x, width, y

    def add(self, node_type: str, node_height: float, /, **kw) -> Node:
        """Add a node below the last one (``kw`` as for ``Workflow.add``)."""
        node = self.wf.add(node_type, (self.x, self.y), (self.width, node_height), **kw)
        self.y += node_height + GAP
        return node

    def next(self, width: float) -> Column:
        """The column to the right of this one."""
        return Column(self.wf, self.x + self.width + COLUMN_GAP, width)
