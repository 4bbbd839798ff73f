"""A live ComfyUI server for tests: the real `main.py` as a subprocess on loopback, in a temporary base directory
with this pack and the test-only injector pack installed under `custom_nodes/`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from . import comfy_runtime

TEST_PACK_DIR = Path(__file__).resolve().parents[1] / "tests" / "comfy_test_pack"
PACK_FOLDER_NAME = "comfyui-tdm"


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_base_directory(base: Path, install_pack: bool = True) -> Path:
    for sub in ("custom_nodes", "models/loras", "models/diffusers", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    if install_pack:
        link = base / "custom_nodes" / PACK_FOLDER_NAME
        if not link.exists():
            link.symlink_to(comfy_runtime.REPO_ROOT, target_is_directory=True)
    injector = base / "custom_nodes" / "tdm_test_pack"
    if not injector.exists():
        injector.symlink_to(TEST_PACK_DIR, target_is_directory=True)
    return base


class ComfyServer:
    """Starts ComfyUI's real server; always stopped by its PID (use as a context manager)."""

    def __init__(self, base_directory: Path, startup_timeout: float = 180.0, extra_args: tuple = ()):
        self.base_directory = Path(base_directory)
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_directory / "server.log"
        self.process: subprocess.Popen | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> ComfyServer:
        root = comfy_runtime.comfyui_dir()
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--base-directory", str(self.base_directory),
            "--database-url", "sqlite:///:memory:", *self.extra_args,
        ]
        env = dict(os.environ)
        env.setdefault("PYTHONHASHSEED", "0")
        packages = comfy_runtime.extra_site_packages()
        if packages is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(packages), env.get("PYTHONPATH", "")) if p)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=root, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.process.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.25)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=15)
        self._log.close()
        self.process = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def get(self, path: str, timeout: float = 30.0):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body, timeout: float = 30.0):
        return self.request("POST", path, body, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def queue_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        """POSTs an API-format graph; a validation failure raises with ComfyUI's own error text."""
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        try:
            return self.post("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as error:
            raise ServerError(f"/prompt refused the graph: {error.read().decode(errors='replace')}") from None

    def wait_for(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Waits for a queued prompt; returns its /history entry, raising with the execution error if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise ServerError(f"prompt {prompt_id} failed: {json.dumps(messages)[:4000]}")
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait_for(self.queue_prompt(prompt), timeout)

    def run_prompt_watching(self, prompt: dict, timeout: float = 300.0) -> tuple[dict, list[dict]]:
        """Runs a prompt as the browser does, connected to /ws under its client id: (history entry, every JSON message
        the server sent that client while the prompt ran, e.g. {"type": "progress", "data": {...}})."""
        import asyncio

        import aiohttp

        client_id = uuid.uuid4().hex
        messages: list[dict] = []

        async def watch() -> str:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}") as socket_:
                    prompt_id = await asyncio.to_thread(self.queue_prompt, prompt, client_id)
                    async with asyncio.timeout(timeout):
                        async for frame in socket_:
                            if frame.type != aiohttp.WSMsgType.TEXT:
                                continue
                            message = json.loads(frame.data)
                            messages.append(message)
                            data = message.get("data") or {}
                            if data.get("prompt_id") == prompt_id and (
                                    message["type"] in ("execution_success", "execution_error")
                                    or (message["type"] == "executing" and data.get("node") is None)):
                                return prompt_id
            raise ServerError(f"the websocket closed before prompt {prompt_id} ended")

        return self.wait_for(asyncio.run(watch()), timeout), messages
