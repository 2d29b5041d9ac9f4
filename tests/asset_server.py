"""The tests' "internet": an HTTP server on 127.0.0.1 serving generated files (standard library).

- Files at any path, with HTTP Range (206 + Content-Range), or a deliberate cut: the next N answers
  for a path send the full Content-Length header but only the first `cut` bytes, then drop the
  connection (what a flaky network does).
- The Hugging Face hub's public layout for a repository snapshot:
  GET /api/models/{repo}/revision/{rev}?blobs=true -> {"id", "sha", "siblings": [{"rfilename",
  "size", "blobId", "lfs": {"sha256", "size", "pointerSize"}}]}, and
  GET /{repo}/resolve/{commit}/{path} -> the bytes.
- Every request is logged: path, query, Range header, status, body bytes sent.
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AssetServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.json: dict[str, object] = {}
        self.cuts: dict[str, list[int]] = {}  # path -> [cut_at_bytes, times_left]
        self.ignore_range: set[str] = set()
        self.log: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                parsed = urllib.parse.urlsplit(self.path)
                path = urllib.parse.unquote(parsed.path)
                entry = {"path": path, "query": parsed.query, "range": self.headers.get("Range"), "status": None, "sent": 0,
                         "done": False}
                with server._lock:
                    server.log.append(entry)
                if path in server.json:
                    body = json.dumps(server.json[path]).encode()
                    self._send(200, body, {"Content-Type": "application/json"}, entry)
                    return
                data = server.files.get(path)
                if data is None:
                    self._send(404, b"not found", {}, entry)
                    return
                start = 0
                rng = entry["range"]
                if rng and path not in server.ignore_range and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, entry)
                        return
                body = data[start:]
                headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                cut = None
                with server._lock:
                    plan = server.cuts.get(path)
                    if plan and plan[1] > 0:
                        plan[1] -= 1
                        cut = plan[0]
                self._send(206 if start else 200, body, headers, entry, cut=cut)

            def _send(self, status, body, headers, entry, cut=None):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                payload = body if cut is None else body[:cut]
                self.wfile.write(payload)
                self.wfile.flush()
                entry["status"], entry["sent"] = status, len(payload)
                if cut is not None:  # drop the connection half way
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                entry["done"] = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # --------------------------------------------------------------------------------- set-up
    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.base + urllib.parse.quote(path)

    def cut_next(self, path: str, at: int, times: int = 1) -> None:
        self.cuts[path] = [at, times]

    def add_snapshot(self, repo: str, commit: str, files: dict[str, bytes], lfs: set[str],
                     aliases: tuple[str, ...] = ("main",)) -> None:
        siblings = []
        for name, data in files.items():
            sib = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if name in lfs:
                sib["lfs"] = {"sha256": sha256(data), "size": len(data), "pointerSize": 134}
            siblings.append(sib)
            self.files[f"/{repo}/resolve/{commit}/{name}"] = data
        for rev in (commit, *aliases):
            self.json[f"/api/models/{repo}/revision/{rev}"] = {"id": repo, "sha": commit, "siblings": siblings}

    def requests(self, prefix: str = "", settle: float = 5.0) -> list[dict]:
        """Logged requests under `prefix`, once their answers are written (the client may finish first)."""
        deadline = time.monotonic() + settle
        while True:
            with self._lock:
                found = [dict(e) for e in self.log if e["path"].startswith(prefix)]
            if all(e["done"] for e in found) or time.monotonic() > deadline:
                return found
            time.sleep(0.01)
