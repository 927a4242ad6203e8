"""ControlNet nodes: apply (attach to conditioning) and the control-image preprocessors."""

from __future__ import annotations

from ..sd35_core.image import preprocess
from ..sd35_core.image.fit import DEFAULT_RESIZE_MODE, RESIZE_MODES
from ..sd35_core.models.controlnet import CONTROL_TYPES
from .conditioning import ControlSpec, attach_control
from .latent_vae import NO_VAE
from .model_input import VAE_TYPES, vae_input
from .objects import SD35ControlNet, require, require_type

NODE = "SD3.5 Apply ControlNet"
CONTROL_TYPE_CHOICES = ["auto", *CONTROL_TYPES]
DEPTH_INVERT = {"off": False, "on": True, "auto": "auto"}


class SD35ControlNetApply:
    """Attach a ControlNet and its control image to the positive and negative conditioning."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "Positive conditioning to steer."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning (the reference applies the "
                                                         "ControlNet to both halves of the CFG batch)."}),
                "control_net": ("SD35_CONTROLNET", {"tooltip": "The ControlNet from SD3.5 ControlNet Loader."}),
                "vae": (VAE_TYPES, {"tooltip": "The SD3 VAE, to encode the control image (SD3.5 VAE Loader, or a "
                                               "ComfyUI VAE such as CheckpointLoaderSimple's)."}),
                "image": ("IMAGE", {"tooltip": "The control image: canny edges, a blurred image or a depth map "
                                               "(see the SD3.5 preprocessors). It is fitted to the generation size "
                                               "(resize_mode)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "How strongly the ControlNet steers; 0 turns it off."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "First part of the run the ControlNet acts on (fraction of "
                                                       "the steps)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Where the ControlNet stops acting (fraction of the steps)."}),
            },
            "optional": {
                "control_type": (CONTROL_TYPE_CHOICES, {
                    "default": "auto",
                    "tooltip": "How the control image is scaled for the VAE; auto reads it from the ControlNet file."}),
                "depth_invert": (list(DEPTH_INVERT), {
                    "default": "auto",
                    "tooltip": "Depth maps only, and the one place their orientation is set. The SD3.5 depth "
                               "ControlNet was trained with near = dark, which the "
                               "reference feeds as given; Depth Anything and MiDaS draw near = bright. auto inverts "
                               "a map whose lower part (usually the ground, near) is brighter than its top, so both "
                               "kinds come out right; off and on force it."}),
                "resize_mode": (list(RESIZE_MODES), {
                    "default": DEFAULT_RESIZE_MODE,
                    "tooltip": "For a control image of another aspect ratio than the generation: crop cuts its "
                               "middle to the aspect first (as ImageScale crop=center), stretch resizes it "
                               "regardless (the reference), pad fits it whole with black bars. The console says "
                               "what was done."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Positive conditioning with the ControlNet attached.",
                       "Negative conditioning with the ControlNet attached.")
    FUNCTION = "apply"
    CATEGORY = "sd35/controlnet"
    DESCRIPTION = ("Attaches an SD3.5 ControlNet to the conditioning; SD3.5 Sampler runs it. Several can be chained.")

    def apply(self, positive, negative, control_net, vae, image, strength, start_percent, end_percent,
              control_type: str = "auto", depth_invert: str = "auto", resize_mode: str = DEFAULT_RESIZE_MODE):
        control_net = require_type(control_net, SD35ControlNet, "control_net", NODE)
        require(vae, "vae", NODE, NO_VAE)
        vae = vae_input(vae, NODE)
        if control_type not in CONTROL_TYPE_CHOICES:
            raise ValueError(f"{NODE}: control_type: expected one of {', '.join(CONTROL_TYPE_CHOICES)}; "
                             f"got {control_type!r}")
        if depth_invert not in DEPTH_INVERT:
            raise ValueError(f"{NODE}: depth_invert: expected one of {', '.join(DEPTH_INVERT)}; got {depth_invert!r}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"{NODE}: resize_mode: expected one of {', '.join(RESIZE_MODES)}; got {resize_mode!r}")
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"{NODE}: expected 0 <= start_percent <= end_percent <= 1; got {start_percent}, "
                             f"{end_percent}")
        if image is None or getattr(image, "ndim", 0) != 4 or image.shape[-1] < 3:
            raise ValueError(f"{NODE}: the image input is not an RGB IMAGE [B, H, W, 3]")
        if strength == 0:
            return (positive, negative)
        spec = ControlSpec(control_net, vae, image[..., :3], float(strength), float(start_percent),
                           float(end_percent), control_type, DEPTH_INVERT[depth_invert], resize_mode)
        return (attach_control(positive, spec), attach_control(negative, spec))


class SD35CannyPreprocessor:
    """Canny edges, as the SD3.5 canny ControlNet was trained on."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to find edges in."}),
                "low_threshold": ("INT", {"default": preprocess.CANNY_LOW, "min": 0, "max": 1020,
                                          "tooltip": "Weak-edge threshold on OpenCV's 0..255 gradient scale "
                                                     "(model card: 100)."}),
                "high_threshold": ("INT", {"default": preprocess.CANNY_HIGH, "min": 0, "max": 1020,
                                           "tooltip": "Strong-edge threshold (model card: 200)."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("White edges on black, for the canny ControlNet.",)
    FUNCTION = "run"
    CATEGORY = "sd35/controlnet/preprocessors"
    DESCRIPTION = "Canny edge detection matching OpenCV's cv2.Canny (no OpenCV needed)."

    def run(self, image, low_threshold, high_threshold):
        return (preprocess.canny(image, low_threshold, high_threshold),)


class SD35BlurPreprocessor:
    """Gaussian blur, as the SD3.5 blur ControlNet was trained on."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to blur."}),
                "kernel_size": ("INT", {"default": preprocess.BLUR_KERNEL, "min": 1, "max": 501,
                                        "tooltip": "Blur window in pixels (model card: 50; even sizes use the next "
                                                   "odd one)."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The blurred image, for the blur ControlNet.",)
    FUNCTION = "run"
    CATEGORY = "sd35/controlnet/preprocessors"
    DESCRIPTION = "Gaussian blur matching cv2.GaussianBlur (no OpenCV needed)."

    def run(self, image, kernel_size):
        return (preprocess.blur(image, kernel_size),)


class SD35DepthNormalize:
    """Stretch a depth map to 0..1 for the depth ControlNet.

    Which way round the map goes (near = dark, as the ControlNet was trained) is decided in one place:
    SD3.5 Apply ControlNet's ``depth_invert``. This node once had its own ``invert`` switch too, and the two
    could cancel each other (``invert`` on here, ``auto`` there re-inverting). ``invert`` is now a hidden
    input: the graph editor shows no second control, an old workflow still loads (the editor drops the
    surplus widget value, and ``depth_invert=auto`` orients the map anyway), and an API prompt or script
    that passes ``invert`` gets what it asked for.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "A depth map from any depth estimator node or file. Which way round "
                                               "it goes is set on SD3.5 Apply ControlNet (depth_invert)."}),
            },
            "hidden": {"invert": ("BOOLEAN", {"default": False})},
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The normalised depth map, grey in all three channels.",)
    FUNCTION = "run"
    CATEGORY = "sd35/controlnet/preprocessors"
    DESCRIPTION = ("Normalises a depth map to the full 0..1 range (per image). Near = dark or bright is handled by "
                   "SD3.5 Apply ControlNet's depth_invert (auto by default).")

    def run(self, image, invert: bool = False):
        if not isinstance(invert, bool):
            raise ValueError(f"SD3.5 Depth Normalize: invert: expected true or false, got {invert!r}")
        out = preprocess.normalize_depth(image)
        return (1.0 - out if invert else out,)
