"""TDM distillation inside ComfyUI: start, watch and stop background jobs (tdm_core.jobs runs them).

The start node takes the teacher the way users already load it — the MODEL and CLIP of the standard loaders
(Load Checkpoint, or Load Diffusion Model + DualCLIPLoader/TripleCLIPLoader for SD3), so fine-tunes, merges and
LoRA-patched teachers work and nothing is loaded twice — encodes the prompts with that CLIP (and unloads it), builds
the training network on ComfyUI's own loaded weights (nodes/training_network.py: shared, not copied) and hands the job
to the job manager's worker thread. It returns the job id at
once; the queue goes on serving other prompts while the job trains. ComfyUI's Cancel button does not reach the job:
the stop node, the HTTP route or the web panel stop it, after the current iteration, with a checkpoint.

Jobs persist under models/loras/.tdm_jobs, so they are listed after a restart; resuming one then needs its teacher
again: queue the workflow with the same output name and if_exists = resume.
"""

from __future__ import annotations

import functools
import logging

from comfy_api.v0_0_2 import io, ui

from tdm_core import families, jobs, presets

from . import categories, comfy_backend, inputs, recipe_inputs
from .cogvideox_teacher import COGVIDEOX_PIPE, check_teacher_inputs
from .distill_images import loss_curve_image, preview_image
from .distill_jobs import (
    DEFAULT_FRAMES,
    NO_FILE,
    input_text_files,
    start_job,
)
from .headless_export import trace_teacher_files
from .job_runtime import get_manager, wait_for_job

# Outputs carry an explicit display name: ComfyUI 0.3.75 would label an unnamed output by its type ("STRING"),
# newer versions by its id, and saved workflows must not depend on the version.
# Every seed gets the frontend's "control after generate" widget (newer frontends add one to any INT named seed and
# would shift a saved workflow's values otherwise). "fixed" by default where the API can say so (newer ComfyUI's
# ControlAfterGenerate): re-queueing a distillation to refresh its status must not start a new job with a new seed.
_SEED_CONTROL = getattr(getattr(io, "ControlAfterGenerate", None), "fixed", True)

LOG = logging.getLogger("comfyui-tdm")

CATEGORY = categories.TRAINING
GRID_CHOICES = ["auto", *[p.name for p in presets.PRESETS.values() if families.FAMILIES[p.family].distillable],
                "training_demo"]
IF_EXISTS = ["refuse", "resume"]
OFFLOAD = ["none", "unload_comfy_models", "train_on_cpu"]


def _refuse(error: Exception):
    raise ValueError(str(error)) from None


# ---------------------------------------------------------------------------------------------------------------
# Nodes


# What most users set on TDM Distill: the prompts, the name, how long, how strongly guided, at what size, and memory.
# The rest keeps working defaults and is marked advanced (folded on the node, web/tdm_advanced.js).
_RARELY_USED = {"prompts_file", "unconditional_prompt", "steps", "grid", "lora_rank", "lora_alpha", "learning_rate",
                "batch_size", "keep_last", "preview_every", "seed", "dtype", "offload", "frames", "micro_batch",
                *(spec.id for spec in (*recipe_inputs.knob_inputs(), *recipe_inputs.appended_knob_inputs()))}


def _fold_rarely_used(widget_inputs: list) -> list:
    return [categories.advanced(spec) if spec.id in _RARELY_USED else spec for spec in widget_inputs]


