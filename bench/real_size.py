"""The released SD3.5 configurations and real-size checkpoint files with random (seeded) weights.

Benchmarks of loading and of full-size steps need files with the released shapes, not the weights: the
released files are gated downloads and speed does not depend on the values. The configs below are what
:meth:`sd35_core.models.mmditx.MMDiTConfig.from_shapes` reads from the official ``sd3.5_medium.safetensors`` and
``sd3.5_large.safetensors`` (hidden 1536 / 24 blocks / attn2 in 0..12, and hidden 2432 / 38 blocks).

``python bench/real_size.py OUT.safetensors [--variant sd3.5_medium] [--dtype float16]`` writes one file:
the diffusion model under ``model.diffusion_model.`` and the SD3 VAE under ``first_stage_model.``, as the
official single files hold them. Each tensor is drawn on its own in float32 and cast at once, so writing
never holds more than the file's own bytes plus one fp32 tensor.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sd35_core.loading.tiny import _is_norm_weight, sincos_pos_embed  # noqa: E402
from sd35_core.models.mmditx import MMDiTConfig, MMDiTX  # noqa: E402
from sd35_core.models.vae import VAE, VAEConfig  # noqa: E402

RELEASED = {
    "sd3.5_medium": MMDiTConfig(
        patch_size=2, in_channels=16, out_channels=16, hidden_size=1536, depth=24, num_heads=24,
        pos_embed_max_size=384, pooled_dim=2048, context_dim=4096, qk_norm=True,
        x_block_self_attn_layers=tuple(range(13)),
    ),
    "sd3.5_large": MMDiTConfig(
        patch_size=2, in_channels=16, out_channels=16, hidden_size=2432, depth=38, num_heads=38,
        pos_embed_max_size=192, pooled_dim=2048, context_dim=4096, qk_norm=True, x_block_self_attn_layers=(),
    ),
}
SD3_VAE = VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def scaled_config(variant: str, hidden: int | None = None, depth: int | None = None) -> MMDiTConfig:
    """The released ``variant`` config, optionally narrowed/shallowed (for CPU smoke runs of GPU scripts)."""
    base = RELEASED[variant]
    if hidden is None and depth is None:
        return base
    hidden = hidden or base.hidden_size
    depth = depth or base.depth
    n_attn2 = round(len(base.x_block_self_attn_layers) * depth / base.depth)
    return MMDiTConfig(
        patch_size=base.patch_size, in_channels=base.in_channels, out_channels=base.out_channels,
        hidden_size=hidden, depth=depth, num_heads=hidden // 64, pos_embed_max_size=base.pos_embed_max_size,
        pooled_dim=base.pooled_dim, context_dim=base.context_dim, qk_norm=base.qk_norm,
        x_block_self_attn_layers=tuple(range(n_attn2)),
    )


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """One seeded tensor scaled as :func:`sd35_core.loading.tiny.randomize_` scales it, drawn in fp32, cast once."""
    if len(shape) >= 2:
        t = torch.randn(shape, generator=gen).div_(math.sqrt(math.prod(shape[1:])))
    elif _is_norm_weight(name):
        t = torch.randn(shape, generator=gen).mul_(0.02).add_(1.0)
    else:
        t = torch.randn(shape, generator=gen).mul_(0.02)
    return t.to(dtype)


def random_mmdit_state(config: MMDiTConfig, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of an MMDiT-X with ``config`` in ``dtype``, random but with the real sin-cos grid."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MMDiTX(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in shapes.items():
        if k == "pos_embed":
            state[k] = sincos_pos_embed(config.hidden_size, config.pos_embed_max_size).to(dtype)
        else:
            state[k] = random_tensor(k, shape, dtype, gen)
    return state


def random_vae_state(dtype: torch.dtype, seed: int = 1, config: VAEConfig = SD3_VAE) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VAE(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, s, dtype, gen) for k, s in shapes.items()}


def write_random_checkpoint(path: str, variant: str = "sd3.5_medium", dtype: torch.dtype = torch.float16,
                            seed: int = 0, vae: bool = True) -> str:
    """Write a single-file checkpoint of ``variant`` at its released size with random weights."""
    out = {"model.diffusion_model." + k: v for k, v in random_mmdit_state(RELEASED[variant], dtype, seed).items()}
    if vae:
        out.update({"first_stage_model." + k: v for k, v in random_vae_state(dtype, seed + 1).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(out, path, metadata={"note": f"random weights in the {variant} layout (benchmark file)"})
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--variant", default="sd3.5_medium", choices=sorted(RELEASED))
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    write_random_checkpoint(args.out, args.variant, DTYPES[args.dtype], args.seed)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
