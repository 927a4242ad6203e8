"""`sd35 batch --engine ray`: rows rendered by sd35_core in a pool of Ray actors, on a local Ray (2 CPUs).

Specification points checked here: each row's image is byte for byte the PNG `sd35 generate` writes for the
same prompt, seed and settings (row overrides included); a worker killed mid-row is replaced and every row
still ends in the manifest exactly once; Ctrl-C stops with a resumable manifest and a rerun does the rest,
none twice; a row without its control image is recorded as failed while the others finish; without Ray the
command says how to install it. One Ray session serves the whole module (starting Ray costs seconds).
"""

import json
import os
import signal
import threading
import time
from collections import Counter

import pytest

from sd35_cli.batch.ray_engine.session import plan_workers
from sd35_cli.main import main
from tests.conftest import IMAGES, TOKENIZERS

ray = pytest.importorskip("ray", reason="the ray extra (pip install -e '.[ray]') is needed for --engine ray")

PLAIN_ROWS = [f"prompt number {i}: a small {c} house" for i, c in enumerate(
    ["red", "blue", "green", "white", "black", "grey", "pink", "brown", "gold", "teal"])]
OVERRIDE = {"steps": 3, "cfg": 2.5, "negative": "blurry, dark"}  # row 10 overrides these
SEED = 100
INIT = os.path.join(IMAGES, "blur.png")


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    """A mask PNG: white (repaint) in the middle, black (keep) around it."""
    from PIL import Image, ImageDraw

    path = tmp_path_factory.mktemp("mask") / "mask.png"
    img = Image.new("L", (64, 48), 0)
    ImageDraw.Draw(img).rectangle((16, 12, 47, 35), fill=255)
    img.save(path)
    return str(path)


@pytest.fixture(scope="module")
def ray_session():
    from sd35_cli.batch.ray_engine import connect

    assert connect(num_cpus=2), "a Ray session was already running in the test process"
    yield
    ray.shutdown()


def common_model_args(tiny_models, model="sd3.5_medium"):
    return ["--model", tiny_models.checkpoints[model],
            "--model_folder", os.path.dirname(tiny_models.text_encoders["clip_l"]),
            "--tokenizers", TOKENIZERS, "--width", "64", "--height", "48", "--steps", "2", "--device", "cpu"]


def twelve_rows(path, mask):
    """Ten plain rows, one overriding steps / cfg / negative, one inpainting an init image under a mask."""
    rows = [{"prompt": p, "seed": SEED + i} for i, p in enumerate(PLAIN_ROWS)]
    rows.append({"prompt": "an override row", "seed": SEED + 10, **OVERRIDE})
    rows.append({"prompt": "an inpainted row", "seed": SEED + 11, "init_image": INIT, "mask_image": mask,
                 "denoise": 0.75})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def batch(tiny_models, prompts, out, *extra, workers=2):
    # One CPU per worker (so one torch thread, as in the test process): two threads on the shared two-core CI
    # machine mostly wait for each other.
    return main(["batch", "--engine", "ray", "-p", str(prompts), "-o", str(out), "--workers", str(workers),
                 "--cpus-per-worker", "1", *common_model_args(tiny_models), *extra])


