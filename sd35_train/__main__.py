"""``python -m sd35_train``: run the tiny shapes recipe (see :mod:`sd35_train.recipe`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .config import MICRO, RecipeConfig
from .plot import draw_loss_curves
from .recipe import run_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd35_train", description=__doc__)
    parser.add_argument("--out", default="assets/tiny_shapes", help="folder for the shipped files")
    parser.add_argument("--work", default=".sd35_train_work", help="folder for resumable training state")
    parser.add_argument("--plot", default="docs/tiny_shapes_loss.png", help="where to draw the loss curves (PNG)")
    parser.add_argument("--micro", action="store_true", help="the tiny test config (seconds, not minutes)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a RecipeConfig field, e.g. --set flow_steps=300")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = MICRO if args.micro else RecipeConfig()
    types = {f.name: f.type for f in dataclasses.fields(RecipeConfig)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types:
            parser.error(f"--set {item}: unknown field {name!r}; fields: {', '.join(types)}")
        cast = float if types[name] in (float, "float") else int
        cfg = dataclasses.replace(cfg, **{name: cast(value)})
    result = run_recipe(args.out, args.work, cfg)
    draw_loss_curves(result["losses"], args.plot)
    print(result["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
