"""`sd35 batch` against two real ComfyUI servers running this pack on tiny checkpoints.

Needs ``COMFYUI_PATH`` (skipped, visibly, without it); the servers run with the Python that
``comfyui_server.comfyui_python`` finds (``COMFYUI_PYTHON`` first). Both start on free loopback ports
with ``--cpu``, their own temporary base directory (``custom_nodes`` holds a symlink to this pack) and the
session's tiny model set through ``--extra-model-paths-config``. The client runs as a real subprocess
(``python -m sd35_cli.batch``), so Ctrl-C is a real SIGINT and a dead server is a real SIGKILL.
"""

import collections
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from ..cli.batch_graphs import txt2img_api, ui_txt2img
from ..shared import IMAGES
from .comfyui_server import (
    COMFYUI_PATH,
    ROOT,
    START_TIMEOUT,
    free_port,
    launch_comfyui,
    stop_process,
    wait_until_ready,
    write_models_yaml,
)

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the batch client's host tests need a ComfyUI checkout"
)

# The default runs of the client follow ComfyUI's progress over its websocket.
pytest.importorskip("websocket", reason="websocket-client is needed to follow ComfyUI's progress")

CLIENT_TIMEOUT = 240
ROWS = 12


class Comfy:
    """One ComfyUI process (started by this module, stopped by its PID)."""

    def __init__(self, base, models_yaml):
        self.base = str(base)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.base, "comfyui.log")
        self.proc = launch_comfyui(self.base, models_yaml, self.port, self.log_path)

    def log(self, tail=3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-tail:]

    def get_json(self, path):
        with urllib.request.urlopen(f"http://{self.address}{path}", timeout=30) as r:
            return json.loads(r.read())

    def wait_ready(self, deadline):
        wait_until_ready(self.proc, lambda: self.get_json("/queue"), deadline, self.log)

    def our_prompts(self):
        """(running, pending) prompt ids queued by a batch client."""
        q = self.get_json("/queue")

        def ours(items):
            return [i[1] for i in items if str(i[3].get("client_id", "")).startswith("sd35-batch-")]

        return ours(q["queue_running"]), ours(q["queue_pending"])

    def stop(self):
        stop_process(self.proc)


@pytest.fixture(scope="module")
def servers(tiny_models, tmp_path_factory):
    yaml = tmp_path_factory.mktemp("batch_models") / "extra_model_paths.yaml"
    write_models_yaml(yaml, tiny_models.root)
    pair = []
    try:
        for name in ("a", "b"):  # both start at once; the wait below overlaps their start-up
            pair.append(Comfy(tmp_path_factory.mktemp(f"comfy_{name}"), yaml))
        deadline = time.monotonic() + START_TIMEOUT
        for s in pair:
            s.wait_ready(deadline)
        yield pair
    finally:
        for s in pair:
            s.stop()


@pytest.fixture
def workflow(tmp_path):
    api = txt2img_api()
    api["6"]["inputs"]["steps"] = 2  # tiny model, 64x64, two steps: plumbing, not pictures
    path = tmp_path / "txt2img_api.json"
    path.write_text(json.dumps(api))
    return str(path)


def prompts_csv(tmp_path, rows=ROWS, extra=""):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,negative,seed\n" + "".join(f"a lighthouse at dusk,blurry,{1000 + i}\n"
                                                       for i in range(rows)) + extra)
    return str(path)


