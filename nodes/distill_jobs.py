"""From TDM Distill's inputs to a job: its prompts, the settings its record holds, and its runtime (the teacher's
training network with both adapters, the job's DistillConfig, previews), built on the prompt executor's thread.
`nodes/trainer.py` holds the nodes; `tdm_core.jobs` runs what this builds.

A job's record speaks one vocabulary (`JobSettings`, job.json's `settings`): the DistillConfig the job learns, the
ComfyUI-only options its runtime is built with (`comfy`: size, grid choice, unconditional prompt, memory options, the
knobs the node changed from the recipe), and the lines the panel and the status show. A resume rebuilds the runtime
from those, never by resolving the node's widgets through a recipe again, so a job keeps what it learned when a recipe
or a default changes later. Records written before held TDM Distill's widget values (`lora_rank` -1, `recipe_used`,
`prompt_list`, ...): the start node converts one when it reads it, the way its job resolved them (its checkpoint's
config, which wins on resume anyway, was built from the same values), and the resume writes it back in this shape.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tdm_core import families, jobs, recipes, schedules
from tdm_core.distill import ConfigError, DistillConfig

from . import cogvideox_teacher, comfy_backend, conditioning, family_adapters, inputs, recipe_inputs, training_network

NO_FILE = "(none)"


def input_text_files() -> list[str]:
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

    def __init__(self, backend, config: DistillConfig, device: torch.device, preview_decode, extra_metadata: dict,
                 shared_network: torch.nn.Module | None = None):
        self.backend = backend
        # the network whose weights the training network shares: ComfyUI's loaded diffusion model, or the
        # transformer of TDM CogVideoX Loader's pipeline
        self.shared_network = shared_network
        self.config = config
        self.device = torch.device(device)
        self.preview_decode = preview_decode
        self.extra_metadata = extra_metadata

    def build(self, state: dict | None, iterations: int | None = None) -> jobs.TDMSession:
        self.backend.to(self.device)
        # the record's iterations, not the checkpoint's: a resume for more iterations stretches a decaying learning
        # rate over them, as a headless `--resume --iterations N` does
        return jobs.TDMSession.create(self.backend, DistillConfig.from_dict(self.config.to_dict()), state,
                                      iterations=iterations, preview_decode=self.preview_decode,
                                      extra_metadata=self.extra_metadata)

    def offload(self) -> None:
        """Parks the job's network on the CPU, except the weights ComfyUI (or the pipeline) still holds on the device
        itself (they cost the job nothing there; moving them would only add a CPU copy). Once ComfyUI has unloaded or
        replaced them, the job's aliases are their only holder and they do move."""
        if self.device.type == "cpu":
            return
        in_use = (training_network.weight_memory(self.shared_network) if self.shared_network is not None
                  else frozenset())
        self.backend.to(torch.device("cpu"), keep=in_use)


# The ComfyUI-only options a job records beside its DistillConfig (TDM Distill's input names): what its runtime is
# built with that the config does not hold. How often to save and preview are the record's own fields.
COMFY_OPTIONS = ("width", "height", "grid", "unconditional_prompt", "dtype", "offload", "gradient_checkpointing",
                 "frames")
# Of those, the ones that change what the job learns; the others are run options. (`frames` only for a video family:
# an image teacher ignores it, so changing it changes nothing of an image job.)
LEARNED_COMFY = ("width", "height", "grid", "unconditional_prompt", "frames")
# TDM Distill's `frames` default, for workflows saved before the input existed: Wan's default clip, 33 frames (9
# latent frames), the length of ComfyUI's own Wan 2.1 text-to-video example.
DEFAULT_FRAMES = 33
# Inputs a queue may change without making another job, applied when it resumes one: how long and how it runs, not
# what it learns. Every other setting defines the LoRA (prompts, grid, steps, cfg, rates, rank, size, batch, seed...).
RUN_OPTIONS = ("iterations", "gradient_checkpointing", "dtype", "offload", "save_every", "keep_last", "preview_every",
               "micro_batch")
