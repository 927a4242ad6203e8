"""One ComfyUI server over its HTTP API (standard library only), and its websocket when websocket-client is there.

Endpoints used: ``GET /object_info``, ``GET /queue``, ``POST /prompt`` (with our ``client_id`` and our own
``prompt_id``, so a prompt is known even when the answer to the POST is lost), ``GET /history/{id}``,
``GET /view``, ``POST /upload/image``, ``POST /queue`` (delete), ``POST /interrupt`` and ``GET /ws``.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import queue
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import PromptRejected, ServerError, ServerUnreachable

try:  # optional: the ``batch`` extra; without it progress comes from polling /history
    import websocket as _websocket
except ImportError:  # pragma: no cover - depends on the environment
    _websocket = None

HAVE_WEBSOCKET = _websocket is not None and hasattr(_websocket, "create_connection")
DEFAULT_PORT = 8188


def parse_address(address: str) -> tuple[str, str, int]:
    """``host:port`` (or a URL) -> (scheme, host, port); the port defaults to ComfyUI's 8188."""
    text = address.strip()
    if not text:
        raise ValueError("--server: empty address (expected host:port, e.g. 127.0.0.1:8188)")
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--server {address!r}: expected host:port or http(s)://host:port")
    try:
        port = parts.port or (DEFAULT_PORT if parts.scheme == "http" else 443)
    except ValueError:
        raise ValueError(f"--server {address!r}: the port is not a number between 0 and 65535") from None
    return parts.scheme, parts.hostname, port


def format_prompt_error(body: Mapping[str, Any]) -> str:
    """One line from a ``/prompt`` 400 answer: the error and each node error with its details."""
    error = body.get("error") or {}
    head = error.get("message", "prompt refused") if isinstance(error, dict) else str(error)
    details = error.get("details") if isinstance(error, dict) else None
    parts = []
    for nid, info in sorted((body.get("node_errors") or {}).items()):
        for e in info.get("errors", []):
            name = (e.get("extra_info") or {}).get("input_name")
            what = e.get("message") or e.get("details") or e.get("type", "error")
            details = e.get("details")
            if details and details not in (name, what):
                what += f" ({details})"
            parts.append(f"node {nid} ({info.get('class_type', '?')})" + (f" {name}" if name else "") + f": {what}")
    if parts:
        return f"{head}: " + "; ".join(parts)
    return f"{head}: {details}" if details else head


def history_error(entry: Mapping[str, Any]) -> str | None:
    """The error of a finished prompt from its ``/history`` entry, or ``None`` when it succeeded."""
    status = entry.get("status") or {}
    if status.get("status_str", "success") == "success" and status.get("completed", True):
        return None
    for event, data in status.get("messages") or []:
        if event == "execution_error":
            return (f"{data.get('node_type', '?')} (node {data.get('node_id', '?')}): "
                    f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}")
        if event == "execution_interrupted":
            return f"interrupted on the server at node {data.get('node_id', '?')} ({data.get('node_type', '?')})"
    return f"the server reports status {status.get('status_str')!r}"


