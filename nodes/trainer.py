"""TDM distillation inside ComfyUI: start, watch and stop background jobs (tdm_core.jobs runs them).

The start node takes the teacher the way users already load it — the MODEL and CLIP of the standard loaders
(Load Checkpoint, or Load Diffusion Model + DualCLIPLoader/TripleCLIPLoader for SD3), so fine-tunes, merges and
LoRA-patched teachers work and nothing is loaded twice — encodes the prompts with that CLIP (and unloads it), builds
the training network on ComfyUI's own loaded weights (nodes/comfy_backend.py: shared, not copied) and hands the job
to the job manager's worker thread. It returns the job id at
once; the queue goes on serving other prompts while the job trains. ComfyUI's Cancel button does not reach the job:
the stop node, the HTTP route or the web panel stop it, after the current iteration, with a checkpoint.

Jobs persist under models/loras/.tdm_jobs, so they are listed after a restart; resuming one then needs its teacher
again: queue the workflow with the same output name and if_exists = resume.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import torch
from comfy_api.v0_0_2 import io, ui

from tdm_core import families, jobs, presets, schedules
from tdm_core.distill import ConfigError, DistillConfig

from . import categories, comfy_backend, family_adapters, inputs, recipe_inputs

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
NO_FILE = "(none)"

# V3 nodes hold no state: the job manager (one per ComfyUI process) lives here.
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


def _input_text_files() -> list[str]:
    import folder_paths

    directory = folder_paths.get_input_directory()
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            if name.lower().endswith(".txt"):
                found.append(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/"))
    return [NO_FILE, *sorted(found)]


def read_prompts(prompts: str, prompts_file: str) -> list[str]:
    """One prompt per non-empty line, from the text box and the optional .txt file in input/."""
    lines = [line.strip() for line in (prompts or "").splitlines()]
    if prompts_file and prompts_file != NO_FILE:
        import folder_paths

        directory = os.path.realpath(folder_paths.get_input_directory())
        path = os.path.realpath(os.path.join(directory, prompts_file))
        if os.path.commonpath([directory, path]) != directory:
            raise ValueError(f"prompts_file {prompts_file!r} is outside ComfyUI's input folder")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompts_file {prompts_file!r} does not exist in ComfyUI's input folder "
                                    f"({directory}); put the .txt file there (one prompt per line) or pick another")
        with open(path, encoding="utf-8") as handle:
            lines += [line.strip() for line in handle]
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise ValueError("no training prompts: write one prompt per line in 'prompts' or choose a prompts_file")
    return found


class ComfyRuntime:
    """A job's teacher (its training network with the adapters) and settings; builds its session on the worker."""

    def __init__(self, backend: comfy_backend.ComfyBackend, config: DistillConfig, device: torch.device,
                 preview_decode, extra_metadata: dict, comfy_model=None):
        self.backend = backend
        self.comfy_model = comfy_model  # ComfyUI's BaseModel whose weights the training network shares
        self.config = config
        self.device = torch.device(device)
        self.preview_decode = preview_decode
        self.extra_metadata = extra_metadata

    def build(self, state: dict | None) -> jobs.TDMSession:
        self.backend.to(self.device)
        return jobs.TDMSession.create(self.backend, DistillConfig.from_dict(self.config.to_dict()), state,
                                      preview_decode=self.preview_decode, extra_metadata=self.extra_metadata)

    def offload(self) -> None:
        """Parks the job's network on the CPU, except the weights ComfyUI still holds on the device itself (they
        cost the job nothing there; moving them would only add a CPU copy). Once ComfyUI has unloaded or replaced
        them, the job's aliases are their only holder and they do move."""
        if self.device.type == "cpu":
            return
        in_use = (comfy_backend.weight_memory(self.comfy_model.diffusion_model) if self.comfy_model is not None
                  else frozenset())
        self.backend.to(torch.device("cpu"), keep=in_use)


def _settings_from_inputs(values: dict, prompts: list[str]) -> dict:
    settings = {k: v for k, v in values.items() if k not in ("model", "clip", "prompts", "prompts_file")}
    settings["prompt_list"] = prompts
    return settings


