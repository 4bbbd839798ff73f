"""TDM LoRA from Distill Job: the student LoRA of a distillation job, loaded onto a MODEL in the same prompt.

TDM LoRA Loader picks a file from a combo of the files that exist, so a workflow that distils a LoRA and samples it
cannot name the file before the job has written it (newer ComfyUI refuses a combo value that is not in the list
before anything runs, and a STRING cannot feed a combo). This node takes the job instead — TDM Distill's `job_id`,
or the job's output name — and asks the job manager for the file: `finished` waits for the job to end (Cancel ends
the wait, never the job), `latest` takes the newest LoRA saved so far. The file is then loaded and applied by the
same code as TDM LoRA Loader (`lora_patching.load_lora_cached` + `apply_tdm_lora`).

The file name comes from the job's record (job.json, data on disk): it is resolved confined to the LoRA folder by the
job manager's own writer (`OutputWriter.lora_path`), and refused otherwise.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from tdm_core import cogvideox as video_core  # not `cogvideox`: that is the node's input name
from tdm_core import jobs
from tdm_core.lora import LoraFileError, LoraMismatchError

from . import categories, inputs, job_runtime, lora_patching
from .cogvideox_teacher import COGVIDEOX_PIPE

USES = ["finished", "latest"]
_SETTLED = ("finished", "stopped", "failed")


def _refuse(message: str):
    raise ValueError(message) from None


def _describe(record: jobs.JobRecord) -> str:
    return f"TDM job {record.id} '{record.name}'"


def _first_save_step(record: jobs.JobRecord) -> str:
    if record.save_every and record.save_every < record.iterations:
        return f"its first LoRA is saved at step {record.save_every} (save_every {record.save_every})"
    return f"it saves its LoRA when it finishes (step {record.iterations}) or is stopped"


def job_lora(manager: jobs.JobManager, record: jobs.JobRecord, use: str) -> tuple[str, str]:
    """(the LoRA file's path, a line on where it came from) for a job record in the state `use` accepts; raises
    ValueError with the reason and what to do otherwise. `finished` expects the record after the wait."""
    who = _describe(record)
    if use == "finished" and record.state == "failed":
        hint = (" queue TDM Distill with if_exists = resume to continue from its checkpoint at step "
                f"{record.checkpoint_step}, or set use to 'latest' to sample that checkpoint's LoRA"
                if record.checkpoint_step else " fix the cause and start it again")
        _refuse(f"{who} failed at step {record.step} of {record.iterations}: {record.message or 'no reason recorded'}."
                f" Its LoRA was not finished:{hint}.")
    if not record.latest_lora or not record.checkpoint_step:
        if use == "latest" and record.state in jobs.ACTIVE_STATES:
            _refuse(f"{who} has not saved a LoRA yet ({record.state}, step {record.step} of {record.iterations}): "
                    f"{_first_save_step(record)}. Queue again after that, or set use to 'finished' to wait for the "
                    "final LoRA.")
        _refuse(f"{who} is {record.state} at step {record.step} of {record.iterations} and never saved a LoRA; "
                "resume it (TDM Distill with if_exists = resume) or start it again.")
    try:
        path = manager.outputs.lora_path(record.latest_lora)
    except jobs.NotOwned as error:
        _refuse(f"{who}: its record names a LoRA file outside models/loras, refused ({error})")
    if not path.is_file():
        _refuse(f"{who}: its LoRA models/loras/{record.latest_lora} is missing (moved or deleted); the job's "
                "record still names it. Put the file back, or resume the job to write it again.")
    if record.state == "finished":
        where = f"its final LoRA (step {record.checkpoint_step} of {record.iterations})"
    elif record.state == "stopped":
        where = (f"the job was stopped at step {record.step} of {record.iterations}: the LoRA of its last checkpoint "
                 f"(step {record.checkpoint_step}); resume it to train on")
    elif record.state == "failed":
        where = (f"the job failed at step {record.step} of {record.iterations}: the LoRA of its last checkpoint "
                 f"(step {record.checkpoint_step})")
    else:
        where = (f"the job is {record.state} at step {record.step} of {record.iterations}: the newest LoRA it saved "
                 f"(step {record.checkpoint_step}); queue again for a newer one")
    return str(path), f"from {who}: {record.latest_lora}, {where}"


def _job_file(job: str, use: str) -> tuple[jobs.JobRecord, str, str]:
    """(record, LoRA path, where it came from) of the job named `job`, waited for when `use` is finished."""
    manager = job_runtime.get_manager()
    try:
        record = manager.get(job.strip())
        if use == "finished":
            record = job_runtime.wait_for_job(manager, record.id)
    except jobs.JobError as error:
        _refuse(str(error))
    return (record, *job_lora(manager, record, use))


class TDMDistillLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TDMDistillLoraLoader",
            display_name="TDM LoRA from Distill Job",
            category=categories.LOADERS,
            description=(
                "Loads the student LoRA of a TDM distillation job onto a MODEL, so one workflow can distil a 4-step "
                "LoRA and sample with it. Connect TDM Distill's job_id. 'finished' waits for the job to end (the "
                "Cancel button ends the wait, not the job); 'latest' takes the newest LoRA the job has saved. The "
                "file is applied as TDM LoRA Loader applies it; the node reports which job and step it came from."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the job distilled (its teacher): the student LoRA is "
                                                "applied to it."),
                io.String.Input("job", default="",
                                tooltip="A job id (connect TDM Distill's job_id) or the job's output name."),
                io.Combo.Input(
                    "use", options=USES, default="finished",
                    tooltip="finished: wait until the job ends, then use its final LoRA (a stopped job: the LoRA of "
                            "its last checkpoint; a failed job: an error). latest: the newest LoRA the job has saved "
                            "so far, without waiting (re-queue for a newer one).",
                ),
                io.Combo.Input(
                    "strength_mode", options=lora_patching.STRENGTH_MODES, default="auto",
                    tooltip="auto: the strength the distilled file records (TDM Distill writes 1). manual: use "
                            "'strength'.",
                ),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.005,
                    tooltip="The LoRA strength used when strength_mode is manual. In auto mode this widget is greyed "
                            "out and ignored: the strength applied is shown on the node after the run.",
                ),
                io.Clip.Input(
                    "clip", optional=True,
                    tooltip="Optional: connect the CLIP if the LoRA file also carries text-encoder weights (TDM "
                            "Distill's files do not).",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the job's student LoRA applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the LoRA's text-encoder weights applied "
                                                            "(the input CLIP unchanged, or nothing, if none)."),
                io.String.Output(display_name="lora_name", tooltip="The LoRA file used, relative to models/loras "
                                                                   "(for TDM LoRA Loader in other workflows)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, job=None, **kwargs):
        # Run again while the job can still change what this node loads (NaN never equals itself); once it has
        # ended, a key of the job and its file, so re-queueing an unchanged graph is served from ComfyUI's cache
        # (a resume or a rewritten file changes the key). ComfyUI gives this method constants only: a `job` that
        # comes through a link (TDM Distill's job_id) is absent, so the key covers every job the manager knows.
        manager = job_runtime.get_manager()
        if isinstance(job, str):
            try:
                records = [manager.get(job.strip())]
            except (jobs.JobError, ValueError):
                return float("nan")
        else:
            records = manager.list()
        if any(record.state not in _SETTLED for record in records):
            return float("nan")
        keys = []
        for record in records:
            try:
                file_key = lora_patching.file_key(str(manager.outputs.lora_path(record.latest_lora)))
            except (OSError, ValueError, jobs.NotOwned):
                file_key = None
            keys.append(f"{record.id}:{record.state}:{record.checkpoint_step}:{file_key}")
        return "|".join(keys)

    @classmethod
    def execute(cls, model, job, use="finished", strength_mode="auto", strength=1.0, clip=None) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        record, path, source = _job_file(job, use)
        lora = lora_patching.load_lora_cached(path)
        application = lora_patching.apply_tdm_lora(model, clip, lora,
                                                   None if strength_mode == "auto" else float(strength))
        report = f"{application.report()}\n{source}"
        return io.NodeOutput(application.model, application.clip, record.latest_lora, ui=ui.PreviewText(report))


class TDMCogVideoXDistillLora(io.ComfyNode):
    """TDM LoRA from Distill Job for TDM CogVideoX Loader's pipeline (a CogVideoX-2B job on ComfyUI 0.3.75)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TDMCogVideoXDistillLora",
            display_name="TDM CogVideoX LoRA from Distill Job",
            category=categories.LOADERS,
            description=(
                "Loads the student LoRA of a TDM distillation job onto TDM CogVideoX Loader's pipeline, so one "
                "workflow distils CogVideoX-2B and samples the student with TDM CogVideoX Sampler. The pipeline it "
                "returns shares the loaded weights (no second copy); the input pipeline stays the teacher. "
                "'finished' waits for the job to end (Cancel ends the wait, not the job); 'latest' takes the newest "
                "LoRA the job has saved."
            ),
            inputs=[
                COGVIDEOX_PIPE.Input("cogvideox", tooltip="The CogVideoX pipeline the job distilled (TDM CogVideoX "
                                                          "Loader, lora_name none)."),
                io.String.Input("job", default="",
                                tooltip="A job id (connect TDM Distill's job_id) or the job's output name."),
                io.Combo.Input("use", options=USES, default="finished",
                               tooltip="finished: wait until the job ends, then use its final LoRA. latest: the "
                                       "newest LoRA the job has saved so far, without waiting."),
                io.Combo.Input("strength_mode", options=lora_patching.STRENGTH_MODES, default="auto",
                               tooltip="auto: the strength the distilled file records (TDM Distill writes 1). "
                                       "manual: use 'strength'."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.01,
                               tooltip="The LoRA strength used when strength_mode is manual."),
            ],
            outputs=[
                COGVIDEOX_PIPE.Output(display_name="cogvideox",
                                      tooltip="The pipeline with the job's student LoRA (for TDM CogVideoX Sampler)."),
                io.String.Output(display_name="lora_name", tooltip="The LoRA file used, relative to models/loras."),
            ],
        )

    fingerprint_inputs = TDMDistillLoraLoader.fingerprint_inputs

    @classmethod
    def execute(cls, cogvideox, job, use="finished", strength_mode="auto", strength=1.0) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        record, path, source = _job_file(job, use)
        try:
            student, used, where = video_core.with_lora(cogvideox, path,
                                                        None if strength_mode == "auto" else float(strength))
        except (video_core.CogVideoXError, LoraFileError, LoraMismatchError) as error:
            _refuse(str(error))
        report = f"{record.latest_lora} at strength {used:g} ({where})\n{source}"
        return io.NodeOutput(student, record.latest_lora, ui=ui.PreviewText(report))


NODES: list = [TDMDistillLoraLoader, TDMCogVideoXDistillLora]
