"""Time one sampling step's model call and measure peak memory: our MMDiT-X against diffusers'
SD3Transformer2DModel, on the same seeded weights (converted to diffusers' layout) and the same inputs.

Run from the repository root: ``python bench/bench_model.py`` (options: --depth --hidden --size --repeats
--threads --dtypes --context-tokens). Prints one JSON object on stdout. Needs diffusers (a test-only
dependency) for the baseline.

Every measurement runs in a fresh Python process, so peak memory is that process's own: the peak RSS
(``ru_maxrss``) after the call minus the peak after the imports, i.e. weights plus working memory. Weights
are built in place in their storage dtype (one tensor's fp32 draw at a time), so in both implementations
loading costs about the weights themselves. The model call is a CFG batch of 2 (cond and uncond), as in
one sampling step. ``--dtypes``: float32, bfloat16 and float16 run in both implementations; fp8 (e4m3fn
storage of the linear weights, bfloat16 compute, as the loader's fp8_e4m3fn policy keeps them) in ours only.

The default model is SD3.5 Medium's shape scaled to run on two CPU cores, as in bench_slg.py: 24 joint
blocks, attn2 in blocks 0..12, qk-norm, hidden width 256; a 512x512 image (1024 image tokens) and 154
context tokens as with real prompts. Weights are random (seeded): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.diffusers_convert import MissingBaseline, diffusers_class, diffusers_model, to_diffusers  # noqa: E402
from sd35_core.loading.checkpoint import DTypePolicy  # noqa: E402
from sd35_core.loading.tiny import randomize_, sincos_pos_embed  # noqa: E402
from sd35_core.models import ops  # noqa: E402
from sd35_core.models.mmditx import MMDiTConfig, MMDiTX  # noqa: E402

# bench name -> DTypePolicy name (storage dtype, compute dtype)
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp8": "fp8_e4m3fn"}
OURS_ONLY = ("fp8",)
IMPLS = ("ours", "diffusers")
# fp32 parity, as the repository's parity tests require: max abs diff <= TOL * max(1, output scale)
FP32_TOL = 1e-4
SIGMA = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256, help="multiple of 64 (heads = hidden / 64)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed model calls per measurement (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--dtypes",
        default="float32,bfloat16,fp8",
        help=f"comma separated, from {', '.join(DTYPES)} ({', '.join(OURS_ONLY)}: ours only)",
    )
    p.add_argument("--context-tokens", type=int, default=154)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    args = p.parse_args(argv)
    if args.hidden % 64 or args.hidden <= 0:
        raise ValueError(f"--hidden: expected a positive multiple of 64 (head width 64); got {args.hidden}")
    if args.size % 16 or args.size <= 0:
        raise ValueError(f"--size: expected a positive multiple of 16 pixels; got {args.size}")
    if args.depth < 1 or args.repeats < 1:
        raise ValueError(f"--depth and --repeats: expected at least 1; got {args.depth} and {args.repeats}")
    args.dtype_list = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    unknown = [d for d in args.dtype_list if d not in DTYPES]
    if unknown or not args.dtype_list:
        raise ValueError(f"--dtypes: expected names from {', '.join(DTYPES)}; got {args.dtypes!r}")
    return args


def model_config(depth: int, hidden: int, size: int) -> MMDiTConfig:
    """SD3.5 Medium's structure (attn2 in the first 13 of 24 blocks, qk-norm) at ``depth`` x ``hidden``."""
    return MMDiTConfig(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // 64,
        pos_embed_max_size=size // 16,
        pooled_dim=2048,
        context_dim=4096,
        qk_norm=True,
        x_block_self_attn_layers=tuple(range((depth * 13 + 23) // 24)),
    )


def build_ours(config: MMDiTConfig, dtype: str, seed: int = 0) -> MMDiTX:
    """Our model with seeded weights stored as ``dtype`` would load them, built without an fp32 copy.

    The values equal ``randomize_(MMDiTX(config), seed)`` cast to the storage dtype (the loader's cast):
    randomize_ draws the same fp32 numbers in the same order and ``copy_`` rounds them like ``.to``.
    """
    policy = DTypePolicy.named(DTYPES[dtype])
    model = MMDiTX(config, device="meta")
    fp8 = policy.storage == torch.float8_e4m3fn
    # As load_weights: fp8 storage is for the linear layers' matrices only; the rest stays in compute dtype.
    narrow = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, ops.Linear)} if fp8 else set()
    empty = {
        k: torch.empty(v.shape, dtype=policy.storage if (not fp8 or k in narrow) else policy.compute)
        for k, v in model.state_dict().items()
    }
    model.load_state_dict(empty, strict=True, assign=True)
    randomize_(model, seed)
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(config.hidden_size, config.pos_embed_max_size))
    return model.requires_grad_(False).eval()


