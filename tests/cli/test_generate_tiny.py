"""`sd35 generate --model <bundled checkpoint> --prompt ...` works with no other flag."""

import json

from PIL import Image

from sd35_cli.main import main
from sd35_train.bundled import tiny_shapes_checkpoint


def test_the_bundled_model_needs_no_other_flag(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.chdir(tmp_path)  # no models/ folder here: the encoders come from the checkpoint
    assert main(["generate", "--model", tiny_shapes_checkpoint(), "--prompt",
                 "a red circle on the left of a blue background", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "draws 64x64 images" in captured.err
    (path,) = result["files"]
    with Image.open(path) as im:
        assert im.size == (64, 64)
    assert (result["settings"]["steps"], result["settings"]["sampler"]) == (20, "euler")
