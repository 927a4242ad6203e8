"""The bundled tiny shapes model's VAE gives the shapes back: the recipe's reconstruction check, on the shipped
file as the loader reads it."""

import json
import os

from sd35_core.loading.loader import load_checkpoint
from sd35_train.bundled import tiny_shapes_checkpoint, tiny_shapes_dir
from sd35_train.config import RecipeConfig
from sd35_train.recon import RECON_SPLIT, reconstruction_check


def test_the_bundled_vae_keeps_the_shape_class_of_held_out_pictures():
    with open(os.path.join(tiny_shapes_dir(), "training_log.json"), encoding="utf-8") as f:
        logged = json.load(f)["vae_reconstruction"]
    vae = load_checkpoint(tiny_shapes_checkpoint(), "fp32", "cpu").vae
    result = reconstruction_check(vae, n=logged["images"], split=RECON_SPLIT)
    assert result["class_kept"] >= RecipeConfig().recon_min_class_kept, result
    # What the recipe measured when it wrote the file (float rounding may move an edge pixel, not a class).
    assert abs(result["class_kept"] - logged["class_kept"]) <= 1 / logged["images"] + 1e-9
    assert abs(result["mean_iou"] - logged["mean_iou"]) < 2e-3
