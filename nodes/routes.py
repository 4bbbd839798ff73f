"""HTTP routes of the TDM distillation jobs, on ComfyUI's own server (also reachable under /api/...).

  GET  /tdm/jobs                    every job (without loss history)
  GET  /tdm/jobs/{job}              one job by id or output name, with its loss history
  GET  /tdm/jobs/{job}/preview.png  the latest student preview
  POST /tdm/jobs/{job}/stop         stop after the current iteration (with a checkpoint)
  POST /tdm/jobs/{job}/resume       resume from the newest checkpoint; body {"iterations": N} optional

Errors answer {"error": message} with 400 (bad request), 404 (no such job) or 409 (not possible in this state).
Websocket events (PromptServer.send_sync): tdm.job.progress {id, name, step, iterations, loss_fake, loss_gen,
it_per_s, eta_s}, tdm.job.state (the job's record), tdm.job.saved {id, name, step, lora, snapshot}.
"""

from __future__ import annotations

import io as _io
import logging

from tdm_core import jobs

LOG = logging.getLogger("comfyui-tdm")
_registered = {"done": False}


def register(get_manager) -> bool:
    """Adds the routes to `PromptServer.instance.routes` once; False when no server is running (tests, scripts)."""
    if _registered["done"]:
        return True
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    from aiohttp import web

    routes = instance.routes

    def error_response(error: Exception):
        status = getattr(error, "status", 400)
        return web.json_response({"error": str(error)}, status=status)

    @routes.get("/tdm/jobs")
    async def list_jobs(request):
        return web.json_response({"jobs": [r.to_dict(history=False) for r in get_manager().list()]})

    @routes.get("/tdm/jobs/{job}")
    async def job_status(request):
        try:
            record = get_manager().get(request.match_info["job"])
        except jobs.JobError as error:
            return error_response(error)
        return web.json_response(record.to_dict())

    @routes.get("/tdm/jobs/{job}/preview.png")
    async def job_preview(request):
        manager = get_manager()
        try:
            record = manager.get(request.match_info["job"])
        except jobs.JobError as error:
            return error_response(error)
        array = manager.preview(record.id)
        if array is None:
            return web.json_response({"error": f"job {record.id} has no preview yet"}, status=404)
        from PIL import Image

        buffer = _io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return web.Response(body=buffer.getvalue(), content_type="image/png")

    @routes.post("/tdm/jobs/{job}/stop")
    async def stop_job(request):
        try:
            # off the event loop: stopping a queued job moves its teacher copy to the CPU
            record = await _in_thread(get_manager().stop, request.match_info["job"])
        except jobs.JobError as error:
            return error_response(error)
        return web.json_response(record.to_dict(history=False))

    @routes.post("/tdm/jobs/{job}/resume")
    async def resume_job(request):
        body = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return web.json_response({"error": "the body must be JSON, e.g. {\"iterations\": 1000}"}, status=400)
        iterations = body.get("iterations") if isinstance(body, dict) else None
        try:
            if iterations is not None:
                iterations = int(iterations)
            record = await _in_thread(get_manager().resume, request.match_info["job"], iterations=iterations)
        except (jobs.JobError, ValueError, TypeError) as error:
            return error_response(error)
        return web.json_response(record.to_dict(history=False))

    _registered["done"] = True
    return True


async def _in_thread(function, *args, **kwargs):
    """Runs a blocking job-manager call (it may move a model between devices or fsync) off aiohttp's event loop."""
    import asyncio
    import functools

    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args, **kwargs))
