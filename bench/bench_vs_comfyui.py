"""One guided sampling step, ours against ComfyUI's native SD3 model, on one checkpoint file.

Run from the repository root (``sd35 bench --vs-comfyui`` runs the same)::

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_vs_comfyui.py [--slg] [--compile] [--repeats 3]

A checkpoint in the official single-file layout (``model.diffusion_model.``, fp16, random seeded weights) is
written once to a temporary folder; ComfyUI loads it with its own ``load_checkpoint_guess_config`` (its
native MMDiT), we load it with ``sd35_core.loading.loader.load_checkpoint``. Both get the same latent, sigma and
conditioning and take one CFG step: cond and uncond batched, ``uncond + (cond - uncond) * cfg``; with
``--slg`` also the skip-layer pass (ComfyUI's ``SkipLayerGuidanceDiT`` node, active over the whole
schedule; ours the Guider's SLG, sigma window, same layers and scale). ComfyUI's step is its sampler's model
call (``sampling_function``: its cond batching, CFG and post-CFG hooks), driven by a sampler that only
times that call.

Each implementation runs in its own process, ours and ComfyUI's alternating for ``--repeats`` rounds, with
the same interpreter (``--python``: default ``$COMFYUI_PYTHON``, else this one) and thread count; every
process warms up, then times ``--calls`` steps. ``step_s_*`` is the median over all timed steps,
``step_vs_comfyui`` ours / ComfyUI's (below 1: ours is faster); ``step_cpu_s_*`` and
``step_cpu_vs_comfyui`` the same for the CPU time of the worker process during the step (the work done, less
sensitive than wall time to a busy machine; with one thread it includes no spinning), ``max_abs_diff``
between the two denoised predictions (float32, CPU). Peak memory: RSS growth over the post-import baseline
on the CPU, peak allocated memory on CUDA. Default shape: SD3.5 Medium's structure at hidden 512 and depth 8 (ComfyUI
derives the block count from the width, so depth = hidden / 64), a 256x256 image (CFG batch of 2) and 154
context tokens, fp32 on the CPU; ``--device cuda`` defaults to bf16. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
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

IMPLS = ("ours", "comfyui")
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SIGMA = 0.9
CFG = 5.0
SHIFT = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="model width (multiple of 64); depth = hidden / 64")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 16)")
    p.add_argument("--batch", type=int, default=1, help="images per step (the CFG batch is twice this)")
    p.add_argument("--context-tokens", type=int, default=154)
    p.add_argument("--slg", action="store_true", help="add the skip-layer pass (layers --slg-layers)")
    p.add_argument("--slg-layers", default=None, help="comma separated; default: Medium's 7,8,9 of 24 scaled")
    p.add_argument("--slg-scale", type=float, default=2.5)
    p.add_argument("--compile", action="store_true", help="our model through torch.compile (warm-up reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, else bfloat16")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (ours, ComfyUI) processes, alternating")
    p.add_argument("--calls", type=int, default=3, help="timed steps per process (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in every worker")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON") or sys.executable)
    p.add_argument("--checkpoint", default=None, help="use this file instead of writing a random one")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hidden % 64 or args.hidden < 128:
        p.error(f"--hidden: expected a multiple of 64 of at least 128, got {args.hidden}")
    if args.size % 16 or args.size <= 0:
        p.error(f"--size: expected a positive multiple of 16 pixels, got {args.size}")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    depth = args.hidden // 64
    if args.slg_layers is None:
        # SD3.5 Medium skips 7, 8, 9 of 24 blocks: the same fractions of this depth.
        args.layer_list = sorted({min(depth - 2, round(i * depth / 24)) for i in (7, 8, 9)})
    else:
        args.layer_list = sorted({int(s) for s in args.slg_layers.split(",") if s.strip()})
    if any(not 0 <= i < depth for i in args.layer_list):
        p.error(f"--slg-layers: expected indices in 0..{depth - 1}, got {args.layer_list}")
    return args


def _maxrss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent
    across fork and exec, so a worker would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def write_checkpoint(path: str, hidden: int, seed: int = 0) -> str:
    """SD3.5 Medium's structure at ``hidden`` (depth hidden / 64), fp16, in the official single-file layout."""
    import torch
    from safetensors.torch import save_file

    from bench.real_size import random_mmdit_state, scaled_config

    config = scaled_config("sd3.5_medium", hidden=hidden, depth=hidden // 64)
    state = random_mmdit_state(config, torch.float16, seed)
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, path)
    return path


