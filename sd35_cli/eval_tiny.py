"""``sd35 eval-tiny``: how well the bundled tiny shapes model draws what it is asked, as JSON.

Renders held-out seeded prompts (``a {color} {shape} on the {position} of a {background} background``) at
several settings, reads colour, shape and position back from each image by simple image analysis
(:mod:`sd35_train.analysis`) and prints the accuracy per attribute for every setting. The shape is also read
by an independent reader (``shape_fill``: the shape's area over its bounding box's, :mod:`sd35_train.recon`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "score the bundled tiny shapes model: accuracy per attribute at several settings (JSON)"
DESCRIPTION = __doc__ + """
Rows: the recommended settings (sd35_core.sampling.defaults, row tiny_shapes_sd35), the same at cfg 1, with skip-layer
guidance, and euler / dpmpp_2m at --steps_list step counts. Images and noise seeds are not the training set's.
"""

MODEL_ROW = "tiny_shapes_sd35"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``eval-tiny`` options on ``parser``."""
    parser.add_argument("--model", default=None, metavar="FILE",
                        help="checkpoint to score (default: the bundled tiny shapes model)")
    parser.add_argument("--prompts", type=int, default=96, metavar="N", help="held-out prompts per row (default: 96)")
    parser.add_argument("--steps_list", default="10,20,40", metavar="N,N",
                        help="step counts for the euler / dpmpp_2m rows (default: 10,20,40)")
    parser.add_argument("--rows", default="all", choices=("all", "defaults"),
                        help="all rows, or only the recommended settings, cfg 1 and SLG (default: all)")
    parser.add_argument("--threads", type=int, default=1, metavar="N", help="torch CPU threads (default: 1)")
    parser.add_argument("--verbose", action="store_true", help="more messages, and tracebacks on errors")


def settings_rows(steps_list: list[int], rows: str = "all") -> list:
    """The evaluator's settings, built from the recommended defaults of the tiny model."""
    from dataclasses import replace

    from sd35_core.sampling.defaults import defaults_for
    from sd35_train.evaluate import EvalSetting

    d = defaults_for(MODEL_ROW)
    slg = defaults_for(MODEL_ROW, slg=True)
    base = EvalSetting("default", d.sampler, d.steps, d.cfg, d.shift)
    out = [base, replace(base, name="cfg 1", cfg=1.0)]
    if slg.slg is not None:
        out.append(EvalSetting("default + SLG", slg.sampler, slg.steps, slg.cfg, slg.shift, slg.slg))
    if rows == "all":
        for sampler in ("euler", "dpmpp_2m"):
            for steps in steps_list:
                if (sampler, steps) != (d.sampler, d.steps):
                    out.append(replace(base, name=f"{sampler} {steps} steps", sampler=sampler, steps=steps))
    return out


def run(args: argparse.Namespace) -> int:
    """``sd35 eval-tiny``."""
    import torch

    from sd35_core.loading.loader import load_checkpoint
    from sd35_core.text.encoder import SD3TextEncoder
    from sd35_core.text.tokenization import SD3Tokenizer, find_tokenizer_files
    from sd35_train.bundled import tiny_shapes_checkpoint
    from sd35_train.evaluate import EVAL_SPLIT, NOISE_SEED, evaluate

    if args.prompts < 1:
        raise ValueError(f"--prompts {args.prompts}: expected a whole number >= 1")
    try:
        steps_list = [int(s) for s in args.steps_list.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps_list {args.steps_list!r}: expected step counts separated by commas") from None
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    path = args.model or tiny_shapes_checkpoint()
    parts = load_checkpoint(path)
    if parts.text_encoders is None or parts.vae is None:
        raise ValueError(f"{path}: expected a checkpoint bundling its VAE and text encoders (the tiny shapes model)")
    te = parts.text_encoders
    tokenizer = SD3Tokenizer.from_files(*find_tokenizer_files(model_path=path))
    text = SD3TextEncoder(te.clip_l, te.clip_g, te.t5, tokenizer)
    rows = evaluate(parts.model.mmdit, parts.vae, text, settings_rows(steps_list, args.rows), n=args.prompts)
    result = {"model": path, "prompts": args.prompts, "prompt_split_seed": EVAL_SPLIT, "noise_seed": NOISE_SEED,
              "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t, 1), "rows": rows}
    print(json.dumps(result, indent=1))
    for r in rows:
        a = r["accuracy"]
        print(f"{r['name']:>20}: colour {a['color']:.0%}  shape {a['shape']:.0%}  position {a['position']:.0%}  "
              f"background {a['background']:.0%}  all {a['all']:.0%}  shape by fill ratio {a['shape_fill']:.0%}  "
              f"({r['seconds']:.0f} s)", file=sys.stderr)
    return 0
