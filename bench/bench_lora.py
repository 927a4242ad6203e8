"""LoRA cost on the benchmark shape: time to read and apply a rank-16 LoRA, one sampling step's model call
with and without it, the extra resident memory while it is applied, and the fp8 figure (a LoRA applied at
compute time on fp8 weights against an fp32 merge).

Run from the repository root: ``python bench/bench_lora.py`` (options: --depth --hidden --size --rank
--repeats --threads). Prints one JSON object on stdout.

The model is bench_model.py's (SD3.5 Medium's structure scaled for two CPU cores: 24 joint blocks, attn2 in
blocks 0..12, hidden 256, a 512x512 image, 154 context tokens); the LoRA is a seeded kohya-format file with
a rank-``--rank`` update on every linear layer of the diffusion model. ``apply_s`` is entering the
``applied`` context (merging every patched weight, backing it up); ``restore`` is leaving it. Times are
wall and CPU seconds (``time.process_time``, all threads): on a shared machine the CPU seconds are the
figure to read, and ``load_average`` says how shared it was.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.bench_model import _rss_mb, build_ours, inputs, model_config  # noqa: E402
from sd35_core.loading.lora import applied, load_lora  # noqa: E402
from sd35_core.loading.tiny import kohya_lora_tensors  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


class Timer:
    """Wall seconds and this process's CPU seconds (all threads): on a shared machine the CPU time is what
    the work costs, the wall time also holds the waits for other processes."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def json(self) -> dict:
        return {"wall_s": round(self.wall, 4), "cpu_s": round(self.cpu, 4)}


def _median_time(fn, repeats: int) -> tuple[dict, torch.Tensor]:
    """Median wall and CPU seconds of ``repeats`` calls after a warm-up, and the last call's result."""
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        with Timer() as t:
            out = fn()
        walls.append(t.wall)
        cpus.append(t.cpu)
    return {"wall_s": round(statistics.median(walls), 4), "cpu_s": round(statistics.median(cpus), 4)}, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = model_config(args.depth, args.hidden, args.size)
    x, t, context, y = inputs(config, args.size, 154)
    model = build_ours(config, "float32")
    gen = torch.Generator().manual_seed(7)
    tensors = kohya_lora_tensors(model, "lora_unet_", args.rank, gen)
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "bench_lora.safetensors")
    save_file(tensors, path)

    with Timer() as load_t:
        lora = load_lora(path, mmdit=model).model
    stack = [(lora, 1.0)]
    patched_bytes = sum(model.get_parameter(k).numel() * model.get_parameter(k).element_size() for k in lora.patches)

    def step(m):
        with torch.no_grad():
            return m(x, t, context, y)

    out = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": platform.machine(), "shape": {"depth": args.depth, "hidden": args.hidden, "size": args.size},
           "rank": args.rank, "lora_file_mb": round(os.path.getsize(path) / 2**20, 2),
           "patched_tensors": len(lora.patches), "read_and_resolve": load_t.json(),
           "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    base_step, fp32_base = _median_time(lambda: step(model), args.repeats)
    rss_before = _rss_mb()
    ctx = applied(model, stack)
    with Timer() as apply_t:
        ctx.__enter__()
    rss_applied = _rss_mb()
    lora_step, fp32_merge = _median_time(lambda: step(model), args.repeats)
    with Timer() as restore_t:
        ctx.__exit__(None, None, None)
    out["fp32"] = {
        "apply": apply_t.json(), "restore": restore_t.json(), "step_without": base_step, "step_with": lora_step,
        "backup_mb": round(patched_bytes / 2**20, 1),
        "extra_rss_mb_while_applied": None if rss_before is None else round(rss_applied - rss_before, 1),
    }

    fp8 = build_ours(config, "fp8")
    fp8_lora = load_lora(path, mmdit=fp8).model
    fp8_base_step, fp8_base = _median_time(lambda: step(fp8), args.repeats)
    with applied(fp8, [(fp8_lora, 1.0)]):
        fp8_step, fp8_out = _median_time(lambda: step(fp8), args.repeats)
    out["fp8_compute_time"] = {
        "step_without": fp8_base_step, "step_with": fp8_step,
        # Relative max error against the fp32 merge (fp32 weights, fp32 compute, LoRA merged).
        "rel_err_vs_fp32_merge": round(_rel(fp8_out, fp32_merge), 5),
        "rel_err_of_fp8_base_vs_fp32_merge": round(_rel(fp8_base, fp32_merge), 5),
        "lora_effect_rel": round(_rel(fp32_merge, fp32_base), 5),
    }
    os.remove(path)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