def make_inputs(spec: dict):
    """The step's inputs, identical in both workers: latent at sigma, cond and uncond conditioning."""
    import torch

    g = torch.Generator().manual_seed(1)
    lat = spec["size"] // 8
    noise = torch.randn(spec["batch"], 16, lat, lat, generator=g)
    cond = (torch.randn(1, spec["context_tokens"], 4096, generator=g), torch.randn(1, 2048, generator=g))
    uncond = (torch.randn(1, spec["context_tokens"], 4096, generator=g), torch.randn(1, 2048, generator=g))
    return noise, cond, uncond


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all threads): the work a step did, whatever else ran."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_calls(step, spec: dict) -> tuple[list[float], float, object]:
    """Warm-up call (seconds returned), then ``calls`` timed calls; the last output."""
    device = spec["device"]
    t0 = time.perf_counter()
    out = step()
    _sync(device)
    warmup = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(spec["calls"]):
        t0, c0 = time.perf_counter(), _cpu_s()
        out = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
    spec["cpu_times"] = cpu  # read back by the worker
    return times, warmup, out


def _ours(spec: dict) -> tuple[list[float], float, object, dict]:
    import torch

    from sd35_core.loading.loader import load_checkpoint
    from sd35_core.sampling.guidance import CondEntry, Guider
    from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance

    parts = load_checkpoint(spec["checkpoint"], DTYPES[spec["dtype"]], spec["device"])
    model = parts.model.mmdit
    options = {"compile": spec["compile"], "share_slg_prefix": True}
    if spec["compile"]:
        from sd35_core.models.compile import compile_model

        model = compile_model(model)
        options["compiled"] = getattr(model, "is_compiled", False)
    noise, cond, uncond = make_inputs(spec)
    slg = None
    if spec["slg"]:
        slg = SkipLayerGuidance(layers=tuple(spec["layers"]), scale=spec["slg_scale"], start=0.0, end=1.0,
                                window="sigma")
    request = SampleRequest(steps=10, cfg=CFG, sampler="euler", shift=SHIFT, seed=0, slg=slg)  # sampler, seed unused
    guider = Guider(model, CondEntry(*cond), CondEntry(*uncond), request)
    x = (SIGMA * noise).to(spec["device"])
    sigma = torch.full((x.shape[0],), SIGMA, device=spec["device"])
    times, warmup, out = _time_calls(lambda: guider(x, sigma, 1), spec)
    return times, warmup, out, options


def _comfyui(spec: dict) -> tuple[list[float], float, object, dict]:
    sys.path.insert(0, spec["comfyui_path"])
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = spec["device"] == "cpu"
    import comfy.model_management
    import comfy.samplers
    import comfy.sd

    dtype = getattr(torch, spec["dtype"])
    patcher, _, _, _ = comfy.sd.load_checkpoint_guess_config(
        spec["checkpoint"], output_vae=False, output_clip=False, model_options={"dtype": dtype}
    )
    if spec["slg"]:
        from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

        layers = ",".join(str(i) for i in spec["layers"])
        patcher = SkipLayerGuidanceDiT.execute(patcher, spec["slg_scale"], 0.0, 1.0, double_layers=layers,
                                               single_layers="").result[0]
    noise, cond, uncond = make_inputs(spec)
    positive = [[cond[0], {"pooled_output": cond[1]}]]
    negative = [[uncond[0], {"pooled_output": uncond[1]}]]
    result = {}

    def timed_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones([x.shape[0]])
        result["timing"] = _time_calls(lambda: model(x, s, **(extra_args or {})), spec)
        return x

    sampler = comfy.samplers.KSAMPLER(timed_sampler)
    device = comfy.model_management.get_torch_device()
    sigmas = torch.tensor([SIGMA, 0.0])
    latent = torch.zeros_like(noise)
    comfy.samplers.sample(patcher, noise, positive, negative, CFG, device, sampler, sigmas, latent_image=latent,
                          seed=0)
    times, warmup, out = result["timing"]
    return times, warmup, out, {}


