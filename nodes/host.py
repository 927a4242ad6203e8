"""The one door between the node pack and ComfyUI.

Every ComfyUI module the pack uses is imported here and nowhere else: ``folder_paths`` (model folders),
``comfy.model_management`` (devices, interruption, memory), ``comfy.model_patcher`` (registering our
modules so ComfyUI can load and evict them), ``comfy.utils.ProgressBar`` and ``latent_preview`` (progress
with previews). Each has a plain fallback, so the nodes also run under pytest without ComfyUI: the CPU is
the device, models are moved with ``.to()``, and model files are looked up in the folders named by the
``SD35_MODELS_DIR`` environment variable (``<dir>/checkpoints``, ``<dir>/vae`` ...) or by absolute path.
The model bridge (``comfy.model_base`` and friends) is a second door in the same role, ``comfy_bridge.py``,
reached only through :func:`comfy_bridge` and absent outside ComfyUI.

Environment variables (all optional):

``SD35_MODELS_DIR``
    Fallback model root (outside ComfyUI) holding ComfyUI-style sub-folders.
``SD35_TOKENIZERS``
    A folder with ``clip/`` (vocab.json, merges.txt) and ``t5/tokenizer.json``; takes precedence over the
    tokenizer files bundled with ComfyUI.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sequence

import torch

from ..sd35_core.models.latent import SD3_PREVIEW, LatentPreview, latent_to_rgb_preview

log = logging.getLogger(__name__)

try:  # ComfyUI is importable only inside its own process (or with its checkout on sys.path).
    import comfy.latent_formats as _latent_formats
    import comfy.model_management as _mm
    import comfy.model_patcher as _model_patcher
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
    import latent_preview as _latent_preview
except ImportError:
    _latent_formats = _mm = _model_patcher = _comfy_utils = _folder_paths = _latent_preview = None

IN_COMFYUI = _mm is not None

MODEL_EXTENSIONS = (".safetensors", ".sft")
GGUF_EXTENSIONS = (".gguf",)
MODELS_DIR_ENV = "SD35_MODELS_DIR"
TOKENIZERS_ENV = "SD35_TOKENIZERS"


# --------------------------------------------------------------------------------------------- folders

def list_models(folder: str, extensions: Sequence[str] = MODEL_EXTENSIONS) -> list[str]:
    """Model files in one of ComfyUI's model folders (``checkpoints``, ``vae``, ``controlnet`` ...).

    Only files with ``extensions`` are listed (safetensors by default: the loaders refuse pickles, so
    offering them would only lead to an error). ComfyUI lists a folder only with the extensions it registered
    for it, which never include ``.gguf``; those files are found by walking the folder's paths, without
    touching ComfyUI's registry (other loaders would then offer files they cannot read).
    """
    extensions = tuple(e.lower() for e in extensions)
    if _folder_paths is not None:
        try:
            names = _folder_paths.get_filename_list(folder)
            registered = {e.lower() for e in _folder_paths.folder_names_and_paths[folder][1]}
            roots = _folder_paths.get_folder_paths(folder)
        except KeyError:
            names, registered, roots = [], set(), []
        if any(e not in registered for e in extensions):
            for root in roots:
                names += _folder_paths.recursive_search(root, excluded_dir_names=[".git"])[0]
    else:
        root = _fallback_folder(folder)
        names = []
        if root is not None:
            for dirpath, _dirs, files in os.walk(root, followlinks=True):
                names += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted({n for n in names if n.lower().endswith(extensions)})


def resolve_model(folders: str | Sequence[str], name: str) -> str:
    """Absolute path of model file ``name`` from the first of ``folders`` that holds it.

    An absolute path that exists is accepted as is (scripts and tests pass files directly).
    Raises ``FileNotFoundError`` naming the folders that were searched.
    """
    if isinstance(folders, str):
        folders = (folders,)
    if os.path.isabs(name) and os.path.isfile(name):
        return name
    searched: list[str] = []
    for folder in folders:
        if _folder_paths is not None:
            path = _folder_paths.get_full_path(folder, name)
            if path is not None:
                return path
            try:
                searched += _folder_paths.get_folder_paths(folder)
            except KeyError:
                pass
        else:
            root = _fallback_folder(folder)
            if root is not None:
                path = os.path.join(root, name)
                if os.path.isfile(path):
                    return path
                searched.append(root)
    where = ", ".join(searched) if searched else f"no folder (set {MODELS_DIR_ENV} outside ComfyUI)"
    raise FileNotFoundError(f"model file {name!r} not found in the {'/'.join(folders)} folders: searched {where}")


def register_model_folder(folder: str, extensions: Iterable[str]) -> None:
    """Make ``models/<folder>`` one of ComfyUI's model folders, for a kind of model ComfyUI has no folder for
    (``ipadapter``). Where another pack registered it already, its paths stay and ``extensions`` are added."""
    if _folder_paths is None:
        return
    extensions = {e.lower() for e in extensions}
    default = os.path.join(_folder_paths.models_dir, folder)
    registry = _folder_paths.folder_names_and_paths
    if folder in registry:  # another pack, or extra_model_paths.yaml (which registers no extensions)
        paths, known = registry[folder]
        registry[folder] = (paths if default in paths else [*paths, default], set(known) | extensions)
    else:
        registry[folder] = ([default], extensions)


def _fallback_folder(folder: str) -> str | None:
    root = os.environ.get(MODELS_DIR_ENV)
    if not root:
        return None
    path = os.path.join(root, folder)
    return path if os.path.isdir(path) else None


def comfyui_root() -> str | None:
    """The directory of the running ComfyUI's code (where its bundled tokenizer folders are)."""
    if _folder_paths is None:
        return None
    return os.path.dirname(os.path.realpath(_folder_paths.__file__))


