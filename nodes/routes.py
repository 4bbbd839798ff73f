"""HTTP routes of the TDM distillation jobs, on ComfyUI's own server (also reachable under /api/...).

  GET  /tdm/jobs                    every job (without loss history)
  GET  /tdm/jobs/{job}              one job by id or output name, with its loss history
  GET  /tdm/jobs/{job}/preview.png  the latest student preview
  GET  /tdm/jobs/{job}/headless     the job as a headless run: {config, file_name, resume_from, command}
                                    (nodes/headless_export.py); 409 with the reason when it cannot run headless
  POST /tdm/jobs/{job}/stop         stop after the current iteration (with a checkpoint)
  POST /tdm/jobs/{job}/resume       resume from the newest checkpoint; body {"iterations": N} optional
  DELETE /tdm/jobs/{job}            forget a finished, failed or stopped job (record, checkpoints, preview; its LoRA
                                    files stay); 409 while it is active

Every handler runs the manager's work on a thread of the loop's executor: the event loop (ComfyUI's whole server) never
waits for a lock, a disk write, a PNG encode or a model moving between devices.
Errors answer {"error": message} with 400 (bad request), 404 (no such job), 409 (not possible in this state), 413
(a body over 64 KiB) or 507 (the job's record could not be written). Every value of a request is validated
(tdm_core.validation, through the job manager); an unexpected failure answers 500 with its reason and never stops the
server. Like ComfyUI's own routes these have no authentication: see the README's Security section.
Websocket events (PromptServer.send_sync): tdm.job.progress {id, name, step, iterations, loss_fake, loss_gen,
it_per_s, eta_s}, tdm.job.state (the job's record), tdm.job.saved {id, name, step, lora, snapshot},
tdm.job.removed {id, name}.
"""

from __future__ import annotations

import io as _io
import logging

from tdm_core import jobs, validation

from .headless_export import headless_config

LOG = logging.getLogger("comfyui-tdm")
_registered = {"done": False}
MAX_BODY = 64 * 1024  # a resume body is a few bytes; anything near this is not a client of this route
RESUME_KEYS = ("iterations",)


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

    @routes.get("/tdm/jobs")
    @guarded
    async def list_jobs(request):
        listed = await _in_thread(lambda: [r.to_dict(history=False) for r in get_manager().list()])
        return web.json_response({"jobs": listed})

    @routes.get("/tdm/jobs/{job}")
    @guarded
    async def job_status(request):
        try:
            record = await _in_thread(lambda: get_manager().get(request.match_info["job"]).to_dict())
        except jobs.JobError as error:
            return error_response(error)
        return web.json_response(record)

    @routes.get("/tdm/jobs/{job}/preview.png")
    @guarded
    async def job_preview(request):
        try:
            job_id, png = await _in_thread(lambda: _preview_png(get_manager(), request.match_info["job"]))
        except jobs.JobError as error:
            return error_response(error)
        if png is None:
            return web.json_response({"error": f"job {job_id} has no preview yet"}, status=404)
        return web.Response(body=png, content_type="image/png")

    @routes.get("/tdm/jobs/{job}/headless")
    @guarded
    async def job_headless(request):
        try:
            answer = await _in_thread(lambda: headless_run(get_manager(), request.match_info["job"]))
        except jobs.JobError as error:
            return error_response(error)
        except ValueError as error:  # a job that cannot run headless: the reason, for the panel to show
            return web.json_response({"error": str(error)}, status=409)
        return web.json_response(answer)

    @routes.post("/tdm/jobs/{job}/stop")
    @guarded
    async def stop_job(request):
        try:
            # stopping a queued job moves its network to the CPU (seconds)
            record = await _in_thread(lambda: get_manager().stop(request.match_info["job"]).to_dict(history=False))
        except jobs.JobError as error:
            return error_response(error)
        return web.json_response(record)

    @routes.delete("/tdm/jobs/{job}")
    @guarded
    async def remove_job(request):
        try:
            # off the event loop: it deletes the job's checkpoints
            record = await _in_thread(lambda: get_manager().remove(request.match_info["job"]).to_dict(history=False))
        except jobs.JobError as error:
            return error_response(error)
        return web.json_response({"removed": record["id"], "name": record["name"]})

    @routes.post("/tdm/jobs/{job}/resume")
    @guarded
    async def resume_job(request):
        body, refusal = await _resume_body(request)
        if refusal is not None:
            return web.json_response({"error": refusal[0]}, status=refusal[1])
        # iterations is validated (whole, finite, 1 ≤ n ≤ MAX_ITERATIONS) by the manager, like every other caller's
        record = await _in_thread(lambda: get_manager().resume(
            request.match_info["job"], iterations=body.get("iterations")).to_dict(history=False))
        return web.json_response(record)

    _registered["done"] = True
    return True


