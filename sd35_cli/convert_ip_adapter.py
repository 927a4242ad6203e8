"""``sd35 convert-ip-adapter``: write InstantX's ``ip-adapter.bin`` once as ``.safetensors``.

The release exists only as a pickle. This command reads it with torch's restricted unpickler (tensors and
plain containers; anything else is refused, naming the file), checks that it is an SD3 IP-Adapter, and writes
a flat safetensors file with ``image_proj.`` / ``ip_adapter.`` prefixes, which the loaders then read natively.
"""

from __future__ import annotations

import argparse
import json
import os

from .main import UsageError

HELP = "convert InstantX's SD3.5 IP-Adapter ip-adapter.bin to .safetensors (tensors only, read without running code)"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options: the source file and the target."""
    parser.add_argument("source", metavar="ip-adapter.bin", help="the release file (or any IP-Adapter layout)")
    parser.add_argument("target", metavar="OUT.safetensors", nargs="?",
                        help="where to write it (default: beside the source, with .safetensors)")
    parser.add_argument("--force", action="store_true", help="replace an existing target file")


def run(args: argparse.Namespace) -> int:
    """Convert, then print what was written (JSON on stdout)."""
    from sd35_core.loading.ip_adapter import convert_ip_adapter, load_ip_adapter

    source = args.source
    if not os.path.isfile(source):
        raise UsageError(f"{source}: no such file")
    target = args.target or os.path.splitext(source)[0] + ".safetensors"
    if os.path.exists(target) and not args.force:
        raise UsageError(f"{target} already exists; pass --force to replace it")
    convert_ip_adapter(source, target)
    config = load_ip_adapter(target, "fp32", "meta").config  # the written file loads: every tensor used
    print(json.dumps({"source": source, "target": target, "blocks": config.blocks, "tokens": config.num_queries,
                      "bytes": os.path.getsize(target)}))
    return 0