def build_runtime(model, clip, settings: dict, prompts: list[str], vae=None):
    """The job's runtime from the teacher MODEL/CLIP and the node's settings: (runtime, teacher fingerprint, grid).
    Runs on the prompt executor's thread (CLIP encoding, building the training network on ComfyUI's loaded weights
    and adapter creation use ComfyUI's memory manager and the process RNG)."""
    import comfy.model_management

    family = comfy_backend.model_family(model)
    family_adapters.check_distillable(model, family)
    parametrisation = comfy_backend.model_parametrisation(model)
    latent_format = model.model.latent_format
    channels = int(latent_format.latent_channels)
    width, height = int(settings["width"]), int(settings["height"])
    if width % 16 or height % 16:
        raise ValueError(f"width and height must be multiples of 16 (got {width}×{height})")
    latent_shape = (channels, height // 8, width // 8)
    grid = comfy_backend.training_grid(model, family, settings["grid"], int(settings["steps"]),
                                       schedules.TRAINING_DEMO_TOTAL_STEPS, latent_shape=latent_shape)
    knobs, changed, recipe = recipe_inputs.distill_settings(settings, family)
    family_adapters.check_distillable(model, family, knobs["cfg"])
    try:
        config = DistillConfig(
            prompts=prompts, steps=int(settings["steps"]), timesteps=grid.timesteps, seed=int(settings["seed"]),
            iterations=int(settings["iterations"]), total_steps=schedules.TRAINING_DEMO_TOTAL_STEPS,
            keep_last=int(settings["keep_last"]), family=family, recommended_strength=1.0, sampler_preset=grid.preset,
            **knobs)
        config.validate(num_timesteps=grid.schedule.num_timesteps)
    except (ConfigError, TypeError, ValueError) as error:
        raise ValueError(f"TDM Distill (recipe {recipe}): {error}") from None
    settings["recipe_used"] = recipe
    settings["recipe_description"] = recipe_inputs.description(recipe, changed)

    offload = settings["offload"]
    if offload == "unload_comfy_models":
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    device = torch.device("cpu") if offload == "train_on_cpu" else comfy.model_management.get_torch_device()
    conds = comfy_backend.encode_prompts(clip, prompts, settings["unconditional_prompt"], model=model, family=family,
                                         latent_shape=latent_shape)
    comfy_backend.release_text_encoders(clip)  # before the teacher is made ready, so both never share the device
    network = comfy_backend.training_network(model, device, comfy_backend.DTYPES[settings["dtype"]])
    family_adapters.adapter(family).prepare_for_training(network)
    if settings["gradient_checkpointing"]:
        comfy_backend.enable_gradient_checkpointing(network)
    # The loaded (patched) weights, before any dtype change: a resume with other memory options still matches.
    teacher = comfy_backend.teacher_fingerprint(model.model.diffusion_model, family, parametrisation, channels)
    # Nodes run under torch.inference_mode(); adapters created there could never be trained.
    with torch.inference_mode(False):
        backend = comfy_backend.ComfyBackend(network, family=family, parametrisation=parametrisation,
                                             schedule=grid.schedule, latent_shape=latent_shape, conds=conds,
                                             lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                                             adapter_seed=config.seed)
    preview = (comfy_backend.vae_preview_decoder(model, vae, device) if vae is not None
               else comfy_backend.latent_preview_decoder(model))
    metadata = comfy_backend.family_metadata(grid.preset, family, recipe_changes=changed)
    runtime = ComfyRuntime(backend, config, device, preview, metadata, comfy_model=model.model)
    return runtime, teacher, grid


def _recorded_prompts(settings: dict, record: jobs.JobRecord) -> list[str]:
    prompts = settings.get("prompt_list")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts) or sum(
            len(p) for p in prompts) > inputs.MAX_TEXT:
        raise ValueError(f"the record of TDM job {record.id} '{record.name}' holds no valid prompt list; start a new "
                         "job under another output name")
    return list(prompts)


# Inputs a queue may change without making another job, applied when it resumes one: how long and how it runs, not
# what it learns. Every other setting defines the LoRA (prompts, grid, steps, cfg, rates, rank, size, batch, seed...).
RUN_OPTIONS = ("iterations", "gradient_checkpointing", "dtype", "offload", "save_every", "keep_last", "preview_every")
# Never compared with the existing job's: the run options, and how the node names the job and treats a taken name.
_NOT_LEARNED = (*RUN_OPTIONS, "if_exists", "output_name")


