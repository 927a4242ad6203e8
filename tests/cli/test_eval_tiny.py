"""`sd35 eval-tiny`: held-out prompts through the standard path, scored per attribute, as JSON."""

import json

from sd35_cli.main import main
from sd35_train.bundled import tiny_shapes_checkpoint


def test_eval_tiny_scores_the_bundled_model_per_attribute(capsys):
    assert main(["eval-tiny", "--prompts", "4", "--rows", "defaults"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["model"] == tiny_shapes_checkpoint() and result["prompts"] == 4
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["default", "cfg 1"] and "default + SLG" in names
    for row in result["rows"]:
        acc = row["accuracy"]
        assert set(acc) == {"color", "shape", "position", "background", "all", "shape_fill"}
        assert all(0.0 <= v <= 1.0 and v * 4 == round(v * 4) for v in acc.values())
    assert result["rows"][1]["cfg"] == 1.0 and "colour" in captured.err and "shape by fill ratio" in captured.err


def test_eval_tiny_rejects_a_bad_step_list(capsys):
    assert main(["eval-tiny", "--steps_list", "ten"]) == 1
    assert "--steps_list" in capsys.readouterr().err