def job_records(out):
    with open(os.path.join(out, "manifest.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r["type"] == "job"], [r for r in records if r["type"] == "requeued"]


@pytest.fixture(scope="module")
def generated(tiny_models, tmp_path_factory, mask_file):
    """`sd35 generate`'s PNG bytes for the twelve rows (seeds SEED+i; rows 10 and 11 with their options)."""
    tmp = tmp_path_factory.mktemp("generate")
    plain = tmp / "plain.txt"
    plain.write_text("\n".join(PLAIN_ROWS) + "\n")
    args = ["generate", *common_model_args(tiny_models), "--out_dir", str(tmp), "--seed_type", "roll"]
    assert main([*args, "--prompt", str(plain), "--seed", str(SEED), "--postfix", "_plain"]) == 0
    assert main([*args, "--prompt", "an override row", "--seed", str(SEED + 10), "--postfix", "_over",
                 "--steps", "3", "--cfg", "2.5", "--negative_prompt", "blurry, dark"]) == 0
    assert main([*args, "--prompt", "an inpainted row", "--seed", str(SEED + 11), "--postfix", "_mask",
                 "--init_image", INIT, "--mask", mask_file, "--denoise", "0.75"]) == 0
    files = []
    for postfix, count in (("_plain", 10), ("_over", 1), ("_mask", 1)):
        folder = next(p for p in tmp.rglob(f"*{postfix}") if p.is_dir())
        files += [folder / f"{i:06d}.png" for i in range(count)]
    return [f.read_bytes() for f in files]


def test_rows_are_the_images_sd35_generate_makes(ray_session, tiny_models, generated, mask_file, tmp_path, capsys):
    prompts = tmp_path / "rows.jsonl"
    twelve_rows(prompts, mask_file)
    assert batch(tiny_models, prompts, tmp_path / "out") == 0
    jobs, requeued = job_records(tmp_path / "out")
    assert [r["status"] for r in jobs] == ["done"] * 12 and not requeued
    assert sorted(r["job"] for r in jobs) == sorted(f"{i}:0" for i in range(12))
    for i in range(12):
        name = f"{i:05d}_{SEED + i}_sd35_0.png"
        assert (tmp_path / "out" / name).read_bytes() == generated[i], f"row {i} differs from sd35 generate"
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".part")]

    # The same command again finds everything done and starts no worker.
    assert batch(tiny_models, prompts, tmp_path / "out") == 0
    assert "nothing to do: all 12 image(s) are done" in capsys.readouterr().err
    assert len(job_records(tmp_path / "out")[0]) == 12


def _parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _ours(pid):
    """Whether ``pid`` descends from this test process (the local Ray it started), not another Ray's worker."""
    try:
        while pid > 1:
            pid = _parent(pid)
            if pid == os.getpid():
                return True
    except OSError:
        pass
    return False


