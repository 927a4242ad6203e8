"""``sd35 batch`` / ``python -m sd35_cli.batch``: options, the checks made before anything is queued, the run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .client import HAVE_WEBSOCKET, ComfyClient
from .errors import BatchError, WorkflowError
from .jobs import prepare_jobs
from .manifest import Manifest, is_done
from .progress import Progress
from .rows import FORMATS, expand_jobs, parse_overrides, read_prompts, used_columns, with_overrides
from .runner import ROW_TIMEOUT_S, BatchRun
from .targets import describe_targets, resolve_targets
from .validation import validate
from .workflow import is_link, load_workflow, to_api

PROG = "sd35 batch"
ENGINES = ("comfyui", "ray")
# sd35 generate's options that --engine ray takes, with generate's names and parsing; the others are the batch's
# own (--seed, --verbose) or decided by it (the prompt comes from the rows, the files' names and folder).
RAY_GENERATE_OPTIONS = (
    "model", "model_folder", "vae", "clip_l", "clip_g", "t5xxl", "tokenizers", "comfyui", "controlnet_ckpt",
    "controlnet_cond_image", "controlnet_strength", "controlnet_preprocess", "resize_mode", "init_image", "denoise",
    "dtype", "device", "text_encoder_device", "lora", "negative_prompt", "sampler", "steps", "cfg", "shift",
    "width", "height", "skip_layer_cfg", "slg_layers", "slg_scale", "slg_start", "slg_end", "slg_window", "mask",
    "grow_mask", "mask_mode", "cache_threshold", "compile", "ip_adapter", "clip_vision", "ip_image", "ip_scale",
    "cfg_zero_star", "zero_init_steps", "apg", "apg_eta", "apg_norm_threshold", "apg_momentum",
)
RAY_NOT_GENERATE_OPTIONS = ("prompt", "seed", "verbose", "out_dir", "postfix", "seed_type", "save_latent", "json")
log = logging.getLogger("sd35_cli.batch")

HELP = "render a prompts file through ComfyUI servers, or on Ray, and bring every image home"
DESCRIPTION = """\
Queue a list of prompts through ComfyUI's HTTP API, on one or several servers, and write every image
to --out with a stable name, <row>_<seed>_<node>_<index>.png, plus manifest.jsonl (one line per image:
row, settings, seed, server, files, seconds, status or error).

