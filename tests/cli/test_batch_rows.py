"""`sd35 batch` prompts files: plain text, CSV/TSV and JSONL rows with typed per-row overrides, and the jobs
(row x seed) a run is made of."""

import json

import pytest

from sd35_cli.batch.errors import PromptsFileError
from sd35_cli.batch.rows import MAX_SEED, expand_jobs, read_prompts, used_columns


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_text_file_is_one_prompt_a_line_without_blanks_and_comments(tmp_path):
    path = write(tmp_path, "p.txt", "a red fox\n\n# not this one\n  a blue bird, watercolor  \r\na frog\n")
    rows = read_prompts(path)
    assert [r.values for r in rows] == [{"prompt": "a red fox"}, {"prompt": "a blue bird, watercolor"},
                                        {"prompt": "a frog"}]
    assert [r.index for r in rows] == [0, 1, 2]
    assert [r.line for r in rows] == [1, 4, 5]


def test_csv_columns_are_typed_and_empty_cells_keep_the_workflow_value(tmp_path):
    path = write(tmp_path, "p.csv", "Prompt, Negative ,seed,steps,CFG,width,height,style\n"
                                    "\"a fox, in snow\",blurry,7,30,4.5,1024,768,ink\n"
                                    "a bird,,,,,,,\n")
    rows = read_prompts(path)
    assert rows[0].values == {"prompt": "a fox, in snow", "negative": "blurry", "seed": 7, "steps": 30, "cfg": 4.5,
                              "width": 1024, "height": 768, "style": "ink"}
    assert isinstance(rows[0].values["steps"], int) and isinstance(rows[0].values["cfg"], float)
    assert rows[1].values == {"prompt": "a bird"}
    assert used_columns(rows) == ["prompt", "negative", "seed", "steps", "cfg", "width", "height", "style"]


def test_tsv_and_forced_format(tmp_path):
    tsv = write(tmp_path, "p.tsv", "prompt\tsteps\na, b\t12\n")
    assert read_prompts(tsv)[0].values == {"prompt": "a, b", "steps": 12}
    as_csv = write(tmp_path, "rows.data", "prompt,steps\nx,3\n")
    assert read_prompts(as_csv, "csv")[0].values == {"prompt": "x", "steps": 3}
    assert read_prompts(as_csv)[0].values == {"prompt": "prompt,steps"}  # unknown extension: plain text


def test_jsonl_rows_keep_json_types_and_null_means_unset(tmp_path):
    lines = [{"prompt": "a fox", "seed": 3, "cfg": 5, "denoise": 0.6, "extra": [1, 2]},
             {"prompt": "a bird", "steps": None},
             "just a prompt"]
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = read_prompts(path)
    assert rows[0].values == {"prompt": "a fox", "seed": 3, "cfg": 5.0, "denoise": 0.6, "extra": [1, 2]}
    assert rows[1].values == {"prompt": "a bird"}
    assert rows[2].values == {"prompt": "just a prompt"}


def test_image_columns_are_paths_relative_to_the_prompts_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "edges.png").write_bytes(b"png")
    path = write(tmp_path, "p.csv", "prompt,control_image\nx,img/edges.png\n")
    assert read_prompts(path)[0].values["control_image"] == str(tmp_path / "img" / "edges.png")
    missing = write(tmp_path, "q.csv", "prompt,control_image\nx,img/nope.png\n")
    with pytest.raises(PromptsFileError,
                       match=r"q.csv line 2 \(row 1\): column 'control_image': 'img/nope.png' is not a file"):
        read_prompts(missing)


@pytest.mark.parametrize("name, text, message", [
    ("p.csv", "prompt,steps\nx,forty\n", r"p.csv line 2 \(row 1\): column 'steps': expected a whole number "
                                          r"such as 30, got 'forty'"),
    ("p.csv", "prompt,steps\nx,4.5\n", r"p.csv line 2 \(row 1\): column 'steps': expected a whole number"),
    ("p.csv", "prompt,seed\nx,-1\n", r"seed -1 is outside"),
    ("p.csv", "prompt,Prompt\nx,y\n", r"column 'prompt' appears more than once"),
    ("p.csv", "prompt\nx,y\n", r"line 2 \(row 1\): more cells than header columns"),
    ("p.csv", "", r"empty file"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"p.jsonl line 2 \(row 2\): not valid JSON"),
    ("p.jsonl", "[1, 2]\n", r"line 1 \(row 1\): expected a JSON object"),
    ("p.jsonl", '{"prompt": "x", "cfg": "high"}\n', r"line 1 \(row 1\): column 'cfg': "
                                                 r"expected a number such as 4\.5, got 'high'"),
    ("p.jsonl", '{"prompt": "x", "steps": true}\n', r"line 1 \(row 1\): column 'steps': expected a whole number"),
    ("p.txt", "# only a comment\n\n", r"no prompts in the file"),
])
def test_bad_rows_are_reported_with_file_line_and_column(tmp_path, name, text, message):
    with pytest.raises(PromptsFileError, match=message):
        read_prompts(write(tmp_path, name, text))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(PromptsFileError, match="does not exist"):
        read_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(PromptsFileError, match="expected one of txt, csv, tsv, jsonl"):
        read_prompts(write(tmp_path, "p.txt", "x\n"), "xml")