def _rendering_workers():
    """PIDs of this session's Ray workers busy in RowWorker.render (Ray names a worker after its running task)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::RowWorker.render") and _ours(int(entry)):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _when(out, done_rows, action, stop):
    """Run ``action()`` (once) as soon as the manifest in ``out`` lists ``done_rows`` finished rows."""
    def watch():
        path = os.path.join(out, "manifest.jsonl")
        while not stop.is_set():
            try:
                with open(path) as f:
                    done = sum(1 for line in f if '"status": "done"' in line)
            except OSError:
                done = 0
            if done >= done_rows and action():
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_worker_killed_mid_row_is_replaced_and_every_row_ends_once(ray_session, tiny_models, generated, mask_file,
                                                                      tmp_path, capsys):
    prompts = tmp_path / "rows.jsonl"
    twelve_rows(prompts, mask_file)
    out = tmp_path / "out"
    killed = []

    def kill_one():
        pids = _rendering_workers()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        return bool(pids)

    stop = threading.Event()
    watcher = _when(str(out), 2, kill_one, stop)
    try:
        rc = batch(tiny_models, prompts, out)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was caught rendering"
    assert rc == 0, capsys.readouterr().err
    jobs, requeued = job_records(out)
    assert Counter(r["job"] for r in jobs) == Counter(f"{i}:0" for i in range(12))  # each row exactly once
    assert all(r["status"] == "done" for r in jobs)
    assert len(requeued) == 1 and "died" in requeued[0]["reason"]
    redone = next(r for r in jobs if r["job"] == requeued[0]["job"])
    assert redone["server"] != requeued[0]["server"]  # finished by the replacement
    for i in range(12):
        assert (out / f"{i:05d}_{SEED + i}_sd35_0.png").read_bytes() == generated[i]
    assert "replaces it" in capsys.readouterr().err


def test_ctrl_c_stops_cleanly_and_a_rerun_does_the_rest_none_twice(ray_session, tiny_models, generated, mask_file,
                                                                    tmp_path, capsys):
    import _thread

    prompts = tmp_path / "rows.jsonl"
    twelve_rows(prompts, mask_file)
    out = tmp_path / "out"
    stop = threading.Event()
    watcher = _when(str(out), 3, lambda: _thread.interrupt_main(signal.SIGINT) or True, stop)
    # A test run started in the background (`cmd &`, nohup) inherits SIGINT ignored, and interrupt_main then
    # does nothing: handle it as an interactive Python does.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert batch(tiny_models, prompts, out, workers=1) == 130
    finally:
        signal.signal(signal.SIGINT, inherited)
        stop.set()
        watcher.join()
    err = capsys.readouterr().err
    assert "interrupted with" in err and "rerun the same command to resume" in err
    first, _ = job_records(out)
    assert 3 <= len(first) < 12
    assert not [p for p in os.listdir(out) if p.endswith(".part")]

    assert batch(tiny_models, prompts, out, workers=1) == 0
    assert f"resuming: {len(first)} of 12 image(s) already done" in capsys.readouterr().err
    jobs, _ = job_records(out)
    assert Counter(r["job"] for r in jobs) == Counter(f"{i}:0" for i in range(12))  # the rest, none twice
    for i in range(12):
        assert (out / f"{i:05d}_{SEED + i}_sd35_0.png").read_bytes() == generated[i]


def test_a_row_without_its_control_image_fails_while_the_others_finish(ray_session, tiny_models, tmp_path, capsys):
    not_an_image = tmp_path / "broken.png"
    not_an_image.write_text("this is not a picture")
    canny = os.path.join(IMAGES, "canny.png")
    rows = [{"prompt": "edges of a cup", "control_image": canny},
            {"prompt": "no control image at all"},
            {"prompt": "edges of a chair", "control_image": str(not_an_image)},
            {"prompt": "edges of a lamp", "control_image": canny, "seed": 9}]
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = main(["batch", "--engine", "ray", "-p", str(prompts), "-o", str(out), "--workers", "1",
               "--cpus-per-worker", "1", "--seed", "5",
               *common_model_args(tiny_models, "sd3.5_large"),
               "--controlnet_ckpt", tiny_models.controlnets["canny"]])
    err = capsys.readouterr().err
    assert rc == 1 and "2 image(s) made, 2 failed" in err
    jobs, _ = job_records(out)
    status = {r["row"]: r for r in jobs}
    assert len(jobs) == 4 and sorted(status) == [0, 1, 2, 3]
    assert [status[i]["status"] for i in range(4)] == ["done", "error", "error", "done"]
    assert "no control image" in status[1]["error"]
    assert "broken.png" in status[2]["error"] or "cannot identify image" in status[2]["error"]
    assert (out / "00000_5_sd35_0.png").is_file() and (out / "00003_9_sd35_0.png").is_file()


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, tiny_models, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # what `import ray` sees when it is not installed
    assert batch(tiny_models, prompts, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "needs Ray, which is not installed" in err and 'pip install -e ".[ray]"' in err
    assert not (tmp_path / "out").exists()


def test_workers_default_to_one_per_gpu_or_one_on_cpus():
    assert plan_workers({"CPU": 16, "GPU": 4}, None, None, None, None) == (4, 1.0, 1.0)
    assert plan_workers({"CPU": 16, "GPU": 4}, None, None, 0.5, None) == (8, 1.0, 0.5)
    assert plan_workers({"CPU": 16, "GPU": 4}, None, None, None, "cpu") == (1, 16.0, 0.0)
    assert plan_workers({"CPU": 8}, 2, None, None, None) == (2, 4.0, 0.0)


@pytest.mark.parametrize("extra, message", [
    (("--workflow", "wf.json"), "not --workflow or --server"),
    (("--map", "style=Node.text"), "--engine ray has no workflow"),
    (("--controlnet_cond_image", "x.png"), "needs --controlnet_ckpt"),
])
def test_options_that_do_not_fit_the_ray_engine_are_refused(tiny_models, tmp_path, capsys, extra, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert batch(tiny_models, prompts, tmp_path / "out", *extra) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_sd35_generate_option_is_taken_by_the_ray_engine_or_decided_by_the_batch():
    from sd35_cli.batch.cli import RAY_GENERATE_OPTIONS, RAY_NOT_GENERATE_OPTIONS
    from sd35_cli.generate import GenerateOptions

    assert sorted(RAY_GENERATE_OPTIONS + RAY_NOT_GENERATE_OPTIONS) == sorted(GenerateOptions.__dataclass_fields__)


def test_ray_options_are_refused_by_the_comfyui_engine(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["batch", "-w", "wf.json", "-p", str(prompts), "-o", str(tmp_path / "out"),
                 "--model", "m.safetensors"]) == 1
    assert "--model is an option of --engine ray" in capsys.readouterr().err
