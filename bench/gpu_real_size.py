"""Real-size SD3.5 Medium and Large on a GPU: our step eager, compiled and on a step-cache hit, against ComfyUI.

Run from the repository root on a CUDA machine (one run, about 10 minutes on one H100/H200-class GPU)::

    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_real_size.py > gpu.json

and on any machine, as a smoke test of the script itself (what CI runs)::

    python bench/gpu_real_size.py --tiny

Options: ``--variants sd3.5_medium,sd3.5_large``, ``--storages bf16,fp8``, ``--impls`` (from ``ours_eager,
ours_compiled,ours_cache_hit,comfyui``), ``--size 1024``, ``--calls 5``, ``--budget-gib 12`` (the Large row
that must fit: fp8 storage under this cap, set with ``torch.cuda.set_per_process_memory_fraction``).

Weights are random (seeded) in the released shapes (``bench/real_size.py``), drawn on the device in each
worker process from the same seed, so both implementations hold the same numbers; ComfyUI gets them as a
state dict through its own ``load_diffusion_model_state_dict`` (its native MMDiT). One CFG step is timed:
the cond/uncond batch at 1024x1024 with 154 context tokens, bf16 compute (fp8 storage computes in bf16 in
both). ``ours_cache_hit`` is the cost of a step the step cache reuses (embedding, first block, final layer):
with a fraction r of the steps reused an image costs about ``(1 - r) * eager + r * hit`` per step. The
compiled row reports its warm-up (compiling) apart. Peak VRAM is ``max_memory_allocated`` during the timed
steps (weights included), after the load's own peak was reset. ``--tiny``: the same structures at hidden
128 / depth 2, 64x64, on the CPU (or ``--device``), and no compiled row unless asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

IMPLS = ("ours_eager", "ours_compiled", "ours_cache_hit", "comfyui")
STORAGES = {"bf16": "bf16", "fp8": "fp8_e4m3fn", "fp32": "fp32"}
SIGMA = 0.9
CFG = 4.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="sd3.5_medium,sd3.5_large")
    p.add_argument("--storages", default="bf16,fp8", help=f"from {', '.join(STORAGES)}")
    p.add_argument("--impls", default=None, help=f"from {', '.join(IMPLS)} (default: all; --tiny: no compile)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; --tiny 64)")
    p.add_argument("--calls", type=int, default=5, help="timed steps per process, after one warm-up step")
    p.add_argument("--budget-gib", type=float, default=12.0, help="VRAM cap of the Large fp8 budget row")
    p.add_argument("--device", default=None, help="default: cuda (--tiny: cpu)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke test of this script")
    p.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON") or sys.executable)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.size = args.size or (64 if args.tiny else 1024)
    default_impls = [i for i in IMPLS if not (args.tiny and i == "ours_compiled")]
    args.impl_list = [i.strip() for i in args.impls.split(",")] if args.impls else default_impls
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.storage_list = [s.strip() for s in args.storages.split(",") if s.strip()]
    bad = [i for i in args.impl_list if i not in IMPLS] + [s for s in args.storage_list if s not in STORAGES]
    if bad:
        p.error(f"unknown impls or storages: {bad}")
    return args


def _config(spec: dict):
    from bench.real_size import scaled_config

    if spec["tiny"]:
        return scaled_config(spec["variant"], hidden=128, depth=2)
    return scaled_config(spec["variant"])


def _state(spec: dict, device: str):
    """The seeded weights in the official key layout, drawn on ``device`` in their storage dtype."""
    import torch

    from sd35_core.loading.checkpoint import DTypePolicy
    from sd35_core.loading.tiny import sincos_pos_embed
    from sd35_core.models import ops
    from sd35_core.models.mmditx import MMDiTX

    config = _config(spec)
    policy = DTypePolicy.named(STORAGES[spec["storage"]], device)
    with torch.device("meta"):
        model = MMDiTX(config)
    fp8 = policy.storage == torch.float8_e4m3fn
    narrow = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, ops.Linear)} if fp8 else set()
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for k, v in model.state_dict().items():
        dtype = policy.storage if (not fp8 or k in narrow) else policy.compute
        if k == "pos_embed":
            state[k] = sincos_pos_embed(config.hidden_size, config.pos_embed_max_size).to(device, dtype)
            continue
        t = torch.randn(v.shape, generator=gen, device=device, dtype=torch.float32)
        t = t / (v.shape[1] ** 0.5) if v.ndim >= 2 else t * 0.02 + (1.0 if "norm" in k else 0.0)
        state[k] = t.to(dtype)
    return config, policy, state


def _inputs(spec: dict, config, device: str):
    import torch

    g = torch.Generator().manual_seed(1)
    lat = spec["size"] // 8
    noise = torch.randn(1, config.in_channels, lat, lat, generator=g)
    cond = (torch.randn(1, 154, config.context_dim, generator=g), torch.randn(1, config.pooled_dim, generator=g))
    uncond = (torch.randn(1, 154, config.context_dim, generator=g), torch.randn(1, config.pooled_dim, generator=g))
    return noise, cond, uncond


def _ours(spec: dict, device: str):
    import torch

    from sd35_core.models.mmditx import MMDiTX
    from sd35_core.sampling.guidance import CondEntry, Guider
    from sd35_core.sampling.request import SampleRequest

    config, policy, state = _state(spec, device)
    with torch.device("meta"):
        model = MMDiTX(config)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.requires_grad_(False).eval()
    model.compute_dtype = policy.compute
    del state
    if spec["impl"] == "ours_compiled":
        from sd35_core.models.compile import compile_model

        compile_model(model)
    noise, cond, uncond = _inputs(spec, config, device)
    threshold = 1e30 if spec["impl"] == "ours_cache_hit" else 0.0
    request = SampleRequest(steps=10, cfg=CFG, sampler="euler", shift=3.0, seed=0, cache_threshold=threshold)
    guider = Guider(model, CondEntry(*cond), CondEntry(*uncond), request)
    x = (SIGMA * noise).to(device)
    sigma = torch.full((1,), SIGMA, device=device)
    if spec["impl"] == "ours_cache_hit":
        guider(x, sigma, 0)  # the full step that fills the cache; every later step (not the last) reuses it
    return lambda: guider(x, sigma, 1), model


def _comfyui(spec: dict, device: str):
    import torch

    sys.path.insert(0, spec["comfyui_path"])
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = device == "cpu"
    import comfy.model_management
    import comfy.samplers
    import comfy.sd

    config, policy, state = _state(spec, device)
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp32": torch.float32}[spec["storage"]]
    patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": dtype})
    del state
    noise, cond, uncond = _inputs(spec, config, device)
    positive = [[cond[0], {"pooled_output": cond[1]}]]
    negative = [[uncond[0], {"pooled_output": uncond[1]}]]
    calls = {}

    def capture(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones([x.shape[0]])
        calls["step"] = lambda: model(x, s, **(extra_args or {}))
        calls["result"] = _timed(calls["step"], spec, device)
        return x

    sampler = comfy.samplers.KSAMPLER(capture)
    comfy.samplers.sample(patcher, noise, positive, negative, CFG, comfy.model_management.get_torch_device(),
                          sampler, torch.tensor([SIGMA, 0.0]), latent_image=torch.zeros_like(noise), seed=0)
    return None, calls["result"]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(step, spec: dict, device: str) -> dict:
    import torch

    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    step()
    _sync(device)
    warmup = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["calls"]):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"step_s": statistics.median(times), "step_s_all": times, "warmup_s": warmup}
    if cuda:
        out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _worker(spec: dict) -> dict:
    import torch

    device = spec["device"]
    if spec.get("budget_gib") and device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["budget_gib"] * 2**30 / total))
    try:
        with torch.no_grad():
            if spec["impl"] == "comfyui":
                _, result = _comfyui(spec, device)
            else:
                step, model = _ours(spec, device)
                result = _timed(step, spec, device)
                if spec["impl"] == "ours_compiled":
                    from sd35_core.models.compile import compiled_ok

                    result["compiled_ok"] = compiled_ok(model)
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}
    result["gpu"] = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    result["torch"] = torch.__version__
    return result


def run_worker(python: str, spec: dict) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": f"worker failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    comfy = os.environ.get("COMFYUI_PATH")
    impls = [i for i in args.impl_list if i != "comfyui" or comfy]
    if "comfyui" in args.impl_list and not comfy:
        print("COMFYUI_PATH is not set: no ComfyUI rows", file=sys.stderr)
    rows = []
    plan = [(v, s, i, None) for v in args.variant_list for s in args.storage_list for i in impls]
    if "sd3.5_large" in args.variant_list and "fp8" in args.storage_list and args.device.startswith("cuda"):
        plan.append(("sd3.5_large", "fp8", "ours_eager", args.budget_gib))
    for variant, storage, impl, budget in plan:
        spec = {"variant": variant, "storage": storage, "impl": impl, "tiny": args.tiny, "size": args.size,
                "calls": args.calls, "device": args.device, "comfyui_path": comfy, "budget_gib": budget}
        python = args.python if impl == "comfyui" else sys.executable
        row = {"variant": variant, "storage": storage, "impl": impl, "budget_gib": budget,
               **run_worker(python, spec)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    for row in rows:
        theirs = next((r for r in rows if r["impl"] == "comfyui" and r["variant"] == row["variant"]
                       and r["storage"] == row["storage"] and "step_s" in r), None)
        if theirs is not None and "step_s" in row and row["impl"] != "comfyui":
            row["step_vs_comfyui"] = round(row["step_s"] / theirs["step_s"], 3)
    result = {"image": [args.size, args.size], "cfg_batch": 2, "context_tokens": 154, "device": args.device,
              "tiny": args.tiny, "machine": platform.platform(), "rows": rows}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