def comfyui_tokenizer_dirs() -> list[str]:
    """The running ComfyUI's own CLIP and T5 tokenizer folders (``comfy/sd1_tokenizer``,
    ``comfy/text_encoders/t5_tokenizer``), or none outside ComfyUI."""
    root = comfyui_root()
    if root is None:
        return []
    return [os.path.join(root, "comfy", "sd1_tokenizer"), os.path.join(root, "comfy", "text_encoders", "t5_tokenizer")]


def tokenizer_path() -> str | None:
    """An explicit tokenizer folder from ``SD35_TOKENIZERS``, if set."""
    return os.environ.get(TOKENIZERS_ENV) or None


def server_routes():
    """ComfyUI's server route table (an aiohttp ``RouteTableDef``), or ``None`` outside a running ComfyUI.

    Taken from the ``server`` module ComfyUI has already imported (importing it here would start building
    ComfyUI's web app in processes that are not ComfyUI).
    """
    prompt_server = getattr(sys.modules.get("server"), "PromptServer", None)
    return getattr(getattr(prompt_server, "instance", None), "routes", None)


# --------------------------------------------------------------------------------------------- devices

def torch_device() -> torch.device:
    """Where the models compute: ComfyUI's device, or the CPU outside ComfyUI."""
    if _mm is not None:
        return _mm.get_torch_device()
    return torch.device("cpu")


def offload_device() -> torch.device:
    """Where idle weights wait: ComfyUI's offload device (normally the CPU)."""
    if _mm is not None:
        return _mm.unet_offload_device()
    return torch.device("cpu")


def text_encoder_device(choice: str = "default") -> torch.device:
    """Device for the text encoders: ``default`` (ComfyUI's choice), ``cpu`` or ``gpu``."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "gpu":
        return torch_device()
    if choice != "default":
        raise ValueError(f"text encoder device: expected default, cpu or gpu; got {choice!r}")
    if _mm is not None:
        return _mm.text_encoder_device()
    return torch.device("cpu")


def text_encoder_offload_device() -> torch.device:
    if _mm is not None:
        return _mm.text_encoder_offload_device()
    return torch.device("cpu")


def vae_device() -> torch.device:
    if _mm is not None:
        return _mm.vae_device()
    return torch.device("cpu")


def default_weight_dtype(device: torch.device) -> str:
    """Weight dtype name for ``default``: bf16 where the device runs it well, else fp16, fp32 on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return "fp32"
    if _mm is not None:
        if _mm.should_use_bf16(device):
            return "bf16"
        if _mm.should_use_fp16(device):
            return "fp16"
        return "fp32"
    return "bf16"


def soft_empty_cache() -> None:
    if _mm is not None:
        _mm.soft_empty_cache()


def comfy_bridge():
    """The ComfyUI side of the model bridge (``nodes/comfy_bridge.py``), or ``None`` outside ComfyUI.

    Imported on first use, so processes without ComfyUI never touch it.
    """
    if not IN_COMFYUI:
        return None
    from . import comfy_bridge as bridge

    return bridge


# --------------------------------------------------------------------------------------------- memory

