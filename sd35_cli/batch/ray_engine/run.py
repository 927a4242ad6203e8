"""``sd35 batch --engine ray`` from parsed options: checks, the jobs, Ray, the pool, the summary."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace

from ...generate.options import GenerateOptions, options_from_args, validate_options
from ...main import UsageError
from ..errors import BatchError
from ..manifest import Manifest, is_done
from ..progress import Progress
from ..rows import Row, expand_jobs
from .jobs import RowJob, check_columns, prepare_row_jobs
from .session import connect, import_ray, plan_workers

PROG = "sd35 batch --engine ray"


def check_models(opts: GenerateOptions) -> None:
    """What can be checked from the files' headers before Ray starts (``BatchError`` naming the problem)."""
    from ...generate.models import inspect_model
    from ...generate.settings import defaults_entry, resolve_settings

    try:
        config, variant = inspect_model(opts.model)
        config.check_image_size(opts.width, opts.height)
        resolve_settings(opts, defaults_entry(opts.model, variant)[0], "", config.depth)
        for option in ("vae", "controlnet_ckpt", "clip_l", "clip_g"):
            path = getattr(opts, option)
            if path is not None and not os.path.isfile(path):
                raise UsageError(f"--{option} {path}: no such file")
        for spec in opts.lora:
            if not os.path.isfile(spec.path):
                raise UsageError(f"--lora {spec.path}: no such file")
    except (UsageError, ValueError, OSError) as e:
        raise BatchError(str(e)) from None


def prepare(args: argparse.Namespace, rows: Sequence[Row]) -> tuple[GenerateOptions, list[RowJob]]:
    """The run's base options (``sd35 generate``'s, from the command line) and a job per image."""
    if args.map:
        raise BatchError("--map sends columns to workflow nodes; --engine ray has no workflow (its columns: "
                         "prompt, negative, seed, steps, cfg, width, height, denoise, init_image, control_image, "
                         "mask_image)")
    if args.model is None:
        raise BatchError("--engine ray needs --model (the checkpoint every worker loads)")
    base = options_from_args(args)
    try:
        # The run's own options must hold together; the control image may come from the rows.
        validate_options(replace(base, controlnet_cond_image=base.controlnet_cond_image or base.controlnet_ckpt))
    except UsageError as e:
        raise BatchError(str(e)) from None
    check_columns(rows, base)
    check_models(base)
    try:
        jobs = expand_jobs(rows, args.seeds_per_prompt, args.seed if args.seed is not None else base.seed)
    except ValueError as e:
        raise BatchError(str(e)) from None
    return base, prepare_row_jobs(base, jobs)


def run_ray(args: argparse.Namespace, rows: Sequence[Row]) -> int:
    """Run the rows on Ray; returns the exit status (0 all done, 1 some failed, 130 interrupted)."""
    base, prepared = prepare(args, rows)
    if args.dry_run:
        return _dry_run(prepared)
    import_ray()  # before touching --out: without Ray nothing happens but the hint
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise BatchError(f"--out {args.out}: cannot create the folder ({e.strerror or e})") from None
    manifest = Manifest.in_dir(args.out, fresh=args.fresh)
    latest = manifest.latest()
    todo = [p for p in prepared if not is_done(latest.get(p.key), p.fingerprint, args.out)]
    skipped = len(prepared) - len(todo)
    progress = Progress(len(prepared), skipped=skipped, quiet=args.quiet)
    if not todo:
        progress.message(f"nothing to do: all {len(prepared)} image(s) are done (--fresh redoes them)")
        return 0
    if skipped:
        progress.message(f"resuming: {skipped} of {len(prepared)} image(s) already done in {manifest.path}")

    from .pool import PoolConfig, RayPool

    started = connect(args.address)
    ray = import_ray()
    try:
        resources = ray.cluster_resources()
        workers, cpus, gpus = plan_workers(resources, args.workers, args.cpus_per_worker, args.gpus_per_worker,
                                           base.device)
        for name, each in (("CPU", cpus), ("GPU", gpus)):
            have = resources.get(name, 0.0)
            if each * min(workers, len(todo)) > have:
                progress.message(f"note: {min(workers, len(todo))} worker(s) x {each:g} {name} is more than the "
                                 f"{have:g} {name} Ray has now; the workers beyond wait until it has room")
        config = PoolConfig(base, min(workers, len(todo)), cpus, gpus)
        manifest.append({"type": "run", "engine": "ray", "model": os.path.abspath(base.model),
                         "prompts": os.path.abspath(args.prompts), "workers": config.workers,
                         "cpus_per_worker": cpus, "gpus_per_worker": gpus, "jobs": len(prepared),
                         "todo": len(todo)})
        progress.message(f"{len(todo)} image(s) on {config.workers} Ray worker(s) ({cpus:g} CPU"
                         + (f", {gpus:g} GPU" if gpus else "") + " each)")
        result = RayPool(config, todo, args.out, manifest, progress).run()
    finally:
        if started:
            ray.shutdown()
    done = skipped + result.done
    if result.interrupted:
        print(f"{PROG}: interrupted with {done} of {len(prepared)} image(s) done; rerun the same command to "
              f"resume (manifest: {manifest.path})", file=sys.stderr)
        return 130
    summary = f"{PROG}: {result.done} image(s) made" + (f", {skipped} already done" if skipped else "")
    if result.failed:
        summary += f", {result.failed} failed (first: {result.first_error}); rerun to retry them"
    print(summary + f"; manifest: {manifest.path}", file=sys.stderr)
    return 1 if result.failed else 0


def _dry_run(prepared: Sequence[RowJob]) -> int:
    print(f"{len(prepared)} image(s) for Ray workers")
    for p in prepared:
        if p.error:
            print(f"  {p.label}: {p.error}")
    first = next((p for p in prepared if p.options is not None), None)
    if first is not None:
        print(f"first image ({first.label}, {first.file_name}):")
        opts = {k: v for k, v in asdict(first.options).items() if v not in (None, (), "")}
        print(json.dumps(opts, indent=1, default=str))
    print("nothing was started")
    return 1 if any(p.error for p in prepared) else 0
