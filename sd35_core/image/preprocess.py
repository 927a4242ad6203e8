"""Control-image preprocessors for the SD3.5 ControlNets, in torch (no OpenCV at run time).

The model cards (stabilityai/stable-diffusion-3.5-large-controlnet-canny / -blur / -depth) prepare the
training-style inputs with OpenCV and torchvision:

* canny: ``cv2.Canny`` on the 8-bit grayscale image with thresholds 100 and 200 (3x3 Sobel, L1 gradient).
  :func:`canny` is the same algorithm (OpenCV's integer grayscale, replicate-border Sobel, its fixed-point
  direction test and neighbour comparisons, 8-connected hysteresis), so on 8-bit inputs it draws the
  same edges as OpenCV (the tests measure the agreement).
* blur: a Gaussian blur with a 50 pixel kernel. A Gaussian kernel needs an odd size (OpenCV and torchvision
  both refuse 50), so an even ``kernel`` is taken as the next odd size (51), and the width follows OpenCV's
  rule for a kernel of that size, ``sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8`` (8.0 for 51), with
  OpenCV's default reflect-101 border. It matches ``cv2.GaussianBlur(img, (k, k), 0)``.
* depth: the card uses depth maps from a depth estimator (DepthFM); any depth ``IMAGE`` works after
  :func:`normalize_depth`. Near must be dark for these models; see
  :func:`sd35_core.image.control_image.prepare_control_image` for the inversion choice.

``IMAGE`` tensors are ``[B, H, W, 3]`` float in 0..1, as ComfyUI passes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CANNY_LOW = 100
CANNY_HIGH = 200
BLUR_KERNEL = 50

# OpenCV's fixed-point RGB -> gray weights (0.299, 0.587, 0.114 in 15 bits, OpenCV 5; OpenCV 4's 14-bit weights
# differ by one gray level on a fraction of a percent of pixels) and its tan(22.5°) * 2**15.
_GRAY_R, _GRAY_G, _GRAY_B, _GRAY_SHIFT = 9798, 19235, 3735, 15
_TG22 = 13573


def _check_image(image: torch.Tensor, what: str) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{what}: expected an RGB IMAGE tensor [B, H, W, 3] with values 0..1; got {shape}")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{what}: the image is empty (shape {tuple(image.shape)})")


def gray8(image: torch.Tensor) -> torch.Tensor:
    """8-bit grayscale ``[B, H, W]`` (int32 0..255) of an ``IMAGE``, exactly as ``cv2.COLOR_RGB2GRAY``."""
    u = (image.float().clamp(0, 1) * 255).round().to(torch.int32)
    r, g, b = u.unbind(-1)
    return (r * _GRAY_R + g * _GRAY_G + b * _GRAY_B + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT


def canny(image: torch.Tensor, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> torch.Tensor:
    """Canny edges of an ``IMAGE`` as an ``IMAGE`` (edges 1.0, background 0.0, the same in all channels).

    Thresholds are on the 0..255 gradient scale of ``cv2.Canny`` (L1 magnitude of the 3x3 Sobel of the 8-bit
    grayscale image); the defaults are the model card's 100 and 200.
    """
    _check_image(image, "canny")
    if low < 0 or high < 0:
        raise ValueError(f"canny thresholds: expected non-negative values, got low={low}, high={high}")
    low, high = sorted((low, high))
    lo, hi = int(low // 1), int(high // 1)  # OpenCV floors the thresholds for the L1 gradient
    g = gray8(image).to(image.device)
    b, h, w = g.shape

    p = F.pad(g[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0].to(torch.int64)
    smooth_y = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # [1, 2, 1] down the rows
    dx = smooth_y[:, :, 2:] - smooth_y[:, :, :-2]
    smooth_x = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]
    dy = smooth_x[:, 2:] - smooth_x[:, :-2]
    mag = dx.abs() + dy.abs()

    # Neighbour magnitudes, zero outside the image (as OpenCV's magnitude buffer).
    mp = F.pad(mag, (1, 1, 1, 1))

    def at(dr: int, dc: int) -> torch.Tensor:
        return mp[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]

    ax = dx.abs()
    ay = dy.abs() << 15
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << 16)
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx < 0) == (dy < 0)
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep_d = torch.where(
        same_sign,
        (mag > at(-1, -1)) & (mag > at(1, 1)),
        (mag > at(-1, 1)) & (mag > at(1, -1)),
    )
    candidate = (mag > lo) & ((horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d))
    edges = _hysteresis(candidate & (mag > hi), candidate)
    return edges.to(torch.float32)[..., None].expand(b, h, w, 3).contiguous()


def _hysteresis(strong: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Candidates 8-connected (through candidates) to a strong pixel."""
    cand = candidate[:, None].float()
    cur = strong[:, None].float()
    while True:
        # Several growth steps per convergence test: each step is cheap, the test needs a sync.
        prev = cur
        for _ in range(8):
            cur = F.max_pool2d(cur, 3, stride=1, padding=1) * cand
        if torch.equal(cur, prev):
            return cur[:, 0] > 0