def _worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")
    base_rss = _maxrss_mb()
    run = _ours if spec["impl"] == "ours" else _comfyui
    # The same import set before the baseline would be fairer still, but each side imports only its own.
    with torch.no_grad():
        times, warmup, out, options = run(spec)
    from safetensors.torch import save_file

    save_file({"denoised": out.detach().float().cpu().contiguous()}, spec["out"])
    peak = {"peak_rss_growth_mb": round(_maxrss_mb() - base_rss, 1)}
    if cuda:
        peak["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"impl": spec["impl"], "times": times, "cpu_times": spec.get("cpu_times", []),
            "warmup_s": warmup, "options": options, "torch": torch.__version__,
            "threads": torch.get_num_threads(), **peak}


def run_worker(python: str, spec: dict) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['impl']} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, tmp: str) -> dict:
    """Alternate worker processes and summarise (see the module doc)."""
    from safetensors.torch import load_file

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    comfy = os.environ.get("COMFYUI_PATH")
    if "comfyui" in impls and not comfy:
        print("COMFYUI_PATH is not set: timing ours only", file=sys.stderr)
        impls = [i for i in impls if i != "comfyui"]
    checkpoint = args.checkpoint or write_checkpoint(os.path.join(tmp, "bench_sd35_medium_like.safetensors"),
                                                     args.hidden)
    base = {"checkpoint": checkpoint, "comfyui_path": comfy, "size": args.size, "batch": args.batch,
            "context_tokens": args.context_tokens, "slg": args.slg, "layers": args.layer_list,
            "slg_scale": args.slg_scale, "compile": args.compile, "device": args.device, "dtype": args.dtype,
            "calls": args.calls, "threads": args.threads}
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    outputs = {}
    for rep in range(args.repeats):
        for impl in impls if rep % 2 == 0 else impls[::-1]:
            out_path = os.path.join(tmp, f"{impl}.safetensors")
            r = run_worker(args.python, {**base, "impl": impl, "out": out_path})
            runs[impl].append(r)
            outputs[impl] = load_file(out_path)["denoised"]
            print(f"{impl}: {[round(t, 4) for t in r['times']]} s", file=sys.stderr)
    result: dict = {
        "shape": {"hidden": args.hidden, "depth": args.hidden // 64, "image": [args.size, args.size],
                  "cfg_batch": 2 * args.batch, "context_tokens": args.context_tokens,
                  "structure": "SD3.5 Medium (attn2 in the first blocks, qk-norm)"},
        "device": args.device,
        "dtype": args.dtype,
        "slg": {"layers": args.layer_list, "scale": args.slg_scale} if args.slg else None,
        "options": {"compile": args.compile, "share_slg_prefix": True},
        "repeats": args.repeats,
        "calls_per_process": args.calls,
        "python": args.python,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    for impl, rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        result[f"step_s_{impl}"] = round(statistics.median(times), 5)
        result[f"step_s_{impl}_all"] = [round(t, 5) for t in times]
        result[f"warmup_s_{impl}"] = round(statistics.median(r["warmup_s"] for r in rs), 4)
        result[f"step_cpu_s_{impl}"] = round(statistics.median(t for r in rs for t in r["cpu_times"]), 5)
        result[f"peak_rss_growth_mb_{impl}"] = max(r["peak_rss_growth_mb"] for r in rs)
        if "peak_vram_mb" in rs[0]:
            result[f"peak_vram_mb_{impl}"] = max(r["peak_vram_mb"] for r in rs)
        result["torch"] = rs[0]["torch"]
        result["threads"] = rs[0]["threads"]
        if impl == "ours":
            result["options"].update(rs[0]["options"])
    if "ours" in runs and "comfyui" in runs:
        result["step_vs_comfyui"] = round(result["step_s_ours"] / result["step_s_comfyui"], 3)
        result["step_cpu_vs_comfyui"] = round(result["step_cpu_s_ours"] / result["step_cpu_s_comfyui"], 3)
        result["max_abs_diff"] = float((outputs["ours"] - outputs["comfyui"]).abs().max())
        result["output_scale"] = float(outputs["comfyui"].abs().max())
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    with tempfile.TemporaryDirectory(prefix="sd35_vs_comfyui_") as tmp:
        print(json.dumps(run(args, tmp), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
