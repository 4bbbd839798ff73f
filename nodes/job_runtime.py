"""The distillation job runtime of this ComfyUI process: its one job manager, the bridge from job events to ComfyUI's
websocket, and the wiring of the /tdm/jobs HTTP routes (nodes/routes.py), installed by the extension's entry point
(`__init__.py`), never as a side effect of importing a node module.

V3 nodes hold no state, so the manager lives here; TDM Distill, Status, Stop, TDM LoRA from Distill Job and the
routes all reach it through `get_manager()`.
"""

from __future__ import annotations

import threading
import time

from tdm_core import jobs

from . import routes

_manager_lock = threading.Lock()
_manager: dict = {"instance": None}


def get_manager() -> jobs.JobManager:
    with _manager_lock:
        if _manager["instance"] is None:
            import folder_paths

            loras_dir = folder_paths.get_folder_paths("loras")[0]
            _manager["instance"] = jobs.JobManager(loras_dir, listener=_WebsocketBridge())
        return _manager["instance"]


class _WebsocketBridge:
    """Job events → ComfyUI's websocket (`PromptServer.send_sync` is thread-safe); progress at most 5 per second
    per job, state changes and saves always."""

    def __init__(self):
        self._last: dict[str, float] = {}

    def __call__(self, event: str, payload: dict) -> None:
        if event == "tdm.job.progress":
            now = time.monotonic()
            if now - self._last.get(payload["id"], 0.0) < 0.2 and payload["step"] < payload["iterations"]:
                return
            self._last[payload["id"]] = now
        try:
            from server import PromptServer
        except ImportError:
            return
        instance = getattr(PromptServer, "instance", None)
        if instance is not None:
            instance.send_sync(event, payload)


def install() -> bool:
    """Registers the HTTP routes when a ComfyUI server is running (False in tests and scripts without one)."""
    return routes.register(get_manager)


def wait_for_job(manager, job_id: str, timeout: float | None = None):
    """Waits for a job to leave its active states while honouring the canvas Cancel button (the job itself keeps
    running: Cancel only stops this node from waiting). The waiting node's progress bar follows the job's steps, so
    a graph that waits for training (TDM LoRA from Distill Job, Status with wait) does not sit at 0 %."""
    import comfy.model_management
    import comfy.utils

    deadline = None if timeout is None else time.monotonic() + timeout
    record = manager.get(job_id)
    bar = comfy.utils.ProgressBar(max(1, record.iterations))
    shown = None

    def show(record) -> None:  # one message per change, not one a second
        nonlocal shown
        if (record.step, record.iterations) != shown:
            shown = (record.step, record.iterations)
            bar.update_absolute(min(record.step, record.iterations), max(1, record.iterations))

    while True:
        comfy.model_management.throw_exception_if_processing_interrupted()
        show(record)
        try:
            ended = manager.wait(job_id, timeout=1.0)
        except TimeoutError:
            record = manager.get(job_id)
            if deadline is not None and time.monotonic() > deadline:
                raise ValueError(f"TDM job {job_id} did not stop within {timeout:.0f} s; it is "
                                 f"{record.state}. Check TDM Distill Status, or stop it again.") from None
        else:
            show(ended)
            return ended
