"""Time loading one checkpoint file and measure peak memory: our loader against ComfyUI's own.

Run from the repository root::

    python bench/real_size.py /some/dir/sd3.5_medium_random.safetensors   # once: 4.8 GiB, random weights
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_load.py /some/dir/sd3.5_medium_random.safetensors

Options: ``--dtypes fp16,fp32`` (the dtype the model is loaded into, by both), ``--repeats N``,
``--python`` (the interpreter of the worker processes; default ``$COMFYUI_PYTHON``, else this one, so both
loaders run on the same torch). Prints one JSON object on stdout.

Every load runs in a fresh process, ours and ComfyUI's alternating, so each peak RSS (VmHWM) is the process's
own and both see the same page cache. ``load_s`` is the wall time of the load call alone (imports excluded)
and ``load_cpu_s`` the CPU time the process spent in it (user + system, all threads: the work done, less
sensitive than wall time to a busy machine); ``touch_s`` is the time to then read one element of every 4 KiB
page of every weight, which pages in weights that are memory-mapped rather than copied, and ``ready_s`` their
sum, the honest figure to compare (a zero-copy load defers reading the file to the first use). Ours is
``sd35_core.loading.loader.load_checkpoint`` (diffusion model and VAE), ComfyUI's is
``comfy.sd.load_checkpoint_guess_config`` with its VAE and without text encoders (the file has none), on
the CPU. Memory-mapped file pages count in RSS while they are touched, for both.
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("ours", "comfyui")
DTYPES = ("fp32", "fp16", "bf16")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


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


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads: the work done, whatever else the machine runs."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _n_params(module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def _touch(*modules) -> float:
    """Read one element per 4 KiB page of every weight, so memory-mapped weights are paged in; seconds."""
    import torch

    t0 = time.perf_counter()
    total = 0.0
    with torch.no_grad():
        for m in modules:
            for t in m.state_dict().values():
                flat = t.reshape(-1)
                total += float(flat[:: max(1, 4096 // t.element_size())].float().sum())
    return time.perf_counter() - t0


def _worker(spec: dict) -> dict:
    """One load in this process; returns timings and memory."""
    import torch

    torch.set_num_threads(spec["threads"]) if spec.get("threads") else None
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec["dtype"]]
    if spec["impl"] == "ours":
        sys.path.insert(0, ROOT)
        from sd35_core.loading.loader import load_checkpoint

        import_rss = _rss_mb()
        t0, c0 = time.perf_counter(), _cpu_s()
        parts = load_checkpoint(spec["path"], spec["dtype"], "cpu")
        load_s, load_cpu = time.perf_counter() - t0, _cpu_s() - c0
        model, vae = parts.model.mmdit, parts.vae
        got_dtype = str(model.context_embedder.weight.dtype)
        n = _n_params(model) + (_n_params(vae) if vae is not None else 0)
        touch_s = _touch(model, vae)
    else:
        sys.path.insert(0, spec["comfyui_path"])
        from comfy.cli_args import args

        args.cpu = True  # as `main.py --cpu`: no accelerator is looked for
        import comfy.model_management  # noqa: F401
        import comfy.sd

        import_rss = _rss_mb()
        t0, c0 = time.perf_counter(), _cpu_s()
        patcher, _, vae, _ = comfy.sd.load_checkpoint_guess_config(
            spec["path"], output_vae=True, output_clip=False, model_options={"dtype": dtype}
        )
        load_s, load_cpu = time.perf_counter() - t0, _cpu_s() - c0
        dm = patcher.model.diffusion_model
        got_dtype = str(next(dm.parameters()).dtype)
        n = _n_params(dm) + _n_params(vae.first_stage_model)
        touch_s = _touch(dm, vae.first_stage_model)
    return {
        "impl": spec["impl"],
        "dtype": spec["dtype"],
        "load_s": round(load_s, 3),
        "load_cpu_s": round(load_cpu, 3),
        "touch_s": round(touch_s, 3),
        "ready_s": round(load_s + touch_s, 3),
        "peak_rss_mb": round(_maxrss_mb(), 1),
        "rss_after_load_mb": round(_rss_mb(), 1),
        "rss_after_import_mb": round(import_rss, 1),
        "weights_dtype": got_dtype,
        "tensor_elements": n,
        "torch": torch.__version__,
    }


def run_worker(python: str, spec: dict) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['impl']} load worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    out = {k: runs[0][k] for k in ("weights_dtype", "tensor_elements", "torch")}
    for key in ("load_s", "load_cpu_s", "touch_s", "ready_s"):
        out[key] = round(statistics.median(r[key] for r in runs), 3)
    out["load_s_all"] = [r["load_s"] for r in runs]
    out["ready_s_all"] = [r["ready_s"] for r in runs]
    out["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in runs), 1)
    out["rss_after_load_mb"] = round(statistics.median(r["rss_after_load_mb"] for r in runs), 1)
    out["rss_after_import_mb"] = round(statistics.median(r["rss_after_import_mb"] for r in runs), 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", help="a .safetensors checkpoint (e.g. written by bench/real_size.py)")
    p.add_argument("--dtypes", default="fp16", help=f"comma separated, from {', '.join(DTYPES)}")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON") or sys.executable)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if not args.path:
        p.error("path: expected a .safetensors checkpoint")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if any(d not in DTYPES for d in dtypes) or any(i not in IMPLS for i in impls):
        p.error(f"--dtypes from {DTYPES}, --impls from {IMPLS}")
    comfy = os.environ.get("COMFYUI_PATH")
    if "comfyui" in impls and not comfy:
        print("COMFYUI_PATH is not set: timing our loader only", file=sys.stderr)
        impls = [i for i in impls if i != "comfyui"]
    if not os.path.isfile(args.path):
        p.error(f"{args.path}: no such file (write one with bench/real_size.py)")
    result: dict = {
        "file": os.path.basename(args.path),
        "file_gib": round(os.path.getsize(args.path) / 2**30, 3),
        "repeats": args.repeats,
        "python": args.python,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": {},
    }
    for dtype in dtypes:
        runs: dict[str, list[dict]] = {i: [] for i in impls}
        for rep in range(args.repeats):
            # Alternate the order each repeat so neither side always gets the warmer cache.
            order = impls if rep % 2 == 0 else impls[::-1]
            for impl in order:
                spec = {"impl": impl, "dtype": dtype, "path": os.path.abspath(args.path), "comfyui_path": comfy,
                        "threads": args.threads}
                runs[impl].append(run_worker(args.python, spec))
                r = runs[impl][-1]
                print(f"{dtype} {impl}: load {r['load_s']} s, ready {r['ready_s']} s, peak {r['peak_rss_mb']} MB",
                      file=sys.stderr)
        entry = {impl: summarize(r) for impl, r in runs.items()}
        if "ours" in entry and "comfyui" in entry:
            entry["load_vs_comfyui"] = round(entry["ours"]["load_s"] / entry["comfyui"]["load_s"], 3)
            entry["ready_vs_comfyui"] = round(entry["ours"]["ready_s"] / entry["comfyui"]["ready_s"], 3)
            entry["load_cpu_vs_comfyui"] = round(entry["ours"]["load_cpu_s"] / entry["comfyui"]["load_cpu_s"], 3)
            entry["peak_rss_vs_comfyui"] = round(entry["ours"]["peak_rss_mb"] / entry["comfyui"]["peak_rss_mb"], 3)
        result["results"][dtype] = entry
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
