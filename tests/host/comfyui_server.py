"""Starting a real ComfyUI with this pack, for the host tests (plain code; the fixtures are in conftest.py).

``COMFYUI_PATH`` names the ComfyUI checkout (the host test modules skip, visibly, without it). The server runs
with ``COMFYUI_PYTHON`` if set, else the first existing ``bin/python`` of ``<COMFYUI_PATH>/venv``,
``<COMFYUI_PATH>/.venv``, ``<COMFYUI_PATH>/../comfy-venv`` or ``<COMFYUI_PATH>/../../comfy-venv``, else this Python.
Each server starts on a free loopback port with ``--cpu``, a temporary base directory whose ``custom_nodes`` holds a
symlink to this pack, and models from a temporary folder given by ``--extra-model-paths-config``. The ComfyUI
checkout itself is not modified.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence

import numpy as np

from ..shared import ROOT, SHARED  # noqa: F401  (re-exported for the host tests)

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
PACK_DIR = "comfyui_sd35"  # the folder name the pack gets in the server's custom_nodes
START_TIMEOUT = 180
RUN_TIMEOUT = 120
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "controlnet", "loras", "clip_vision",
                 "ipadapter")


def comfyui_python() -> str:
    """The Python that runs ComfyUI (see the module docstring for the search order)."""
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    comfy = os.path.abspath(COMFYUI_PATH)
    parent, grandparent = os.path.dirname(comfy), os.path.dirname(os.path.dirname(comfy))
    for venv in (os.path.join(comfy, "venv"), os.path.join(comfy, ".venv"), os.path.join(parent, "comfy-venv"),
                 os.path.join(grandparent, "comfy-venv")):
        python = os.path.join(venv, "bin", "python")
        if os.path.exists(python):
            return python
    return sys.executable


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_models_yaml(path, models_root) -> None:
    """An ``--extra-model-paths-config`` file that points ComfyUI's model folders into ``models_root``."""
    with open(path, "w") as f:
        f.write(
            "sd35_tiny:\n"
            f"    base_path: {models_root}\n"
            + "".join(f"    {folder}: {folder}\n" for folder in MODEL_FOLDERS)
        )


def launch_comfyui(base, models_yaml, port: int, log_path: str, extra_args: Sequence[str] = ()) -> subprocess.Popen:
    """Start ComfyUI on ``port`` with base directory ``base`` (this pack linked into its ``custom_nodes``).

    Its output goes to ``log_path``. The ``SD35_*`` variables are dropped so the pack finds its tokenizers and
    models through ComfyUI, as it would for a user.
    """
    os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
    os.symlink(ROOT, os.path.join(base, "custom_nodes", PACK_DIR))
    cmd = [comfyui_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--extra-model-paths-config", str(models_yaml),
           "--database-url", "sqlite:///:memory:", "--disable-auto-launch", *extra_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD35_")}
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_until_ready(proc: subprocess.Popen, probe: Callable[[], object], deadline: float,
                     log_tail: Callable[[], str]) -> None:
    """Call ``probe`` until it stops raising OSError; fail with the log if ComfyUI exits or ``deadline`` passes."""
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"ComfyUI exited with {proc.returncode}; log:\n{log_tail()}")
        try:
            probe()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"ComfyUI did not start in {START_TIMEOUT}s; log:\n{log_tail()}") from None
            time.sleep(0.5)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a ComfyUI this code started (by its handle), killing it if it does not exit in 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    """A running ComfyUI: HTTP helpers and a websocket that follows one prompt at a time."""

    def __init__(self, proc: subprocess.Popen, port: int, base: str, models, log_path: str):
        self.proc, self.port, self.base, self.models, self.log_path = proc, port, base, models, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = uuid.uuid4().hex
        self.ws = None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def connect(self):
        # Imported here so that importing this module never needs websocket-client; the test modules that
        # use a Server skip, visibly, without it.
        import websocket

        self.ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                              timeout=RUN_TIMEOUT)

    def queue(self, prompt: dict) -> str:
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"prompt rejected: {e.read().decode(errors='replace')}") from None

    def follow(self, prompt_id: str, on_progress=None, on_executing=None) -> dict:
        """Websocket events of one prompt until it finishes: status, progress, previews, error, interrupted.

        ``on_progress(data)`` and ``on_executing(data)`` are called with each progress event and each "now
        executing node" event of the prompt."""
        result = {"status": None, "progress": [], "previews": 0, "error": None, "interrupted": None}
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            msg = self.ws.recv()
            if isinstance(msg, bytes):
                result["previews"] += 1
                continue
            msg = json.loads(msg)
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            kind = msg["type"]
            if kind == "progress":
                result["progress"].append((data["value"], data["max"]))
                if on_progress is not None:
                    on_progress(data)
            elif kind == "execution_error":
                result["error"] = data
            elif kind == "execution_interrupted":
                result["interrupted"] = data
            elif kind == "execution_success":
                result["status"] = "success"
            elif kind == "executing" and data.get("node") is not None:
                if on_executing is not None:
                    on_executing(data)
            elif kind == "executing" and data.get("prompt_id") == prompt_id:
                if result["status"] is None:
                    ended = "error" if result["error"] else "interrupted" if result["interrupted"] else "done"
                    result["status"] = ended
                return result
        raise AssertionError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT}s; log:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, **kw) -> dict:
        prompt_id = self.queue(prompt)
        result = self.follow(prompt_id, **kw)
        result["prompt_id"] = prompt_id
        return result

    def client(self) -> "Client":
        """Another API client of this server: its own client id and websocket (the caller closes it)."""
        client = Client(self.port)
        client.connect()
        return client

    def images(self, prompt_id: str) -> list[np.ndarray]:
        """The saved images of a finished prompt, fetched through /history and /view, as uint8 arrays."""
        from io import BytesIO

        from PIL import Image

        history = self.get_json(f"/history/{prompt_id}")[prompt_id]
        arrays = []
        for output in history["outputs"].values():
            for img in output.get("images", []):
                query = urllib.parse.urlencode({k: img[k] for k in ("filename", "subfolder", "type")})
                png = self.get(f"/view?{query}")
                arrays.append(np.asarray(Image.open(BytesIO(png)).convert("RGB")))
        return arrays

    def close(self) -> None:
        """Close the websocket and stop the ComfyUI process."""
        if self.ws is not None:
            self.ws.close()
        stop_process(self.proc)


