"""Time one guided sampling step three ways on the same weights: plain CFG, naive skip-layer guidance
(the reference: the [cond; uncond] batch plus a separate skip pass) and our shared-prefix SLG.

Run from the repository root: ``python bench/bench_slg.py`` (options: --depth --hidden --size --repeats
--device --dtype --layers --threads). Prints one JSON object on stdout.

The default model is SD3.5 Medium's shape scaled to run on two CPU cores: 24 joint blocks, attn2 in blocks
0..12, qk-norm, but hidden width 256 instead of 1536; a 512x512 image (64x64 latent, 1024 image tokens) and
154 context tokens as with real prompts. Weights are random (seeded): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from sd35_core.loading.tiny import randomize_, sincos_pos_embed  # noqa: E402
from sd35_core.models.mmditx import MMDiTConfig, MMDiTX  # noqa: E402
from sd35_core.sampling.guidance import CondEntry, Guider  # noqa: E402
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256, help="multiple of 64 (heads = hidden / 64)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--layers", default="7,8,9", help="skipped joint blocks, comma separated")
    p.add_argument("--context-tokens", type=int, default=154)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def build(args) -> tuple[MMDiTX, MMDiTConfig]:
    config = MMDiTConfig(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=args.hidden // 64,
        pos_embed_max_size=args.size // 16,
        pooled_dim=2048,
        context_dim=4096,
        qk_norm=True,
        # SD3.5 Medium: the second image self-attention in the first 13 of 24 blocks
        x_block_self_attn_layers=tuple(range((args.depth * 13 + 23) // 24)),
    )
    model = randomize_(MMDiTX(config), seed=0)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(config.hidden_size, config.pos_embed_max_size))
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).requires_grad_(False).eval()
    return model, config


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = tuple(int(s) for s in args.layers.split(",") if s.strip())
    model, config = build(args)
    g = torch.Generator().manual_seed(1)

    def entry() -> CondEntry:
        return CondEntry(
            torch.randn(1, args.context_tokens, config.context_dim, generator=g),
            torch.randn(1, config.pooled_dim, generator=g),
        )

    pos, neg = entry(), entry()
    latent = args.size // 8
    x = torch.randn(1, 16, latent, latent, generator=g).to(args.device)
    sigma = torch.full((1,), 0.9, device=args.device)
    steps, step_index = 50, 5  # inside the SD3.5 Medium SLG window (0.5 < i < 10)
    slg = SkipLayerGuidance(layers=layers, scale=2.5, start=0.01, end=0.2)
    cfg = SampleRequest(steps=steps, cfg=4.0, sampler="euler", shift=3.0, seed=0)  # sampler, seed unused
    guiders = {
        "cfg": Guider(model, pos, neg, cfg),
        "naive_slg": Guider(model, pos, neg, replace(cfg, slg=slg, share_slg_prefix=False)),
        "slg": Guider(model, pos, neg, replace(cfg, slg=slg)),
    }
    times: dict[str, list[float]] = {k: [] for k in guiders}
    cpu: dict[str, list[float]] = {k: [] for k in guiders}  # process CPU time: robust to other load
    outputs = {}
    with torch.inference_mode():
        for name, guider in guiders.items():  # warm-up (allocator, kernels)
            outputs[name] = guider(x, sigma, step_index)
        for _ in range(args.repeats):
            # interleaved, so drift in machine load hits all three alike
            for name, guider in guiders.items():
                _sync(args.device)
                t0, c0 = time.perf_counter(), time.process_time()
                guider(x, sigma, step_index)
                _sync(args.device)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    diff = (outputs["slg"] - outputs["naive_slg"]).abs().max().item()
    scale = outputs["naive_slg"].abs().max().item()
    k = min(layers)
    result = {
        "cfg_step_s": round(med["cfg"], 4),
        "naive_slg_step_s": round(med["naive_slg"], 4),
        "slg_step_s": round(med["slg"], 4),
        "slg_step_vs_naive": round(med["slg"] / med["naive_slg"], 4),
        "slg_overhead_vs_cfg": round(med["slg"] / med["cfg"], 4),
        "cpu_time_s": {k: round(v, 4) for k, v in med_cpu.items()},
        "slg_step_vs_naive_cpu_time": round(med_cpu["slg"] / med_cpu["naive_slg"], 4),
        "naive_overhead_vs_cfg": round(med["naive_slg"] / med["cfg"], 4),
        "shared_vs_naive_max_abs_diff": diff,
        "shared_vs_naive_rel_diff": diff / max(1.0, scale),
        "shared_prefix_blocks": k,
        "config": {
            "depth": config.depth,
            "hidden": config.hidden_size,
            "heads": config.num_heads,
            "attn2_blocks": len(config.x_block_self_attn_layers),
            "qk_norm": config.qk_norm,
            "image_px": args.size,
            "latent": [latent, latent],
            "image_tokens": (latent // config.patch_size) ** 2,
            "context_tokens": args.context_tokens,
            "skip_layers": list(layers),
            "device": args.device,
            "dtype": args.dtype,
        },
        "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.device.startswith("cuda"):
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