# DistillConfig fields never compared with the existing job's: the run options, the headless runs' own (a job does not
# use them), and what the teacher and the grid choice decide (the teacher check and the grid choice compare those).
_NOT_COMPARED = frozenset({"iterations", "keep_last", "micro_batch", "checkpoint_every", "preview_every", "log_every",
                           "output_dir", "preview_prompts", "dtype", "family", "timesteps", "total_steps", "sampler_preset",
                           "recommended_strength", "teacher", "parallel", "lora_file"})
_CONFIG_FIELDS = frozenset(field.name for field in dataclasses.fields(DistillConfig))


@dataclass
class JobSettings:
    """What a job's record holds as its `settings`: what it learns and how its runtime is built."""

    config: DistillConfig
    comfy: dict  # COMFY_OPTIONS by input name; "recipe_changes": the knobs the node changed ("cfg 3.5", ...)
    recipe_description: str = ""
    grid_description: str = ""
    # the loader files the queued graph fed the teacher from, or {"error": why not} (nodes/headless_export.py)
    teacher_files: dict | None = None

    def record(self) -> dict:
        record = {"config": self.config.to_dict(), "comfy": dict(self.comfy),
                  "recipe_description": self.recipe_description, "grid_description": self.grid_description}
        if self.teacher_files is not None:
            record["teacher_files"] = dict(self.teacher_files)
        return record

    def learned(self) -> dict:
        """What the job learns, by name: the config's fields but those of _NOT_COMPARED, and the comfy options
        that change it."""
        values = {k: v for k, v in self.config.to_dict().items() if k not in _NOT_COMPARED}
        video = getattr(families.FAMILIES.get(self.config.family), "video", False)
        return values | {k: self.comfy[k] for k in LEARNED_COMFY if k in self.comfy and (k != "frames" or video)}


def micro_batch(values: dict) -> int:
    """TDM Distill's micro_batch (0, all rows in one pass, for workflows saved before the input existed)."""
    return int(values.get("micro_batch", 0))


def settings_from_inputs(values: dict, prompts: list[str], family: str, grid=None,
                         recorded: JobSettings | None = None) -> JobSettings:
    """The settings a job started from TDM Distill's inputs records. `grid`: the training grid (None where the settings
    are only compared: the grid choice stands for it). `recorded`: an existing job's, when asking what the inputs would
    make of that job: `auto` is the recipe the job resolved, and a knob left to the recipe keeps the job's value
    unless the job's node had changed it (the recipe's value, the one the node now asks for, is then compared)."""
    if recorded is not None and values.get("recipe", recipes.AUTO) == recipes.AUTO:
        values = dict(values, recipe_used=recorded.config.recipe)
    knobs, changed, recipe, explicit = recipe_inputs.resolve_knobs(values, family)
    if recorded is not None and recipe == recorded.config.recipe:
        kept = recorded.config.to_dict()
        own = explicit | recipe_inputs.changed_fields(recorded.comfy.get("recipe_changes", []))
        knobs = {key: value if key in own or key not in kept else kept[key] for key, value in knobs.items()}
    try:
        config = DistillConfig(
            prompts=list(prompts), steps=int(values["steps"]), timesteps=grid.timesteps if grid else None,
            seed=int(values["seed"]), iterations=int(values["iterations"]), micro_batch=micro_batch(values),
            total_steps=schedules.TRAINING_DEMO_TOTAL_STEPS, keep_last=int(values["keep_last"]), family=family,
            recommended_strength=1.0, sampler_preset=grid.preset if grid else "", **knobs)
    except (ConfigError, TypeError, ValueError) as error:
        raise ValueError(f"TDM Distill (recipe {recipe}): {error}") from None
    comfy = {key: values.get(key, DEFAULT_FRAMES) if key == "frames" else values[key] for key in COMFY_OPTIONS}
    comfy["recipe_changes"] = changed
    return JobSettings(config, comfy, recipe_inputs.description(recipe, changed), grid.description if grid else "")


