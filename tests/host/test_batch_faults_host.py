"""`sd35 batch` when things break: a server answering 500, a server that accepts a row and never finishes it, a
row's image gone from the disk, and a manifest cut mid-line by a crash. Nothing is lost, nothing is done twice.

Needs ``COMFYUI_PATH`` (skipped, visibly, without it). One real ComfyUI runs this pack on the tiny checkpoints; the
broken servers are :class:`~.faulty_proxy.FaultyProxy` instances in front of it, so every row that does run, runs
on the real server. The client is a real subprocess, as in test_batch_host.py.
"""

import collections
import json
import os
import time

import pytest

from ..cli.batch_graphs import txt2img_api
from ..shared import IMAGES
from .comfyui_server import COMFYUI_PATH, START_TIMEOUT, write_models_yaml
from .faulty_proxy import FaultyProxy
from .test_batch_host import _CLIENTS, Comfy, client, images_in, prompts_csv, wait_for
from .test_batch_host import finish as _finish

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the batch client's host tests need a ComfyUI checkout"
)
pytest.importorskip("websocket", reason="websocket-client is needed to follow ComfyUI's progress")

ROWS = 6


@pytest.fixture(scope="module")
def comfy(tiny_models, tmp_path_factory):
    yaml = tmp_path_factory.mktemp("faults_models") / "extra_model_paths.yaml"
    write_models_yaml(yaml, tiny_models.root)
    server = Comfy(tmp_path_factory.mktemp("comfy_faults"), yaml)
    try:
        server.wait_ready(time.monotonic() + START_TIMEOUT)
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _stop_leftover_clients():
    yield
    while _CLIENTS:
        proc = _CLIENTS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture
def workflow(tmp_path):
    api = txt2img_api()
    api["6"]["inputs"]["steps"] = 1
    path = tmp_path / "txt2img_api.json"
    path.write_text(json.dumps(api))
    return str(path)


def finish(proc, comfy):
    return _finish(proc, [comfy])


def records(out_dir):
    """The manifest's whole records (a line torn by a crash is skipped, as the client skips it)."""
    out = []
    with open(os.path.join(out_dir, "manifest.jsonl")) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def done_records(out_dir):
    return [r for r in records(out_dir) if r["type"] == "job" and r["status"] == "done"]


def executed(comfy) -> int:
    """How many prompts the real server has run (its history)."""
    return len(comfy.get_json("/history"))


def assert_each_row_done_once(out, rows=ROWS):
    done = done_records(out)
    assert collections.Counter(r["job"] for r in done) == {f"{i}:0": 1 for i in range(rows)}
    assert images_in(out) == sorted(f"{i:05d}_{1000 + i}_8_0.png" for i in range(rows))
    return done


def test_a_server_answering_500_to_prompts_is_dropped_and_its_rows_run_on_the_other(comfy, workflow, tmp_path):
    broken = FaultyProxy(comfy.port, mode="500")
    try:
        before = executed(comfy)
        out = str(tmp_path / "out")
        rc, _, err = finish(client("-w", workflow, "-p", prompts_csv(tmp_path, ROWS), "-o", out,
                                   "-s", broken.address, "-s", comfy.address), comfy)
    finally:
        broken.close()
    assert rc == 0, err
    done = assert_each_row_done_once(out)
    assert {r["server"] for r in done} == {comfy.address}
    assert broken.refused >= 1
    assert f"server {broken.address} is gone" in err and "HTTP 500" in err, err
    assert executed(comfy) - before == ROWS  # nothing ran twice


def test_a_server_that_accepts_a_row_and_never_finishes_loses_it_after_the_row_timeout(comfy, workflow, tmp_path):
    stuck = FaultyProxy(comfy.port, mode="swallow")
    try:
        before = executed(comfy)
        out = str(tmp_path / "out")
        rc, _, err = finish(client("-w", workflow, "-p", prompts_csv(tmp_path, ROWS), "-o", out, "--row-timeout", "20",
                                   "-s", stuck.address, "-s", comfy.address), comfy)
        swallowed = len(stuck.swallowed)
    finally:
        stuck.close()
    assert rc == 0, err
    assert swallowed >= 1
    done = assert_each_row_done_once(out)
    assert {r["server"] for r in done} == {comfy.address}
    requeued = [r for r in records(out) if r["type"] == "requeued"]
    assert len(requeued) == swallowed and {r["server"] for r in requeued} == {stuck.address}
    assert "for more than 20 s (--row-timeout) without finishing" in err, err
    assert executed(comfy) - before == ROWS


