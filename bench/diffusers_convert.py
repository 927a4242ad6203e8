"""Our MMDiT-X weights (the official checkpoint keys) in the layout of diffusers' ``SD3Transformer2DModel``.

diffusers is the independent baseline the benchmarks compare against; it is a test-only dependency, so it
is imported lazily and a missing install is a :class:`MissingBaseline` naming how to get it.
"""

from __future__ import annotations

import torch

from sd35_core.models.mmditx import MMDiTConfig


class MissingBaseline(RuntimeError):
    """diffusers (the baseline implementation) is not installed."""


def diffusers_class():
    """``diffusers.SD3Transformer2DModel``, or :class:`MissingBaseline` when diffusers is not installed."""
    try:
        from diffusers import SD3Transformer2DModel
    except ImportError as e:
        raise MissingBaseline(
            f"the baseline needs diffusers, a test-only dependency ({e}); install it with "
            "`pip install -e '.[test]'` or `pip install 'diffusers>=0.31'`"
        ) from e
    return SD3Transformer2DModel


def diffusers_model(cfg: MMDiTConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """An ``SD3Transformer2DModel`` with the structure of ``cfg`` (built on ``device``; "meta" for no memory)."""
    cls = diffusers_class()
    with torch.device(device or "cpu"):
        # sample_size = grid * patch leaves diffusers' sin-cos grid unscaled, as in the reference.
        model = cls(
            sample_size=cfg.pos_embed_max_size * cfg.patch_size,
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            num_layers=cfg.depth,
            attention_head_dim=cfg.hidden_size // cfg.num_heads,
            num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.context_dim,
            caption_projection_dim=cfg.hidden_size,
            pooled_projection_dim=cfg.pooled_dim,
            out_channels=cfg.out_channels,
            pos_embed_max_size=cfg.pos_embed_max_size,
            dual_attention_layers=tuple(cfg.x_block_self_attn_layers),
            qk_norm="rms_norm" if cfg.qk_norm else None,
        )
    return model.requires_grad_(False).eval()


def _swap_shift_scale(t: torch.Tensor) -> torch.Tensor:
    # Our adaLN order is (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
    shift, scale = t.chunk(2)
    return torch.cat([scale, shift])


def to_diffusers(state: dict[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Our (= official) keys to ``SD3Transformer2DModel`` keys.

    Fused qkv matrices become views of the original storage (no copy), so converting a loaded model
    costs no memory beyond the two small re-ordered modulation layers. Every key must be consumed.
    """
    sd = dict(state)
    out: dict[str, torch.Tensor] = {"pos_embed.pos_embed": sd.pop("pos_embed")}
    for p in ("weight", "bias"):
        out[f"pos_embed.proj.{p}"] = sd.pop(f"x_embedder.proj.{p}")
        out[f"context_embedder.{p}"] = sd.pop(f"context_embedder.{p}")
        for ours, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
            out[f"time_text_embed.{theirs}.linear_1.{p}"] = sd.pop(f"{ours}.mlp.0.{p}")
            out[f"time_text_embed.{theirs}.linear_2.{p}"] = sd.pop(f"{ours}.mlp.2.{p}")
        out[f"proj_out.{p}"] = sd.pop(f"final_layer.linear.{p}")
        out[f"norm_out.linear.{p}"] = _swap_shift_scale(sd.pop(f"final_layer.adaLN_modulation.1.{p}"))
        for i in range(cfg.depth):
            src, dst = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
            last = i == cfg.depth - 1
            attn2 = i in cfg.x_block_self_attn_layers
            streams = [("x_block.attn", "attn.to_"), ("context_block.attn", "attn.add_")]
            if attn2:
                streams.append(("x_block.attn2", "attn2.to_"))
            for ours, theirs in streams:
                q, k, v = sd.pop(f"{src}{ours}.qkv.{p}").chunk(3)
                suffix = "" if theirs.endswith("to_") else "_proj"
                out.update({f"{dst}{theirs}{n}{suffix}.{p}": w for n, w in zip("qkv", (q, k, v), strict=True)})
            out[f"{dst}attn.to_out.0.{p}"] = sd.pop(f"{src}x_block.attn.proj.{p}")
            if attn2:
                out[f"{dst}attn2.to_out.0.{p}"] = sd.pop(f"{src}x_block.attn2.proj.{p}")
            out[f"{dst}norm1.linear.{p}"] = sd.pop(f"{src}x_block.adaLN_modulation.1.{p}")
            ctx_mod = sd.pop(f"{src}context_block.adaLN_modulation.1.{p}")
            # The last block's context stream is pre-only: diffusers normalises it with AdaLayerNormContinuous.
            out[f"{dst}norm1_context.linear.{p}"] = _swap_shift_scale(ctx_mod) if last else ctx_mod
            out[f"{dst}ff.net.0.proj.{p}"] = sd.pop(f"{src}x_block.mlp.fc1.{p}")
            out[f"{dst}ff.net.2.{p}"] = sd.pop(f"{src}x_block.mlp.fc2.{p}")
            if not last:
                out[f"{dst}attn.to_add_out.{p}"] = sd.pop(f"{src}context_block.attn.proj.{p}")
                out[f"{dst}ff_context.net.0.proj.{p}"] = sd.pop(f"{src}context_block.mlp.fc1.{p}")
                out[f"{dst}ff_context.net.2.{p}"] = sd.pop(f"{src}context_block.mlp.fc2.{p}")
    if cfg.qk_norm:
        for i in range(cfg.depth):
            src, dst = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
            for n in ("q", "k"):
                out[f"{dst}attn.norm_{n}.weight"] = sd.pop(f"{src}x_block.attn.ln_{n}.weight")
                out[f"{dst}attn.norm_added_{n}.weight"] = sd.pop(f"{src}context_block.attn.ln_{n}.weight")
                if i in cfg.x_block_self_attn_layers:
                    out[f"{dst}attn2.norm_{n}.weight"] = sd.pop(f"{src}x_block.attn2.ln_{n}.weight")
    if sd:
        raise KeyError(f"keys with no diffusers counterpart: {sorted(sd)}")
    return out
