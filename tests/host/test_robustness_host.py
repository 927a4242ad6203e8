"""Nothing lost under load: a soak, two concurrent clients, interrupts inside the VAE and the ControlNet encode,
and checkpoint files that change on disk between prompts, all through a real ComfyUI server.

Needs ``COMFYUI_PATH`` (skipped, visibly, without it); the server is conftest.py's ``server`` fixture with the tiny
model set, so a run stays in CI's time (tiny models, 32-pixel images, one or two steps).
"""

import os
import shutil
import threading

import numpy as np
import pytest

from .comfyui_server import COMFYUI_PATH
from .graphs import LARGE, MEDIUM, SD3, assert_success, controlnet_graph, decode_only_graph, quick_graph

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the real-ComfyUI host tests need a ComfyUI checkout"
)
pytest.importorskip("websocket", reason="websocket-client is needed to follow ComfyUI's progress")

SOAK_PROMPTS = 100
SOAK_MEMORY_GROWTH = 0.05  # resident memory may grow by less than this after the first round
FOLLOW_TIMEOUT = 900


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def soak_graph(i: int) -> dict:
    """Prompt ``i`` of the soak: the three checkpoints and a ControlNet run in turn, each with its own seed, so
    every prompt samples and the loader caches (one checkpoint at a time) and ComfyUI's model management evict."""
    prefix = f"soak_{i:03d}"
    kind = i % 4
    if kind == 3:
        return controlnet_graph(prefix, seed=i, steps=1)
    g = quick_graph(prefix, seed=i, steps=1)
    g["1"]["inputs"]["ckpt_name"] = (MEDIUM, LARGE, SD3)[kind]
    return g


def assert_each_served_once(server, results: dict, prompt_ids: dict, size=(32, 32)):
    """Every prompt ended once, successfully, and /history + /view serve exactly its own image."""
    for prefix, prompt_id in prompt_ids.items():
        entry = results[prompt_id]
        assert entry["error"] is None and entry["interrupted"] is None, (prefix, entry, server.log()[-3000:])
        assert entry["ends"] == 1 and entry["success"] == 1, (prefix, entry)
        outputs = server.get_json(f"/history/{prompt_id}")[prompt_id]["outputs"]
        names = [img["filename"] for out in outputs.values() for img in out.get("images", [])]
        assert len(names) == 1 and names[0].startswith(prefix + "_"), (prefix, names)
        (image,) = server.images(prompt_id)
        assert image.shape == (*size, 3)


def queue_and_follow(server, graphs: dict) -> tuple[dict, dict]:
    client = server.client()
    try:
        prompt_ids = {prefix: client.queue(g) for prefix, g in graphs.items()}
        return client.follow_all(list(prompt_ids.values()), FOLLOW_TIMEOUT), prompt_ids
    finally:
        client.close()


