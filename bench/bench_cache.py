"""The step cache's trade: model evaluations saved and time, against image quality versus the uncached run.

Run from the repository root: ``python bench/bench_cache.py`` (options: --thresholds --steps --seeds --size
--sampler --slg --checkpoint --conditioning). Prints one JSON object on stdout.

For each seed the run is sampled once without the cache and once per threshold, from the same noise and
conditioning; the latents are decoded with the checkpoint's VAE and each cached image is compared with the
uncached one: PSNR (8-bit scale) and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2
0.03, on the three channels, averaged), plus the latent's relative L2 error. ``evaluation_ratio`` is steps /
full steps (the cache target: >= 1.5x at 40 steps with SSIM >= 0.95).

Without ``--checkpoint`` the tiny SD3.5-Medium-shaped model of the test suite is used (random weights,
seeded conditioning): its first block changes far more from step to step than a trained model's, so its
useful thresholds are larger (0.3-0.8 against 0.05-0.2), and its "images" are noise, so SSIM measures
closeness to the uncached noise, a stricter test than on smooth images. A trained checkpoint with a VAE can
be passed instead. When it bundles its text encoders and its tokenizers are found (the tiny shapes model),
seed ``i`` is conditioned on a real prompt, held-out prompt ``i`` of ``sd35 eval-tiny``, against the empty
negative prompt, and the image size defaults to the model's 64 px; otherwise the conditioning is seeded
random vectors (``--conditioning random`` asks for the vectors in every case).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sd35_core.loading.loader import load_checkpoint  # noqa: E402
from sd35_core.sampling.guidance import CondEntry  # noqa: E402
from sd35_core.sampling.passes import PassStats  # noqa: E402
from sd35_core.sampling.pipeline import RunHooks, txt2img  # noqa: E402
from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--thresholds", default="0.3,0.5,0.6,0.8", help="comma separated, each > 0")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: 64 for a checkpoint with its text encoders, else 256)")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--slg", action="store_true", help="skip-layer guidance on its reference window (scaled layers)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint with a VAE (default: the tiny random model)")
    p.add_argument("--conditioning", choices=("auto", "random"), default="auto",
                   help="auto: held-out prompts through the checkpoint's own text encoders when it bundles them, "
                        "else seeded random vectors; random: always the vectors")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.threshold_list = [float(t) for t in args.thresholds.split(",") if t.strip()]
    if not args.threshold_list or any(t <= 0 for t in args.threshold_list):
        p.error(f"--thresholds: expected numbers > 0, got {args.thresholds!r}")
    return args


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two images ``[3, H, W]`` in 0..1 (Gaussian window 11, sigma 1.5, per channel)."""
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11).contiguous()
    x, y = a[None].double(), b[None].double()

    def blur(t):
        return F.conv2d(t, window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in 0..1, on the 8-bit scale the saved PNGs have."""
    a8, b8 = (a.clamp(0, 1) * 255).round(), (b.clamp(0, 1) * 255).round()
    mse = float(((a8 - b8) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def _conditioning(config, seed: int) -> tuple[CondEntry, CondEntry]:
    g = torch.Generator().manual_seed(1000 + seed)

    def one() -> CondEntry:
        context = torch.randn(1, 154, config.context_dim, generator=g)
        return CondEntry(context, torch.randn(1, config.pooled_dim, generator=g))

    return one(), one()


def _prompt_conditioning(parts, path: str):
    """``seed -> (positive, negative)`` from the checkpoint's own text encoders and held-out prompts, or
    ``None`` when it has no text encoders or no tokenizers are found for it."""
    if parts.text_encoders is None:
        return None
    from sd35_core.text.encoder import SD3TextEncoder
    from sd35_core.text.tokenization import SD3Tokenizer, find_tokenizer_files
    from sd35_train.data import spec_for
    from sd35_train.evaluate import EVAL_SPLIT

    try:
        tokenizer = SD3Tokenizer.from_files(*find_tokenizer_files(model_path=path))
    except (FileNotFoundError, ValueError):
        return None
    te = parts.text_encoders
    text = SD3TextEncoder(te.clip_l, te.clip_g, te.t5, tokenizer)
    negative = CondEntry(*text.encode(""))

    def conditioning(seed: int) -> tuple[CondEntry, CondEntry, str]:
        prompt = spec_for(EVAL_SPLIT, seed).caption()
        return CondEntry(*text.encode(prompt)), negative, prompt

    return conditioning


def _load(args, tmp: str):
    path = args.checkpoint
    if path is None:
        from sd35_core.loading.tiny import write_checkpoint

        path = write_checkpoint(os.path.join(tmp, "tiny-sd3.5_medium.safetensors"), "sd3.5_medium", seed=0)
    parts = load_checkpoint(path, "fp32", "cpu")
    if parts.vae is None:
        raise SystemExit(f"{path}: expected a checkpoint with a VAE (first_stage_model.*)")
    return parts, path


def _decode(vae, latent: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ((vae.decode(latent) + 1) / 2).clamp(0, 1)[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sd35_bench_cache_") as tmp:
        parts, path = _load(args, tmp)
        model, vae, config = parts.model.mmdit, parts.vae, parts.model.config
        prompted = _prompt_conditioning(parts, path) if args.conditioning == "auto" else None
        if args.size is None:
            args.size = 64 if prompted else 256
        prompts = []
        slg = None
        if args.slg:
            layers = tuple(sorted({min(config.depth - 1, round(i * config.depth / 24)) for i in (7, 8, 9)}))
            slg = SkipLayerGuidance(layers=layers)
        rows: dict[float, list[dict]] = {t: [] for t in [0.0, *args.threshold_list]}
        for seed in range(args.seeds):
            if prompted:
                pos, neg, prompt = prompted(seed)
                prompts.append(prompt)
            else:
                pos, neg = _conditioning(config, seed)
            reference = None
            for threshold in rows:
                request = SampleRequest(steps=args.steps, cfg=args.cfg, sampler=args.sampler, shift=args.shift,
                                        seed=seed, slg=slg, cache_threshold=threshold)
                stats = PassStats()
                t0 = time.perf_counter()
                latent = txt2img(model, pos, neg, request, width=args.size, height=args.size,
                                 hooks=RunHooks(stats=stats))
                seconds = time.perf_counter() - t0
                image = _decode(vae, latent)
                row = {"seconds": seconds, "steps_reused": stats.cache_hits}
                if reference is None:
                    reference = (latent, image)
                else:
                    row["psnr_db"] = psnr(image, reference[1])
                    row["ssim"] = ssim(image, reference[1])
                    row["latent_rel_l2"] = float((latent - reference[0]).norm() / reference[0].norm())
                rows[threshold].append(row)
                print(f"seed {seed} threshold {threshold}: {row}", file=sys.stderr)
    base_seconds = statistics.median(r["seconds"] for r in rows[0.0])
    table = []
    for threshold, rs in rows.items():
        if threshold == 0.0:
            continue
        reused = statistics.mean(r["steps_reused"] for r in rs)
        entry = {
            "threshold": threshold,
            "steps_reused_mean": round(reused, 2),
            "evaluation_ratio": round(args.steps / (args.steps - reused), 3),
            "speedup_wall": round(base_seconds / statistics.median(r["seconds"] for r in rs), 3),
            "ssim_mean": round(statistics.mean(r["ssim"] for r in rs), 4),
            "ssim_min": round(min(r["ssim"] for r in rs), 4),
            "psnr_db_mean": round(statistics.mean(r["psnr_db"] for r in rs), 2),
            "latent_rel_l2_mean": round(statistics.mean(r["latent_rel_l2"] for r in rs), 4),
        }
        entry["meets_target"] = entry["evaluation_ratio"] >= 1.5 and entry["ssim_min"] >= 0.95
        table.append(entry)
    result = {
        "model": "tiny random SD3.5-Medium-shaped (test suite)" if args.checkpoint is None else os.path.basename(path),
        "shape": {"hidden": config.hidden_size, "depth": config.depth, "image": [args.size, args.size]},
        "steps": args.steps, "sampler": args.sampler, "cfg": args.cfg, "shift": args.shift,
        "slg": None if slg is None else list(slg.layers), "seeds": args.seeds,
        "conditioning": "held-out prompts of sd35 eval-tiny, empty negative" if prompted else "seeded random vectors",
        "prompts": prompts,
        "uncached_seconds": round(base_seconds, 3),
        "thresholds": table,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
