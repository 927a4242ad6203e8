"""Per-step time and resident memory of GGUF-quantized diffusion models (Q8_0, Q4_0) against fp16 and fp8
storage of the same weights, each loaded by the real loader from a real file, on the bench shape.

Run from the repository root: ``python bench/bench_gguf.py`` (options: --depth --hidden --size --repeats
--threads --storages --compute --device). Prints one JSON object on stdout. Needs the ``gguf`` package
(a test-only dependency) to write the GGUF files; loading them does not.

The weights are bench_model.py's seeded model (SD3.5 Medium's structure at hidden 256, 24 blocks, 512x512
px, 154 context tokens, a CFG batch of 2), written once as fp32 safetensors and as GGUF files the way
city96's tools write them (bench/gguf_write.py). Each storage is then measured in a fresh process, as in
bench_model.py: ``resident_mb`` is the process's resident memory after the calls minus before loading
(the weights as they sit in memory, plus what the allocator keeps), ``resident_after_load_mb`` the same
right after loading (a safetensors file in its storage dtype is mapped, not read, until the first call
touches it), ``peak_increase_mb`` the peak RSS increase through loading and the calls (``VmHWM``). Every storage
computes in the same ``--compute`` dtype (float32 by default on the CPU, which has no fast bf16 here), so
the differences are the storage alone: fp16/fp8 weights are cast per layer, GGUF weights dequantized per
layer. ``materialize_s`` times making every weight dense once (the cast or dequantization a call pays on top of
the arithmetic), and ``rel_err_vs_fp32`` is the output's relative L2 distance to fp32 storage's output.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.bench_model import _cpu_model, _load, _weights_mb, build_ours, inputs, model_config  # noqa: E402

# storage name -> (file kind, loader dtype name); GGUF files load with the compute dtype's name.
STORAGES = {"fp32": ("safetensors", "fp32"), "fp16": ("safetensors", "fp16"), "fp8": ("safetensors", "fp8_e4m3fn"),
            "Q8_0": ("gguf", None), "Q4_0": ("gguf", None)}
COMPUTE = {"float32": ("fp32", torch.float32), "bfloat16": ("bf16", torch.bfloat16), "float16": ("fp16", torch.float16)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256, help="multiple of 64 (heads = hidden / 64)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed model calls per storage (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--storages", default="fp32,fp16,fp8,Q8_0,Q4_0", help=f"comma separated, from {', '.join(STORAGES)}")
    p.add_argument("--compute", default=None, help=f"one of {', '.join(COMPUTE)} (default: float32 on the CPU, "
                                                    "bfloat16 elsewhere)")
    p.add_argument("--device", default="cpu", help="torch device to load and run on (cpu, cuda, ...)")
    p.add_argument("--context-tokens", type=int, default=154)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    args = p.parse_args(argv)
    if args.hidden % 64 or args.hidden <= 0:
        raise ValueError(f"--hidden: expected a positive multiple of 64 (head width 64); got {args.hidden}")
    if args.size % 16 or args.size <= 0:
        raise ValueError(f"--size: expected a positive multiple of 16 pixels; got {args.size}")
    if args.depth < 1 or args.repeats < 1:
        raise ValueError(f"--depth and --repeats: expected at least 1; got {args.depth} and {args.repeats}")
    args.storage_list = [s.strip() for s in args.storages.split(",") if s.strip()]
    if not args.storage_list or any(s not in STORAGES for s in args.storage_list):
        raise ValueError(f"--storages: expected names from {', '.join(STORAGES)}; got {args.storages!r}")
    if args.compute is None:
        args.compute = "float32" if torch.device(args.device).type == "cpu" else "bfloat16"
    if args.compute not in COMPUTE:
        raise ValueError(f"--compute: expected one of {', '.join(COMPUTE)}; got {args.compute!r}")
    return args


def _status_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB. Not ru_maxrss: Linux carries that over
    from the parent process, which wrote the model files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux: 5 > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_mb(device: torch.device) -> tuple[float, float] | None:
    """(allocated now, peak allocated) on a CUDA device, in MB."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20