def _edited_settings(recorded: dict, queued: dict) -> list[str]:
    """What the queued node changes in what the existing job learns, in words ("cfg 2.0 → 3.0")."""
    edited = []
    for key, value in queued.items():
        if key in _NOT_LEARNED or key not in recorded or recorded[key] == value:
            continue
        old = recorded[key]
        if key == "prompt_list":
            edited.append(f"prompts ({len(old) if isinstance(old, list) else '?'} → {len(value)} lines, edited)"
                          if not isinstance(old, list) or len(old) != len(value) else "prompts (edited)")
        else:
            edited.append(f"{key} {str(old)[:40]} → {str(value)[:40]}")
    return edited


def start_job(model, clip, values: dict, vae=None) -> jobs.JobRecord:
    """Everything the start node does (see the module docstring); raises ValueError with the reason to refuse."""
    manager = get_manager()
    name = jobs.validate_output_name(values["output_name"], manager.loras_dir)
    existing = manager.find(name)
    if existing is not None:
        # A queue with edited settings (the prompts of a distil-then-sample graph, say) must not come back with the
        # old job's LoRA: neither reuse nor resume it, say what differs and offer a free name.
        edited = _edited_settings(existing.settings,
                                  _settings_from_inputs(values, read_prompts(values["prompts"], values["prompts_file"])))
        if edited:
            raise ValueError(
                f"output name '{name}' belongs to TDM job {existing.id} ({existing.state} at step {existing.step}/"
                f"{existing.iterations}), which was started with other settings: {'; '.join(edited[:6])}"
                f"{'; ...' if len(edited) > 6 else ''}. Its LoRA would not have your edits: set output_name to "
                f"'{manager.free_name(name)}' to train a new one, or undo the edits to use or continue "
                "that job.")
        if values["if_exists"] != "resume":
            manager.submit(name, None, values["iterations"])  # raises the duplicate-name refusal
        if existing.state in jobs.ACTIVE_STATES and manager.has_runtime(existing.id):
            return existing
        if existing.state == "finished" and values["iterations"] <= existing.step:
            return existing
        # Resume: the job's own settings (a different rank or grid could not load its checkpoint).
        # Run options may change on resume (memory: the usual fix after running out of it; how often to save).
        settings = dict(existing.settings, **{k: values[k] for k in RUN_OPTIONS})
        prompts = _recorded_prompts(settings, existing)
        # An input added to the node after the job started takes the workflow's value.
        for key, value in values.items():
            if key not in ("prompts", "prompts_file"):
                settings.setdefault(key, value)
        # The settings come from job.json on disk: checked by the same rules as the node's own inputs.
        inputs.check_inputs(TDMDistillStart, settings)
    else:
        prompts = read_prompts(values["prompts"], values["prompts_file"])
        settings = _settings_from_inputs(values, prompts)

    runtime, teacher, grid = build_runtime(model, clip, settings, prompts, vae)
    settings["grid_description"] = grid.description
    return manager.submit(name, runtime, int(settings["iterations"]), save_every=int(settings["save_every"]),
                          keep_last=int(settings["keep_last"]), preview_every=int(settings["preview_every"]),
                          settings=settings, teacher=teacher, if_exists=values["if_exists"])


# ---------------------------------------------------------------------------------------------------------------
# Images for the status node