def test_each_row_gets_the_same_consecutive_seeds_unless_it_names_its_own(tmp_path):
    rows = read_prompts(write(tmp_path, "p.csv", "prompt,seed\na,\nb,1000\nc,\n"))
    jobs = expand_jobs(rows, seeds_per_prompt=3, base_seed=40)
    assert [(j.row.index, j.k, j.seed) for j in jobs] == [
        (0, 0, 40), (0, 1, 41), (0, 2, 42),
        (1, 0, 1000), (1, 1, 1001), (1, 2, 1002),
        (2, 0, 40), (2, 1, 41), (2, 2, 42),
    ]
    assert jobs[4].settings == {"prompt": "b", "seed": 1001}
    assert [j.key for j in jobs[:2]] == ["0:0", "0:1"]
    assert jobs[4].stem == "00001_1001"
    assert len({j.key for j in jobs}) == len({j.stem for j in jobs}) == len(jobs)


def test_without_any_seed_the_workflow_seed_stays_and_names_count_the_repeats(tmp_path):
    rows = read_prompts(write(tmp_path, "p.txt", "a\n"))
    jobs = expand_jobs(rows, seeds_per_prompt=2, base_seed=None)
    assert [(j.seed, j.stem, "seed" in j.settings) for j in jobs] == [(None, "00000_0", False),
                                                                      (None, "00000_1", False)]


def test_seed_limits(tmp_path):
    rows = read_prompts(write(tmp_path, "p.csv", f"prompt,seed\na,{MAX_SEED}\n"))
    with pytest.raises(ValueError, match="above"):
        expand_jobs(rows, seeds_per_prompt=2)
    with pytest.raises(ValueError, match="seeds-per-prompt"):
        expand_jobs(rows, seeds_per_prompt=0)


def test_set_values_go_under_every_row_and_a_rows_own_value_wins(tmp_path):
    from sd35_cli.batch.rows import parse_overrides, with_overrides

    rows = read_prompts(write(tmp_path, "p.csv", "prompt,steps\na,\nb,12\n"))
    overrides = parse_overrides(["width=768", "Steps=30", "cfg=4.5", "negative=blurry"])
    assert overrides == {"width": 768, "steps": 30, "cfg": 4.5, "negative": "blurry"}  # typed as the columns
    jobs = expand_jobs(with_overrides(rows, overrides))
    assert [j.settings for j in jobs] == [
        {"width": 768, "steps": 30, "cfg": 4.5, "negative": "blurry", "prompt": "a"},
        {"width": 768, "steps": 12, "cfg": 4.5, "negative": "blurry", "prompt": "b"},
    ]
    text = read_prompts(write(tmp_path, "p.txt", "a fox\n"))
    assert with_overrides(text, parse_overrides(["width=768", "steps=30"]))[0].values == {
        "width": 768, "steps": 30, "prompt": "a fox"}


@pytest.mark.parametrize("item, message", [
    ("steps=abc", r"--set steps=abc: column 'steps': expected a whole number such as 30, got 'abc'"),
    ("cfg=high", r"--set cfg=high: column 'cfg': expected a number such as 4\.5, got 'high'"),
    ("width", r"--set 'width': expected FIELD=VALUE"),
    ("steps=", r"no value after '='"),
    ("init_image=nope.png", r"'nope.png' is not a file"),
])
def test_bad_set_values_name_the_field_and_what_was_expected(tmp_path, item, message):
    from sd35_cli.batch.rows import parse_overrides

    with pytest.raises(PromptsFileError, match=message):
        parse_overrides([item], str(tmp_path))


def test_a_bad_cell_names_the_row_the_column_and_what_was_expected(tmp_path):
    with pytest.raises(PromptsFileError, match=r"p\.csv line 3 \(row 2\): column 'steps': expected a whole number "
                                               r"such as 30, got 'abc'"):
        read_prompts(write(tmp_path, "p.csv", "prompt,steps\na,4\nb,abc\n"))
    with pytest.raises(PromptsFileError, match=r"p\.jsonl line 2 \(row 2\): column 'cfg': expected a number"):
        read_prompts(write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "cfg": "x"}\n'))