def _reflect101(n: int, pad: int, device) -> torch.Tensor:
    """Source indices for ``n`` samples padded by ``pad`` on both sides, OpenCV's BORDER_REFLECT_101."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


# OpenCV's fixed binomial-like kernels for the small sizes when no sigma is given (getGaussianKernel).
_SMALL_KERNELS = {
    1: (1,),
    3: (1 / 4, 1 / 2, 1 / 4),
    5: (1 / 16, 1 / 4, 3 / 8, 1 / 4, 1 / 16),
    7: (1 / 32, 7 / 64, 7 / 32, 9 / 32, 7 / 32, 7 / 64, 1 / 32),
    9: (1 / 64, 13 / 256, 15 / 128, 51 / 256, 15 / 64, 51 / 256, 15 / 128, 13 / 256, 1 / 64),
}


def gaussian_kernel(kernel: int, sigma: float | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd size ``kernel`` (float64), as ``cv2.getGaussianKernel``.

    Without ``sigma``: OpenCV's fixed kernels up to size 9, else ``sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8``.
    """
    if sigma is None or sigma <= 0:
        if kernel in _SMALL_KERNELS:
            return torch.tensor(_SMALL_KERNELS[kernel], dtype=torch.float64)
        sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    x = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def blur(image: torch.Tensor, kernel: int = BLUR_KERNEL, sigma: float | None = None) -> torch.Tensor:
    """Gaussian blur of an ``IMAGE`` with a ``kernel`` x ``kernel`` window (even sizes become the next odd).

    ``sigma`` defaults to OpenCV's value for the kernel size; borders reflect without repeating the edge
    pixel (OpenCV's default), so the result matches ``cv2.GaussianBlur(img, (k, k), 0)``.
    """
    _check_image(image, "blur")
    if not isinstance(kernel, int) or kernel < 1:
        raise ValueError(f"blur kernel: expected a positive whole number of pixels, got {kernel!r}")
    if kernel % 2 == 0:
        kernel += 1
    pad = kernel // 2
    _, h, w, _ = image.shape
    k = gaussian_kernel(kernel, sigma).to(device=image.device, dtype=torch.float32)
    x = image.float().permute(0, 3, 1, 2)  # [B, 3, H, W]
    x = x[:, :, :, _reflect101(w, pad, image.device)]
    x = F.conv2d(x.reshape(-1, 1, h, w + 2 * pad), k.view(1, 1, 1, -1)).view(-1, 3, h, w)
    x = x[:, :, _reflect101(h, pad, image.device), :]
    x = F.conv2d(x.reshape(-1, 1, h + 2 * pad, w), k.view(1, 1, -1, 1)).view(-1, 3, h, w)
    return x.permute(0, 2, 3, 1).clamp(0.0, 1.0).contiguous()


def normalize_depth(image: torch.Tensor) -> torch.Tensor:
    """Stretch each depth map to 0..1 (min-max) and return it as an ``IMAGE`` with equal RGB channels.

    Accepts ``[B, H, W]``, ``[B, H, W, 1]`` or ``[B, H, W, 3]`` (channels averaged). A constant map becomes 0.
    """
    ok = isinstance(image, torch.Tensor) and (image.ndim == 3 or (image.ndim == 4 and image.shape[-1] in (1, 3)))
    if not ok:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"depth map: expected an IMAGE [B, H, W, 3], [B, H, W, 1] or [B, H, W]; got {shape}")
    d = image.float() if image.ndim == 3 else image.float().mean(-1)
    flat = d.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1)
    span = (flat.max(1).values.view(-1, 1, 1) - lo).clamp_min(torch.finfo(torch.float32).tiny)
    out = ((d - lo) / span).clamp(0.0, 1.0)
    return out[..., None].expand(*out.shape, 3).contiguous()


def depth_near_is_bright(image: torch.Tensor) -> bool:
    """Guess whether a depth map draws near as bright (Depth Anything, MiDaS, Zoe) or as dark (DepthFM).

    A heuristic for photographs: the bottom of the frame is almost always nearer than the top (ground vs sky
    or background), so near is bright when the bottom third is brighter than the top third.
    """
    d = image.float()
    if d.ndim == 4:
        d = d.mean(-1) if d.shape[-1] in (1, 3) else d
    if d.ndim == 3:
        d = d.mean(0)
    if d.ndim != 2 or d.shape[0] < 3:
        raise ValueError(f"depth map: expected an image of at least 3 rows, got shape {tuple(image.shape)}")
    third = d.shape[0] // 3
    return bool(d[-third:].mean() > d[:third].mean())


# A grey picture's channels agree to within JPEG chroma noise; a photo's differ by far more on average.
DEPTH_CHANNEL_SPREAD = 0.04


def depth_map_problem(image: torch.Tensor) -> str | None:
    """Why ``image`` (``[B, H, W, 3]`` or ``[H, W, 3]``, 0..1) does not look like a depth map, or ``None``.

    Depth maps are grey: all three channels equal. A colour photo (mean spread between the largest and
    smallest channel above :data:`DEPTH_CHANNEL_SPREAD`) fed to the depth ControlNet steers it with
    colours it reads as distances.
    """
    x = image.float()
    spread = float((x.amax(-1) - x.amin(-1)).mean())
    if spread <= DEPTH_CHANNEL_SPREAD:
        return None
    return (f"it does not look like a depth map: its three colour channels differ (mean spread {spread:.2f}; a "
            "depth map is grey). It is used as it is; make a depth map first (a depth estimator such as Depth "
            "Anything or MiDaS)")