# The two losses' colours, on a dark background: the same in this image (TDM Distill Status) and in the jobs panel's
# curve (web/tdm_jobs.js, LOSS_COLOURS; a test holds the two together).
LOSS_COLOURS = {"fake score": "#e8a33d", "generator": "#5fa8e8"}
_CURVE_BACKGROUND, _CURVE_FRAME, _CURVE_TEXT = (32, 32, 32), (80, 80, 80), (210, 210, 210)


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def loss_curve_image(history: list, width: int = 512, height: int = 256) -> torch.Tensor:
    """The two TDM losses over the steps (fake score above, generator below), as a ComfyUI IMAGE [1, H, W, 3]."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), _CURVE_BACKGROUND)
    draw = ImageDraw.Draw(image)
    panels = [(label, column, _rgb(LOSS_COLOURS[label])) for label, column in (("fake score", 1), ("generator", 2))]
    panel_h = height // 2
    for row, (label, column, colour) in enumerate(panels):
        top = row * panel_h
        draw.rectangle([0, top, width - 1, top + panel_h - 1], outline=_CURVE_FRAME)
        points = [(p[0], p[column]) for p in history if math.isfinite(p[column])]
        if not points:
            draw.text((6, top + 4), f"{label} loss: no steps yet", fill=_CURVE_TEXT)
            continue
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        lo, hi = min(values), max(values)
        span_s = max(1, steps[-1] - steps[0])
        span_v = (hi - lo) or 1.0
        xy = [(4 + (s - steps[0]) / span_s * (width - 8), top + panel_h - 6 - (v - lo) / span_v * (panel_h - 24))
              for s, v in points]
        if len(xy) == 1:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        else:
            draw.line(xy, fill=colour, width=2)
        draw.text((6, top + 4), f"{label} loss {values[-1]:.4g} (min {lo:.4g}, max {hi:.4g}) step {steps[-1]}",
                  fill=colour)
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def preview_image(array) -> torch.Tensor:
    if array is None:
        return torch.full((1, 64, 64, 3), 0.5)
    return torch.from_numpy(array.astype("float32") / 255.0)[None]


def _refuse(error: Exception):
    raise ValueError(str(error)) from None


def _wait_for_job(manager, job_id: str, timeout: float | None = None):
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


# ---------------------------------------------------------------------------------------------------------------
# Nodes


# What most users set on TDM Distill: the prompts, the name, how long, how strongly guided, at what size, and memory.
# The rest keeps working defaults and is marked advanced (folded on the node, web/tdm_advanced.js).
_RARELY_USED = {"prompts_file", "unconditional_prompt", "steps", "grid", "lora_rank", "lora_alpha", "learning_rate",
                "batch_size", "keep_last", "preview_every", "seed", "dtype", "offload",
                *(spec.id for spec in recipe_inputs.knob_inputs())}


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
                io.Model.Input("model", tooltip="The teacher (SD1.5-family, SDXL, SD3/SD3.5 or Flux-dev), with any "
                                                "LoRAs applied to it. The job shares its loaded weights; sampling "
                                                "from it meanwhile is unaffected."),
                io.Clip.Input("clip", tooltip="The teacher's text encoder (from the same loader); it encodes the "
                                              "prompts once, when the job starts."),
                io.String.Input("prompts", multiline=True, default="a photo of a cat\na watercolor landscape",
                                tooltip="Training prompts, one per line (lines starting with # are skipped). TDM is "
                                        "data-free: prompts are all it needs. Combined with prompts_file."),
                io.Combo.Input("prompts_file", options=_input_text_files(), default=NO_FILE,
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
                               tooltip="LoRA alpha; 0 = rank (scale 1 in every loader). -1: the recipe's."),
                io.Float.Input("learning_rate", default=-1.0, min=-1.0, max=1e-2, step=1e-6, round=False,
                               tooltip="Fake-score learning rate (official 1e-4, README run 2e-5). -1: the "
                                       "recipe's."),
                io.Float.Input("cfg", default=-1.0, min=-1.0, max=20.0, step=0.1,
                               tooltip="Teacher guidance distilled into the student (official demo 2, README run 4.5, "
                                       "Flow-Factory 4); the student then samples with CFG 1. Flux-dev: 1 (its "
                                       "guidance is FluxGuidance's value). -1: the recipe's."),
                io.Int.Input("batch_size", default=-1, min=-1, max=64,
                             tooltip="Trajectories per iteration. -1: the recipe's (1)."),
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
            ]),
            outputs=[io.String.Output("job_id", display_name="job_id", tooltip="The job's id, for TDM Distill Status / Stop and the "
                                                        "/tdm/jobs HTTP routes.")],
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
    def execute(cls, model, clip, vae=None, **values) -> io.NodeOutput:
        inputs.check_inputs(cls, values)
        try:
            record = start_job(model, clip, values, vae)
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
                record = _wait_for_job(manager, record.id)
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
                record = _wait_for_job(manager, record.id, timeout=600)
        except jobs.JobError as error:
            _refuse(error)
        text = record.progress_text()
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES: list = [TDMDistillStart, TDMDistillStatus, TDMDistillStop]

from . import routes  # noqa: E402  (registers the HTTP routes when a server is running)

routes.register(get_manager)
