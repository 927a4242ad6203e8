"""The ``mask_image`` column: a mask file turned into the PNG that a workflow's image loader reads as that mask.

ComfyUI's loaders read masks in different ways: ``LoadImage`` gives ``1 - alpha`` (what its mask editor paints),
``LoadImageMask`` one chosen channel. A row's mask file follows the pack's rule (an image with transparency:
``1 - alpha``; otherwise its grey levels, white = repaint; see ``sd35_core.sampling.mask``). The client uploads it as an
RGBA PNG whose grey levels are the mask and whose alpha is ``1 - mask``, so every loader and channel choice reads
the same mask. When the loader that gives the mask also gives the picture (the usual ``LoadImage`` with a
painted mask), the upload is the row's ``init_image`` with the mask as its alpha instead, the mask resized to the
picture bilinearly as ComfyUI's own nodes resize masks.

Pillow, numpy and torch are imported only when a prompts file has the column.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from .targets import IMAGE_LOADERS, Target
from .workflow import is_link


def loader_gives_the_image(api: Mapping[str, Mapping[str, Any]], targets: Mapping[str, list[Target]]) -> bool:
    """Whether a node the ``mask_image`` column writes to also feeds its IMAGE output (slot 0) into the graph."""
    nodes = {t.node for t in targets.get("mask_image", ()) if api[t.node].get("class_type") in IMAGE_LOADERS}
    for node in api.values():
        for value in (node.get("inputs") or {}).values():
            if is_link(value) and str(value[0]) in nodes and value[1] == 0:
                return True
    return False


def _png(rgb, alpha) -> bytes:
    import numpy as np
    from PIL import Image

    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


def _to_8bit(values):
    import numpy as np

    return np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)


def mask_png(mask_path: str) -> bytes:
    """The mask file as RGBA PNG bytes: grey levels = mask, alpha = 1 - mask (ValueError for a bad file)."""
    from sd35_core.sampling.mask import load_mask

    mask = _to_8bit(load_mask(mask_path)[0].numpy())
    return _png(mask[..., None].repeat(3, axis=-1), 255 - mask)


def image_with_mask_png(image_path: str, mask_path: str) -> bytes:
    """The picture (EXIF orientation applied, as ``LoadImage`` does) with ``1 - mask`` as its alpha, PNG bytes."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image, ImageOps, UnidentifiedImageError

    from sd35_core.sampling.mask import load_mask

    try:
        with Image.open(image_path) as img:
            rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"init_image {image_path}: not a readable image ({e})") from None
    mask = load_mask(mask_path)[None]
    h, w = rgb.shape[:2]
    if tuple(mask.shape[-2:]) != (h, w):
        mask = F.interpolate(mask, size=(h, w), mode="bilinear")
    return _png(rgb, 255 - _to_8bit(mask[0, 0].numpy()))
