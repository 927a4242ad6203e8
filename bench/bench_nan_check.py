"""What a load-time NaN check would cost next to the load itself, on a real-size checkpoint.

``python bench/bench_nan_check.py CHECKPOINT.safetensors [--dtype fp16] [--sample 4096]`` loads the file with
``sd35_core.loading.loader.load_checkpoint`` (fp16/bf16 storage keeps the tensors zero-copy views of the mapped
file), then
times :func:`sd35_core.models.numerics.has_non_finite` over the first ``--sample`` values of every floating-point tensor
of the diffusion model and VAE, and over all of them. Prints one JSON object; write a real-size file with
``bench/real_size.py``. The sampling loop's per-step check is what catches NaN weights; a load-time check would be
added only if it cost under 1 % of the load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from sd35_core.loading.loader import load_checkpoint  # noqa: E402
from sd35_core.models.numerics import has_non_finite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--dtype", default="fp16", help="weight dtype to load in (default fp16: zero-copy)")
    parser.add_argument("--sample", type=int, default=4096, help="values checked per tensor (default 4096)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="also time the check over every value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    parts = load_checkpoint(args.checkpoint, args.dtype)
    load_s = time.perf_counter() - t0
    modules = [m for m in (parts.model.mmdit, parts.vae) if m is not None]
    tensors = [t for m in modules for t in m.state_dict().values() if t.is_floating_point()]

    t0 = time.perf_counter()
    found = sum(has_non_finite(t.reshape(-1)[: args.sample]) for t in tensors)
    sampled_s = time.perf_counter() - t0
    result = {
        "checkpoint": os.path.basename(args.checkpoint), "dtype": args.dtype, "threads": args.threads,
        "tensors": len(tensors), "values": sum(t.numel() for t in tensors),
        "sampled_values": sum(min(t.numel(), args.sample) for t in tensors),
        "load_s": round(load_s, 3), "sampled_check_s": round(sampled_s, 4),
        "sampled_check_of_load": round(sampled_s / load_s, 4), "non_finite_tensors_sampled": found,
    }
    if args.full:
        t0 = time.perf_counter()
        result["non_finite_tensors"] = sum(has_non_finite(t) for t in tensors)
        result["full_check_s"] = round(time.perf_counter() - t0, 3)
        result["full_check_of_load"] = round(result["full_check_s"] / load_s, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
