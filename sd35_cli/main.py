"""The ``sd35`` command line: subcommands ``generate``, ``demo``, ``bench`` and ``batch``.

Each subcommand lives in a module (or package) of ``sd35_cli`` that provides ``HELP`` (one line),
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``. :data:`SUBCOMMANDS` lists them with
their one-line help, so ``sd35 --help`` imports none of them and running one imports only that one
(``batch`` needs torch only for its ``--engine ray`` options, ``generate`` for its run). Adding a subcommand
is one module and one entry there.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence

PROG = "sd35"


class UsageError(Exception):
    """A mistake in what the user asked for; reported in one line without a traceback."""


# name -> (module in this package, or None for the bench command below; one-line help)
SUBCOMMANDS: dict[str, tuple[str | None, str]] = {
    "generate": ("generate", "text-to-image / image-to-image / ControlNet, a drop-in for the reference's sd3_infer.py"),
    "demo": ("demo", "draw shapes with the bundled tiny SD3.5-architecture model: txt2img grid, ControlNet, img2img"),
    "bench": (None, "time a plain CFG step, a naive SLG step and the shared-prefix SLG step (JSON on stdout); "
                    "--vs-comfyui: one CFG step of ours against ComfyUI's native SD3 on the same file"),
    "batch": ("batch", "render a prompts file through ComfyUI servers, or on Ray, and bring every image home"),
    "eval-tiny": ("eval_tiny", "score the bundled tiny shapes model: accuracy per attribute at several settings"),
    "convert-ip-adapter": ("convert_ip_adapter", "convert InstantX's SD3.5 IP-Adapter ip-adapter.bin to "
                                                 ".safetensors (tensors only, read without running code)"),
}

BENCH_SCRIPT = os.path.join("bench", "bench_slg.py")
VS_COMFYUI_SCRIPT = os.path.join("bench", "bench_vs_comfyui.py")
VS_COMFYUI_FLAG = "--vs-comfyui"


def _bench_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        help="options passed to bench/bench_slg.py (--depth --hidden --size --repeats --device --dtype --layers "
        "--threads; `sd35 bench -- --help` lists them); with --vs-comfyui, to bench/bench_vs_comfyui.py "
        "(--slg --compile --hidden --size --repeats --calls --device --dtype; needs COMFYUI_PATH for ComfyUI's side)",
    )


def _find_bench_script(script: str = BENCH_SCRIPT) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, script)
    if not os.path.isfile(path):
        raise UsageError(
            f"sd35 bench runs {script} from the repository checkout; it was not found at {path} "
            "(install from a git checkout, e.g. `pip install -e .`)"
        )
    return path


def _bench_run(args: argparse.Namespace) -> int:
    passthrough = list(args.bench_args)
    if passthrough[:1] == ["--"]:
        passthrough = passthrough[1:]
    script = BENCH_SCRIPT
    if VS_COMFYUI_FLAG in passthrough:
        passthrough.remove(VS_COMFYUI_FLAG)
        script = VS_COMFYUI_SCRIPT
    path = _find_bench_script(script)
    spec = importlib.util.spec_from_file_location("sd35_bench_" + os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a loader
        raise UsageError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(passthrough)
    if isinstance(result, dict):  # the script's main returns its JSON object; its __main__ prints it
        print(json.dumps(result))
        return 0
    return int(result or 0)


def _command_of(argv: Sequence[str]) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return token if token in SUBCOMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``sd35`` parser; the options of ``command`` (all commands when ``None``) are registered."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Stable Diffusion 3 / 3.5 from self-contained model code (sd35_core). "
            "Start with `sd35 demo` (no weights needed), then `sd35 generate --help`."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_line) in SUBCOMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_line)
            continue
        if module_name is None:
            p = sub.add_parser(name, help=help_line, description=help_line)
            _bench_add_arguments(p)
            p.set_defaults(_run=_bench_run)
            continue
        module = importlib.import_module(f"{__package__}.{module_name}")
        p = sub.add_parser(
            name, help=help_line, description=module.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user can cause (bad files, bad settings): reported in one line, no traceback."""
    errors: list[type[BaseException]] = [
        UsageError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
        FileExistsError,
    ]
    # A damaged checkpoint or an fp16 overflow (sd35_core.models.numerics) names the step and what to try.
    from sd35_core.errors import NonFiniteError

    errors.append(NonFiniteError)
    try:
        from PIL import UnidentifiedImageError

        errors.append(UnidentifiedImageError)
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sd35`` console script; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "bench":
        # Everything after `bench` belongs to the benchmark script, options included.
        args.bench_args = extra + list(args.bench_args)
    elif extra:
        parser.parse_args(argv)  # reports the unknown arguments and exits with status 2
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if verbose:
            raise
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
