"""Time the IP-Adapter's share of one guided sampling step: the same CFG step with and without the adapter, and
the resampler alone (the part of the adapter that runs once per step, not per block).

Run from the repository root: ``python bench/bench_ip_adapter.py`` (options: --depth --hidden --size --repeats
--threads --resampler-hidden --slg --layers). Prints one JSON object on stdout.

The bench shape is bench_slg.py's (24 joint blocks of width 256, a 512x512 image: 1024 image tokens, 154 context
tokens) in SD3.5 Large's layout (no second self-attention), with an adapter of the released structure: SigLIP
features of the real shape (729 x 1152), the resampler at its real width (1280, 20 heads, 64 queries, 4 blocks,
a 320-wide timestep sinusoid) and one IP attention per joint block at the model's width. The resampler's cost
does not shrink with the model, so at this scaled-down model it weighs more than at the real one. Weights are
random (seeded): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from sd35_core.loading.tiny import randomize_, sincos_pos_embed  # noqa: E402
from sd35_core.loading.tiny_ip_adapter import ip_adapter_config  # noqa: E402
from sd35_core.models.ip_adapter import IPAdapter  # noqa: E402
from sd35_core.models.mmditx import MMDiTConfig, MMDiTX  # noqa: E402
from sd35_core.sampling.guidance import CondEntry, Guider  # noqa: E402
from sd35_core.sampling.ip_adapter import IPAdapterHint, ip_rows  # noqa: E402
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance  # noqa: E402

SIGLIP_TOKENS, SIGLIP_WIDTH = 729, 1152  # so400m-patch14-384


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256, help="multiple of 64 (heads = hidden / 64)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 16)")
    p.add_argument("--resampler-hidden", type=int, default=1280, help="resampler width (multiple of 64)")
    p.add_argument("--context-tokens", type=int, default=154)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slg", action="store_true", help="also time a step with skip-layer guidance")
    p.add_argument("--layers", default="7,8,9", help="with --slg: the skipped joint blocks, comma separated")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def build(args) -> tuple[MMDiTX, IPAdapter]:
    config = MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, hidden_size=args.hidden, depth=args.depth,
                         num_heads=args.hidden // 64, pos_embed_max_size=args.size // 16, pooled_dim=2048,
                         context_dim=4096, qk_norm=True, x_block_self_attn_layers=())
    model = randomize_(MMDiTX(config), seed=0)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(config.hidden_size, config.pos_embed_max_size))
    cfg = ip_adapter_config(model_hidden=args.hidden, blocks=args.depth, embed_dim=SIGLIP_WIDTH,
                            hidden=args.resampler_hidden, num_queries=64, timestep_dim=320)
    adapter = randomize_(IPAdapter(cfg), seed=1)
    return model.requires_grad_(False).eval(), adapter.requires_grad_(False).eval()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, adapter = build(args)
    config = model.config
    g = torch.Generator().manual_seed(2)

    def entry() -> CondEntry:
        return CondEntry(torch.randn(1, args.context_tokens, config.context_dim, generator=g),
                         torch.randn(1, config.pooled_dim, generator=g))

    pos, neg = entry(), entry()
    features = torch.randn(1, SIGLIP_TOKENS, SIGLIP_WIDTH, generator=g)
    hint = IPAdapterHint(adapter, features, 0.5)
    latent = args.size // 8
    x = torch.randn(1, 16, latent, latent, generator=g)
    sigma = torch.full((1,), 0.9)
    base = SampleRequest(steps=50, cfg=4.0, sampler="euler", shift=3.0, seed=0)
    runs = {"cfg": Guider(model, pos, neg, base),
            "cfg_ip": Guider(model, pos, neg, replace(base, ip_adapters=[hint]))}
    if args.slg:
        layers = tuple(int(v) for v in args.layers.split(",") if v.strip())
        slg = SkipLayerGuidance(layers=layers, scale=2.5, start=0.0, end=1.0)
        runs["slg"] = Guider(model, pos, neg, replace(base, slg=slg))
        runs["slg_ip"] = Guider(model, pos, neg, replace(base, slg=slg, ip_adapters=[hint]))

    def resampler():  # what each step's embed adds: the tokens of the picture and of no picture
        return ip_rows([hint], [True, False], sigma.repeat(2) * 1000, torch.float32, torch.device("cpu"))

    calls = {**{k: (lambda guider=v: guider(x, sigma, 5)) for k, v in runs.items()}, "resampler": resampler}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    wall: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for call in calls.values():  # warm-up
            call()
        for _ in range(args.repeats):
            for name, call in calls.items():  # interleaved, so drift in machine load hits all alike
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    ip_cost = med["cfg_ip"] - med["cfg"]
    result = {
        "cpu_time_s": {k: round(v, 4) for k, v in med.items()},
        "wall_s": {k: round(statistics.median(v), 4) for k, v in wall.items()},
        "ip_share_of_cfg_step": round(ip_cost / med["cfg_ip"], 4),
        "ip_step_vs_plain": round(med["cfg_ip"] / med["cfg"], 4),
        "resampler_share_of_cfg_step": round(med["resampler"] / med["cfg_ip"], 4),
        "ip_attention_share_of_cfg_step": round((ip_cost - med["resampler"]) / med["cfg_ip"], 4),
        "config": {"depth": config.depth, "hidden": config.hidden_size, "heads": config.num_heads,
                   "image_px": args.size, "image_tokens": (latent // config.patch_size) ** 2,
                   "context_tokens": args.context_tokens, "ip_tokens": adapter.config.num_queries,
                   "resampler_hidden": adapter.config.hidden, "siglip_features": [SIGLIP_TOKENS, SIGLIP_WIDTH],
                   "adapter_params_m": round(sum(p.numel() for p in adapter.parameters()) / 1e6, 2)},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
    }
    if args.slg:
        result["ip_share_of_slg_step"] = round((med["slg_ip"] - med["slg"]) / med["slg_ip"], 4)
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