def build_diffusers(config: MMDiTConfig, dtype: str, seed: int = 0) -> torch.nn.Module:
    """diffusers' model holding exactly the weights of :func:`build_ours` (views of them, no extra copy)."""
    ours = build_ours(config, dtype, seed)
    state = to_diffusers(ours.state_dict(), config)
    del ours
    model = diffusers_model(config, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def inputs(config: MMDiTConfig, size: int, context_tokens: int, seed: int = 1):
    """One sampling step's CFG batch: the same latent twice, cond and uncond text, sigma 0.9."""
    g = torch.Generator().manual_seed(seed)
    latent = size // 8
    x = torch.randn(1, config.in_channels, latent, latent, generator=g).repeat(2, 1, 1, 1)
    context = torch.randn(2, context_tokens, config.context_dim, generator=g)
    y = torch.randn(2, config.pooled_dim, generator=g)
    t = torch.full((2,), SIGMA * 1000.0)
    return x, t, context, y


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _cpu_ticks() -> tuple[int, int] | None:
    """Machine-wide (stolen, total) CPU ticks: a VM's stolen time shows a host that was busy elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[7], sum(fields[:8])
    except (OSError, ValueError, IndexError):
        return None


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _weights_mb(model: torch.nn.Module) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process: build, call once, time ``repeats`` calls, track peak RSS."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    impl, dtype = spec["impl"], spec["dtype"]
    if impl == "diffusers":
        diffusers_class()  # the import is part of the baseline, not of the measurement
    config = model_config(spec["depth"], spec["hidden"], spec["size"])
    x, t, context, y = inputs(config, spec["size"], spec["context_tokens"])
    # Start the runtime's one-time pieces (thread pool, kernels' scratch) before the baseline.
    q = torch.randn(1, 1, 8, 64)
    torch.nn.functional.scaled_dot_product_attention(q, q, q) @ torch.randn(64, 64)
    del q
    gc.collect()
    base_peak, base_rss = _maxrss_mb(), _rss_mb()

    t0 = time.perf_counter()
    if impl == "ours":
        model = build_ours(config, dtype)

        def call() -> torch.Tensor:
            return model(x, t, context, y)

    else:
        model = build_diffusers(config, dtype)
        compute = DTypePolicy.named(DTYPES[dtype]).compute

        def call() -> torch.Tensor:
            out = model(
                hidden_states=x.to(compute),
                encoder_hidden_states=context.to(compute),
                pooled_projections=y.to(compute),
                timestep=t,
                return_dict=False,
            )[0]
            return out.float()

    load_s = time.perf_counter() - t0
    gc.collect()
    load_peak, load_rss = _maxrss_mb(), _rss_mb()
    times, cpu = [], []
    ticks0 = _cpu_ticks()
    with torch.inference_mode():
        output = call()  # warm-up (allocator, kernels); its output is the one compared
        for _ in range(spec["repeats"]):
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = _maxrss_mb()
    ticks1 = _cpu_ticks()
    steal = None
    if ticks0 and ticks1 and ticks1[1] > ticks0[1]:
        steal = round((ticks1[0] - ticks0[0]) / (ticks1[1] - ticks0[1]), 4)
    from safetensors.torch import save_file

    save_file({"output": output.contiguous()}, spec["output"])
    return {
        "impl": impl,
        "dtype": dtype,
        "step_s": statistics.median(times),
        "cpu_time_s": statistics.median(cpu),
        "times_s": [round(v, 4) for v in times],
        "load_s": round(load_s, 3),
        "weights_mb": round(_weights_mb(model), 2),
        "peak_increase_mb": round(peak - base_peak, 2),
        "load_peak_increase_mb": round(load_peak - base_peak, 2),
        # working memory of the call beyond what the loaded model keeps resident
        "step_extra_mb": round(peak - base_peak - (load_rss - base_rss), 2) if base_rss is not None else None,
        "baseline_maxrss_mb": round(base_peak, 1),
        "threads": torch.get_num_threads(),
        "steal_frac": steal,  # share of all CPU time stolen by the hypervisor during the calls
        "load_avg_1min": (_load() or [None])[0],  # includes this run's own threads
    }


def _run_worker(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(
            f"measurement {spec['impl']} {spec['dtype']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    spec = dict(
        depth=args.depth,
        hidden=args.hidden,
        size=args.size,
        context_tokens=args.context_tokens,
        repeats=args.repeats,
        threads=args.threads,
    )
    if args.worker is not None:
        return worker({**spec, **json.loads(args.worker)})
    if importlib.util.find_spec("diffusers") is None:
        raise MissingBaseline(
            "the benchmark compares against diffusers' SD3Transformer2DModel, and diffusers is not installed "
            "(a test-only dependency): `pip install -e '.[test]'` or `pip install 'diffusers>=0.31'`"
        )
    config = model_config(args.depth, args.hidden, args.size)
    load_before = _load()
    runs: dict[str, dict[str, dict]] = {impl: {} for impl in IMPLS}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="sd35_bench_model_") as tmp:
        for dtype in args.dtype_list:  # per dtype, ours then diffusers: drift in machine load hits both alike
            for impl in IMPLS:
                if impl != "ours" and dtype in OURS_ONLY:
                    continue
                path = os.path.join(tmp, f"{impl}_{dtype}.safetensors")
                runs[impl][dtype] = _run_worker({**spec, "impl": impl, "dtype": dtype, "output": path})
                outputs[impl, dtype] = load_file(path)["output"]
    both = [d for d in args.dtype_list if d in runs["diffusers"]]
    diffs, rel = {}, {}
    for dtype in both:
        ours, theirs = outputs["ours", dtype], outputs["diffusers", dtype]
        diffs[dtype] = (ours - theirs).abs().max().item()
        rel[dtype] = diffs[dtype] / max(1.0, theirs.abs().max().item())
    if "float32" in rel and rel["float32"] > FP32_TOL:
        raise RuntimeError(
            f"ours and diffusers disagree in float32: max abs diff {diffs['float32']:.3g} "
            f"({rel['float32']:.3g} of the output scale, expected <= {FP32_TOL}); the comparison is not valid"
        )
    reference = "float32" if "float32" in diffs else (both[0] if both else None)

    def table(key: str, digits: int = 4) -> dict:
        return {impl: {d: round(r[key], digits) for d, r in by.items()} for impl, by in runs.items() if by}

    def ratio(key: str) -> dict:
        # A toy shape can stay below the import-time peak, so a measured increase may be 0: no ratio then.
        def one(d: str) -> float | None:
            den = runs["diffusers"][d][key]
            return round(runs["ours"][d][key] / den, 4) if den > 0 else None

        return {d: one(d) for d in both}

    fp8 = runs["ours"].get("fp8")
    return {
        "step_s": table("step_s"),
        "step_vs_diffusers": ratio("step_s"),
        "cpu_time_s": table("cpu_time_s"),
        "cpu_time_vs_diffusers": ratio("cpu_time_s"),
        "peak_mem_mb": table("peak_increase_mb", 1),
        "peak_mem_vs_diffusers": ratio("peak_increase_mb"),
        "weights_mb": table("weights_mb", 1),
        "steal_frac": {impl: {d: r["steal_frac"] for d, r in by.items()} for impl, by in runs.items() if by},
        "step_extra_mb": {impl: {d: r["step_extra_mb"] for d, r in by.items()} for impl, by in runs.items() if by},
        "fp8_vs_bf16_peak_mem": (
            round(fp8["peak_increase_mb"] / runs["ours"]["bfloat16"]["peak_increase_mb"], 4)
            if fp8 and "bfloat16" in runs["ours"]
            else None
        ),
        "max_abs_diff": diffs.get(reference) if reference else None,
        "max_abs_diff_dtype": reference,
        "max_abs_diff_by_dtype": diffs,
        "rel_diff_by_dtype": rel,
        "runs": runs,
        "config": {
            "depth": config.depth,
            "hidden": config.hidden_size,
            "heads": config.num_heads,
            "attn2_blocks": len(config.x_block_self_attn_layers),
            "qk_norm": config.qk_norm,
            "image_px": args.size,
            "image_tokens": (args.size // 8 // config.patch_size) ** 2,
            "context_tokens": args.context_tokens,
            "batch": 2,
            "pooled_dim": config.pooled_dim,
            "context_dim": config.context_dim,
            "dtypes": args.dtype_list,
            "device": "cpu",
        },
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "python": platform.python_version(),
        "threads": next(iter(runs["ours"].values()))["threads"],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "system": platform.system(),
        "load_avg_before": load_before,
        "load_avg_after": _load(),
        "repeats": args.repeats,
    }


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    try:
        print(json.dumps(main()))
    except MissingBaseline as e:
        sys.exit(f"bench_model.py: {e}")
