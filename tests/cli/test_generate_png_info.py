"""PNGs from `sd35 generate` carry their settings (an `sd35` JSON chunk and an A1111-style `parameters`
chunk); `--json` reports the device and dtype the run actually used."""

import json
import os

import numpy as np
from PIL import Image

from tests.cli.test_generate import run_json


def test_png_text_chunks_record_every_setting_and_json_reports_device_and_dtype(capsys, gen_args, tmp_path,
                                                                                tiny_models):
    edges = np.zeros((48, 64, 3), dtype=np.uint8)
    edges[10:12, :] = 255
    picture = tmp_path / "edges.png"
    Image.fromarray(edges).save(picture)
    cn, lora = tiny_models.controlnets["canny"], tiny_models.lora
    prompt = "a café, at dusk"  # non-Latin-1-safe punctuation and an accent travel in UTF-8
    summary, _ = run_json(capsys, gen_args(
        "--prompt", prompt, "--negative_prompt", "blurry", "--seed", "9", "--cfg", "3.5", "--sampler", "euler",
        "--shift", "2.5", "--slg_layers", "1,2", "--slg_scale", "2", "--controlnet_ckpt", cn,
        "--controlnet_cond_image", str(picture), "--controlnet_strength", "0.7", "--lora", f"{lora}:0.5:0.25",
        "--dtype", "fp32", "--postfix", "_info", model="sd3.5_large"))
    assert (summary["device"], summary["dtype"], summary["weights_dtype"]) == ("cpu", "float32", "float32")

    with Image.open(summary["files"][0]) as im:
        chunks = dict(im.text)
    assert "prompt" not in chunks and "workflow" not in chunks  # ComfyUI's own keys (its graph JSON)
    s = json.loads(chunks["sd35"])
    assert s == {
        "prompt": prompt, "negative_prompt": "blurry", "seed": 9, "steps": 2, "cfg": 3.5, "sampler": "euler",
        "schedule": "reference", "shift": 2.5,
        "slg": {"layers": [1, 2], "scale": 2.0, "start": summary["settings"]["slg"]["start"],
                "end": summary["settings"]["slg"]["end"], "window": summary["settings"]["slg"]["window"]},
        "width": 64, "height": 48, "model": os.path.basename(tiny_models.checkpoints["sd3.5_large"]),
        "controlnet": {"model": os.path.basename(cn), "strength": 0.7, "image": "edges.png", "preprocess": "none"},
        "loras": [{"file": os.path.basename(lora), "strength": 0.5, "clip_strength": 0.25}],
    }
    # A1111 infotext: prompt, "Negative prompt:" line, then "Key: value" fields split on ", ".
    first, negative, fields = chunks["parameters"].split("\n")
    assert first == prompt and negative == "Negative prompt: blurry"
    parsed = dict(f.split(": ", 1) for f in fields.split(", "))
    assert parsed["Steps"] == "2" and parsed["Sampler"] == "Euler" and parsed["CFG scale"] == "3.5"
    assert parsed["Seed"] == "9" and parsed["Size"] == "64x48" and parsed["Shift"] == "2.5"
    assert parsed["Model"] == "tiny-sd3.5_large"
    assert parsed["SLG"].startswith("layers 1 2 scale 2.0")
    assert parsed["ControlNet"].startswith(os.path.basename(cn)) and "strength 0.7" in parsed["ControlNet"]
    assert parsed["LoRA"] == f"{os.path.basename(lora)}:0.5:0.25"


def test_img2img_pngs_record_the_init_image_and_denoise(capsys, gen_args, tmp_path):
    Image.new("RGB", (64, 48), (200, 40, 40)).save(tmp_path / "init.png")
    summary, _ = run_json(capsys, gen_args("--prompt", "x", "--init_image", str(tmp_path / "init.png"),
                                           "--denoise", "0.5", "--postfix", "_i2i"))
    with Image.open(summary["files"][0]) as im:
        s = json.loads(im.text["sd35"])
        assert "Denoising strength: 0.5" in im.text["parameters"]
    assert (s["init_image"], s["denoise"], s["loras"]) == ("init.png", 0.5, []) and "controlnet" not in s