def test_a_row_whose_image_vanished_during_the_run_fails_alone_and_a_rerun_does_only_that_row(comfy, tmp_path):
    from PIL import Image

    api = txt2img_api()
    api["6"]["inputs"]["steps"] = 1
    api["20"] = {"class_type": "SD35ControlNetLoader", "_meta": {"title": "ControlNet"},
                 "inputs": {"model": ["1", 0], "control_net_name": "tiny-sd3.5_large_controlnet_canny.safetensors"}}
    api["21"] = {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}, "_meta": {"title": "Edges"}}
    api["23"] = {"class_type": "SD35ControlNetApply", "_meta": {"title": "Apply ControlNet"},
                 "inputs": {"positive": ["3", 0], "negative": ["4", 0], "control_net": ["20", 0], "vae": ["1", 2],
                            "image": ["21", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    api["6"]["inputs"].update(positive=["23", 0], negative=["23", 1])
    wf = tmp_path / "controlnet.json"
    wf.write_text(json.dumps(api))
    (tmp_path / "img").mkdir()
    canny = Image.open(os.path.join(IMAGES, "canny.png")).convert("RGB").resize((64, 64))
    canny.save(tmp_path / "img" / "first.png")
    canny.rotate(90).save(tmp_path / "img" / "last.png")
    rows = [f"a tower,img/first.png,{i}\n" for i in range(5)] + ["a tower,img/last.png,5\n"]
    prompts = tmp_path / "rows.csv"
    prompts.write_text("prompt,control_image,seed\n" + "".join(rows))
    out = str(tmp_path / "out")
    args = ("-w", str(wf), "-p", str(prompts), "-o", out, "-s", comfy.address, "--max-queue", "1")
    proc = client(*args)
    wait_for(lambda: os.path.exists(os.path.join(out, "manifest.jsonl")) and done_records(out), 120,
             "the first row", proc)
    os.replace(tmp_path / "img" / "last.png", tmp_path / "last.png")  # gone before its row is queued
    rc, _, err = finish(proc, comfy)
    assert rc == 1, err
    failed = [r for r in records(out) if r["type"] == "job" and r["status"] == "error"]
    assert [r["row"] for r in failed] == [5]
    assert "cannot upload the row's image: No such file or directory" in failed[0]["error"]
    assert str(tmp_path / "img" / "last.png") in failed[0]["error"]
    assert "5 image(s) made, 1 failed (first: row 5 seed 5: cannot upload" in err, err

    os.replace(tmp_path / "last.png", tmp_path / "img" / "last.png")
    before = executed(comfy)
    rc, _, err = finish(client(*args), comfy)
    assert rc == 0, err
    assert "resuming: 5 of 6 image(s) already done" in err and "1 image(s) made" in err
    assert executed(comfy) - before == 1


def test_a_manifest_cut_mid_line_by_a_crash_resumes_from_what_is_whole(comfy, workflow, tmp_path):
    out = str(tmp_path / "out")
    args = ("-w", workflow, "-p", prompts_csv(tmp_path, ROWS), "-o", out, "-s", comfy.address)
    rc, _, err = finish(client(*args), comfy)
    assert rc == 0, err
    path = os.path.join(out, "manifest.jsonl")
    with open(path, "rb") as f:
        data = f.read()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    torn_job = json.loads(last)["job"]
    with open(path, "wb") as f:  # the crash: the last record only half written, no newline
        f.write(data[: len(data) - len(last) // 2 - 1])

    before = executed(comfy)
    rc, _, err = finish(client(*args), comfy)
    assert rc == 0, err
    assert f"resuming: {ROWS - 1} of {ROWS} image(s) already done" in err and "1 image(s) made" in err, err
    assert executed(comfy) - before == 1  # only the row whose record was torn ran again
    redone = [r for r in done_records(out) if r["job"] == torn_job]
    assert len(redone) == 1  # the torn line is skipped, the new record stands on its own line
    assert_each_row_done_once(out)
