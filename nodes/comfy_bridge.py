"""ComfyUI's side of the model bridge: our MMDiT-X as a ComfyUI ``MODEL``, and ComfyUI's SD3 ``MODEL`` in our sampler.

Like ``host.py`` this module is a door to ComfyUI (``comfy.model_base``, ``comfy.model_patcher``,
``comfy.model_management``, ``comfy.supported_models``); it is imported only inside ComfyUI, through
:func:`.host.comfy_bridge`, so every node still imports and runs under pytest without ComfyUI.

Our side: the checkpoint loader registers the MMDiT-X with ComfyUI through :func:`model_patcher`, a
``ModelPatcher`` over :class:`SD35MMDiTX` (a ``comfy.model_base.SD3`` whose ``diffusion_model`` is
:class:`.comfy_model.ComfyMMDiT`). ``SD3.5 Model to ComfyUI MODEL`` hands out clones of that patcher, so
ComfyUI's own rules for clones apply: LoRA patches of a clone are applied when it loads and taken back
when the plain model (our sampler) loads again; the weights exist once.

Their side: :func:`inspect_native` checks a native ``MODEL`` and :func:`load_native` loads it (its patches
applied by ComfyUI) and returns what our sampler runs: our MMDiT-X over the native tensors when that is
exact, else :class:`.comfy_model.NativePasses`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import comfy.supported_models
import comfy.weight_adapter
import torch

from ..sd35_core.loading.lora.apply import collect, patched_weight
from ..sd35_core.models.latent import SD3_PREVIEW, LatentPreview
from ..sd35_core.models.mmditx import MMDiTConfig, MMDiTX
from ..sd35_core.sampling.cfg import ModelHooks
from . import host
from .comfy_model import ComfyMMDiT, NativePasses, ViewRefusal, comfy_unet_config, mmdit_view, shapes_of

log = logging.getLogger(__name__)

# model_options entries that change how ComfyUI's own samplers run the model; the sampler cannot honour them
# and would silently drop them, so a model carrying one is refused with its name. The CFG functions
# (sampler_pre_cfg_function, sampler_cfg_function, sampler_post_cfg_function) are honoured: model_hooks().
GUIDANCE_OPTIONS = {
    "sampler_calc_cond_batch_function": "a cond-batch function",
    "model_function_wrapper": "a model function wrapper",
    "denoise_mask_function": "a denoise-mask function (e.g. DifferentialDiffusion: use this sampler's mask_mode "
                             "differential instead)",
}


class SD35MMDiTX(comfy.model_base.SD3):
    """ComfyUI's SD3 model around our MMDiT-X (ComfyUI's log names models by this class name).

    ``model_config`` is ComfyUI's SD3 config with the ``unet_config`` its detection would derive from
    these weights, so its LoRA key maps (``model_lora_keys_unet``) and model sampling apply unchanged.
    """

    def __init__(self, mmdit: MMDiTX, shift: float, preview: LatentPreview = SD3_PREVIEW):
        unet_config = dict(comfy_unet_config(mmdit.config), disable_unet_model_creation=True)
        model_config = comfy.supported_models.SD3(unet_config)
        model_config.sampling_settings["shift"] = float(shift)
        model_config.set_inference_dtype(mmdit.compute_dtype, None)
        super().__init__(model_config)
        self.latent_format = host.comfy_latent_format(preview)  # ComfyUI's samplers preview with it
        self.diffusion_model = ComfyMMDiT(mmdit)


def _apply_skipped_patches(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load) -> None:
    """After a load: apply the weight patches ComfyUI left for later.

    In a partial (low-VRAM) load ComfyUI defers patches to its own layers' on-the-fly casts; our layers
    have none, so a deferred patch would be lost. Applying it here makes it a regular patch (backed up
    and taken back by ComfyUI as any other).
    """
    for key in list(patcher.patches):
        if key not in patcher.backup:
            patcher.patch_weight_to_device(key, device_to=device_to)


class SD35ModelPatcher(comfy.model_patcher.ModelPatcher):
    """ComfyUI's ModelPatcher, refusing weight patches it would apply wrongly to our layers.

    A GGUF-quantized layer keeps raw block bytes under its official key, and a scaled-fp8 layer keeps fp8 values
    whose per-tensor scale our ops multiply in at compute time: ComfyUI's LoRA arithmetic on either stored tensor
    would not be the LoRA, so a patch that reaches one is an error naming the key and what to use instead.
    """

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        kinds = {}
        for name, m in self.model.diffusion_model.named_modules():
            if getattr(m, "weight_quant", None) is not None:
                kinds[f"diffusion_model.{name}.weight"] = "GGUF-quantized"
            elif getattr(m, "weight_scale", None) is not None:
                kinds[f"diffusion_model.{name}.weight"] = "scaled fp8"
        hit = sorted(k if isinstance(k, str) else k[0] for k in patches
                     if (k if isinstance(k, str) else k[0]) in kinds)
        if hit:
            raise ValueError(f"SD3.5 Model to ComfyUI MODEL: {len(hit)} patched weights are {kinds[hit[0]]} "
                             f"(e.g. {hit[0]}); ComfyUI's weight patches cannot apply to them; put the LoRA on "
                             "the model with SD3.5 LoRA Loader before this node (it applies at compute time), or "
                             "load a plain safetensors model")
        return super().add_patches(patches, strength_patch, strength_model)


def model_patcher(mmdit: MMDiTX, shift: float, load_device: torch.device, offload_device: torch.device,
                  preview: LatentPreview = SD3_PREVIEW):
    """The ``ModelPatcher`` that registers our MMDiT-X with ComfyUI (see the module doc)."""
    patcher = SD35ModelPatcher(SD35MMDiTX(mmdit, shift, preview), load_device, offload_device)
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, _apply_skipped_patches)
    return patcher


class SD35LoraPatch(comfy.weight_adapter.WeightAdapterBase):
    """Our LoRA stack's entries for one weight, as a ComfyUI weight patch.

    ComfyUI applies it when it loads the MODEL (and takes it back as any of its patches) with our own
    arithmetic (``sd35_core.loading.lora.apply.patched_weight``: float32, then ComfyUI rounds to the storage dtype,
    as our merge does), so SD3.5 LoRA Loader's LoRAs reach ComfyUI's samplers unchanged.
    """

    name = "sd35_lora"

    def __init__(self, entries):
        self.entries = list(entries)
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength != 1.0:
            raise ValueError(f"{key}: SD3.5 LoRA patches carry their own strength; got a ComfyUI strength {strength}")
        return function(patched_weight(weight, self.entries).to(intermediate_dtype))


def with_loras(patcher, stack):
    """A clone of ``patcher`` carrying our LoRA ``stack`` (``SD35Model.loras``) as ComfyUI weight patches."""
    clone = patcher.clone()
    patches = {f"diffusion_model.{key}": SD35LoraPatch(items) for key, items in collect(stack).items()}
    if patches:
        clone.add_patches(patches, 1.0)
    return clone


def with_shift(patcher, shift: float):
    """A clone of ``patcher`` sampling with ``shift`` (what ComfyUI's ModelSamplingSD3 node does)."""
    clone = patcher.clone()
    current = patcher.get_model_object("model_sampling")
    if float(getattr(current, "shift", -1.0)) == float(shift):
        return clone

    class ModelSamplingSD35(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    sampling = ModelSamplingSD35(patcher.model.model_config)
    sampling.set_parameters(shift=float(shift), multiplier=1000)
    clone.add_object_patch("model_sampling", sampling)
    return clone


# ----------------------------------------------------------------------------------------- native MODELs

@dataclass(eq=False)
class NativeModel:
    """A native ComfyUI SD3 / SD3.5 ``MODEL``, as checked by :func:`inspect_native`."""

    patcher: object  # comfy.model_patcher.ModelPatcher
    config: MMDiTConfig
    shift: float  # of its model sampling (ModelSamplingSD3 changes it)

    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    @property
    def preview(self) -> LatentPreview:
        return SD3_PREVIEW  # ComfyUI's own model, with its own latent format

    @property
    def compute_dtype(self) -> torch.dtype:
        model = self.patcher.model
        dtype = model.manual_cast_dtype or model.get_dtype()
        return torch.bfloat16 if dtype.itemsize == 1 else dtype


def is_native_model(value) -> bool:
    return isinstance(value, comfy.model_patcher.ModelPatcher)


def inspect_native(patcher, node: str) -> NativeModel:
    """Check that ``patcher`` is an SD3-family ``MODEL`` our sampler can honour; ValueError naming what is not."""
    model = patcher.model
    if not isinstance(model, comfy.model_base.SD3):
        raise ValueError(f"{node}: the model input is a ComfyUI {type(model).__name__} model; the SD3.5 nodes run "
                         "SD3 / SD3.5 models only")
    sampling = patcher.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow) or sampling.multiplier != 1000:
        raise ValueError(f"{node}: the model's sampling is {type(sampling).__name__}; SD3 models sample as a "
                         "discrete flow with multiplier 1000 (remove the node that changed it)")
    options = patcher.model_options
    refused = [f"{what} ({key})" for key, what in GUIDANCE_OPTIONS.items() if options.get(key)]
    if any(w for by_key in patcher.wrappers.values() for w in by_key.values()):
        refused.append("sampling wrappers")
    if options.get("transformer_options", {}).get("wrappers"):
        refused.append("transformer wrappers")
    if patcher.hook_patches or patcher.forced_hooks is not None or patcher.additional_models:
        refused.append("hooks or attached models")
    if refused:
        raise ValueError(f"{node}: the model carries {', '.join(refused)}, which only ComfyUI's own samplers apply; "
                         "sample it with KSampler / SamplerCustomAdvanced, or use this sampler's own skip-layer "
                         "guidance instead (CFG functions such as RescaleCFG, CFGZeroStar and APG are honoured)")
    try:
        config = MMDiTConfig.from_shapes(shapes_of(model.diffusion_model))
    except ValueError as e:
        raise ValueError(f"{node}: the model's diffusion model is not an SD3 MMDiT: {e}") from None
    return NativeModel(patcher, config, float(sampling.shift))


def load_native(native: NativeModel, extra: list, memory_required: int) -> MMDiTX | NativePasses:
    """Load ``native`` (and the ``extra`` patchers used with it) the way ComfyUI's samplers do, with its
    weight and object patches applied, and return what our sampler runs: our MMDiT-X over the native tensors
    (exact, block by block), our MMDiT-X itself (a MODEL made by SD3.5 Model to ComfyUI MODEL), or
    :class:`NativePasses` (whole native passes, for block patches and weight types our layers cannot run)."""
    patcher = native.patcher
    mm.load_models_gpu([patcher, *extra], memory_required=memory_required)
    diffusion = patcher.model.diffusion_model
    options = patcher.model_options.get("transformer_options", {})
    object_patches = [k for k in patcher.object_patches if k != "model_sampling"]
    reason: str | None = None
    if options:  # block patches, attention overrides ...: ComfyUI's MMDiT hands them to its blocks and attention
        reason = f"it carries transformer options ({', '.join(sorted(options))})"
    elif object_patches:
        reason = f"it carries object patches ({', '.join(object_patches)})"
    elif isinstance(diffusion, ComfyMMDiT):
        # Our own model come back through ComfyUI (e.g. after its LoraLoader): its patches are in place.
        log.info("sd35: our %s model sampled after ComfyUI's patches", native.config.variant)
        return diffusion.mmdit
    else:
        view = mmdit_view(diffusion, native.compute_dtype)
        if isinstance(view, ViewRefusal):
            reason = view.reason
        else:
            log.info("sd35: native %s model sampled by our MMDiT-X over its own weights", native.config.variant)
            return view
    log.info("sd35: native %s model run through its own forward pass per model call (%s); skip-layer "
             "guidance runs as a separate pass", native.config.variant, reason)
    return NativePasses(diffusion, native.config, native.compute_dtype, options)


# ---------------------------------------------------------------------------------------- CFG functions

def has_cfg_hooks(native: NativeModel) -> bool:
    """Whether the MODEL carries CFG functions (its model_options' pre-CFG, CFG or post-CFG functions)."""
    options = native.patcher.model_options
    return bool(options.get("sampler_pre_cfg_function") or options.get("sampler_cfg_function")
                or options.get("sampler_post_cfg_function"))


def cfg1_optimization(native: NativeModel) -> bool:
    """Whether ComfyUI leaves the negative out at cfg 1 for this MODEL (unless a node disabled it)."""
    return not native.patcher.model_options.get("disable_cfg1_optimization", False)


@contextlib.contextmanager
def model_hooks(native: NativeModel, positive, negative, latent_shape, cfg: float, sigmas: torch.Tensor):
    """The MODEL's CFG functions as :class:`~..sd35_core.sampling.cfg.ModelHooks`, for the duration of a run.

    They are called with the arguments ComfyUI's ``sampling_function`` passes. Those that only ComfyUI can give
    are ComfyUI's own: its model (set up as its samplers set it up, so a function that calls back into it, e.g.
    ``calc_cond_batch`` with a skip-layer patch, runs the native forward pass), the model options with the
    run's ``sample_sigmas``, and the conditioning processed by ComfyUI's ``process_conds`` (areas resolved and
    mirrored) as ``cond`` / ``uncond`` (``None`` when the negative is left out at cfg 1).
    """
    patcher = native.patcher
    options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas.to(patcher.load_device)
    device = patcher.load_device
    conds = {"positive": comfy.sampler_helpers.convert_cond(positive),
             "negative": comfy.sampler_helpers.convert_cond(negative)}
    noise = torch.zeros(tuple(latent_shape), device=device)
    conds = comfy.samplers.process_conds(patcher.model, noise, conds, device, noise, None, 0)
    skip_uncond = cfg1_optimization(native) and cfg == 1.0  # as the Guider decides it
    extra = {"model": patcher.model, "model_options": options, "cond": conds["positive"],
             "uncond": None if skip_uncond else conds["negative"]}
    hooks = ModelHooks(tuple(options.get("sampler_pre_cfg_function", ())), options.get("sampler_cfg_function"),
                       tuple(options.get("sampler_post_cfg_function", ())), lambda: extra)
    patcher.pre_run()
    try:
        yield hooks
    finally:
        patcher.cleanup()


# ----------------------------------------------------------------------------------------------------- VAE

class SD35ComfyVAE(comfy.sd.VAE):
    """ComfyUI's ``VAE`` over our SD3 autoencoder: the same module and the same ModelPatcher, no copy.

    ``comfy.sd.VAE.__init__`` builds ComfyUI's own autoencoder from a state dict, so it is not called; the
    attributes its encode / decode / tiled paths read are set here for an image VAE, and its
    ``first_stage_model`` is our VAE, whose ``encode`` (pixels in [-1, 1] -> mean latent) and ``decode`` are
    the calls ComfyUI makes.
    """

    def __init__(self, vae, patcher, device: torch.device):
        config = vae.config
        self.first_stage_model = vae
        self.patcher = patcher
        self.device = device
        self.vae_dtype = vae.compute_dtype
        self.working_dtypes = [self.vae_dtype]
        self.output_device = mm.intermediate_device()
        self.latent_channels = config.z_channels
        self.output_channels = config.out_channels
        self.downscale_ratio = self.upscale_ratio = config.downscale
        self.latent_dim = 2
        self.not_video = False
        self.crop_input = True
        self.disable_offload = False
        self.downscale_index_formula = self.upscale_index_formula = self.extra_1d_channel = None
        # Peak activations: the widest level at full resolution, a few buffers deep.
        width = config.ch * max(config.ch_mult)
        self.memory_used_encode = lambda shape, dtype: shape[-2] * shape[-1] * width * 6 * mm.dtype_size(dtype)
        self.memory_used_decode = lambda shape, dtype: (shape[-2] * shape[-1] * config.downscale**2 * width * 6
                                                        * mm.dtype_size(dtype))

    @staticmethod
    def process_input(image: torch.Tensor) -> torch.Tensor:
        return image * 2.0 - 1.0

    @staticmethod
    def process_output(image: torch.Tensor) -> torch.Tensor:
        return ((image + 1.0) / 2.0).clamp(0.0, 1.0)


def is_native_vae(value) -> bool:
    return isinstance(value, comfy.sd.VAE)


def encode_with_native_vae(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Raw latent of ``pixels`` ``[B, 3, H, W]`` (already scaled for the VAE, e.g. the reference's canny
    scaling) through a ComfyUI ``VAE``, which expects an IMAGE in 0..1 and maps it to ``2x - 1`` itself."""
    latent = vae.encode(((pixels.float() + 1.0) / 2.0).movedim(1, -1))
    if latent.ndim == 5:  # video-capable VAEs return a time axis
        latent = latent[:, :, 0]
    return latent