def test_soak_of_100_prompts_over_three_checkpoints_and_a_controlnet(server):
    first_round = {f"soak_{i:03d}": soak_graph(i) for i in range(4)}
    results, ids = queue_and_follow(server, first_round)
    assert_each_served_once(server, results, ids)
    after_first_round = resident_bytes(server.proc.pid)

    rest = {f"soak_{i:03d}": soak_graph(i) for i in range(4, SOAK_PROMPTS)}
    results, rest_ids = queue_and_follow(server, rest)
    assert_each_served_once(server, results, rest_ids)
    at_end = resident_bytes(server.proc.pid)
    growth = at_end / after_first_round - 1
    assert growth < SOAK_MEMORY_GROWTH, (
        f"resident memory grew by {growth:.1%} over {SOAK_PROMPTS - 4} prompts "
        f"({after_first_round / 2**20:.0f} MiB -> {at_end / 2**20:.0f} MiB)")
    # Each checkpoint change went back to the disk: the loader cache holds one checkpoint, and none was lost.
    log = server.log()
    assert all(log.count(f"sd35: loaded {name}") >= SOAK_PROMPTS // 4 - 1 for name in (MEDIUM, SD3))


def test_two_clients_queueing_twenty_prompts_each_at_once(server):
    clients = [server.client(), server.client()]
    queued: list[dict] = [{}, {}]
    seen: list[dict] = [{}, {}]
    errors = []

    def work(k: int):
        try:
            for i in range(20):
                prefix = f"client{k}_{i:02d}"
                queued[k][prefix] = clients[k].queue(quick_graph(prefix, seed=1000 * k + i, steps=1))
            seen[k] = clients[k].follow_all(list(queued[k].values()), FOLLOW_TIMEOUT)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(FOLLOW_TIMEOUT + 60)
    finally:
        for c in clients:
            c.close()
    assert not errors, errors
    for k in range(2):
        # Each client hears about its own prompts only, and each of them ended once with its own image.
        assert set(seen[k]) == set(queued[k].values()), f"client {k} saw other prompts"
        assert_each_served_once(server, seen[k], queued[k])
    assert len({pid for q in queued for pid in q.values()}) == 40


def test_interrupt_during_a_tiled_vae_decode_and_the_next_prompt_runs(server):
    interrupted = []

    def interrupt_at_first_tile(progress):
        if progress.get("node") == "30" and not interrupted:
            server.post("/interrupt", {})
            interrupted.append(progress["value"])

    result = server.run(decode_only_graph("decode_interrupted", size=256), on_progress=interrupt_at_first_tile)
    assert interrupted, "the decode reported no tile before it ended"
    assert result["interrupted"] is not None and result["interrupted"]["node_type"] == "SD35VAEDecode", result
    assert result["error"] is None
    tiles = [(v, m) for v, m in result["progress"] if v < m]
    assert tiles, "the decode ran to its last tile"
    outputs = server.get_json(f"/history/{result['prompt_id']}")[result["prompt_id"]]["outputs"]
    assert not any(out.get("images") for out in outputs.values()), "an image was saved after the interrupt"
    after = server.run(decode_only_graph("decode_after_interrupt", size=64))
    assert_success(after, server)
    (image,) = server.images(after["prompt_id"])
    assert image.shape == (64, 64, 3)


def test_interrupt_during_controlnet_encoding_and_the_next_prompt_runs(server):
    interrupted = []

    def interrupt_when_the_sampler_starts(data):
        # The sampler encodes the control image before its first step.
        if data["node"] == "20" and not interrupted:
            server.post("/interrupt", {})
            interrupted.append(True)

    result = server.run(controlnet_graph("cn_interrupted", seed=3, steps=2, size=256),
                        on_executing=interrupt_when_the_sampler_starts)
    assert interrupted
    assert result["interrupted"] is not None and result["interrupted"]["node_type"] == "SD35Sampler", result
    assert result["error"] is None
    assert result["progress"] == [], "sampling began: the interrupt was not honoured during the encode"
    after = server.run(controlnet_graph("cn_after_interrupt", seed=3, steps=2))
    assert_success(after, server)
    (image,) = server.images(after["prompt_id"])
    assert image.shape == (32, 32, 3)


def test_a_checkpoint_replaced_on_disk_between_prompts_is_loaded_afresh(server):
    folder = os.path.join(server.models.root, "checkpoints")
    swap = os.path.join(folder, "swap.safetensors")
    shutil.copy(os.path.join(folder, LARGE), swap)

    def run(ckpt, prefix):
        g = quick_graph(prefix, seed=5)
        g["1"]["inputs"]["ckpt_name"] = ckpt
        result = server.run(g)
        assert_success(result, server)
        return server.images(result["prompt_id"])[0]

    before = run("swap.safetensors", "swap_before")
    assert np.array_equal(before, run(LARGE, "large_direct"))
    # Same name, new content: written beside it and renamed over it, as a download manager does.
    shutil.copy(os.path.join(folder, SD3), swap + ".part")
    os.replace(swap + ".part", swap)
    after = run("swap.safetensors", "swap_after")
    assert np.array_equal(after, run(SD3, "sd3_direct"))
    assert not np.array_equal(after, before)
    assert server.log().count("sd35: loaded swap.safetensors (SD3 Medium)") == 1


def test_a_checkpoint_deleted_between_prompts_is_a_clear_error_and_the_server_keeps_serving(server):
    folder = os.path.join(server.models.root, "checkpoints")
    doomed = os.path.join(folder, "doomed.safetensors")
    shutil.copy(os.path.join(folder, LARGE), doomed)
    g = quick_graph("doomed_before", seed=6)
    g["1"]["inputs"]["ckpt_name"] = "doomed.safetensors"
    assert_success(server.run(g), server)
    os.remove(doomed)
    g = quick_graph("doomed_after", seed=7)
    g["1"]["inputs"]["ckpt_name"] = "doomed.safetensors"
    try:
        result = server.run(g)
    except AssertionError as rejected:  # ComfyUI's own check of the file list, before anything runs
        message = str(rejected)
        assert "doomed.safetensors" in message and "ckpt_name" in message, message
    else:
        error = result["error"]
        assert error is not None and error["node_type"] == "SD35CheckpointLoader", result
        assert "doomed.safetensors" in error["exception_message"], error
    assert_success(server.run(quick_graph("after_doomed", seed=8)), server)


def test_a_checkpoint_with_nan_weights_is_a_sampler_error_and_the_server_keeps_serving(server):
    from safetensors.torch import load_file, save_file

    folder = os.path.join(server.models.root, "checkpoints")
    state = load_file(os.path.join(folder, LARGE))
    state["model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"][0, 0] = float("nan")  # a broken merge
    save_file(state, os.path.join(folder, "nan.safetensors"))
    g = quick_graph("nan", seed=11)
    g["1"]["inputs"]["ckpt_name"] = "nan.safetensors"
    result = server.run(g)
    error = result["error"]
    assert error is not None and error["node_type"] == "SD35Sampler", result
    assert error["exception_type"].endswith("NonFiniteError"), error
    message = error["exception_message"]
    assert "step 1 of 2 holds NaN" in message and "weights float32" in message and "bf16 or fp32" in message, message
    history = server.get_json(f"/history/{result['prompt_id']}")[result["prompt_id"]]
    assert not any(out.get("images") for out in history["outputs"].values()), "an image was saved"
    assert_success(server.run(quick_graph("after_nan", seed=11)), server)