class TDMDistillStart(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMDistillStart",
            display_name="TDM Distill (start job)",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Starts a TDM distillation in the background and returns its job id at once: the queue keeps "
                "running other prompts while it trains. The student LoRA is saved to models/loras/<output_name>"
                ".safetensors every save_every steps (plus numbered snapshots). Stop it with TDM Distill Stop (the "
                "Cancel button does not stop training); watch it with TDM Distill Status."),
            inputs=_fold_rarely_used([
                # Optional since the cogvideox input exists: a teacher is a MODEL and CLIP, or that pipeline.
                io.Model.Input("model", optional=True,
                               tooltip="The teacher (SD1.5-family, SDXL, SD3/SD3.5, Flux-dev, Wan 2.1 T2V, native "
                                       "CogVideoX-2B), with any LoRAs applied to it. The job shares its loaded "
                                       "weights. Or connect cogvideox instead of model and clip."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The teacher's text encoder (from the same loader); it encodes the prompts "
                                      "once, when the job starts."),
                io.String.Input("prompts", multiline=True, default="a photo of a cat\na watercolor landscape",
                                tooltip="Training prompts, one per line (lines starting with # are skipped). TDM is "
                                        "data-free: prompts are all it needs. Combined with prompts_file."),
                io.Combo.Input("prompts_file", options=input_text_files(), default=NO_FILE,
                               tooltip="Optional .txt file in ComfyUI's input folder with more prompts, one per "
                                       "line."),
                io.String.Input("unconditional_prompt", default="",
                                tooltip="The unconditional prompt of the teacher's CFG target (the official recipe: "
                                        "empty)."),
                io.String.Input("output_name", default="tdm_distilled",
                                tooltip="LoRA file name under models/loras (sub-folders with '/'); no absolute "
                                        "paths or '..'. A name in use by another job is refused."),
                io.Combo.Input("if_exists", options=IF_EXISTS, default="refuse",
                               tooltip="refuse: a job with this output name already exists → error. resume: "
                                       "continue that job from its newest checkpoint (after a stop, a failure or a "
                                       "ComfyUI restart; the job's own settings are kept, iterations may grow)."),
                io.Int.Input("steps", default=4, min=1, max=16,
                             tooltip="K, the student's number of sampling steps (the released TDM LoRAs: 4)."),
                io.Combo.Input("grid", options=GRID_CHOICES, default="auto",
                               tooltip="The timesteps the student is trained on, i.e. the TDM preset to sample it "
                                       "with. auto: the preset of the teacher's family (sd3, sd35, dreamshaper, sdxl, "
                                       "flux). training_demo: the official demo script's grid."),
                io.Int.Input("iterations", default=500, min=1, max=1_000_000,
                             tooltip="Training iterations (the official demo trains a few hundred to thousands)."),
                io.Int.Input("lora_rank", default=-1, min=-1, max=256, tooltip="Rank of the student and fake-score "
                                                                                "LoRAs. -1: the recipe's."),
                io.Float.Input("lora_alpha", default=-1.0, min=-1.0, max=1024.0, step=1.0,
                               tooltip="LoRA alpha; 0 = rank (scale 1 in every loader). -1: the recipe's, "
                                       "at the recipe's alpha / rank when lora_rank is set."),
                io.Float.Input("learning_rate", default=-1.0, min=-1.0, max=1e-2, step=1e-6, round=False,
                               tooltip="Fake-score learning rate (official 1e-4, README run 2e-5). -1: the "
                                       "recipe's."),
                io.Float.Input("cfg", default=-1.0, min=-1.0, max=20.0, step=0.1,
                               tooltip="Teacher guidance distilled into the student (official demo 2, README run 4.5, "
                                       "Flow-Factory 4); the student then samples with CFG 1. Flux-dev: 1 (its "
                                       "guidance is FluxGuidance's value). -1: the recipe's."),
                io.Int.Input("batch_size", default=-1, min=-1, max=64,
                             tooltip="Trajectories per iteration. -1: the recipe's (1). 4 ends closer to the teacher "
                                     "than 1 in the same iterations (toys: 1.5-3.5x closer); on a GPU 4 took "
                                     "1.2-1.7x the time of 1. micro_batch fits it into VRAM."),
                io.Int.Input("width", default=512, min=16, max=4096, step=16,
                             tooltip="Training resolution in pixels (latents are 1/8); use the teacher's native "
                                     "size (SD1.5 512, SD3 1024) or smaller to save memory."),
                io.Int.Input("height", default=512, min=16, max=4096, step=16, tooltip="Training height in pixels."),
                io.Int.Input("save_every", default=100, min=0, max=100_000,
                             tooltip="Write a checkpoint and the LoRA every N steps (0: only at the end or on "
                                     "stop). Every file is written atomically."),
                io.Int.Input("keep_last", default=3, min=1, max=100,
                             tooltip="Numbered LoRA snapshots and checkpoints kept (older ones are deleted)."),
                io.Int.Input("preview_every", default=50, min=0, max=100_000,
                             tooltip="Sample the student every N steps for the status preview (0: never)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=_SEED_CONTROL,
                             tooltip="Seed of the adapters' initialisation and of every training draw: the same "
                                     "seed and settings give the same LoRA."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute each block's activations in the backward pass instead of "
                                         "storing them: much less VRAM for about one extra forward pass of time; "
                                         "gradients are the same."),
                io.Combo.Input("dtype", options=list(comfy_backend.DTYPES), default="auto",
                               tooltip="Precision of the teacher: auto = as ComfyUI loaded it (shared, no copy); "
                                       "another dtype makes one converted copy. The LoRAs and optimiser stay float32. "
                                       "Prefer bfloat16 to float16 (loss scaling)."),
                io.Combo.Input("offload", options=OFFLOAD, default="none",
                               tooltip="none: train on ComfyUI's device, on its loaded weights. "
                                       "unload_comfy_models: free VRAM from ComfyUI's other models first. "
                                       "train_on_cpu: train a copy in CPU memory (slow)."),
                # Last, and a socket: workflows saved before it keep their links and widget values.
                io.Vae.Input("vae", optional=True, tooltip=(
                    "Optional: the teacher's VAE. Previews are then decoded images (the job keeps a copy of the VAE, "
                    "about 0.3 GB for SD's); without it, ComfyUI's latent-RGB preview.")),
                # After every older widget (saved workflows hold widget values by position), and optional.
                recipe_inputs.recipe_input(),
                *recipe_inputs.knob_inputs(),
                io.Int.Input("frames", default=DEFAULT_FRAMES, min=1, max=257, step=4, optional=True,
                             tooltip="Video teachers only: frames of each training clip, 4k + 1 (the VAE keeps "
                                     "the first frame and packs 4 per latent frame). Wan 2.1: 33 (its default "
                                     "clip); CogVideoX-2B: up to 49, its own length. Image teachers ignore it."),
                # After every older widget (saved workflows hold widget values by position), and optional.
                io.Int.Input("micro_batch", default=0, min=0, max=1024, optional=True,
                             tooltip="Memory: the most samples (with stages all: sample-steps) one network pass "
                                     "takes; larger updates run pass by pass and add up their gradients, the same "
                                     "update, only slower. 0: all at once. A resume may change it."),
                # After every older widget (saved workflows hold widget values by position), and optional.
                *recipe_inputs.appended_knob_inputs(),
                # Last: workflows saved before it keep their links and widget values.
                COGVIDEOX_PIPE.Input("cogvideox", optional=True, tooltip=(
                    "Instead of model and clip: CogVideoX-2B from TDM CogVideoX Loader (lora_name none), for any "
                    "ComfyUI (0.3.75 has no native CogVideoX). The job shares the pipeline's weights.")),
            ]),
            outputs=[io.String.Output("job_id", display_name="job_id", tooltip="The job's id, for TDM Distill Status / Stop and the "
                                                        "/tdm/jobs HTTP routes.")],
            # The queued graph: the job records which loader files its teacher came from, for a headless export.
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, output_name="", if_exists="refuse", **kwargs):
        # Unchanged inputs reuse the cached job id (re-queueing the workflow refreshes the status node); in resume
        # mode a job that stopped or failed since then must run the node again.
        if if_exists != "resume":
            return "refuse"
        try:
            record = get_manager().get(output_name)
        except (jobs.JobError, ValueError):
            return "new"
        return f"{record.id}:{record.state}:{record.checkpoint_step}"

    USER_FILES = {"prompts_file": "ComfyUI's input folder"}

    @classmethod
    def validate_inputs(cls, prompts_file):  # one declared input: see nodes/inputs.py
        return inputs.validate_one(cls, "prompts_file", prompts_file)

    @classmethod
    def execute(cls, model=None, clip=None, vae=None, cogvideox=None, **values) -> io.NodeOutput:
        inputs.check_inputs(cls, values)
        check_teacher_inputs(model, clip, vae, cogvideox)
        try:
            record = start_job(get_manager(), model, clip, values, vae,
                               check_record=functools.partial(inputs.check_inputs, TDMDistillStart),
                               teacher_files=trace_teacher_files(cls.hidden.prompt, cls.hidden.unique_id),
                               cogvideox=cogvideox)
        except jobs.JobError as error:
            _refuse(error)
        return io.NodeOutput(record.id, ui=ui.PreviewText(record.progress_text()))


