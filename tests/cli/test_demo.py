"""`sd35 demo`: offline, the bundled tiny shapes model through the same code path as real weights."""

import json
import os

import numpy as np
import torch
from PIL import Image

from sd35_cli.demo import GRID_PROMPTS
from sd35_cli.main import main
from sd35_core.sampling.defaults import defaults_for
from sd35_train.analysis import read_image
from sd35_train.bundled import tiny_shapes_checkpoint, tiny_shapes_controlnet


def test_demo_draws_the_grid_controlnet_and_img2img_with_the_bundled_model(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert main(["demo", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["threads"] == 1 and torch.get_num_threads() == threads  # restored for the caller
    assert summary["out"] == str(out)
    assert summary["model"] == tiny_shapes_checkpoint() and summary["controlnet"] == tiny_shapes_controlnet()

    grid, slg, control, img2img = summary["runs"]
    assert grid["prompts"] == list(GRID_PROMPTS) and len(grid["files"]) == 6
    assert slg["settings"]["slg"]["layers"] == list(defaults_for("tiny_shapes_sd35", slg=True).slg.layers)
    assert "ControlNet" in control["title"] and img2img["settings"]["denoise"] == 0.7
    pngs = grid["files"] + slg["files"] + control["files"] + img2img["files"] + [control["control_image"]]
    for f in pngs:
        assert f.startswith(str(out)) and f.endswith(".png")
        with Image.open(f) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    # The ControlNet saw canny edges: a binary picture, not the coloured input.
    with Image.open(control["control_image"]) as im:
        assert set(np.unique(np.asarray(im.convert("L")))) <= {0, 255}
    with Image.open(summary["grid"]) as im:
        assert im.size[0] == 3 * 192 and im.size[1] > 2 * 192
    # The model draws: every grid image has the background its prompt asks for.
    for prompt, f in zip(GRID_PROMPTS, grid["files"], strict=True):
        with Image.open(f) as im:
            assert read_image(np.asarray(im)).background == prompt.split(" of a ")[1].split(" ")[0], prompt

    report = captured.err
    assert "toy trained on shapes" in report and "ComfyUI/models/checkpoints" in report
    assert summary["grid"] in report
    assert os.path.isfile(os.path.join(out, "inputs", "control_triangle.png"))


def test_demo_files_follow_the_users_umask(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    previous = os.umask(0o022)
    try:
        assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "1"]) == 0
    finally:
        os.umask(previous)
    capsys.readouterr()
    modes = {os.path.relpath(os.path.join(d, f), tmp_path): os.stat(os.path.join(d, f)).st_mode & 0o777
             for d, _, files in os.walk(tmp_path / "demo") for f in files}
    assert any(p.endswith(".png") for p in modes)
    assert {p: m for p, m in modes.items() if m != 0o644} == {}


def test_the_printed_real_weights_command_runs_as_printed(tmp_path, monkeypatch, capsys, tiny_models):
    """The 'then, for example' command, in a folder holding a ComfyUI (tiny files under the real names, the
    real tokenizer files where ComfyUI bundles them); only the size and steps are added for the tiny model."""
    import shlex
    import shutil

    from sd35_cli.demo import REAL_WEIGHTS
    from tests.conftest import TOKENIZERS

    lines = REAL_WEIGHTS.split("then, for example:\n", 1)[1].splitlines()
    lines = lines[:next(i for i, line in enumerate(lines) if not line.rstrip().endswith("\\")) + 1]
    command = " ".join(line.rstrip("\\").strip() for line in lines)
    args = shlex.split(command)
    assert args[0] == "sd35"
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    (comfy / "models" / "text_encoders").mkdir(parents=True)
    shutil.copy(tiny_models.checkpoints["sd3.5_medium"], comfy / "models" / "checkpoints" / "sd3.5_medium.safetensors")
    for role, name in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp16")):
        shutil.copy(tiny_models.text_encoders[role], comfy / "models" / "text_encoders" / f"{name}.safetensors")
    shutil.copytree(os.path.join(TOKENIZERS, "clip"), comfy / "comfy" / "sd1_tokenizer")
    (comfy / "comfy" / "text_encoders" / "t5_tokenizer").mkdir(parents=True)
    shutil.copy(os.path.join(TOKENIZERS, "t5", "tokenizer.json"), comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert main(args[1:] + ["--width", "64", "--height", "64", "--steps", "1", "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    assert list((tmp_path / "outputs" / "sd3.5_medium").glob("*/000000.png"))
