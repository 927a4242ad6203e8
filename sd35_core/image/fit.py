"""Fitting an image of one size into a frame of another: ``crop``, ``stretch`` or ``pad``.

Control and init images often come at another aspect ratio than the generation. ``stretch`` resizes to the
frame whatever the aspect (the reference's ``sd3_infer.py`` does that); ``crop`` cuts the middle of the
image to the frame's aspect first, with the same arithmetic as ComfyUI's ImageScale ``crop=center``
(``x = round((W - W * frame_aspect / aspect) / 2)``), then resizes; ``pad`` resizes the whole image to fit
inside the frame and fills the rest with black. For an image of the frame's aspect all three are the same
plain resize. The geometry lives here once; callers apply it with their own resampler (PIL LANCZOS).
"""

from __future__ import annotations

from dataclasses import dataclass

RESIZE_MODES = ("crop", "stretch", "pad")
DEFAULT_RESIZE_MODE = "crop"


@dataclass(frozen=True)
class Fit:
    """How a ``source`` (width, height) image goes into a ``frame``: crop box, resized size, paste offset."""

    source: tuple[int, int]
    frame: tuple[int, int]
    mode: str
    crop: tuple[int, int, int, int]  # left, top, right, bottom in the source
    size: tuple[int, int]  # the cropped part resized to this (width, height)
    offset: tuple[int, int]  # where it goes in the frame (non-zero only for pad)

    @property
    def changes_aspect(self) -> bool:
        """Whether the source's aspect ratio differs from the frame's (then the modes differ)."""
        (sw, sh), (fw, fh) = self.source, self.frame
        return sw * fh != sh * fw

    def describe(self) -> str:
        """One line saying what was done, for the log."""
        (sw, sh), (fw, fh) = self.source, self.frame
        if self.mode == "crop":
            left, top, right, bottom = self.crop
            how = f"center-cropped to {right - left}x{bottom - top} then resized"
        elif self.mode == "pad":
            how = f"resized to {self.size[0]}x{self.size[1]} and padded with black"
        else:
            how = "stretched (aspect ratio not kept)"
        return f"{sw}x{sh} -> {fw}x{fh}: {how}"


def fit_image(source: tuple[int, int], frame: tuple[int, int], mode: str = DEFAULT_RESIZE_MODE) -> Fit:
    """The :class:`Fit` of a ``source`` (width, height) image into ``frame`` with ``mode``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode: expected one of {', '.join(RESIZE_MODES)}; got {mode!r}")
    (sw, sh), (fw, fh) = source, frame
    if min(sw, sh, fw, fh) <= 0:
        raise ValueError(f"resize: expected positive sizes, got {sw}x{sh} -> {fw}x{fh}")
    crop, size, offset = (0, 0, sw, sh), (fw, fh), (0, 0)
    if mode == "crop":
        aspect, frame_aspect = sw / sh, fw / fh
        x = y = 0
        if aspect > frame_aspect:
            x = round((sw - sw * (frame_aspect / aspect)) / 2)
        elif aspect < frame_aspect:
            y = round((sh - sh * (aspect / frame_aspect)) / 2)
        crop = (x, y, sw - x, sh - y)
    elif mode == "pad":
        scale = min(fw / sw, fh / sh)
        size = (max(1, min(fw, round(sw * scale))), max(1, min(fh, round(sh * scale))))
        offset = ((fw - size[0]) // 2, (fh - size[1]) // 2)
    return Fit((sw, sh), (fw, fh), mode, crop, size, offset)
