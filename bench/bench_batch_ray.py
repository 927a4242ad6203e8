"""Throughput of ``sd35 batch --engine ray`` against ``sd35 generate`` on the same machine and the same rows.

Run from the repository root (needs the ray extra)::

    python bench/bench_batch_ray.py --rows 8 --size 64 --steps 4 --workers 1,2

Every variant is a fresh command-line process, timed from start to exit (what a user waits for), on the tiny
seeded model set of ``sd35_core.loading.tiny`` (no downloads; real code paths, toy widths):

- ``generate_loop``: ``sd35 generate`` once per row, as a shell loop would (each call loads the models);
- ``generate_file``: one ``sd35 generate`` over a prompts .txt (models loaded once; one process, in order);
- ``ray_wN``: ``sd35 batch --engine ray --workers N`` with a local Ray started by the command (the CPUs split
  between the workers), with its manifest's per-row render seconds.

Prints one JSON object on stdout: per variant the wall seconds, images per minute, and for Ray the median
render seconds per row inside a worker (the part that scales with model size; the rest is start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZERS = os.path.join(os.path.dirname(ROOT), "shared", "tokenizers")


def _run(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--size", type=int, default=128, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to time, comma-separated")
    parser.add_argument("--tokenizers", default=TOKENIZERS, help="folder with clip/ and t5/ tokenizer files")
    parser.add_argument("--variants", default="generate_loop,generate_file,ray")
    args = parser.parse_args(argv)

    from sd35_core.loading.tiny import write_tiny_model_set

    tmp = tempfile.mkdtemp(prefix="bench_batch_ray_")
    models = write_tiny_model_set(os.path.join(tmp, "models"))
    prompts = [f"a photo of thing number {i}, studio light" for i in range(args.rows)]
    txt = os.path.join(tmp, "prompts.txt")
    with open(txt, "w") as f:
        f.write("\n".join(prompts) + "\n")
    model_args = ["--model", models.checkpoints["sd3.5_medium"],
                  "--model_folder", os.path.dirname(models.text_encoders["clip_l"]), "--tokenizers", args.tokenizers,
                  "--width", str(args.size), "--height", str(args.size), "--steps", str(args.steps),
                  "--device", "cpu"]
    py = [sys.executable, "-m", "sd35_cli"]
    variants = args.variants.split(",")
    results: dict[str, dict] = {}

    def record(name: str, seconds: float, **extra) -> None:
        results[name] = {"seconds": round(seconds, 2), "images_per_min": round(60 * args.rows / seconds, 2), **extra}
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)

    if "generate_loop" in variants:
        total = 0.0
        for i, p in enumerate(prompts):
            total += _run([*py, "generate", *model_args, "--prompt", p, "--seed", str(i), "--seed_type", "fixed",
                           "--out_dir", os.path.join(tmp, "loop"), "--postfix", f"_{i}"])
        record("generate_loop", total)
    if "generate_file" in variants:
        record("generate_file", _run([*py, "generate", *model_args, "--prompt", txt, "--seed", "0",
                                      "--seed_type", "roll", "--out_dir", os.path.join(tmp, "file"),
                                      "--postfix", "_all"]))
    if "ray" in variants:
        for n in [int(w) for w in args.workers.split(",")]:
            out = os.path.join(tmp, f"ray_w{n}")
            seconds = _run([*py, "batch", "--engine", "ray", "-p", txt, "-o", out, "--workers", str(n),
                            "--seed", "0", "-q", *model_args])
            with open(os.path.join(out, "manifest.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            render = [r["seconds"] for r in rows if r.get("type") == "job" and r.get("status") == "done"]
            assert len(render) == args.rows, f"ray_w{n}: {len(render)} of {args.rows} rows done"
            record(f"ray_w{n}", seconds, median_render_s=round(statistics.median(render), 3))
    shutil.rmtree(tmp, ignore_errors=True)
    return {"bench": "batch_ray", "rows": args.rows, "size": args.size, "steps": args.steps,
            "model": "tiny sd3.5_medium (sd35_core.loading.tiny)", "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "results": results}


if __name__ == "__main__":
    print(json.dumps(main()))