def headless_run(manager, job: str) -> dict:
    """The job's headless config and the command that continues it from its newest checkpoint."""
    import os
    import shlex

    import folder_paths

    record = manager.get(job)
    comfyui_dir = os.path.dirname(os.path.abspath(folder_paths.__file__))
    output_dir = os.path.join(folder_paths.get_output_directory(), "tdm-headless", record.name)
    config = headless_config(record, comfyui_dir, output_dir=output_dir)
    # the run's LoRA also lands in models/loras, under a name no job and no file uses, so it shows in ComfyUI's LoRA
    # lists and never replaces the job's own
    lora_name = f"{record.name}_headless"
    if manager.find(lora_name) is not None or (manager.loras_dir / (lora_name + jobs.LORA_EXTENSION)).exists():
        lora_name = manager.free_name(lora_name)
    config["lora_file"] = str(manager.loras_dir / (lora_name + jobs.LORA_EXTENSION))
    # ComfyUI's --base-directory, for a teacher of ComfyUI files (a diffusers-folder teacher names its folder whole)
    if "comfyui_dir" in config["teacher"] and os.path.realpath(folder_paths.base_path) != os.path.realpath(comfyui_dir):
        config["teacher"]["base_directory"] = folder_paths.base_path
    file_name = record.name.replace("/", "_") + ".headless.json"
    pack_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tdm_core and tdm_comfy live there
    resume_from = (str(manager.outputs.checkpoint_dir(record.id, record.checkpoint_step)) if record.checkpoint_step
                   else None)  # the newest checkpoint folder itself: a job keeps them under checkpoints/step-N
    command = (f"cd {shlex.quote(pack_dir)} && torchrun --nproc_per_node <GPUs> -m tdm_core.distill "
               f"--config <folder of the download>/{shlex.quote(file_name)}"
               + (f" --resume {shlex.quote(resume_from)}" if resume_from else ""))
    return {"config": config, "file_name": file_name, "resume_from": resume_from, "command": command}


def error_response(error: Exception):
    """A refused command as JSON, with the status the error carries (a JobError's: 404, 409, 507...)."""
    from aiohttp import web

    return web.json_response({"error": str(error)}, status=getattr(error, "status", 400))


def guarded(handler):
    """A route whose unexpected failures answer 500 with the reason (and a log line) instead of an HTML page."""
    import functools

    from aiohttp import web

    @functools.wraps(handler)
    async def wrapper(request):
        try:
            return await handler(request)
        except jobs.JobError as error:
            return error_response(error)
        except Exception as error:  # noqa: BLE001 - one bad request never takes the others down
            LOG.exception("TDM route %s failed", request.path)
            return web.json_response({"error": f"{type(error).__name__}: {str(error)[:300]}"}, status=500)

    return wrapper


async def _resume_body(request) -> tuple[dict, tuple[str, int] | None]:
    """A resume request's JSON body (empty: {}), read to at most MAX_BODY bytes and checked; or the refusal, as
    (message, HTTP status)."""
    if not request.can_read_body:
        return {}, None
    example = "a resume body is JSON like {\"iterations\": 1000}"
    if request.content_length is not None and request.content_length > MAX_BODY:
        return {}, (f"the body is {request.content_length} bytes; {example}", 413)
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        return {}, (f"the body is over {MAX_BODY} bytes; {example}", 413)
    if not raw.strip():
        return {}, None
    try:
        body = validation.json_object(validation.loads_json(raw, "the body", max_bytes=MAX_BODY, max_depth=4),
                                      "the body")
        unknown = sorted(set(body) - set(RESUME_KEYS))
        if unknown:
            raise validation.ValidationError(f"the body has unknown keys {unknown[:5]}; only "
                                             f"{', '.join(RESUME_KEYS)} is accepted")
    except validation.ValidationError as error:
        return {}, (f"{error}; send JSON like {{\"iterations\": 1000}}", 400)
    return body, None


def _preview_png(manager, job: str) -> tuple[str, bytes | None]:
    """The job's id and its latest preview as PNG bytes (None: no preview yet); reads a file and encodes, so it runs
    off the event loop."""
    record = manager.get(job)
    array = manager.preview(record.id)
    if array is None:
        return record.id, None
    from PIL import Image

    buffer = _io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return record.id, buffer.getvalue()


async def _in_thread(function, *args, **kwargs):
    """Runs a job-manager call off aiohttp's event loop. Every route does: commands may move a model between devices
    or fsync, and even a status read (microseconds under the manager's lock) must never stall ComfyUI's server."""
    import asyncio
    import functools

    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args, **kwargs))