def new_job_settings(model, values: dict, prompts: list[str], cogvideox=None) -> JobSettings:
    """A new job's settings from TDM Distill's inputs and the teacher: a MODEL, or TDM CogVideoX Loader's pipeline
    (`cogvideox`, with model None); its family and training grid."""
    if cogvideox is not None:
        cogvideox_teacher.check_teacher(cogvideox)
        _, grid = cogvideox_teacher.training_grid(cogvideox, values, int(values["steps"]))
        return settings_from_inputs(values, prompts, cogvideox_teacher.FAMILY, grid)
    family = family_adapters.model_family(model)
    family_adapters.check_distillable(model, family)
    _, grid = _training_grid(model, family, values, int(values["steps"]))
    return settings_from_inputs(values, prompts, family, grid)


def recorded_settings(record: jobs.JobRecord, values: dict, model, check: Callable[[dict], None]) -> JobSettings:
    """An existing job's settings from its record, checked: job.json is data on disk anyone can edit (the config was
    checked field by field when it was read back; `check` holds TDM Distill's input values to the node's rules).
    Options the record lacks (inputs added to the node after the job started) take the workflow's values. A record
    written before jobs recorded their DistillConfig is converted, with the teacher MODEL's family and grid."""
    settings = record.settings
    if "config" in settings:
        config = jobs.record_config(settings["config"])
        recorded_prompts(config.prompts, record)
        comfy = dict(settings.get("comfy") or {})
        for key in COMFY_OPTIONS:
            comfy.setdefault(key, values.get(key, DEFAULT_FRAMES) if key == "frames" else values[key])
        check({key: comfy[key] for key in COMFY_OPTIONS})
        changes = comfy.setdefault("recipe_changes", [])
        if not isinstance(changes, list) or not all(
                isinstance(c, str) and c.split(" ", 1)[0] in _CONFIG_FIELDS for c in changes):
            raise ValueError(f"the record of TDM job {record.id} '{record.name}' names recipe changes that are not "
                             "DistillConfig fields; start a new job under another output name")
        return JobSettings(config, comfy, str(settings.get("recipe_description", "")),
                           str(settings.get("grid_description", "")), settings.get("teacher_files"))
    if model is None:  # jobs on TDM CogVideoX Loader's pipeline were never recorded in the older shape
        raise ValueError(f"the record of TDM job {record.id} '{record.name}' has no DistillConfig; start a new job "
                         "under another output name")
    old = dict(settings)
    prompts = recorded_prompts(old.get("prompt_list"), record)
    for key, value in values.items():
        if key not in ("prompts", "prompts_file"):
            old.setdefault(key, value)
    check(old)
    family = family_adapters.model_family(model)
    _, grid = _training_grid(model, family, old, int(old["steps"]))
    converted = settings_from_inputs(old, prompts, family, grid)
    for key in ("recipe_description", "grid_description"):  # as the job showed them
        if isinstance(old.get(key), str) and old[key]:
            setattr(converted, key, old[key])
    return converted


def with_run_options(recorded: JobSettings, values: dict) -> JobSettings:
    """The job's settings with the run options of the queued node (memory: the usual fix after running out of it)."""
    config = dataclasses.replace(recorded.config, iterations=int(values["iterations"]),
                                 keep_last=int(values["keep_last"]), micro_batch=micro_batch(values))
    comfy = dict(recorded.comfy, **{key: values[key] for key in RUN_OPTIONS if key in COMFY_OPTIONS})
    return dataclasses.replace(recorded, config=config, comfy=comfy)


