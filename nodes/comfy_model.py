"""Our MMDiT-X in ComfyUI's shape, and ComfyUI's SD3 diffusion models in ours (no ComfyUI import here).

Both directions rest on one fact: our module names are the official checkpoint keys, and so are ComfyUI's.

- :class:`ComfyMMDiT` is the ``diffusion_model`` ComfyUI's SD3 model wrapper calls: it owns our MMDiT-X's
  parameters, buffers and sub-modules (the very same dicts, so ``state_dict()`` reads
  ``joint_blocks.0.x_block.attn.qkv.weight`` and a ComfyUI weight patch or device move acts on our module)
  and has ComfyUI's signature ``forward(x, timesteps, context, y, control, transformer_options)``.
- :func:`mmdit_view` builds an :class:`~..sd35_core.models.mmditx.MMDiTX` whose parameters *are* a foreign module's
  tensors (ComfyUI's own SD3 model after its patches are applied), or says why it cannot.
- :class:`NativePasses` runs a foreign SD3 diffusion model whole, one pass per call, for what the view
  cannot express (block patches, quantised weight types): the plain computation, never a wrong one.

:func:`comfy_unet_config` is the ``unet_config`` ComfyUI would detect from our model's weights.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..sd35_core.errors import CheckpointError
from ..sd35_core.models.mmditx import HEAD_DIM, MMDiTConfig, MMDiTX
from ..sd35_core.sampling.passes import WholePasses
from ..sd35_core.sampling.regions import pad_to_patch
from .ip_adapter import IPAdapterOption

log = logging.getLogger(__name__)

# Weight dtypes our layers compute from exactly as ComfyUI's plain and manual-cast layers do (a cast to the
# compute dtype). Quantised packs (GGUF), scaled fp8 and other tensor types are left to the native model.
VIEW_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def comfy_unet_config(config: MMDiTConfig) -> dict:
    """The ``unet_config`` ComfyUI's model detection derives for these weights (plus ``num_blocks``).

    ComfyUI sizes an MMDiT as ``hidden = 64 * depth``; ``num_blocks`` keeps the real block count, so its
    LoRA key maps (``mmdit_to_diffusers``) cover every block also for models where the two differ.
    """
    return {
        "in_channels": config.in_channels,
        "patch_size": config.patch_size,
        "out_channels": config.out_channels,
        "depth": config.hidden_size // HEAD_DIM,
        "num_blocks": config.depth,
        "input_size": None,
        "adm_in_channels": config.pooled_dim,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": config.context_dim, "out_features": config.hidden_size},
        },
        "num_patches": config.pos_embed_max_size**2,
        "pos_embed_max_size": config.pos_embed_max_size,
        "qk_norm": "rms" if config.qk_norm else None,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": list(config.x_block_self_attn_layers),
    }


def _skip_block(args: dict, _extra: dict) -> dict:
    """A ``patches_replace`` block patch that leaves the block out (ComfyUI's skip-layer guidance)."""
    return args


def _block_ip(ip, block: int):
    """Joint block ``block``'s IP-Adapter input (``JointBlock.forward``'s ``ip``), or ``None`` without one."""
    return None if ip is None else functools.partial(ip.add_to, block)


class ComfyMMDiT(nn.Module):
    """ComfyUI's diffusion-model interface over our MMDiT-X (see the module doc).

    The forward pass is ComfyUI's MMDiT loop: embed (a latent that is not a multiple of the patch size padded
    circularly, the output cut back, as ComfyUI's MMDiT does for an area crop); per joint block either the block or the
    ``transformer_options["patches_replace"]["dit"][("double_block", i)]`` patch (called with
    ``{"img", "txt", "vec", "transformer_options"}`` and ``{"original_block": ...}``, as ComfyUI calls it),
    then ``control["output"][i]`` added to the image tokens when present; final layer and unpatchify.
    """

    def __init__(self, mmdit: MMDiTX):
        super().__init__()
        # Not registered as a child: this module *is* the MMDiT-X for state_dict, .to() and ComfyUI's weight
        # patches, because it shares the three dicts that hold its tensors and sub-modules.
        object.__setattr__(self, "mmdit", mmdit)
        self._parameters = mmdit._parameters
        self._buffers = mmdit._buffers
        self._non_persistent_buffers_set = mmdit._non_persistent_buffers_set
        self._modules = mmdit._modules

    @property
    def dtype(self) -> torch.dtype:
        """What ComfyUI casts the inputs to (its ``BaseModel.get_dtype``): our compute dtype."""
        return self.mmdit.compute_dtype

    def cropped_pos_embed(self, hw: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
        """ComfyUI's MMDiT method of this name: the centre crop of the position grid for a latent ``hw``."""
        return self.mmdit.cropped_pos_embed((hw[0], hw[1]), self.mmdit.pos_embed.dtype).to(device)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: Mapping | None = None,
        transformer_options: Mapping | None = None,
        **_extra,
    ) -> torch.Tensor:
        """Velocity prediction, ComfyUI's way (``timesteps`` = sigma * 1000)."""
        if context is None or y is None:
            raise ValueError("SD3 diffusion model: expected both the text context and the pooled vector (y); "
                             "use SD3 conditioning (SD3.5 Text Encode or CLIPTextEncodeSD3)")
        options = transformer_options or {}
        replace = options.get("patches_replace", {}).get("dit", {})
        model = self.mmdit
        hw = x.shape[-2:]
        # ComfyUI's PatchEmbed pads a latent that is not a multiple of the patch size (an area crop) circularly,
        # and its MMDiT cuts the output back
        x = pad_to_patch(x, model.config.patch_size)
        state = model.embed(x, timesteps, context, y)
        # IP-Adapter applications carried by SD3.5 Model to ComfyUI MODEL: per-row tokens from cond_or_uncond
        ip_option = options.get(IPAdapterOption.KEY)
        ip = None if ip_option is None else ip_option.rows(options, x.shape[0], timesteps, model.compute_dtype,
                                                            x.device)
        img, txt, vec = state.x, state.context, state.c
        residuals = control.get("output") if control is not None else None
        for i, block in enumerate(model.joint_blocks):
            patch = replace.get(("double_block", i))
            if patch is not None:
                def original_block(args, block=block, i=i):
                    txt_out, img_out = block(args["txt"], args["img"], args["vec"], _block_ip(ip, i))
                    return {"txt": txt_out, "img": img_out}

                out = patch({"img": img, "txt": txt, "vec": vec, "transformer_options": options},
                            {"original_block": original_block})
                txt, img = out["txt"], out["img"]
            else:
                if txt is None:
                    raise ValueError(f"joint block {i}: no context tokens left (the last block has already run)")
                txt, img = block(txt, img, vec, _block_ip(ip, i))
            if residuals is not None and i < len(residuals) and residuals[i] is not None:
                img = img + residuals[i].to(img.dtype)
        state.x, state.context = img, txt
        return model.unembed(state)[:, :, :hw[0], :hw[1]]


# ------------------------------------------------------------------------------------------------ the view

@dataclass(frozen=True)
class ViewRefusal:
    """Why a foreign module's tensors cannot back our MMDiT-X directly (then the native model runs)."""

    reason: str


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and t.dtype in VIEW_DTYPES


def shapes_of(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a module's state (what :meth:`MMDiTConfig.from_shapes` reads)."""
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def mmdit_view(module: nn.Module, compute_dtype: torch.dtype | None = None) -> MMDiTX | ViewRefusal:
    """Our MMDiT-X over ``module``'s own tensors (same objects: no copy), or why that would be wrong.

    ``module`` is an SD3 diffusion model keyed like the official files (ComfyUI's, or ours). The view is
    exact only if every tensor is a plain floating tensor of a dtype our layers cast the same way, the key
    sets match one to one, and no layer computes its weight on the fly (ComfyUI's low-VRAM patches).
    """
    tensors = dict(module.state_dict(keep_vars=True))
    try:
        config = MMDiTConfig.from_shapes({k: tuple(v.shape) for k, v in tensors.items()})
    except CheckpointError as e:
        return ViewRefusal(f"not an SD3 MMDiT ({e})")
    odd = sorted(k for k, t in tensors.items() if not _plain(t))
    if odd:
        t = tensors[odd[0]]
        return ViewRefusal(f"{len(odd)} weights are stored as {type(t).__name__}/{t.dtype} (e.g. {odd[0]})")
    computed = sorted(name for name, m in module.named_modules()
                      if getattr(m, "weight_function", None) or getattr(m, "bias_function", None))
    if computed:
        return ViewRefusal(f"{len(computed)} layers patch their weights on the fly (e.g. {computed[0]})")
    with torch.device("meta"):
        view = MMDiTX(config)
    expected = view.state_dict(keep_vars=True)
    if expected.keys() != tensors.keys():
        extra = sorted(tensors.keys() - expected.keys())
        missing = sorted(expected.keys() - tensors.keys())
        return ViewRefusal(f"its keys differ from the official layout (extra: {extra[:3]}, missing: {missing[:3]})")
    for key, target in expected.items():
        if tuple(target.shape) != tuple(tensors[key].shape):
            return ViewRefusal(f"'{key}' has shape {tuple(tensors[key].shape)}, expected {tuple(target.shape)}")
    _adopt(view, module)
    view.compute_dtype = compute_dtype
    return view.requires_grad_(False).eval()


def _adopt(view: nn.Module, source: nn.Module) -> None:
    """Make every parameter and buffer of ``view`` the very object ``source`` holds under the same key."""
    held = dict(source.named_parameters(remove_duplicate=False))
    held.update(source.named_buffers(remove_duplicate=False))
    for key in view.state_dict(keep_vars=True):
        owner_name, _, leaf = key.rpartition(".")
        owner = view.get_submodule(owner_name) if owner_name else view
        t = held[key]
        if leaf in owner._parameters:
            owner._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t


# ------------------------------------------------------------------------------------ whole native passes

class NativePasses(WholePasses):
    """Whole passes of a foreign SD3 diffusion model (ComfyUI's MMDiT), one per model call.

    :meth:`forward` calls ``native(x, timesteps, context=, y=, control=, transformer_options=)`` with the
    native model's own ``transformer_options``; skipped layers become ``patches_replace`` skip patches
    (ComfyUI's skip-layer guidance) and block residuals its ``control["output"]``. ControlNets get the
    native patch embedding. Being whole passes, the skip pass always runs separately and the step cache is
    refused (see :class:`~..sd35_core.sampling.passes.WholePasses`).
    """

    def __init__(self, native: nn.Module, config: MMDiTConfig, compute_dtype: torch.dtype,
                 transformer_options: Mapping | None = None):
        super().__init__(native)
        self._config = config
        self._compute_dtype = compute_dtype
        self.transformer_options = dict(transformer_options or {})

    @property
    def config(self) -> MMDiTConfig:
        return self._config

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        self.config.check_image_size(w * 8, h * 8)
        tokens = self.model.x_embedder(x.to(self.compute_dtype))
        return self.model.cropped_pos_embed((h, w), device=x.device).to(tokens.dtype) + tokens

    def _options(self, skip_layers: Sequence[int]) -> dict:
        options = dict(self.transformer_options)
        if skip_layers:
            patches = {k: dict(v) for k, v in options.get("patches_replace", {}).items()}
            dit = patches.setdefault("dit", {})
            for i in skip_layers:
                dit[("double_block", i)] = _skip_block
            options["patches_replace"] = patches
        return options

    def forward(self, x, timestep, context, pooled, skip_layers, residuals) -> torch.Tensor:
        dtype = self.compute_dtype
        t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        control = None
        if residuals is not None:
            control = {"output": [None if r is None else r.to(dtype) for r in residuals]}
        out = self.model(x.to(dtype), t, context=context.to(dtype), y=pooled.to(dtype), control=control,
                         transformer_options=self._options(tuple(skip_layers)))
        return out.float()
