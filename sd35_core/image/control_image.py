"""Control images into VAE input: resize and fit to the generation size, invert depth maps if asked, and scale
each control type as the reference does (:func:`prepare_control_image`)."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..models.controlnet import CONTROL_TYPE_NAMES, CONTROL_TYPES, PATH_2B, PATH_8B, ControlPath
from .fit import Fit, fit_image
from .preprocess import depth_map_problem, depth_near_is_bright

log = logging.getLogger(__name__)


def _control_type_name(control_type: str | int) -> str:
    if isinstance(control_type, str) and control_type.lower() in CONTROL_TYPES:
        return control_type.lower()
    if isinstance(control_type, int) and control_type in CONTROL_TYPE_NAMES:
        return CONTROL_TYPE_NAMES[control_type]
    raise ValueError(f"control type: expected one of {', '.join(CONTROL_TYPES)} (or 0, 1, 2); got {control_type!r}")


def _resize_lanczos(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize ``[H, W, 3]`` 0..1 with PIL's LANCZOS, as the reference does on the loaded file.

    8-bit images (anything loaded from a PNG/JPEG) go through PIL's 8-bit path, so results are bit-identical
    with the reference; others are resized per channel in float so no precision is lost.
    """
    arr = image.detach().to("cpu", torch.float32).numpy()
    scaled = arr * 255.0
    rounded = np.rint(scaled)
    if np.abs(scaled - rounded).max(initial=0.0) < 1e-3:
        pil = Image.fromarray(rounded.clip(0, 255).astype(np.uint8), "RGB")
        out = np.asarray(pil.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0
    else:
        chans = [
            np.asarray(Image.fromarray(arr[..., i], "F").resize((width, height), Image.LANCZOS)) for i in range(3)
        ]
        out = np.stack(chans, axis=-1).clip(0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(out))


def _fit_tensor(img: torch.Tensor, fit: Fit) -> torch.Tensor:
    """``[H, W, 3]`` fitted into the frame as ``fit`` says (crop box, LANCZOS resize, black padding)."""
    left, top, right, bottom = fit.crop
    img = img[top:bottom, left:right]
    if (img.shape[1], img.shape[0]) != fit.size:
        img = _resize_lanczos(img, *fit.size)
    if fit.size == fit.frame:
        return img
    canvas = torch.zeros(fit.frame[1], fit.frame[0], 3, dtype=img.dtype, device=img.device)
    x, y = fit.offset
    canvas[y:y + fit.size[1], x:x + fit.size[0]] = img
    return canvas


def prepare_control_image(
    image: torch.Tensor,
    width: int,
    height: int,
    control_type: str | int,
    invert: bool | Literal["auto"] = False,
    *,
    path: ControlPath = PATH_8B,
    resize_mode: str = "stretch",
) -> torch.Tensor:
    """Turn a control ``IMAGE`` ``[B, H, W, 3]`` (0..1) into the VAE input ``[B, 3, height, width]``.

    As the reference's ``_image_to_latent``/``vae_encode``: resize to ``width`` x ``height`` with LANCZOS
    (``resize_mode`` says how an image of another aspect ratio is fitted, see :mod:`.fit`: ``stretch`` as
    the reference by default; the node and the CLI default to ``crop``; the log says what was done), then
    scale per type: canny ``x*255*0.5+0.5`` (what the canny ControlNet was trained on),
    blur and depth ``2x-1``; the 2b path always ``2x-1``.

    ``invert`` maps depth ``x -> 1 - x`` first. The SD3.5 depth ControlNet takes near = dark (the depth map
    shipped with it, ``shared/images/depth.png``, has dark foreground and bright sky, and the reference feeds
    it as given), while common depth estimators (Depth Anything, MiDaS, Zoe nodes) output near = bright; the
    diffusers model card inverts Depth Anything's map, and ComfyUI inverts every map. ``False`` feeds the map
    as given (reference), ``True`` inverts, ``"auto"`` inverts each map whose foreground is bright according
    to :func:`sd35_core.image.preprocess.depth_near_is_bright`.
    """
    kind = _control_type_name(control_type)
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"control image: expected an RGB IMAGE tensor [B, H, W, 3] with values 0..1; got {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"control image: it is empty (shape {tuple(image.shape)})")
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % 16:
            raise ValueError(f"control image {name}: expected a positive multiple of 16 pixels, got {v!r}")
    if invert not in (True, False, "auto"):
        raise ValueError(f"invert: expected True, False or 'auto'; got {invert!r}")
    if path not in (PATH_8B, PATH_2B):
        raise ValueError(f"path: expected '8b' or '2b'; got {path!r}")

    fit = fit_image((image.shape[2], image.shape[1]), (width, height), resize_mode)
    if fit.changes_aspect:
        log.info("control image %s (resize_mode %s)", fit.describe(), resize_mode)
    if kind == "depth":
        problem = depth_map_problem(image[..., :3])
        if problem:
            log.warning("control image for the depth ControlNet: %s", problem)
    out = []
    for img in image.float().clamp(0.0, 1.0):
        if (img.shape[0], img.shape[1]) != (height, width):
            img = _fit_tensor(img, fit).to(image.device)
        if kind == "depth" and (invert is True or (invert == "auto" and depth_near_is_bright(img[None]))):
            img = 1.0 - img
        out.append(img)
    x = torch.stack(out).permute(0, 3, 1, 2).contiguous()
    if path == PATH_2B or kind != "canny":
        return x * 2.0 - 1.0
    return x * 255 * 0.5 + 0.5