def _training_grid(model, family: str, options: dict, steps: int):
    """(latent shape, training grid) for the width, height (and, for a video family, frames) and grid choice of
    `options`. The family's adapter decides the latent's shape: an image's (C, H/8, W/8), a video's (C, T, H/8, W/8)
    with T from `frames` (a record without it: the adapter's default length)."""
    width, height = int(options["width"]), int(options["height"])
    if width % 16 or height % 16:
        raise ValueError(f"width and height must be multiples of 16 (got {width}×{height})")
    frames = options.get("frames")
    latent_shape = family_adapters.training_latent_shape(model, family, width, height,
                                                         None if frames is None else int(frames))
    grid = comfy_backend.training_grid(model, family, options["grid"], steps, schedules.TRAINING_DEMO_TOTAL_STEPS,
                                       latent_shape=latent_shape)
    return latent_shape, grid


def build_runtime(model, clip, settings: dict, prompts: list[str], vae=None):
    """The runtime of a new job started with TDM Distill's inputs `settings`: `job_runtime` of its settings."""
    return job_runtime(model, clip, new_job_settings(model, settings, prompts), vae)


def job_runtime(model, clip, job: JobSettings, vae=None, cogvideox=None, previews: bool = True):
    """The job's runtime from the teacher MODEL/CLIP (or TDM CogVideoX Loader's pipeline, `cogvideox`) and its
    settings: (runtime, teacher fingerprint, grid). Runs on the prompt executor's thread (CLIP encoding, building the
    training network on ComfyUI's loaded weights and adapter creation use ComfyUI's memory manager and the process
    RNG). `previews` False: the job never previews (a pipeline job then keeps no copy of the VAE)."""
    config, options = job.config, job.comfy
    if cogvideox is not None:
        return _pipe_job_runtime(cogvideox, job, previews)
    family = family_adapters.model_family(model)
    family_adapters.check_distillable(model, family)
    parametrisation = comfy_backend.model_parametrisation(model)
    channels = int(model.model.latent_format.latent_channels)
    latent_shape, grid = _training_grid(model, family, options, config.steps)
    family_adapters.check_distillable(model, family, config.cfg)
    try:
        config.validate(num_timesteps=grid.schedule.num_timesteps)
    except ConfigError as error:
        raise ValueError(f"TDM Distill (recipe {config.recipe}): {error}") from None

    device = _device(options["offload"])
    conds = conditioning.encode_prompts(clip, config.prompts, options["unconditional_prompt"], model=model,
                                         family=family, latent_shape=latent_shape)
    conditioning.release_text_encoders(clip)  # before the teacher is made ready, so both never share the device
    network = training_network.training_network(model, device, comfy_backend.DTYPES[options["dtype"]])
    family_adapters.adapter(family).prepare_for_training(network)
    if options["gradient_checkpointing"]:
        training_network.enable_gradient_checkpointing(network)
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
    metadata = comfy_backend.family_metadata(grid.preset, family, recipe_changes=options.get("recipe_changes", []))
    runtime = ComfyRuntime(backend, config, device, preview, metadata, shared_network=model.model.diffusion_model)
    return runtime, teacher, grid


def _device(offload: str) -> torch.device:
    import comfy.model_management

    if offload == "unload_comfy_models":
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    return torch.device("cpu") if offload == "train_on_cpu" else comfy.model_management.get_torch_device()


def _pipe_job_runtime(pipe, job: JobSettings, previews: bool = True):
    """job_runtime for a teacher from TDM CogVideoX Loader (nodes/cogvideox_teacher.py)."""
    config, options = job.config, job.comfy
    if config.family != cogvideox_teacher.FAMILY:
        raise ValueError(f"this job distils a {config.family} teacher; TDM Distill's cogvideox input holds a "
                         "CogVideoX pipeline: connect the job's own teacher to model and clip")
    if options["unconditional_prompt"]:
        raise ValueError("a CogVideoX teacher's unconditional prompt is the empty one (CogVideoX samples with an "
                         "empty negative prompt by default); leave unconditional_prompt empty")
    cogvideox_teacher.check_teacher(pipe)
    latent_shape, grid = cogvideox_teacher.training_grid(pipe, options, config.steps)
    try:
        config.validate(num_timesteps=grid.schedule.num_timesteps)
    except ConfigError as error:
        raise ValueError(f"TDM Distill (recipe {config.recipe}): {error}") from None
    device = _device(options["offload"])
    teacher = cogvideox_teacher.teacher_fingerprint(pipe)
    backend = cogvideox_teacher.build_backend(pipe, config, options, device, latent_shape, grid)
    # the VAE copy (0.4 GB in bf16 for the 2B) only where the job will preview
    preview = cogvideox_teacher.preview_decoder(pipe, device) if previews else None
    metadata = comfy_backend.family_metadata(grid.preset, config.family,
                                             recipe_changes=options.get("recipe_changes", []))
    return ComfyRuntime(backend, config, device, preview, metadata, shared_network=pipe.transformer), teacher, grid


