"""From TDM Distill's inputs to a job: its prompts, its settings as the job records them, and its runtime (the
teacher's training network with both adapters, the DistillConfig of the chosen recipe, previews), built on the
prompt executor's thread. `nodes/trainer.py` holds the nodes; `tdm_core.jobs` runs what this builds.
"""

from __future__ import annotations

import os

import torch

from tdm_core import jobs, schedules
from tdm_core.distill import ConfigError, DistillConfig

from . import comfy_backend, conditioning, family_adapters, inputs, recipe_inputs, training_network

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
        in_use = (training_network.weight_memory(self.comfy_model.diffusion_model) if self.comfy_model is not None
                  else frozenset())
        self.backend.to(torch.device("cpu"), keep=in_use)


def settings_from_inputs(values: dict, prompts: list[str]) -> dict:
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
    conds = conditioning.encode_prompts(clip, prompts, settings["unconditional_prompt"], model=model, family=family,
                                         latent_shape=latent_shape)
    conditioning.release_text_encoders(clip)  # before the teacher is made ready, so both never share the device
    network = training_network.training_network(model, device, comfy_backend.DTYPES[settings["dtype"]])
    family_adapters.adapter(family).prepare_for_training(network)
    if settings["gradient_checkpointing"]:
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
    metadata = comfy_backend.family_metadata(grid.preset, family, recipe_changes=changed)
    runtime = ComfyRuntime(backend, config, device, preview, metadata, comfy_model=model.model)
    return runtime, teacher, grid


def recorded_prompts(settings: dict, record: jobs.JobRecord) -> list[str]:
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


def edited_settings(recorded: dict, queued: dict) -> list[str]:
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
