"""An HTTP proxy in front of a real ComfyUI that can be told to fail the way broken servers do (plain code for the
batch client's host tests).

Modes (``proxy.mode``, changeable while it runs):

* ``"pass"``: every request goes to the ComfyUI behind it and its answer comes back unchanged;
* ``"500"``: ``POST /prompt`` is answered ``500 Internal Server Error`` (everything else still passes), as a server
  whose prompt handling crashed;
* ``"swallow"``: ``POST /prompt`` is accepted (200, the prompt id echoed) but never run: ``/queue`` shows it running
  for ever and ``/history`` never has it, as a server stuck on a node that never returns.

It speaks plain HTTP only, so a websocket to it fails and the batch client follows it by polling. It listens on a
free loopback port and stops with :meth:`close`.
"""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("pass", "500", "swallow")


class FaultyProxy:
    """A proxy to ``127.0.0.1:<target_port>``; ``address`` is where to point the client."""

    def __init__(self, target_port: int, mode: str = "pass"):
        self.target_port = target_port
        self.mode = mode
        self.swallowed: list[dict] = []  # the /prompt bodies accepted in swallow mode
        self.refused = 0  # /prompt requests answered 500
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the tests read the client's output, not ours
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, body: bytes | None) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self._answer(resp.status, resp.read(), resp.getheader("Content-Type") or "application/json")
                finally:
                    conn.close()

            def do_GET(self):
                with proxy._lock:
                    swallowed = list(proxy.swallowed)
                path = self.path.split("?")[0]
                if swallowed and path == "/queue":
                    running = [[i, p["prompt_id"], p["prompt"], {"client_id": p.get("client_id", "")}, []]
                               for i, p in enumerate(swallowed)]
                    return self._answer(200, json.dumps({"queue_running": running[:1],
                                                         "queue_pending": running[1:]}).encode())
                if path.startswith("/history/") and path.rsplit("/", 1)[1] in {p["prompt_id"] for p in swallowed}:
                    return self._answer(200, b"{}")
                self._forward(None)

            def do_POST(self):
                body = self._body()
                if self.path == "/prompt" and proxy.mode == "500":
                    with proxy._lock:
                        proxy.refused += 1
                    return self._answer(500, b"500 Internal Server Error", "text/plain")
                if self.path == "/prompt" and proxy.mode == "swallow":
                    payload = json.loads(body)
                    with proxy._lock:
                        proxy.swallowed.append(payload)
                        number = len(proxy.swallowed)
                    return self._answer(200, json.dumps({"prompt_id": payload["prompt_id"], "number": number,
                                                         "node_errors": {}}).encode())
                if self.path in ("/queue", "/interrupt") and proxy.mode == "swallow":
                    return self._answer(200, b"")  # the stuck server "takes note" and stays stuck
                self._forward(body)

        return Handler
