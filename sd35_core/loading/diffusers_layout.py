"""diffusers' key layouts (SD3Transformer2DModel, AutoencoderKL) seen as the official layout, by key at load time.

The official HF repos and many fine-tunes ship ``transformer/diffusion_pytorch_model.safetensors`` and
``vae/diffusion_pytorch_model.safetensors`` in diffusers' names. Each official key is made from its diffusers
pieces (the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` and
``convert_ldm_vae_checkpoint``, which the tests run against this map), read straight into the loaded tensor:

* the fused ``attn.qkv`` from ``to_q``/``to_k``/``to_v`` (``add_*_proj`` for the context stream, ``attn2`` on
  SD3.5 Medium), ``attn.proj`` from ``to_out.0`` / ``to_add_out``, ``ln_q``/``ln_k`` from ``norm_q``/``norm_k``
  (``norm_added_*``), ``adaLN_modulation.1`` from ``norm1.linear`` / ``norm1_context.linear``;
* the modulations diffusers stores as (scale, shift) where the official layout has (shift, scale): ``norm_out``
  and the last block's ``norm1_context`` (its two-chunk AdaLayerNormContinuous); the halves are read swapped;
* the VAE's blocks (``down_blocks.i.resnets.j`` -> ``down.i.block.j``, ``up_blocks`` in reverse order), its
  mid-block attention from linear ``[C, C]`` to 1x1 convolution ``[C, C, 1, 1]`` weights.

Detection is by keys only. Keys the map does not know stay under their own names, so the unused-tensor check
names them.
"""

from __future__ import annotations

import re

from .checkpoint import find_prefix
from .mapped_file import MappedFile, Piece

TRANSFORMER_MARKER = "transformer_blocks.0.attn.to_q.weight"
VAE_MARKER = "decoder.up_blocks.0.resnets.0.conv1.weight"
PARAMS = ("weight", "bias")

