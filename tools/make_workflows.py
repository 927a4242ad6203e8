"""Write the shipped workflows: ``workflows/*.json`` (ComfyUI UI format) and ``workflows/api/*.json`` (API format).

Every setting comes from one of two sources: the recommended-settings table (``sd35_core/sampling/defaults.py``) and the
node classes' own ``INPUT_TYPES`` (input order, widget defaults). Run it after changing either:

    python tools/make_workflows.py            # rewrite the JSON files
    python tools/make_workflows.py --check    # exit 1 if the committed files differ from what it would write

The output is deterministic, so ``tests/workflows`` can compare the committed files with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# The builders live in the sibling package tools/workflow_gen. Running this file puts tools/ on sys.path already;
# loading it by file path (as tests/workflows does) does not, so make the package importable either way.
TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from workflow_gen.controlnet import controlnet, native_lora_controlnet  # noqa: E402
from workflow_gen.graph import Workflow  # noqa: E402
from workflow_gen.image_to_image import img2img, masked_repaint  # noqa: E402
from workflow_gen.ip_adapter import ip_adapter  # noqa: E402
from workflow_gen.pack import ROOT  # noqa: E402
from workflow_gen.regional import regional  # noqa: E402
from workflow_gen.text_to_image import lora, tiny_shapes, txt2img  # noqa: E402

WORKFLOWS = os.path.join(ROOT, "workflows")


def build_workflows() -> dict[str, Workflow]:
    """Every shipped workflow by file name (without ``.json``)."""
    flows = [
        txt2img("sd3.5_medium_txt2img_slg", "sd3.5_medium", "SD3.5 Medium text to image with skip-layer guidance",
                slg=True),
        txt2img("sd3.5_large_txt2img", "sd3.5_large", "SD3.5 Large text to image"),
        txt2img("sd3.5_large_turbo_txt2img", "sd3.5_large_turbo", "SD3.5 Large Turbo text to image (4 steps)"),
        txt2img("sd3_medium_txt2img", "sd3_medium", "SD3 Medium text to image"),
        img2img("sd3.5_large_img2img", "sd3.5_large", "SD3.5 Large image to image"),
        lora("sd3.5_large_lora", "sd3.5_large", "SD3.5 Large text to image with a LoRA"),
        masked_repaint("sd3.5_large_inpaint", "sd3.5_large", "SD3.5 Large inpainting (repaint a masked part)",
                       outpaint=False),
        masked_repaint("sd3.5_large_outpaint", "sd3.5_large", "SD3.5 Large outpainting (extend the canvas)",
                       outpaint=True),
        tiny_shapes("tiny_shapes_txt2img", "Tiny shapes text to image (the bundled toy model, no downloads)"),
        controlnet("sd3.5_large_controlnet_canny", "canny", "SD3.5 Large with the canny ControlNet"),
        controlnet("sd3.5_large_controlnet_blur", "blur", "SD3.5 Large with the blur ControlNet"),
        controlnet("sd3.5_large_controlnet_depth", "depth", "SD3.5 Large with the depth ControlNet"),
        native_lora_controlnet("sd3.5_large_native_lora_controlnet",
                               "ComfyUI's SD3.5 Large + LoRA in the SD3.5 sampler with SLG and the canny ControlNet"),
        ip_adapter("sd3.5_large_ip_adapter", "SD3.5 Large prompted with a picture (InstantX IP-Adapter)"),
        regional("sd3.5_medium_regional_slg", "SD3.5 Medium regional prompting: a base prompt and two areas, with "
                 "skip-layer guidance"),
    ]
    return {wf.name: wf for wf in flows}


def rendered() -> dict[str, str]:
    """Relative path -> file text for every workflow file."""
    files = {}
    for name, wf in build_workflows().items():
        files[f"{name}.json"] = json.dumps(wf.ui(), indent=2) + "\n"
        files[os.path.join("api", f"{name}.json")] = json.dumps(wf.api(), indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    """Write the workflow files (or, with ``--check``, only compare them); the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed files")
    parser.add_argument("--out", default=WORKFLOWS, help="folder to write (default: the pack's workflows/)")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in rendered().items():
        path = os.path.join(args.out, rel)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current == text:
            continue
        stale.append(rel)
        if not args.check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if args.check and stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