_CLIENTS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_leftover_clients():
    yield
    while _CLIENTS:  # a test that failed half-way may leave its client running: stop it by its PID
        proc = _CLIENTS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _sigint_as_a_terminal_sends_it():
    # A test run started in the background (`cmd &`, nohup) hands SIGINT down ignored, and a Python started
    # with it ignored never raises KeyboardInterrupt: the Ctrl-C test would test nothing.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def client(*args):
    """Start ``python -m sd35_cli.batch`` as its own process, with SIGINT as a terminal would deliver it."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "sd35_cli.batch", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_a_terminal_sends_it)
    _CLIENTS.append(proc)
    return proc


def finish(proc, servers=()):
    try:
        out, err = proc.communicate(timeout=CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the client did not finish; stderr:\n{err}\n"
                             + "\n".join(f"{s.address} log:\n{s.log()}" for s in servers)) from None
    return proc.returncode, out, err


def records(out_dir):
    with open(os.path.join(out_dir, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def done_records(out_dir):
    return [r for r in records(out_dir) if r["type"] == "job" and r["status"] == "done"]


def wait_for(condition, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the client ended before {what}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def count_done(out_dir):
    try:
        return len(done_records(out_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def expected_files(rows=ROWS):
    return sorted(f"{i:05d}_{1000 + i}_8_0.png" for i in range(rows))


def images_in(out_dir):
    return sorted(f for f in os.listdir(out_dir) if not f.startswith("manifest"))


def assert_pngs(out_dir, names, size=(64, 64)):
    from PIL import Image

    for name in names:
        with Image.open(os.path.join(out_dir, name)) as im:
            assert im.format == "PNG" and im.size == size, name


# ---------------------------------------------------------------------------------------------------- tests

def test_refusals_come_before_anything_is_queued(servers, workflow, tmp_path):
    a, b = servers
    before = [len(s.get_json("/history")) for s in servers]
    prompts = prompts_csv(tmp_path, rows=2)

    dead = f"127.0.0.1:{free_port()}"
    rc, _, err = finish(client("-w", workflow, "-p", prompts, "-o", str(tmp_path / "o1"), "-s", a.address,
                               "-s", dead))
    assert rc == 1 and f"ComfyUI at {dead} did not answer GET /object_info" in err and "nothing was queued" in err

    bad = txt2img_api()
    bad["8"]["class_type"] = "NoSuchSaver"
    bad["1"]["inputs"]["ckpt_name"] = "not-here.safetensors"
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps(bad))
    rc, _, err = finish(client("-w", str(bad_path), "-p", prompts, "-o", str(tmp_path / "o2"), "-s", a.address,
                               "-s", b.address))
    assert rc == 1, err
    assert "bad.json does not validate, nothing was queued" in err
    for s in servers:
        assert f"{s.address}: node 8 'Save Image' (NoSuchSaver): node type 'NoSuchSaver' is not installed" in err
        assert f"{s.address}: node 1 'Load Checkpoint' (SD35CheckpointLoader): ckpt_name 'not-here.safetensors' " \
               "is not available on the server" in err

    rc, _, err = finish(client("-w", workflow, "-p", prompts, "-o", str(tmp_path / "o3"), "-s", a.address,
                               "--map", "prompt=Nowhere.text"))
    assert rc == 1 and "no node titled 'Nowhere'" in err

    assert [len(s.get_json("/history")) for s in servers] == before
    assert not any(os.path.exists(tmp_path / d) for d in ("o1", "o2", "o3"))


def test_a_failing_row_is_recorded_and_the_run_goes_on(servers, workflow, tmp_path):
    a = servers[0]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a red fox", "seed": 1},
        {"prompt": "a red fox", "seed": 2, "width": 72},  # the pack's node refuses it while running
        {"prompt": "a red fox", "seed": 3, "cfg": -1},  # ComfyUI's /prompt validation refuses it
        {"prompt": "a red fox", "seed": 4, "steps": 3},
    ]) + "\n")
    out = str(tmp_path / "out")
    rc, _, err = finish(client("-w", workflow, "-p", str(path), "-o", out, "-s", a.address), servers)
    assert rc == 1, err
    recs = {r["row"]: r for r in records(out) if r["type"] == "job"}
    assert [recs[i]["status"] for i in range(4)] == ["done", "error", "error", "done"]
    assert "SD35EmptyLatent (node 5): ValueError" in recs[1]["error"] and "72" in recs[1]["error"]
    assert "node 6 (SD35Sampler) cfg: Value -1.0 smaller than min of 0.0" in recs[2]["error"]
    assert recs[3]["settings"] == {"prompt": "a red fox", "steps": 3, "seed": 4}
    assert recs[3]["server"] == a.address and recs[3]["seconds"] > 0
    assert images_in(out) == ["00000_1_8_0.png", "00003_4_8_0.png"]
    assert "2 image(s) made, 2 failed" in err


def test_a_ui_workflow_is_converted_with_the_servers_object_info(servers, tmp_path):
    a = servers[0]
    wf = tmp_path / "editor_saved.json"
    wf.write_text(json.dumps(ui_txt2img(slg_layers="1,2")))  # the Large-like tiny model has 4 blocks
    prompts = tmp_path / "p.txt"
    prompts.write_text("a lighthouse\na harbour\n")
    out = str(tmp_path / "out")
    rc, stdout, err = finish(client("-w", str(wf), "-p", str(prompts), "-o", out, "-s", a.address, "--dry-run"))
    assert rc == 0, err
    assert "prompt -> 3 'Positive' (SD35TextEncode).text" in stdout
    assert "seed -> 6 'Sampler' (SD35Sampler).seed" in stdout
    first = json.loads(stdout[stdout.index("{"):stdout.rindex("}") + 1])
    assert first["6"]["inputs"]["steps"] == 3 and first["6"]["inputs"]["positive"] == ["3", 0]
    assert first["9"]["inputs"]["images"] == ["7", 0] and "10" not in first and "11" not in first
    assert not os.path.exists(out)  # a dry run writes nothing

    rc, _, err = finish(client("-w", str(wf), "-p", str(prompts), "-o", out, "-s", a.address), servers)
    assert rc == 0, err
    assert images_in(out) == ["00000_42_9_0.png", "00001_42_9_0.png"]  # the workflow's own seed, node 9 saves
    assert_pngs(out, images_in(out), size=(64, 48))


def test_a_shipped_editor_workflow_runs_with_columns_for_the_tiny_files(servers, tmp_path):
    a = servers[0]
    wf = os.path.join(ROOT, "workflows", "sd3.5_large_txt2img.json")
    prompts = tmp_path / "rows.csv"
    prompts.write_text("prompt,ckpt,width,height,steps\n"
                       "a lighthouse,tiny-sd3.5_large.safetensors,64,48,2\n"
                       "a harbour,tiny-sd3.5_large.safetensors,48,64,2\n")
    out = str(tmp_path / "out")
    rc, _, err = finish(client("-w", wf, "-p", str(prompts), "-o", out, "-s", a.address, "--seed", "7",
                               "--map", "ckpt=Load checkpoint.ckpt_name"), servers)
    assert rc == 0, err
    names = images_in(out)
    assert [n.split("_")[:2] for n in names] == [["00000", "7"], ["00001", "7"]]
    assert_pngs(out, names[:1], size=(64, 48))
    assert_pngs(out, names[1:], size=(48, 64))


def test_control_images_are_uploaded_per_row(servers, tmp_path):
    from PIL import Image

    a = servers[0]
    api = txt2img_api()
    api["6"]["inputs"]["steps"] = 2
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
    for name in ("canny", "depth"):
        Image.open(os.path.join(IMAGES, f"{name}.png")).convert("RGB").resize(
            (64, 64)).save(tmp_path / "img" / f"{name}.png")
    prompts = tmp_path / "rows.csv"
    prompts.write_text("prompt,control_image,seed\na tower,img/canny.png,5\na tower,img/depth.png,5\n")
    out = str(tmp_path / "out")
    rc, _, err = finish(client("-w", str(wf), "-p", str(prompts), "-o", out, "-s", a.address), servers)
    assert rc == 0, err
    assert images_in(out) == ["00000_5_8_0.png", "00001_5_8_0.png"]
    recs = sorted(done_records(out), key=lambda r: r["row"])
    assert [r["settings"]["control_image"] for r in recs] == [str(tmp_path / "img" / "canny.png"),
                                                              str(tmp_path / "img" / "depth.png")]
    uploaded = sorted(os.listdir(os.path.join(a.base, "input", "sd35_batch")))
    assert [u.split("_", 1)[1] for u in uploaded] == ["canny.png", "depth.png"]
    with Image.open(os.path.join(out, "00000_5_8_0.png")) as x, Image.open(os.path.join(out, "00001_5_8_0.png")) as y:
        assert x.tobytes() != y.tobytes()  # same prompt and seed: only the control image differs


def test_the_shipped_inpaint_workflow_takes_a_mask_per_row(servers, tmp_path):
    import numpy as np
    from PIL import Image

    a = servers[0]
    wf = os.path.join(ROOT, "workflows", "sd3.5_large_inpaint.json")
    rgb = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    for name, box in (("left", (0, 0, 32, 48)), ("right", (32, 0, 64, 48))):
        mask = Image.new("L", (64, 48), 0)
        mask.paste(255, box)
        mask.save(tmp_path / f"{name}.png")
    prompts = tmp_path / "rows.csv"
    prompts.write_text("prompt,init_image,mask_image,ckpt,steps\n"
                       "a vase,photo.png,left.png,tiny-sd3.5_large.safetensors,2\n"
                       "a vase,photo.png,right.png,tiny-sd3.5_large.safetensors,2\n")
    out = str(tmp_path / "out")
    rc, _, err = finish(client("-w", wf, "-p", str(prompts), "-o", out, "-s", a.address, "--seed", "3",
                               "--map", "ckpt=Load checkpoint.ckpt_name"), servers)
    assert rc == 0, err
    names = images_in(out)
    assert len(names) == 2
    assert_pngs(out, names, size=(64, 48))  # the picture's own size
    # Each row's picture went up with its mask as the alpha, as the MaskEditor would have saved it.
    uploaded = sorted(os.listdir(os.path.join(a.base, "input", "sd35_batch")))
    masked = [u for u in uploaded if u.endswith("_photo_masked.png")]
    assert len(masked) == 2
    alphas = []
    for name in masked:
        with Image.open(os.path.join(a.base, "input", "sd35_batch", name)) as im:
            assert im.mode == "RGBA" and (np.asarray(im)[..., :3] == rgb).all()
            alphas.append(np.asarray(im)[..., 3])
    assert sorted(int(al[:, :32].max()) for al in alphas) == [0, 255]
    with Image.open(os.path.join(out, names[0])) as x, Image.open(os.path.join(out, names[1])) as y:
        left, right = np.asarray(x).astype(int), np.asarray(y).astype(int)
    assert np.abs(left - right).max() > 0  # only the mask differs between the rows


def test_twelve_rows_over_two_servers_survive_one_of_them_dying(servers, workflow, tmp_path):
    a, b = servers
    out = str(tmp_path / "out")
    proc = client("-w", workflow, "-p", prompts_csv(tmp_path), "-o", out, "-s", a.address, "-s", b.address)

    def b_is_busy_with_ours():
        done_by_b = [r for r in done_records(out) if r["server"] == b.address] if count_done(out) else []
        return bool(done_by_b) and bool(b.our_prompts()[0])

    wait_for(b_is_busy_with_ours, 120, "server b to finish one row and start another", proc)
    b.proc.kill()  # SIGKILL mid-run: its running and pending prompts are lost with it
    b.proc.wait()
    rc, _, err = finish(proc, servers)
    assert rc == 0, err

    done = done_records(out)
    assert collections.Counter(r["job"] for r in done) == {f"{i}:0": 1 for i in range(ROWS)}  # each exactly once
    assert images_in(out) == expected_files()
    assert_pngs(out, images_in(out))
    assert {r["server"] for r in done} == {a.address, b.address}
    requeued = [r for r in records(out) if r["type"] == "requeued"]
    assert requeued and {r["server"] for r in requeued} == {b.address}
    by_job = {r["job"]: r for r in done}
    assert all(by_job[r["job"]]["server"] == a.address for r in requeued)
    assert f"server {b.address} is gone" in err
    assert f"{ROWS} image(s) made" in err


def test_ctrl_c_leaves_a_resumable_manifest_and_a_rerun_finishes_the_rest(servers, workflow, tmp_path):
    a = servers[0]
    out = str(tmp_path / "out")
    args = ("-w", workflow, "-p", prompts_csv(tmp_path), "-o", out, "-s", a.address)
    proc = client(*args)
    wait_for(lambda: count_done(out) >= 3, 120, "three finished rows", proc)
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc, servers)
    assert rc == 130, err
    assert "interrupted with" in err and "rerun the same command to resume" in err
    first = done_records(out)
    assert 3 <= len(first) < ROWS
    # The interrupted run took its prompts off the server: nothing of ours stays queued or running.
    wait_for(lambda: a.our_prompts() == ([], []), 30, "the server's queue to be clear of the batch's prompts")

    # The rerun follows the server by polling (no websocket) and does only what is missing.
    rc, _, err = finish(client(*args, "--no-websocket"), servers)
    assert rc == 0, err
    assert f"resuming: {len(first)} of {ROWS} image(s) already done" in err
    done = done_records(out)
    assert collections.Counter(r["job"] for r in done) == {f"{i}:0": 1 for i in range(ROWS)}
    assert images_in(out) == expected_files()
    assert_pngs(out, images_in(out))

    rc, _, err = finish(client(*args))
    assert rc == 0 and "nothing to do" in err