_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}
_BLOCK = {
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def is_diffusers_transformer(keys) -> bool:
    """Whether ``keys`` hold an SD3 transformer in diffusers' names (and not an SD3 ControlNet, which shares
    its block names)."""
    keys = set(keys)
    prefix = find_prefix(keys, TRANSFORMER_MARKER)
    if prefix is None:
        return False
    return prefix + "proj_out.weight" in keys and prefix + "controlnet_blocks.0.weight" not in keys


def is_diffusers_vae(keys) -> bool:
    """Whether ``keys`` hold a VAE in diffusers' names (``decoder.up_blocks.*`` rather than ``decoder.up.*``)."""
    return find_prefix(keys, VAE_MARKER) is not None


def _swapped(key: str, rows: int) -> list[Piece]:
    half = rows // 2
    return [Piece(key, (half, rows)), Piece(key, (0, half))]


def transformer_sources(shapes: dict[str, tuple[int, ...]], prefix: str = ""):
    """``(sources, shapes)`` of the official MMDiT keys (under ``prefix``) from a diffusers transformer's shapes."""
    sources: dict[str, list[Piece]] = {}
    out_shapes: dict[str, tuple[int, ...]] = {}
    hidden = shapes[prefix + "pos_embed.proj.weight"][0] if prefix + "pos_embed.proj.weight" in shapes else None

    def same(official: str, diffusers: str, swap: bool = False) -> None:
        key = prefix + diffusers
        if key in shapes:
            sources[prefix + official] = _swapped(key, shapes[key][0]) if swap else [Piece(key)]
            out_shapes[prefix + official] = shapes[key]

    def fused(official: str, parts: tuple[str, ...]) -> None:
        for p in PARAMS:
            keys = [f"{prefix}{part}.{p}" for part in parts]
            if all(k in shapes for k in keys):
                sources[f"{prefix}{official}.{p}"] = [Piece(k) for k in keys]
                rows = sum(shapes[k][0] for k in keys)
                out_shapes[f"{prefix}{official}.{p}"] = (rows, *shapes[keys[0]][1:])

    same("pos_embed", "pos_embed.pos_embed")
    for official, diffusers in _TOP.items():
        for p in PARAMS:
            same(f"{official}.{p}", f"{diffusers}.{p}")
    for p in PARAMS:
        same(f"final_layer.adaLN_modulation.1.{p}", f"norm_out.linear.{p}", swap=True)
    blocks = sorted({int(k[len(prefix):].split(".")[1]) for k in shapes
                     if k.startswith(prefix + "transformer_blocks.")})
    for i in blocks:
        o, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        for official, diffusers in _BLOCK.items():
            for p in PARAMS:
                same(f"{o}{official}.{p}", f"{d}{diffusers}.{p}")
        for official, parts in _FUSED.items():
            fused(o + official, tuple(d + part for part in parts))
        # A block whose context stream ends (the last one) modulates it with two chunks, stored swapped.
        ctx = f"{prefix}{d}norm1_context.linear.weight"
        swap = ctx in shapes and hidden is not None and shapes[ctx][0] == 2 * hidden
        for p in PARAMS:
            same(f"{o}context_block.adaLN_modulation.1.{p}", f"{d}norm1_context.linear.{p}", swap=swap)
    return _with_leftovers(sources, out_shapes, shapes)


_VAE_RULES = [
    (re.compile(r"(encoder|decoder)\.conv_norm_out\.(.+)"), r"\1.norm_out.\2"),
    (re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"), r"encoder.down.\1.block.\2.\3"),
    (re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"), r"encoder.down.\1.downsample.conv.\2"),
    (re.compile(r"(encoder|decoder)\.mid_block\.resnets\.0\.(.+)"), r"\1.mid.block_1.\2"),
    (re.compile(r"(encoder|decoder)\.mid_block\.resnets\.1\.(.+)"), r"\1.mid.block_2.\2"),
    (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.(.+)"), r"\1.mid.attn_1.norm.\2"),
    (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_q|query)\.(.+)"), r"\1.mid.attn_1.q.\2"),
    (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_k|key)\.(.+)"), r"\1.mid.attn_1.k.\2"),
    (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_v|value)\.(.+)"), r"\1.mid.attn_1.v.\2"),
    (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.(.+)"),
     r"\1.mid.attn_1.proj_out.\2"),
]
_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0\.conv)\.(.+)")


def _vae_key(key: str, up_blocks: int) -> str | None:
    m = _UP.fullmatch(key)
    if m:
        level = up_blocks - 1 - int(m.group(1))
        inner = f"block.{m.group(3)}" if m.group(3) is not None else "upsample.conv"
        return f"decoder.up.{level}.{inner}.{m.group(4)}"
    for pattern, repl in _VAE_RULES:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    if key in {f"{part}.{layer}.{p}" for part in ("encoder", "decoder") for layer in ("conv_in", "conv_out")
               for p in PARAMS}:
        return key
    return None


def vae_sources(shapes: dict[str, tuple[int, ...]], prefix: str = ""):
    """``(sources, shapes)`` of the official VAE keys (under ``prefix``) from a diffusers VAE's shapes."""
    sources: dict[str, list[Piece]] = {}
    out_shapes: dict[str, tuple[int, ...]] = {}
    up_blocks = len({k[len(prefix):].split(".")[2] for k in shapes if k.startswith(prefix + "decoder.up_blocks.")})
    for key, shape in shapes.items():
        if not key.startswith(prefix):
            continue
        official = _vae_key(key[len(prefix):], up_blocks)
        if official is None:
            continue
        if ".mid.attn_1." in official and official.endswith(".weight") and len(shape) == 2 and "norm" not in official:
            shape = (*shape, 1, 1)  # linear attention weights as the official 1x1 convolutions
        sources[prefix + official] = [Piece(key)]
        out_shapes[prefix + official] = shape
    return _with_leftovers(sources, out_shapes, shapes)


def _with_leftovers(sources, out_shapes, shapes):
    """Keys no rule took stay under their own names (unless an official key of that name exists)."""
    taken = {p.key for pieces in sources.values() for p in pieces}
    for key, shape in shapes.items():
        if key not in taken and key not in sources:
            sources[key] = [Piece(key)]
            out_shapes[key] = shape
    return sources, out_shapes


def official_view(file):
    """``file`` itself when it is in the official layout, else a :class:`MappedFile` that shows it so."""
    keys = file.keys()
    shapes = {k: file.shape(k) for k in keys}
    if is_diffusers_transformer(keys):
        prefix = find_prefix(keys, TRANSFORMER_MARKER)
        return MappedFile(file, *transformer_sources(shapes, prefix), layout="diffusers SD3 transformer")
    if is_diffusers_vae(keys):
        prefix = find_prefix(keys, VAE_MARKER)
        return MappedFile(file, *vae_sources(shapes, prefix), layout="diffusers VAE")
    return file
