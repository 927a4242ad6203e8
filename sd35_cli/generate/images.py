"""The images of a run: init and control images in (resized, encoded) and latents decoded out, as the reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from .models import LoadedModels
from .options import GenerateOptions, stem


def load_image_resized(path: str, width: int, height: int, mode: str = "stretch",
                       say: Callable[[str], None] = lambda s: None, what: str = "image") -> Image.Image:
    """Open ``path`` and fit it to ``width`` x ``height`` with LANCZOS, then RGB (the reference's order).

    ``mode`` (:mod:`sd35_core.image.fit`) says what happens to another aspect ratio: ``stretch`` as the reference,
    ``crop`` the middle first, ``pad`` with black; a note to ``say`` tells what was done. At the output's
    aspect ratio every mode is the reference's plain resize, bit for bit.
    """
    from sd35_core.image.fit import fit_image

    with Image.open(path) as img:
        img.load()
        fit = fit_image(img.size, (width, height), mode)
        if fit.changes_aspect:
            say(f"note: --{what} {path}: {fit.describe()} (--resize_mode {mode})")
        part = img if fit.crop == (0, 0, *img.size) else img.crop(fit.crop)
        part = part.resize(fit.size, Image.LANCZOS).convert("RGB")
    if fit.size == fit.frame:
        return part
    canvas = Image.new("RGB", fit.frame)
    canvas.paste(part, fit.offset)
    return canvas


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``IMAGE`` tensor ``[1, H, W, 3]`` in 0..1."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def encode_image(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """VAE mean latent (raw VAE space, CPU float32) of ``[B, 3, H, W]`` pixels already scaled for the VAE."""
    with torch.no_grad():
        return vae.encode(pixels).float().cpu()


def init_latent(vae: Any, path: str, width: int, height: int, mode: str = "stretch",
                say: Callable[[str], None] = lambda s: None) -> torch.Tensor:
    """``--init_image`` as a raw VAE-space latent ``[1, 16, h, w]`` (pixels ``2x-1``, VAE mean)."""
    # Contiguous NCHW as the reference builds it (layout can change which convolution kernel runs).
    image = load_image_resized(path, width, height, mode, say, "init_image")
    x = pil_to_tensor(image).permute(0, 3, 1, 2).contiguous()
    return encode_image(vae, x * 2.0 - 1.0)


def load_noise_mask(path: str, width: int, height: int, grow: int, mode: str = "stretch") -> torch.Tensor:
    """``--mask`` as a ``[1, 1, height, width]`` mask (1 = repaint), resized bilinearly to the image, grown.

    The mask is fitted to the ``width`` x ``height`` frame with the init image's ``mode`` (cropped, stretched
    or padded the same way, padding kept), so it stays on the same pixels; ``UsageError`` naming the file
    when it cannot be read.
    """
    import torch.nn.functional as F

    from sd35_core.image.fit import fit_image
    from sd35_core.sampling.mask import grow_mask, load_mask

    from ..main import UsageError

    try:
        mask = load_mask(path)[None]
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    if tuple(mask.shape[-2:]) != (height, width):
        fit = fit_image((mask.shape[-1], mask.shape[-2]), (width, height), mode)
        left, top, right, bottom = fit.crop
        mask = F.interpolate(mask[..., top:bottom, left:right], size=(fit.size[1], fit.size[0]), mode="bilinear")
        if fit.size != fit.frame:
            x, y = fit.offset
            mask = F.pad(mask, (x, width - fit.size[0] - x, y, height - fit.size[1] - y))
    return grow_mask(mask, grow).round() if grow else mask


def control_type_of(loaded: LoadedModels, opts: GenerateOptions) -> str:
    """The ControlNet's type: from the file's ``control_type`` tensor, else from its file name."""
    name = loaded.controlnet.control_type_name if loaded.controlnet is not None else None
    if name:
        return name
    name = stem(opts.controlnet_ckpt or "").lower()
    for kind in ("canny", "blur", "depth"):
        if kind in name:
            return kind
    return "blur"  # no type known: plain 2x-1 scaling, the reference's non-canny branch


def control_image(
    loaded: LoadedModels, opts: GenerateOptions, width: int, height: int, say: Callable[[str], None] = lambda s: None
) -> tuple[torch.Tensor, Image.Image]:
    """The control image as the VAE input ``[1, 3, H, W]`` and as the picture the ControlNet sees."""
    from sd35_core.image.control_image import prepare_control_image
    from sd35_core.image.preprocess import blur, canny

    kind = control_type_of(loaded, opts)
    image = pil_to_tensor(load_image_resized(opts.controlnet_cond_image, width, height, opts.resize_mode, say,
                                             "controlnet_cond_image"))
    pre = opts.controlnet_preprocess
    if pre == "auto":
        pre = kind if kind in ("canny", "blur") else "none"
    if pre == "canny":
        image = canny(image)
    elif pre == "blur":
        image = blur(image)
    shown = Image.fromarray((image[0].numpy() * 255).round().clip(0, 255).astype(np.uint8), "RGB")
    pixels = prepare_control_image(image, width, height, kind, path=loaded.controlnet_path)
    return pixels, shown


def decode_image(vae: Any, latent: torch.Tensor) -> Image.Image:
    """Decode one raw VAE latent ``[1, 16, h, w]`` to a PIL image exactly as the reference's ``vae_decode``."""
    with torch.no_grad():
        image = vae.decode(latent).float().cpu()
    image = torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)[0]
    decoded = (255.0 * np.moveaxis(image.numpy(), 0, 2)).astype(np.uint8)
    return Image.fromarray(decoded)


def encode_inputs(
    loaded: LoadedModels, opts: GenerateOptions, say: Callable[[str], None]
) -> tuple[torch.Tensor | None, list[Any], Image.Image | None]:
    """The run's image inputs: the ``--init_image`` latent (or ``None``), the ControlNet hints, and the
    control image as the ControlNet sees it (for ``control.png``; ``None`` without a ControlNet)."""
    from sd35_core.models.latent import process_in
    from sd35_core.sampling.control import ControlHint

    init = None
    if opts.init_image:
        say("Encoding init image...")
        init = init_latent(loaded.vae, opts.init_image, opts.width, opts.height, opts.resize_mode, say)
    controls = []
    shown = None
    if loaded.controlnet is not None:
        say("Encoding control image...")
        pixels, shown = control_image(loaded, opts, opts.width, opts.height, say)
        cond_latent = process_in(encode_image(loaded.vae, pixels))
        controls.append(ControlHint(loaded.controlnet, cond_latent, strength=opts.controlnet_strength))
    return init, controls, shown