def worker(spec: dict) -> dict:
    """One storage in this (fresh) process: load its file, call once, time ``repeats`` calls, track memory."""
    from sd35_core.loading.loader import load_checkpoint
    from sd35_core.models import ops

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    compute_name, compute = COMPUTE[spec["compute"]]
    config = model_config(spec["depth"], spec["hidden"], spec["size"])
    x, t, context, y = (v.to(device) for v in inputs(config, spec["size"], spec["context_tokens"]))
    q = torch.randn(1, 1, 8, 64, device=device)  # start the runtime's one-time pieces before the baseline
    torch.nn.functional.scaled_dot_product_attention(q, q, q) @ torch.randn(64, 64, device=device)
    del q
    gc.collect()
    base_rss, base_dev = _status_mb("VmRSS"), _device_mb(device)
    _reset_peak()

    t0 = time.perf_counter()
    kind, dtype = STORAGES[spec["storage"]]
    model = load_checkpoint(spec["path"], dtype or compute_name, device).model.mmdit
    model.compute_dtype = compute
    _sync(device)
    load_s = time.perf_counter() - t0
    gc.collect()
    load_rss, load_dev = _status_mb("VmRSS"), _device_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        output = model(x, t, context, y)  # warm-up; its output is the one compared
        for _ in range(spec["repeats"]):
            _sync(device)
            t0 = time.perf_counter()
            model(x, t, context, y)
            _sync(device)
            times.append(time.perf_counter() - t0)
        # What storage alone costs per call: every linear/conv weight made dense in the compute dtype once.
        layers = [m for m in model.modules() if isinstance(m, (ops.Linear, ops.Conv2d))]
        materialize = []
        for _ in range(spec["repeats"]):
            _sync(device)
            t0 = time.perf_counter()
            for m in layers:
                ops.materialize_weight(m, compute, device)
            _sync(device)
            materialize.append(time.perf_counter() - t0)
    gc.collect()
    step_rss, peak, peak_dev = _status_mb("VmRSS"), _status_mb("VmHWM"), _device_mb(device)
    from safetensors.torch import save_file

    save_file({"output": output.float().cpu().contiguous()}, spec["output"])
    out = {
        "storage": spec["storage"],
        "step_s": statistics.median(times),
        "times_s": [round(v, 4) for v in times],
        "materialize_s": statistics.median(materialize),
        "load_s": round(load_s, 3),
        "weights_mb": round(_weights_mb(model), 2),
        # RSS over the loaded process's baseline: after loading, after the calls, and at the peak
        "resident_after_load_mb": round(load_rss - base_rss, 2) if base_rss is not None else None,
        "resident_mb": round(step_rss - base_rss, 2) if base_rss is not None else None,
        "peak_increase_mb": round(peak - base_rss, 2) if base_rss is not None else None,
        "threads": torch.get_num_threads(),
    }
    if base_dev is not None:
        out["device_resident_mb"] = round(load_dev[0] - base_dev[0], 2)
        out["device_step_peak_mb"] = round(peak_dev[1] - base_dev[0], 2)
    return out


def _run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(f"measurement {spec['storage']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def write_files(directory: str, config, storages) -> dict[str, str]:
    """The seeded bench model as fp32 safetensors (for fp32/fp16/fp8 storage) and as one GGUF per quant type."""
    from bench.gguf_write import write_gguf
    from sd35_core.loading.tiny import save_state

    state = build_ours(config, "float32").state_dict()
    paths = {"safetensors": save_state(os.path.join(directory, "model.safetensors"), {"": state})}
    for s in storages:
        if STORAGES[s][0] == "gguf":
            paths[s] = write_gguf(os.path.join(directory, f"model-{s}.gguf"), state, s)
    return {s: paths[s] if STORAGES[s][0] == "gguf" else paths["safetensors"] for s in storages}


def main(argv=None) -> dict:
    args = parse_args(argv)
    spec = dict(depth=args.depth, hidden=args.hidden, size=args.size, context_tokens=args.context_tokens,
                repeats=args.repeats, threads=args.threads, device=args.device, compute=args.compute)
    if args.worker is not None:
        return worker({**spec, **json.loads(args.worker)})
    from safetensors.torch import load_file

    config = model_config(args.depth, args.hidden, args.size)
    load_before = _load()
    runs, outputs, file_mb = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="sd35_bench_gguf_") as tmp:
        paths = write_files(tmp, config, args.storage_list)
        for storage in args.storage_list:
            file_mb[storage] = round(os.path.getsize(paths[storage]) / 2**20, 2)
            out = os.path.join(tmp, f"out-{storage}.safetensors")
            runs[storage] = _run_worker({**spec, "storage": storage, "path": paths[storage], "output": out})
            outputs[storage] = load_file(out)["output"]
    rel = {}
    if "fp32" in outputs:
        ref = outputs["fp32"]
        rel = {s: (o - ref).norm().item() / ref.norm().item() for s, o in outputs.items()}

    def column(key: str, digits: int = 4) -> dict:
        return {s: (round(r[key], digits) if r.get(key) is not None else None) for s, r in runs.items()}

    step = column("step_s")
    base = step.get("fp16")
    return {
        "step_s": step,
        "step_vs_fp16": {s: round(v / base, 3) for s, v in step.items()} if base else None,
        "materialize_s": column("materialize_s", 5),
        "resident_mb": column("resident_mb", 1),
        "resident_after_load_mb": column("resident_after_load_mb", 1),
        "weights_mb": column("weights_mb", 1),
        "peak_increase_mb": column("peak_increase_mb", 1),
        "file_mb": file_mb,
        "rel_err_vs_fp32": {s: float(f"{v:.3g}") for s, v in rel.items()},
        "runs": runs,
        "config": {
            "depth": config.depth, "hidden": config.hidden_size, "heads": config.num_heads,
            "attn2_blocks": len(config.x_block_self_attn_layers), "qk_norm": config.qk_norm,
            "image_px": args.size, "image_tokens": (args.size // 8 // config.patch_size) ** 2,
            "context_tokens": args.context_tokens, "batch": 2, "compute": args.compute, "device": args.device,
            "storages": args.storage_list,
        },
        "torch": torch.__version__,
        "threads": next(iter(runs.values()))["threads"],
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "load_avg_before": load_before,
        "load_avg_after": _load(),
        "repeats": args.repeats,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