class TDMDistillStatus(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMDistillStatus",
            display_name="TDM Distill Status",
            category=CATEGORY,
            is_output_node=True,
            description=("Shows a TDM distillation job: progress text, loss curves, the latest student preview "
                         "and the latest LoRA name (for the TDM LoRA Loader). Re-queue to refresh."),
            inputs=[
                io.String.Input("job", default="", tooltip="A job id (connect TDM Distill's job_id) or the job's "
                                                           "output name."),
                io.Boolean.Input("wait", default=False,
                                 tooltip="Block this prompt until the job stops, fails or finishes (the job runs "
                                         "either way)."),
            ],
            outputs=[
                io.String.Output("status", display_name="status", tooltip="Progress text: state, step, losses, it/s, ETA, messages."),
                io.Image.Output("loss_curve", display_name="loss_curve", tooltip="Fake-score and generator losses over the steps."),
                io.Image.Output("preview", display_name="preview", tooltip="The latest student samples: decoded by the VAE given to TDM Distill, else the latent-RGB preview at image size."),
                io.String.Output("lora_name", display_name="lora_name", tooltip="The newest LoRA file under models/loras (pick it in the TDM "
                                                      "LoRA Loader)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # always re-run: the job moves on between prompts

    @classmethod
    def execute(cls, job, wait=False) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        manager = get_manager()
        try:
            record = manager.get(job.strip())
            if wait:
                record = wait_for_job(manager, record.id)
        except jobs.JobError as error:
            _refuse(error)
        curve = loss_curve_image(list(record.history))
        preview = preview_image(manager.preview(record.id))
        text = record.progress_text()
        return io.NodeOutput(text, curve, preview, record.latest_lora, ui=ui.PreviewText(text))


class TDMDistillStop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMDistillStop",
            display_name="TDM Distill Stop",
            category=CATEGORY,
            is_output_node=True,
            description="Stops a TDM distillation job after its current iteration, writing a resumable checkpoint "
                        "and the LoRA. Resume with TDM Distill (if_exists = resume) or POST /tdm/jobs/<id>/resume.",
            inputs=[
                io.String.Input("job", default="", tooltip="A job id or output name."),
                io.Boolean.Input("wait", default=True, tooltip="Wait until the checkpoint is written before this "
                                                               "prompt continues."),
            ],
            outputs=[io.String.Output("status", display_name="status", tooltip="The job's state after the request.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, job, wait=True) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        manager = get_manager()
        try:
            record = manager.stop(job.strip())
            if wait:
                record = wait_for_job(manager, record.id, timeout=600)
        except jobs.JobError as error:
            _refuse(error)
        text = record.progress_text()
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES: list = [TDMDistillStart, TDMDistillStatus, TDMDistillStop]