def output_images(entry: Mapping[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """``(node_id, index, image_ref)`` for each saved image of a ``/history`` entry (previews only when no
    node saved anything), in node id order."""
    saved, temp = [], []
    for nid in sorted(entry.get("outputs") or {}, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n)):
        for i, ref in enumerate((entry["outputs"][nid] or {}).get("images") or []):
            (saved if ref.get("type", "output") == "output" else temp).append((nid, i, ref))
    return saved or temp


class ComfyClient:
    """HTTP calls to one ComfyUI server; connection failures raise :class:`ServerUnreachable`."""

    def __init__(self, address: str, timeout: float = 30.0):
        self.scheme, self.host, self.port = parse_address(address)
        self.timeout = timeout
        self.label = f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"ComfyClient({self.label!r})"

    def request(self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> tuple[int, bytes]:
        """One HTTP request; returns (status, body)."""
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout or self.timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, socket.timeout):
                reason = "timed out"
            else:
                reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise ServerUnreachable(f"ComfyUI at {self.label} did not answer {method} {path.split('?')[0]}: "
                                    f"{reason}") from None
        finally:
            conn.close()

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        status, data = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"ComfyUI at {self.label}: GET {path} answered HTTP {status}")
        try:
            return json.loads(data)
        except json.JSONDecodeError:
            raise ServerError(f"{self.label}: GET {path} did not return JSON; is this a ComfyUI server?") from None

    def post_json(self, path: str, payload: Any) -> tuple[int, bytes]:
        return self.request("POST", path, json.dumps(payload).encode("utf-8"), {"Content-Type": "application/json"})

    # ------------------------------------------------------------------------------------------- API

    def object_info(self) -> dict[str, Any]:
        """``/object_info``: every node type the server can run, with its inputs."""
        info = self.get_json("/object_info", timeout=max(self.timeout, 60.0))
        if not isinstance(info, dict):
            raise ServerError(f"{self.label}: /object_info is not a JSON object; is this a ComfyUI server?")
        return info

    def queue(self) -> tuple[list[str], list[str]]:
        """Prompt ids (running, pending) in the server's queue, all clients included."""
        q = self.get_json("/queue")
        return ([str(item[1]) for item in q.get("queue_running", [])],
                [str(item[1]) for item in q.get("queue_pending", [])])

    def submit(self, prompt: Mapping[str, Any], client_id: str, prompt_id: str | None = None) -> str:
        """Queue an API-format prompt; returns its id. A refused prompt raises :class:`PromptRejected`."""
        prompt_id = prompt_id or str(uuid.uuid4())
        status, data = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id})
        try:
            body = json.loads(data) if data else {}
        except json.JSONDecodeError:
            body = {}
        if status == 400:
            raise PromptRejected(format_prompt_error(body), body.get("node_errors"))
        if status != 200:
            raise ServerError(f"{self.label}: POST /prompt answered HTTP {status}: {data[:200]!r}")
        return str(body.get("prompt_id", prompt_id))

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The ``/history`` entry of a finished prompt, or ``None`` while it is queued or running."""
        h = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        return h.get(prompt_id) if isinstance(h, dict) else None

    def view(self, ref: Mapping[str, Any]) -> bytes:
        """The bytes of an output image (``{"filename", "subfolder", "type"}`` from the history)."""
        query = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                        "type": ref.get("type", "output")})
        status, data = self.request("GET", f"/view?{query}", timeout=max(self.timeout, 120.0))
        if status != 200:
            raise ServerError(f"{self.label}: /view of {ref.get('filename')} answered HTTP {status}")
        return data

    def upload_image(self, path: str, name: str, subfolder: str = "") -> str:
        """Upload a local image to the server's input folder; returns the value image loaders take."""
        with open(path, "rb") as f:
            return self.upload_bytes(f.read(), name, subfolder)

    def upload_bytes(self, content: bytes, name: str, subfolder: str = "") -> str:
        """Upload image file bytes as ``name`` to the server's input folder; returns what image loaders take."""
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        fields = {"type": "input", "subfolder": subfolder, "overwrite": "true"}
        body = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        ) + (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
             f"Content-Type: {ctype}\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        status, data = self.request("POST", "/upload/image", body,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"},
                                    timeout=max(self.timeout, 120.0))
        if status != 200:
            raise ServerError(f"{self.label}: uploading {name} answered HTTP {status}")
        answer = json.loads(data)
        sub = answer.get("subfolder") or ""
        return f"{sub}/{answer['name']}" if sub else answer["name"]

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop the running prompt (only ``prompt_id`` when given and the server supports targeting)."""
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def delete_queued(self, prompt_ids: Iterable[str]) -> None:
        """Remove pending prompts from the server's queue."""
        ids = list(prompt_ids)
        if ids:
            self.post_json("/queue", {"delete": ids})

    def websocket_url(self, client_id: str) -> str:
        scheme = "wss" if self.scheme == "https" else "ws"
        return f"{scheme}://{self.host}:{self.port}/ws?clientId={urllib.parse.quote(client_id)}"


class EventListener(threading.Thread):
    """Reads one server's websocket and puts ``(server_index, type, data)`` on ``events``.

    Besides ComfyUI's messages (``progress``, ``executing``, ``execution_error``, ...) it reports
    ``_ws_lost`` when the connection closed and could not be re-opened, which the runner takes as a sign
    to check whether the server is still there.
    """

    def __init__(self, index: int, client: ComfyClient, client_id: str, events: queue.Queue, retries: int = 3):
        super().__init__(name=f"sd35-batch-ws-{client.label}", daemon=True)
        if not HAVE_WEBSOCKET:
            raise RuntimeError("websocket-client is not installed")
        self.index = index
        self.client = client
        self.url = client.websocket_url(client_id)
        self.events = events
        self.retries = retries
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        ws_mod = _websocket
        failures = 0
        while not self._stop_event.is_set():
            try:
                ws = ws_mod.create_connection(self.url, timeout=5)
            except Exception as e:  # any failure to connect counts the same
                failures += 1
                if failures >= self.retries:
                    self.events.put((self.index, "_ws_lost", str(e) or type(e).__name__))
                    return
                self._stop_event.wait(0.3 * failures)
                continue
            failures = 0
            ws.settimeout(0.5)
            try:
                while not self._stop_event.is_set():
                    try:
                        msg = ws.recv()
                    except ws_mod.WebSocketTimeoutException:
                        continue
                    if not isinstance(msg, str) or not msg:
                        continue  # binary frames are latent previews
                    try:
                        data = json.loads(msg)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(data, dict):
                        self.events.put((self.index, data.get("type"), data.get("data") or {}))
            except Exception:  # closed or broken: reconnect (or report) above
                failures += 1
                time.sleep(0.1)
            finally:
                try:
                    ws.close()
                except Exception:
                    pass
