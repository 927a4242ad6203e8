"""Key maps: every trainer's LoRA module names -> the parameter (and row slice) they patch in our modules.

Our module names are the official checkpoint keys, so one map per model covers every format:

* kohya sd-scripts / OneTrainer text encoders: ``lora_unet_`` + our key with ``_`` for ``.``
  (``lora_unet_joint_blocks_0_x_block_attn_qkv``), ``lora_te1_`` (CLIP-L), ``lora_te2_`` (CLIP-G),
  ``lora_te3_`` (T5), including OneTrainer's ``lora_te{1,2}_text_projection``;
* generic: our key itself, or ``diffusion_model.`` / ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.`` + it;
* diffusers / PEFT: ``transformer.`` (or ``base_model.model.``, or no prefix) + diffusers' module name,
  OneTrainer ``lora_transformer_`` and SimpleTuner LyCORIS ``lycoris_`` + that name with ``_`` for ``.``;
  ``text_encoder.`` (CLIP-L), ``text_encoder_2.`` (CLIP-G), ``text_encoder_3.`` (T5) + the HF key.

diffusers splits our fused ``qkv`` into ``to_q`` / ``to_k`` / ``to_v`` (``add_*_proj`` for the context
stream): each maps to a row slice. Its ``AdaLayerNormContinuous`` layers (the final layer and the last
block's pre-only context stream) order the modulation (scale, shift) where the official weights have
(shift, scale): a delta for them has its halves swapped (the same as diffusers' own converter and
ComfyUI's ``mmdit_to_diffusers`` do).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from ...models.mmditx import MMDiTConfig


@dataclass(frozen=True)
class Target:
    """Where one LoRA module lands: a weight key of our module, optionally only rows ``[start, start+len)``."""

    key: str  # e.g. "joint_blocks.0.x_block.attn.qkv.weight"
    rows: tuple[int, int] | None = None
    swap_halves: bool = False  # diffusers' (scale, shift) modulation order

    @property
    def bias_key(self) -> str:
        return self.key[: -len("weight")] + "bias"


# Family labels for messages, by name prefix (the first that matches).
FAMILIES = (
    ("lora_unet_", "kohya"),
    ("lora_te", "kohya/OneTrainer text encoder"),
    ("lora_transformer_", "OneTrainer"),
    ("lycoris_", "SimpleTuner LyCORIS"),
    ("transformer.", "diffusers/PEFT"),
    ("text_encoder", "diffusers/PEFT text encoder"),
    ("base_model.model.", "PEFT"),
)


def family(name: str) -> str:
    """A human label for the trainer format a LoRA module name comes from."""
    for prefix, label in FAMILIES:
        if name.startswith(prefix):
            return label
    return "generic"


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def diffusers_names(cfg: MMDiTConfig) -> dict[str, Target]:
    """diffusers ``SD3Transformer2DModel`` module names -> our targets (weights only)."""
    h = cfg.hidden_size
    out: dict[str, Target] = {
        "pos_embed.proj": Target("x_embedder.proj.weight"),
        "context_embedder": Target("context_embedder.weight"),
        "time_text_embed.timestep_embedder.linear_1": Target("t_embedder.mlp.0.weight"),
        "time_text_embed.timestep_embedder.linear_2": Target("t_embedder.mlp.2.weight"),
        "time_text_embed.text_embedder.linear_1": Target("y_embedder.mlp.0.weight"),
        "time_text_embed.text_embedder.linear_2": Target("y_embedder.mlp.2.weight"),
        "proj_out": Target("final_layer.linear.weight"),
        "norm_out.linear": Target("final_layer.adaLN_modulation.1.weight", swap_halves=True),
    }
    for i in range(cfg.depth):
        src, ours = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == cfg.depth - 1
        streams = [("attn.to_{}", "x_block.attn"), ("attn.add_{}_proj", "context_block.attn")]
        if i in cfg.x_block_self_attn_layers:
            streams.append(("attn2.to_{}", "x_block.attn2"))
            out[src + "attn2.to_out.0"] = Target(ours + "x_block.attn2.proj.weight")
        for pattern, module in streams:
            for j, n in enumerate("qkv"):
                out[src + pattern.format(n)] = Target(f"{ours}{module}.qkv.weight", rows=(j * h, h))
        out[src + "attn.to_out.0"] = Target(ours + "x_block.attn.proj.weight")
        out[src + "ff.net.0.proj"] = Target(ours + "x_block.mlp.fc1.weight")
        out[src + "ff.net.2"] = Target(ours + "x_block.mlp.fc2.weight")
        out[src + "norm1.linear"] = Target(ours + "x_block.adaLN_modulation.1.weight")
        out[src + "norm1_context.linear"] = Target(ours + "context_block.adaLN_modulation.1.weight", swap_halves=last)
        if not last:
            out[src + "attn.to_add_out"] = Target(ours + "context_block.attn.proj.weight")
            out[src + "ff_context.net.0.proj"] = Target(ours + "context_block.mlp.fc1.weight")
            out[src + "ff_context.net.2"] = Target(ours + "context_block.mlp.fc2.weight")
    return out


def _weight_modules(keys: Iterable[str]) -> list[str]:
    return [k[: -len(".weight")] for k in keys if k.endswith(".weight")]


def mmdit_key_map(cfg: MMDiTConfig, keys: Iterable[str]) -> dict[str, Target]:
    """Every name a LoRA file may give an MMDiT module -> its target; ``keys`` are our ``state_dict`` keys."""
    out: dict[str, Target] = {}
    for m in _weight_modules(keys):
        t = Target(m + ".weight")
        out[m] = out["diffusion_model." + m] = out["lora_unet_" + _underscored(m)] = t
    for name, t in diffusers_names(cfg).items():
        for full in (name, "transformer." + name, "base_model.model." + name):
            out[full] = t
        out["lora_transformer_" + _underscored(name)] = out["lycoris_" + _underscored(name)] = t
    return out


TEXT_ROLES = {  # role -> (kohya index, diffusers prefix)
    "clip_l": (1, "text_encoder."),
    "clip_g": (2, "text_encoder_2."),
    "t5xxl": (3, "text_encoder_3."),
}
# OneTrainer writes a CLIP-L text_projection LoRA although SD3 never uses CLIP-L's projection.
IGNORABLE = ("lora_te1_text_projection",)


def text_key_map(modules: Mapping[str, nn.Module]) -> dict[str, Target]:
    """Names for the text encoders ``{clip_l, clip_g, t5xxl: module}`` -> targets keyed ``<role>.<key>``."""
    out: dict[str, Target] = {}
    for role, module in modules.items():
        if module is None:
            continue
        index, diffusers_prefix = TEXT_ROLES[role]
        for m in _weight_modules(module.state_dict().keys()):
            t = Target(f"{role}.{m}.weight")
            names = [f"lora_te{index}_{_underscored(m)}", diffusers_prefix + m,
                     f"text_encoders.{role}.transformer.{m}", f"{role}.transformer.{m}"]
            if m.startswith("text_model."):  # transformers 5 saves CLIPTextModel without its text_model.
                names.append(diffusers_prefix + m[len("text_model."):])
            for name in names:
                out[name] = t
    return out