class Client:
    """One more API client: a client id, its websocket, and the prompts it queued.

    ComfyUI sends a prompt's progress and execution events only to the websocket of the client that queued it;
    :meth:`follow_all` collects them for many prompts at once, so a test can check that each of its prompts ended
    exactly once and that no other client's prompt showed up here.
    """

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.client_id = uuid.uuid4().hex
        self.ws = None

    def connect(self) -> None:
        import websocket

        self.ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                              timeout=RUN_TIMEOUT)

    def queue(self, prompt: dict) -> str:
        req = urllib.request.Request(self.url + "/prompt",
                                     json.dumps({"prompt": prompt, "client_id": self.client_id}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"prompt rejected: {e.read().decode(errors='replace')}") from None

    def follow_all(self, prompt_ids: Sequence[str], timeout: float) -> dict[str, dict]:
        """Events of every prompt this websocket hears about until all of ``prompt_ids`` have ended:
        ``{prompt_id: {"ends": n, "success": n, "error": data, "interrupted": data}}`` (prompts not in
        ``prompt_ids`` are recorded too, so a test can assert there are none)."""
        seen: dict[str, dict] = {}
        waiting = set(prompt_ids)
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(waiting)} prompts did not end in {timeout}s")
            msg = self.ws.recv()
            if isinstance(msg, bytes):
                continue  # latent previews
            msg = json.loads(msg)
            data = msg.get("data", {})
            prompt_id = data.get("prompt_id")
            if prompt_id is None:
                continue
            entry = seen.setdefault(prompt_id, {"ends": 0, "success": 0, "error": None, "interrupted": None})
            kind = msg["type"]
            if kind == "execution_success":
                entry["success"] += 1
            elif kind == "execution_error":
                entry["error"] = data
            elif kind == "execution_interrupted":
                entry["interrupted"] = data
            elif kind == "executing" and data.get("node") is None:
                entry["ends"] += 1
                waiting.discard(prompt_id)
        return seen

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


def start_server(base, models) -> Server:
    """Start ComfyUI in the (existing) base directory ``base`` with the tiny model set ``models``; wait until it
    answers and connect its websocket. The caller stops it with ``Server.close()``.

    ``base`` gets ``custom_nodes`` (the pack), ``extra_model_paths.yaml``, ``comfyui.log`` and ``output``; latent
    previews are on (latent2rgb) so progress previews come over the websocket.
    """
    base = str(base)
    yaml = os.path.join(base, "extra_model_paths.yaml")
    write_models_yaml(yaml, models.root)
    port = free_port()
    log_path = os.path.join(base, "comfyui.log")
    proc = launch_comfyui(base, yaml, port, log_path, ["--output-directory", os.path.join(base, "output"),
                                                       "--preview-method", "latent2rgb"])
    srv = Server(proc, port, base, models, log_path)
    try:
        wait_until_ready(proc, lambda: srv.get("/system_stats"), time.monotonic() + START_TIMEOUT,
                         lambda: srv.log()[-5000:])
        srv.connect()
    except BaseException:
        srv.close()
        raise
    return srv