def recorded_prompts(prompts, record: jobs.JobRecord) -> list[str]:
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts) or sum(
            len(p) for p in prompts) > inputs.MAX_TEXT:
        raise ValueError(f"the record of TDM job {record.id} '{record.name}' holds no valid prompt list; start a new "
                         "job under another output name")
    return list(prompts)


def edited_settings(recorded: JobSettings, queued: JobSettings) -> list[str]:
    """What the queued node changes in what the existing job learns, in words ("cfg 2.0 → 3.0")."""
    old = recorded.learned()
    edited = []
    for key, value in queued.learned().items():
        if key not in old or old[key] == value:
            continue
        prior = old[key]
        if key == "prompts":
            edited.append(f"prompts ({len(prior) if isinstance(prior, list) else '?'} → {len(value)} lines, edited)"
                          if not isinstance(prior, list) or len(prior) != len(value) else "prompts (edited)")
        else:
            edited.append(f"{key} {str(prior)[:40]} → {str(value)[:40]}")
    return edited


def start_job(manager: jobs.JobManager, model, clip, values: dict, vae=None, *,
              check_record: Callable[[dict], None], teacher_files: dict | None = None,
              cogvideox=None) -> jobs.JobRecord:
    """Everything TDM Distill does with its inputs (nodes/trainer.py): a new job, or the job of that output name
    continued or refused; raises ValueError with the reason to refuse. The teacher is the MODEL and CLIP, or TDM
    CogVideoX Loader's pipeline `cogvideox` (model and clip None). `check_record` checks an older record's widget
    values by the node's own rules (job.json is data on disk). `teacher_files`: the loader files the queued graph
    feeds the teacher from (nodes/headless_export.py), recorded for a headless export."""
    name = jobs.validate_output_name(values["output_name"], manager.loras_dir)
    existing = manager.find(name)
    prompts = read_prompts(values["prompts"], values["prompts_file"])
    if existing is None:
        job = new_job_settings(model, values, prompts, cogvideox)
    else:
        # The job's own settings (a record written before converted), checked by the node's rules: job.json is data
        # on disk.
        recorded = recorded_settings(existing, values, model, check_record)
        # A queue with edited settings (the prompts of a distil-then-sample graph, say) must not come back with the
        # old job's LoRA: neither reuse nor resume it, say what differs and offer a free name. What the node would
        # make the job learn is compared with what it learns; run options are not.
        edited = edited_settings(recorded, settings_from_inputs(values, prompts, recorded.config.family,
                                                                recorded=recorded))
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
        # Resume: the job's own settings, as recorded (a different rank or grid could not load its checkpoint, and a
        # recipe changed since must not change the job). Run options may change on resume (memory: the usual fix
        # after running out of it; how often to save).
        job = with_run_options(recorded, values)

    runtime, teacher, grid = job_runtime(model, clip, job, vae, cogvideox,
                                         previews=int(values["preview_every"]) > 0)
    job.grid_description = grid.description
    if teacher_files is not None:  # this queue's graph: a resumed job may have been renamed or moved files since
        job.teacher_files = teacher_files
    return manager.submit(name, runtime, job.config.iterations, save_every=int(values["save_every"]),
                          keep_last=int(values["keep_last"]), preview_every=int(values["preview_every"]),
                          settings=job.record(), teacher=teacher, if_exists=values["if_exists"])
