"""`sd35 batch` on the command line without a server: what is refused before anything is queued, and how
ComfyUI's answers (prompt errors, history entries) are read. Runs against real servers are in
tests/host/test_batch_host.py."""

import json
import os
import socket

import pytest

from sd35_cli.batch.client import format_prompt_error, history_error, output_images, parse_address
from sd35_cli.main import build_parser, main


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def files(tmp_path):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "SaveImage", "inputs": {}}}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    return str(wf), str(prompts), str(tmp_path / "out")


def test_batch_is_an_sd35_subcommand():
    args = build_parser().parse_args(["batch", "-w", "w.json", "-p", "p.txt", "-o", "out", "-s", "a:1", "-s", "b:2",
                                      "--map", "x=T.i", "-n", "3"])
    assert (args.workflow, args.prompts, args.out, args.server, args.map, args.seeds_per_prompt, args.fresh) == \
        ("w.json", "p.txt", "out", ["a:1", "b:2"], ["x=T.i"], 3, False)
    assert build_parser().parse_args(["batch", "-w", "w", "-p", "p", "-o", "o", "--fresh"]).fresh is True


def test_an_unreachable_server_is_a_clear_message_and_nothing_is_written(files, capsys):
    wf, prompts, out = files
    port = closed_port()
    rc = main(["batch", "-w", wf, "-p", prompts, "-o", out, "-s", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"ComfyUI at 127.0.0.1:{port} did not answer GET /object_info" in err
    assert "nothing was queued" in err and "Traceback" not in err
    assert not os.path.exists(out)


@pytest.mark.parametrize("args, message", [
    (["-s", "127.0.0.1:notaport"], "the port is not a number"),
    (["-s", "127.0.0.1:1", "-s", "127.0.0.1:1"], "127.0.0.1:1 is given twice"),
    (["-n", "0"], "--seeds-per-prompt: expected 1 or more"),
])
def test_bad_options_are_one_line(files, capsys, args, message):
    wf, prompts, out = files
    assert main(["batch", "-w", wf, "-p", prompts, "-o", out, *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_files_are_reported_before_any_server_is_asked(files, tmp_path, capsys):
    wf, prompts, out = files
    port = closed_port()
    (tmp_path / "bad.csv").write_text("prompt,steps\na,many\n")
    assert main(["batch", "-w", wf, "-p", str(tmp_path / "bad.csv"), "-o", out, "-s", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert "bad.csv line 2 (row 1): column 'steps': expected a whole number such as 30, got 'many'" in err
    assert main(["batch", "-w", wf, "-p", prompts, "-o", out, "--set", "steps=abc", "-s", f"127.0.0.1:{port}"]) == 1
    assert "--set steps=abc: column 'steps': expected a whole number" in capsys.readouterr().err
    assert main(["batch", "-w", str(tmp_path / "none.json"), "-p", prompts, "-o", out,
                 "-s", f"127.0.0.1:{port}"]) == 1
    assert "none.json does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point(files, capsys):
    from sd35_cli.batch import main as batch_main

    wf, prompts, out = files
    assert batch_main(["-w", wf, "-p", prompts, "-o", out, "-s", f"127.0.0.1:{closed_port()}"]) == 1
    assert capsys.readouterr().err.startswith("sd35 batch: error: ComfyUI at 127.0.0.1:")


def test_addresses():
    assert parse_address("gpu1:8190") == ("http", "gpu1", 8190)
    assert parse_address("gpu1") == ("http", "gpu1", 8188)
    assert parse_address("https://comfy.example.org") == ("https", "comfy.example.org", 443)
    with pytest.raises(ValueError, match="expected host:port"):
        parse_address("ftp://x:1")


def test_reading_comfyuis_answers():
    # The shape of a /prompt 400 answer (execution.validate_prompt).
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "", "extra_info": {}},
            "node_errors": {"6": {"errors": [{"type": "value_smaller_than_min",
                                              "message": "Value -3.0 smaller than min of 0.0", "details": "cfg",
                                              "extra_info": {"input_name": "cfg"}}],
                                  "dependent_outputs": ["8"], "class_type": "SD35Sampler"}}}
    assert format_prompt_error(body) == \
        "Prompt outputs failed validation: node 6 (SD35Sampler) cfg: Value -3.0 smaller than min of 0.0"
    # A /history entry of a prompt that failed in a node.
    failed = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {"prompt_id": "p", "timestamp": 1}],
        ["execution_error", {"node_id": "5", "node_type": "SD35EmptyLatent", "exception_type": "ValueError",
                             "exception_message": "width 72 is not a multiple of 16\n"}]]}}
    assert history_error(failed) == "SD35EmptyLatent (node 5): ValueError: width 72 is not a multiple of 16"
    ok = {"status": {"status_str": "success", "completed": True, "messages": []},
          "outputs": {"12": {"images": [{"filename": "b.png", "subfolder": "", "type": "output"}]},
                      "9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"},
                                       {"filename": "a2.png", "subfolder": "", "type": "output"}]},
                      "3": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}]},
                      "4": {"text": ["not an image"]}}}
    assert history_error(ok) is None
    assert [(n, i, r["filename"]) for n, i, r in output_images(ok)] == [("9", 0, "a.png"), ("9", 1, "a2.png"),
                                                                       ("12", 0, "b.png")]
    previews_only = {"outputs": {"3": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}]}}}
    assert [r["filename"] for _, _, r in output_images(previews_only)] == ["p.png"]


def test_help_says_where_the_images_end_up_and_how_to_set_run_wide_values(capsys):
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--set FIELD=VALUE" in text and "--set width=768 --set steps=30" in text
    assert "The ComfyUI server also keeps its own copy" in text and "output/sd35/" in text
    assert "Preview Image" in text