class _Holder(torch.nn.Module):
    """Carries one of our modules into ComfyUI's ModelPatcher.

    ModelPatcher writes bookkeeping attributes (``device``, ``model_loaded_weight_memory`` ...) onto the
    module it wraps; a holder keeps them off our own classes.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


class ManagedModule:
    """A module whose placement is decided by ComfyUI's model management (or by ``.to()`` outside it).

    ``load()`` brings the weights to the compute device (ComfyUI may evict other models for the room;
    it may later evict ours when something else needs it); ``unload()`` sends them back to the offload
    device. Our modules cannot run with half their weights on the CPU, so loads are always full.
    """

    def __init__(self, module: torch.nn.Module, load_device: torch.device, offload: torch.device | None = None,
                 name: str | None = None, patcher=None):
        self.module = module
        self.name = f"SD35{name or type(module).__name__}"
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload) if offload is not None else offload_device()
        # A caller may bring its own patcher over ``module`` (the diffusion model's, see comfy_bridge.py).
        self.patcher = patcher
        if patcher is None and _model_patcher is not None:
            # A subclass per name, because ComfyUI's log says "Requested to load <class name>".
            holder = type(self.name, (_Holder,), {})(module)
            self.patcher = _model_patcher.ModelPatcher(holder, self.load_device, self.offload_device)

    def load(self, extra: Iterable[ManagedModule] = (), memory_required: int = 0) -> torch.nn.Module:
        """Bring this module (and ``extra`` ones used together with it) onto the load device."""
        modules = [self, *extra]
        if _mm is not None:
            _mm.load_models_gpu([m.patcher for m in modules], memory_required=memory_required, force_full_load=True)
        else:
            for m in modules:
                m.module.to(m.load_device)
        return self.module

    def unload(self) -> None:
        """Move the weights back to the offload device and drop them from ComfyUI's loaded list."""
        if _mm is None:
            self.module.to(self.offload_device)
            return
        # ComfyUI offers no per-model unload call; this is what its own free_memory() does for one entry.
        for i in range(len(_mm.current_loaded_models) - 1, -1, -1):
            loaded = _mm.current_loaded_models[i]
            if loaded.model is self.patcher:
                loaded.model_unload()
                _mm.current_loaded_models.pop(i)
        self.patcher.detach()
        _mm.soft_empty_cache()


# --------------------------------------------------------------------------------------------- progress

def check_interrupt() -> bool:
    """Raise ComfyUI's interruption exception when the user pressed Cancel; ``False`` otherwise.

    Used as the pipeline's ``should_cancel``: raising ComfyUI's own exception makes the UI report an
    interruption (not an error), and the next prompt runs normally.
    """
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()
    return False


def comfy_latent_format(preview: LatentPreview = SD3_PREVIEW):
    """ComfyUI's SD3 latent format; for a model with a preview map of its own (its VAE is not SD3's), that map
    and no TAESD decoder, as ComfyUI's TAESD3 was trained for SD3's VAE."""
    latent_format = _latent_formats.SD3()
    if preview != SD3_PREVIEW:
        latent_format.latent_rgb_factors = [list(row) for row in preview.factors]
        latent_format.latent_rgb_factors_bias = list(preview.bias)
        latent_format.taesd_decoder_name = None
    return latent_format


class Progress:
    """Per-step progress with latent previews: ComfyUI's progress bar and previewer, or a log line."""

    def __init__(self, total: int, device: torch.device | None = None, preview: LatentPreview = SD3_PREVIEW):
        self.total = total
        self.current = 0
        self.preview = preview
        self.bar = _comfy_utils.ProgressBar(total) if _comfy_utils is not None else None
        self.previewer = None
        if _latent_preview is not None:
            try:
                self.previewer = _latent_preview.get_previewer(device or torch_device(), comfy_latent_format(preview))
            except Exception as e:  # a broken TAESD file must not stop sampling
                log.warning("latent previews unavailable: %s", e)
        self.last_preview = None

    def update(self, step: int, total: int | None = None, x0: torch.Tensor | None = None) -> None:
        """Report that step ``step`` (0-based) of ``total`` finished; ``x0`` is the denoised estimate
        in model space (latent format applied), used for the preview."""
        if total is not None:
            self.total = total
        self.current = min(step + 1, self.total)
        if self.bar is not None:
            preview = None
            if self.previewer is not None and x0 is not None:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
            self.bar.update_absolute(self.current, self.total, preview)
        else:
            if x0 is not None:
                self.last_preview = latent_to_rgb_preview(x0, self.preview)
            log.debug("sd35: step %d/%d", self.current, self.total)
