"""Start a real, headless ComfyUI with this pack installed, and drive it over its HTTP API.

Used by the integration tests (tests/comfy_fixtures.py) and the demo (scripts/demo_upscale.py):

    with ComfyServer(models=[path_to_weights]) as comfy:
        prompt_id = comfy.queue({...API-format prompt...})
        entry = comfy.wait(prompt_id)           # the /history entry
        comfy.raise_for_status(entry)           # ComfyError with the node's exception message
        paths = comfy.output_images(entry)      # saved PNGs

The base directory (temp dir unless given) gets custom_nodes/<pack_name> as a *symlink* to the
repository root, under a folder name that differs from the repository's (ComfyUI imports a pack
under its folder name, so this proves the pack's relative imports), plus models/upscale_models,
input/, output/, temp/ and user/. The ComfyUI tree is DF_COMFYUI_DIR or <sys.prefix>/ComfyUI
(scripts/setup_env.sh puts an unmodified ComfyUI 0.3.75 there). Standard library + aiohttp (a
ComfyUI dependency, only for the optional websocket listener).
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACK_NAME = "dreamforge-upscale-test"
# Lines ComfyUI logs when a custom node pack fails to import.
IMPORT_FAILURE_MARKERS = ("IMPORT FAILED", "Cannot import")


class ComfyError(RuntimeError):
    """A prompt that ComfyUI rejected (HTTP 400) or that failed while executing."""

    def __init__(self, message: str, *, status: str = "error", details: dict | None = None):
        super().__init__(message)
        self.status = status  # "rejected" | "error" | "interrupted" | "timeout"
        self.details = details or {}


def comfyui_dir() -> Path:
    env = os.environ.get("DF_COMFYUI_DIR")
    path = Path(env) if env else Path(sys.prefix) / "ComfyUI"
    if not (path / "main.py").is_file():
        raise FileNotFoundError(
            f"no ComfyUI tree at {path} (main.py missing): run scripts/setup_env.sh or set DF_COMFYUI_DIR"
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(Path(target).resolve(), target_is_directory=Path(target).is_dir())


class ComfyServer:
    """One ComfyUI process on 127.0.0.1:<free port> with the pack under custom_nodes/<pack_name>."""

    def __init__(
        self,
        base_dir: str | os.PathLike | None = None,
        *,
        models: Iterable[str | os.PathLike] = (),
        extra_nodes: Mapping[str, str | os.PathLike] | None = None,
        pack_root: str | os.PathLike = REPO_ROOT,
        pack_name: str = DEFAULT_PACK_NAME,
        comfy_dir: str | os.PathLike | None = None,
        port: int | None = None,
        python: str | None = None,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ):
        self._own_base = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="dreamforge-comfy-")).resolve()
        self.comfy_dir = Path(comfy_dir) if comfy_dir else comfyui_dir()
        self.pack_root = Path(pack_root).resolve()
        self.pack_name = pack_name
        self.models = [Path(m) for m in models]
        self.extra_nodes = dict(extra_nodes or {})
        self.port = port or free_port()
        self.python = python or sys.executable
        self.extra_args = list(extra_args)  # e.g. ["--extra-model-paths-config", "extra_model_paths.yaml"]
        self.env = dict(env or {})  # environment of the ComfyUI process, over os.environ
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "comfyui.log"
        self._log_fh = None
        self.startup_seconds: float | None = None
        self._prepare_dirs()

    # ----------------------------------------------------------------- directories
    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def upscale_models_dir(self) -> Path:
        return self.base / "models" / "upscale_models"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base / "custom_nodes"

    def _prepare_dirs(self) -> None:
        for sub in ("custom_nodes", "models/upscale_models", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        if self.pack_name == self.pack_root.name:
            raise ValueError("pack_name must differ from the repository folder name (it proves relative imports)")
        _link(self.pack_root, self.custom_nodes_dir / self.pack_name)
        for name, path in self.extra_nodes.items():
            _link(Path(path), self.custom_nodes_dir / name)
        for model in self.models:
            self.add_model(model)

    def add_model(self, path: str | os.PathLike, name: str | None = None) -> Path:
        """Symlink a weights file into models/upscale_models (ComfyUI re-lists the folder on change)."""
        link = self.upscale_models_dir / (name or Path(path).name)
        _link(Path(path), link)
        return link

    def add_input_image(self, image, name: str) -> str:
        """Save a PIL image, an HxWxC uint8 array or copy a file into input/; returns the LoadImage name."""
        dest = self.input_dir / name
        if isinstance(image, (str, os.PathLike)):
            shutil.copyfile(image, dest)
        else:
            from PIL import Image

            if not isinstance(image, Image.Image):
                image = Image.fromarray(image)
            image.save(dest)
        return name

    # ----------------------------------------------------------------- process
    def command(self) -> list[str]:
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--base-directory", str(self.base),
            # the default database path is inside the ComfyUI tree; keep it in our base directory
            "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
        ]
        if importlib.util.find_spec("comfyui_frontend_package") is None:
            empty = self.base / "empty-frontend"
            empty.mkdir(exist_ok=True)
            cmd += ["--front-end-root", str(empty)]  # without the frontend package startup exits
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if self.proc is not None:
            return self
        self._log_fh = open(self.log_path, "ab")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), cwd=self.comfy_dir, stdout=self._log_fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        atexit.register(self.stop)  # never leave a server behind, even if the caller forgets stop()
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"ComfyUI exited with code {code} during startup; log {self.log_path}:\n"
                                   + self.log_tail())
            try:
                self.object_info(timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ComfyUI did not answer /object_info within {timeout:.0f} s; log {self.log_path}:\n"
                                   + self.log_tail())
            time.sleep(0.5)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: ComfyUI and nothing else
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def cleanup(self) -> None:
        """stop() and delete the base directory if this object created it."""
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failures(self, needle: str | None = None) -> list[str]:
        """Log lines reporting a failed custom node import (only those mentioning `needle` if given)."""
        out = []
        for line in self.log_text().splitlines():
            if any(m in line for m in IMPORT_FAILURE_MARKERS) and (needle is None or needle in line):
                out.append(line)
        return out

    # ----------------------------------------------------------------- HTTP
    def request(self, method: str, path: str, body=None, timeout: float = 30.0) -> tuple[int, object]:
        """(status, parsed JSON or text). HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return status, text

    def _get_json(self, path: str, timeout: float = 30.0):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise urllib.error.URLError(f"GET {path} -> {status}: {body}")
        return body

    def object_info(self, node_class: str | None = None, timeout: float = 30.0) -> dict:
        info = self._get_json("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""),
                              timeout=timeout)
        return info[node_class] if node_class else info

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt as it is: (status, body). 400 bodies carry error + node_errors."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})

    def queue(self, prompt: dict) -> str:
        status, body = self.post_prompt(prompt)
        if status != 200:
            raise ComfyError(f"ComfyUI rejected the prompt (HTTP {status}): {json.dumps(body)[:2000]}",
                             status="rejected", details=body if isinstance(body, dict) else {"body": body})
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._get_json(f"/history/{prompt_id}").get(prompt_id)

    def get_queue(self) -> dict:
        return self._get_json("/queue")

    def is_running(self, prompt_id: str) -> bool:
        return any(item[1] == prompt_id for item in self.get_queue()["queue_running"])

    def post_interrupt(self, prompt_id: str | None = None) -> int:
        status, _ = self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        return status

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.2) -> dict:
        """Poll /history until the prompt finished (success, error or interrupt); its history entry."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if not self.alive and self.proc is not None:
                raise RuntimeError("ComfyUI died while running the prompt:\n" + self.log_tail())
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s", status="timeout")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 120.0, check: bool = True) -> dict:
        """queue + wait; with check, raise ComfyError unless it succeeded."""
        entry = self.wait(self.queue(prompt), timeout)
        if check:
            self.raise_for_status(entry)
        return entry

    # ----------------------------------------------------------------- results
    @staticmethod
    def messages(entry: dict) -> list[tuple[str, dict]]:
        return [(m[0], m[1]) for m in entry.get("status", {}).get("messages", [])]

    @classmethod
    def outcome(cls, entry: dict) -> str:
        """"success", "error" or "interrupted"."""
        events = [name for name, _ in cls.messages(entry)]
        if "execution_interrupted" in events:
            return "interrupted"
        if "execution_error" in events or entry.get("status", {}).get("status_str") != "success":
            return "error"
        return "success"

    @classmethod
    def execution_error(cls, entry: dict) -> dict | None:
        """The execution_error message (node_id, node_type, exception_type, exception_message, ...)."""
        for name, data in cls.messages(entry):
            if name == "execution_error":
                return data
        return None

    @classmethod
    def raise_for_status(cls, entry: dict) -> None:
        outcome = cls.outcome(entry)
        if outcome == "success":
            return
        err = cls.execution_error(entry) or {}
        detail = dict(cls.messages(entry)).get("execution_interrupted", {}) if outcome == "interrupted" else err
        msg = (f"{err.get('node_type')} (node {err.get('node_id')}): {err.get('exception_type')}: "
               f"{err.get('exception_message')}") if err else outcome
        raise ComfyError(msg, status=outcome, details=detail)

    def output_files(self, entry: dict, key: str = "images") -> list[Path]:
        """Paths of the files the output nodes reported under `key` (type output or temp)."""
        roots = {"output": self.output_dir, "temp": self.base / "temp", "input": self.input_dir}
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for item in node_out.get(key, []):
                if isinstance(item, dict) and "filename" in item:
                    paths.append(roots[item.get("type", "output")] / item.get("subfolder", "") / item["filename"])
        return paths

    def output_images(self, entry: dict) -> list[Path]:
        return self.output_files(entry, "images")

    # ----------------------------------------------------------------- websocket (optional)
    def listen(self) -> "WsListener":
        """Start collecting websocket messages (progress, executing, ...) in a background thread."""
        return WsListener(self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}").start()


class WsListener:
    """Collects ComfyUI's JSON websocket messages in a daemon thread (aiohttp client)."""

    def __init__(self, url: str):
        self.url = url
        self.events: list[dict] = []
        self.binary: list[bytes] = []  # binary frames (previews: 4-byte event type, then the payload)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> "WsListener":
        self._thread.start()
        if not self._connected.wait(timeout):
            raise RuntimeError(f"websocket {self.url} did not connect: {self.error}")
        return self

    def _run(self) -> None:
        import asyncio

        import aiohttp

        async def main():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.url, heartbeat=20) as ws:
                    self._connected.set()
                    while not self._stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.2)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            with self._lock:
                                self.events.append(json.loads(msg.data))
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            with self._lock:
                                self.binary.append(bytes(msg.data))
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()/wait_for()
            self.error = exc
            self._connected.set()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.events)

    def wait_for(self, predicate, timeout: float) -> dict:
        """The first message satisfying predicate(msg), waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            events = self.snapshot()
            for msg in events[seen:]:
                if predicate(msg):
                    return msg
            seen = len(events)
            time.sleep(0.05)
        raise TimeoutError(f"no matching websocket message within {timeout:.0f} s (last: {self.snapshot()[-3:]})")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