Prompts file (format from the extension, or --format):
  .txt    one prompt a line (blank lines and lines starting with # are skipped)
  .csv    a header row; .tsv the same with tabs
  .jsonl  one JSON object a line
Columns: prompt, negative, seed, steps, cfg, width, height, denoise, control_image, init_image, mask_image,
ip_image, ip_scale (the picture and weight of SD3.5 Apply IP-Adapter), apg_eta, apg_norm_threshold,
apg_momentum (ComfyUI's APG node on the model; --engine ray: sd35 generate's --apg_*)
(image paths are relative to the prompts file; a mask is white = repaint, or the transparent part of an
image). Empty cells keep the workflow's value. Other columns need --map. A bad cell names the file, line,
row, column and what was expected.

Run-wide values: --set FIELD=VALUE (repeatable; any column above, e.g. --set width=768 --set steps=30)
applies to every row under the row's own values, so a plain .txt prompt list need not run at the
workflow's saved size and step count. Image paths given with --set are relative to the current folder.

Where the images end up: the client downloads each image into --out. The ComfyUI server also keeps its
own copy, as any prompt's SaveImage output: the shipped API workflows save under ComfyUI's output/sd35/
(filename_prefix sd35/<workflow>). Delete those, or give a workflow whose output node is a Preview Image,
if the client's copy should be the only one.

Where columns go: found from the graph for the shipped workflows and most others (the sampler's seed,
steps, cfg, denoise; the text encoder behind its positive and negative inputs; the empty latent's size;
the Load Image behind a ControlNet, an image-to-image encode or an inpainting mask). --map
COLUMN=NodeTitle.input overrides that or adds columns (a node title, a node id, or a node type used once);
repeat it to write a column to several inputs.

Seeds: each row is drawn --seeds-per-prompt times with seeds s, s+1, ..., where s is the row's seed
column, else --seed, else the seed saved in the workflow.

A rerun with the same --out skips images already done (use --fresh to start over); Ctrl-C stops
cleanly and removes this run's prompts from the servers' queues. A server that stops answering has its
images re-queued on the others. Exit status: 0 all done, 1 some images failed (see the manifest),
130 interrupted.

--engine ray: no ComfyUI and no workflow. The models are given as to sd35 generate (--model,
--model_folder, --clip_l/--clip_g/--t5xxl, --controlnet_ckpt, --lora, --dtype, --device, and --steps, --cfg,
--sampler, --shift, --width, --height, SLG options as defaults for the rows); each Ray worker loads them once
and renders rows with sd35_core, the same image sd35 generate makes with those options and the row's seed.
Images are named <row>_<seed>_sd35_0.png. Ray starts locally for the run, or joins --address / $RAY_ADDRESS
(a cluster started with `ray start --head`). A worker that dies is replaced and its row redone once.
Needs the ray extra: pip install "comfyui-sd35[ray]".

examples:
  sd35 batch -w workflows/api/sd3.5_large_txt2img.json -p prompts.txt -o out/
  sd35 batch -w my_workflow.json -p prompts.csv -n 4 --seed 100 -s gpu1:8188 -s gpu2:8188 -o out/
  sd35 batch -w wf.json -p rows.jsonl --map style="Style Prompt.text" -o out/
  sd35 batch --engine ray -p prompts.csv -o out/ --model models/sd3.5_medium.safetensors --model_folder models
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the batch options on ``parser`` (a subcommand parser of ``sd35``, or a standalone one)."""
    parser.add_argument("--engine", choices=ENGINES, default="comfyui",
                        help="comfyui: queue a workflow on ComfyUI servers (the default); ray: run sd35_core itself "
                             "in a pool of Ray workers, with sd35 generate's model options instead of a workflow")
    parser.add_argument("--workflow", "-w", metavar="JSON",
                        help="workflow file, API format (workflows/api/*.json) or as saved by the editor "
                             "(needed by --engine comfyui)")
    parser.add_argument("--prompts", "-p", required=True, metavar="FILE",
                        help="prompts file (.txt, .csv, .tsv, .jsonl)")
    parser.add_argument("--format", choices=FORMATS, help="read the prompts file as this format whatever its name")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the images and manifest.jsonl")
    parser.add_argument("--server", "-s", action="append", metavar="HOST:PORT",
                        help="a ComfyUI server; repeat for several (default 127.0.0.1:8188)")
    parser.add_argument("--seeds-per-prompt", "-n", type=int, default=1, metavar="N",
                        help="images per row, with consecutive seeds (default 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="first seed of each row without a seed column (default: the workflow's seed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a value for every row, under the rows' own values (repeatable; the columns "
                             "of a prompts file: --set width=768 --set steps=30)")
    parser.add_argument("--map", action="append", default=[], metavar="COLUMN=NodeTitle.input",
                        help="send a column to a node input (repeatable)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="fresh", action="store_false",
                        help="skip images the manifest in --out lists as done (the default)")
    resume.add_argument("--fresh", dest="fresh", action="store_true",
                        help="ignore an existing manifest (kept as manifest.jsonl.old) and redo everything")
    parser.set_defaults(fresh=False)
    parser.add_argument("--max-queue", type=int, default=2, metavar="N",
                        help="keep each server at most N prompts deep, counting everyone's (default 2)")
    parser.add_argument("--no-websocket", action="store_true",
                        help="follow the servers by polling /history instead of their websocket")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="HTTP timeout for one request (default 30)")
    parser.add_argument("--row-timeout", type=float, default=ROW_TIMEOUT_S, metavar="SECONDS",
                        help="a prompt that has run this long without finishing (or waited in the queue this long "
                             "while nothing of ours started or finished there) counts as stuck: its server is "
                             "dropped for the rest of the run and its rows go to the other servers "
                             f"(default {ROW_TIMEOUT_S:g}; 0 waits forever)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print where each column goes and the first prompt, queue nothing")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress, only problems and the summary")
    parser.add_argument("--verbose", "-v", action="store_true", help="log details; show tracebacks")
    ray = parser.add_argument_group("--engine ray: where and how many workers")
    ray.add_argument("--address", metavar="ADDR",
                     help="the Ray cluster to join (auto, HOST:6379, ray://HOST:10001; default $RAY_ADDRESS, else a "
                          "local Ray started for the run with this machine's CPUs and GPUs)")
    ray.add_argument("--workers", type=int, metavar="N",
                     help="workers, each loading the models once (default: one per GPU, or one on CPUs only)")
    ray.add_argument("--gpus-per-worker", type=float, metavar="F",
                     help="GPUs each worker takes, e.g. 0.5 to put two on a GPU (default: 1 if there are GPUs)")
    ray.add_argument("--cpus-per-worker", type=float, metavar="F",
                     help="CPUs each worker takes (default: 1 with GPUs, else the CPUs split between the workers)")
    from ..generate.options import add_arguments as add_generate_arguments

    add_generate_arguments(parser, only=RAY_GENERATE_OPTIONS,
                           title="--engine ray: models and settings, as sd35 generate takes them (rows override "
                                 "prompt, negative, seed, steps, cfg, width, height, denoise, init_image, "
                                 "control_image, mask_image)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a batch from parsed options; returns the exit status. Problems are one line on stderr."""
    try:
        return _run(args)
    except BatchError as e:
        if getattr(args, "verbose", False):
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


def _seed_default(api, targets) -> int | None:
    for t in targets.get("seed", ()):
        value = api[t.node]["inputs"].get(t.input)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _given(args: argparse.Namespace, names) -> list[str]:
    return [n for n in names if getattr(args, n, None) is not None]


def _run(args: argparse.Namespace) -> int:
    if args.seeds_per_prompt < 1:
        raise BatchError(f"--seeds-per-prompt: expected 1 or more, got {args.seeds_per_prompt}")
    if args.max_queue < 1:
        raise BatchError(f"--max-queue: expected 1 or more, got {args.max_queue}")
    engine = getattr(args, "engine", "comfyui")
    if engine == "ray":
        if args.workflow is not None or args.server:
            raise BatchError("--engine ray runs sd35_core itself: it takes --model and the other options of "
                             "sd35 generate, not --workflow or --server")
        rows = with_overrides(read_prompts(args.prompts, args.format), parse_overrides(args.overrides))
        from .ray_engine.run import run_ray

        return run_ray(args, rows)
    ray_only = _given(args, RAY_GENERATE_OPTIONS + ("address", "workers", "gpus_per_worker", "cpus_per_worker"))
    if ray_only:
        raise BatchError(f"--{ray_only[0].replace('_', '-')} is an option of --engine ray; --engine comfyui takes "
                         "the models and settings from the workflow")
    if args.workflow is None:
        raise BatchError("--workflow is needed (the ComfyUI workflow to queue per row), or use --engine ray "
                         "with --model")
    if not args.row_timeout >= 0:
        raise BatchError(f"--row-timeout: expected 0 (wait forever) or a number of seconds, got {args.row_timeout}")
    rows = with_overrides(read_prompts(args.prompts, args.format), parse_overrides(args.overrides))
    data = load_workflow(args.workflow)

    addresses = args.server or ["127.0.0.1:8188"]
    try:
        clients = [ComfyClient(a, timeout=args.timeout) for a in addresses]
    except ValueError as e:
        raise BatchError(str(e)) from None
    labels = [c.label for c in clients]
    if len(set(labels)) != len(labels):
        raise BatchError(f"--server: {sorted({x for x in labels if labels.count(x) > 1})[0]} is given twice")
    infos = []
    for c in clients:  # every server must answer before anything is queued anywhere
        try:
            infos.append(c.object_info())
        except BatchError as e:
            raise BatchError(f"{e} (is ComfyUI running there? nothing was queued)") from None

    api = to_api(data, infos[0], os.path.basename(args.workflow))
    columns = [c for c in used_columns(rows) if c != "seed"]
    targets = resolve_targets(api, columns, args.map, infos[0])
    seed_needed = args.seed is not None or args.seeds_per_prompt > 1 or any("seed" in r.values for r in rows)
    if "seed" not in targets:
        try:
            targets.update(resolve_targets(api, ["seed"], [], infos[0]))
        except WorkflowError:
            if seed_needed:
                raise
    for column in list(targets):
        if column not in columns and column != "seed":
            del targets[column]  # a --map for a column no row uses

    settable = [t for ts in targets.values() for t in ts]
    problems = []
    for c, info in zip(clients, infos, strict=True):
        found = validate(api, info, settable)
        problems += [f"{c.label}: {p}" if len(clients) > 1 else p for p in found]
    if problems:
        raise WorkflowError(f"{os.path.basename(args.workflow)} does not validate, nothing was queued:\n  "
                            + "\n  ".join(problems))

    base_seed = args.seed if args.seed is not None else _seed_default(api, targets)
    if "seed" in targets and base_seed is None:
        base_seed = 0
    if "seed" not in targets:
        base_seed = None
    try:
        jobs = expand_jobs(rows, args.seeds_per_prompt, base_seed)
    except ValueError as e:
        raise BatchError(str(e)) from None
    prepared = prepare_jobs(api, targets, jobs, infos[0])

    if args.dry_run:
        return _dry_run(api, targets, prepared, clients)

    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise BatchError(f"--out {args.out}: cannot create the folder ({e.strerror or e})") from None
    manifest = Manifest.in_dir(args.out, fresh=args.fresh)
    latest = manifest.latest()
    todo = [p for p in prepared if not is_done(latest.get(p.key), p.fingerprint, args.out)]
    skipped = len(prepared) - len(todo)
    progress = Progress(len(prepared), skipped=skipped, quiet=args.quiet)
    if skipped and todo:
        progress.message(f"resuming: {skipped} of {len(prepared)} image(s) already done in {manifest.path}")
    use_ws = HAVE_WEBSOCKET and not args.no_websocket
    if not HAVE_WEBSOCKET and not args.no_websocket and not args.quiet:
        progress.message("websocket-client is not installed (pip install 'comfyui-sd35[batch]'): following the "
                         "servers by polling, without per-step progress")
    if not todo:
        progress.message(f"nothing to do: all {len(prepared)} image(s) are done (--fresh redoes them)")
        return 0
    manifest.append({"type": "run", "workflow": os.path.abspath(args.workflow),
                     "prompts": os.path.abspath(args.prompts), "servers": labels, "jobs": len(prepared),
                     "todo": len(todo),
                     "targets": {c: [f"{t.node}.{t.input}" for t in ts] for c, ts in targets.items()}})
    for line in describe_targets(api, targets):
        log.info("%s", line)

    runner = BatchRun(clients, todo, args.out, manifest, progress, use_websocket=use_ws, max_queue=args.max_queue,
                      row_timeout=args.row_timeout)
    result = runner.run()
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


def _dry_run(api, targets, prepared, clients) -> int:
    print(f"{len(prepared)} image(s) on {len(clients)} server(s): {', '.join(c.label for c in clients)}")
    for line in describe_targets(api, targets):
        print("  " + line)
    bad = [p for p in prepared if p.error]
    for p in bad:
        print(f"  {p.label}: {p.error}")
    first = next((p for p in prepared if p.prompt is not None), None)
    if first is not None:
        print(f"first prompt ({first.label}):")
        print(json.dumps({k: v for k, v in first.prompt.items()}, indent=1))
    links = sum(1 for n in api.values() for v in n.get("inputs", {}).values() if is_link(v))
    print(f"{len(api)} nodes, {links} links; nothing was queued")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sd35_cli.batch``: the same as ``sd35 batch``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before anything was queued", file=sys.stderr)
        return 130
