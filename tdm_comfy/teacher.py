"""The headless teacher from ComfyUI model files: `teacher = { factory = "tdm_comfy.teacher:make_backend", ... }`.

The files are loaded by ComfyUI's own loader nodes (Load Checkpoint, or Load Diffusion Model + Load CLIP + Load VAE,
then Load LoRA for each LoRA the teacher carries), and the job is built by `nodes/distill_jobs.job_runtime`, the code
TDM Distill runs: the same conditioning, training network, adapters, grid and LoRA layout. A run therefore learns
what the node would learn from the same graph, and its student loads wherever the node's does.

Every field is checked, and every file name looked up in ComfyUI's model folders (its own `models/`, the
`base_directory`'s, and those of the tree's extra_model_paths.yaml), before any model is loaded; names are ComfyUI's
own (as its loader nodes list them, sub-folders with '/'), so paths cannot leave those folders.
"""

from __future__ import annotations

from pathlib import Path

from tdm_core import families
from tdm_core.distill.config import ConfigError
from tdm_core.distill.teacher_files import OPTION_DEFAULTS, TeacherFiles, check_options

from . import runtime


def check_present(files: TeacherFiles) -> None:
    """Every named file exists in ComfyUI's folders and every choice is one its loaders offer (ComfyUI
    started, nothing loaded)."""
    import folder_paths

    import nodes

    def present(folder: str, name: str, field: str):
        if name not in folder_paths.get_filename_list(folder):
            places = ", ".join(folder_paths.get_folder_paths(folder)) or "(no folder)"
            raise ConfigError(f"{field} = {name!r} is not in ComfyUI's {folder} folders ({places})")

    if files.checkpoint:
        present("checkpoints", files.checkpoint, "teacher.checkpoint")
    if files.diffusion_model:
        present("diffusion_models", files.diffusion_model, "teacher.diffusion_model")
        options = nodes.UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0]
        if files.weight_dtype not in options:
            raise ConfigError(f"teacher.weight_dtype must be one of {', '.join(options)}, got "
                              f"{files.weight_dtype!r}")
    for i, name in enumerate(files.text_encoders):
        present("text_encoders", name, f"teacher.text_encoders[{i}]")
    if files.text_encoders and len(files.text_encoders) < 3:
        loader = nodes.CLIPLoader if len(files.text_encoders) == 1 else nodes.DualCLIPLoader
        options = loader.INPUT_TYPES()["required"]["type"][0]
        if files.clip_type not in options:
            raise ConfigError(f"teacher.clip_type for {len(files.text_encoders)} text encoder(s) must be one of "
                              f"{', '.join(options)}, got {files.clip_type!r}")
    if files.vae:
        present("vae", files.vae, "teacher.vae")
    for i, (name, _, _) in enumerate(files.loras):
        present("loras", name, f"teacher.loras[{i}].name")

def load(files: TeacherFiles):
    """(MODEL, CLIP, VAE or None) by ComfyUI's loader nodes, as a graph of them would."""
    import comfy.sd
    import folder_paths

    import nodes

    vae = None
    if files.checkpoint:
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(files.checkpoint)[:3]
    else:
        (model,) = nodes.UNETLoader().load_unet(files.diffusion_model, files.weight_dtype)
        if len(files.text_encoders) == 1:
            (clip,) = nodes.CLIPLoader().load_clip(files.text_encoders[0], files.clip_type)
        elif len(files.text_encoders) == 2:
            (clip,) = nodes.DualCLIPLoader().load_clip(*files.text_encoders, files.clip_type)
        else:  # what Triple CLIP Loader (comfy_extras/nodes_sd3.py) runs
            paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in files.text_encoders]
            clip = comfy.sd.load_clip(ckpt_paths=paths,
                                      embedding_directory=folder_paths.get_folder_paths("embeddings"))
    if files.vae:
        (vae,) = nodes.VAELoader().load_vae(files.vae)
    for name, strength_model, strength_clip in files.loras:
        model, clip = nodes.LoraLoader().load_lora(model, clip, name, strength_model, strength_clip)
    return model, clip, vae


def make_backend(config=None, comfyui_dir: str = "", base_directory: str = "", comfyui_args: dict | None = None,
                 checkpoint: str = "", diffusion_model: str = "", weight_dtype: str = "default",
                 text_encoders: list | None = None, clip_type: str = "", vae: str = "", loras: list | None = None,
                 **options):
    """The teacher of TDM Distill built from ComfyUI files, as the headless trainer's backend. `options`: TDM Distill's
    width, height, grid, unconditional_prompt, dtype and gradient_checkpointing (see OPTION_DEFAULTS).

    `config` (the run's DistillConfig) must name the teacher's `family`, so that `recipe = "auto"` resolves to the
    family's recipe before anything loads; it is checked against the loaded model. The run's `timesteps` and
    `sampler_preset` are the grid's (filled in when the config leaves them out, refused when they differ)."""
    if config is None:
        raise ConfigError("the ComfyUI-files teacher needs the run's config")
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown teacher keys {unknown}; the ComfyUI-files teacher takes comfyui_dir, "
                          "base_directory, comfyui_args, checkpoint, diffusion_model, weight_dtype, text_encoders, "
                          f"clip_type, vae, loras and {', '.join(OPTION_DEFAULTS)}")
    files = TeacherFiles(checkpoint, diffusion_model, weight_dtype, text_encoders, clip_type, vae, loras)
    settings = check_options(options)
    family = config.family
    if family not in families.FAMILIES or not families.FAMILIES[family].distillable:
        raise ConfigError(f"family must name the teacher's family ({families.distillable_families_text()}), got "
                          f"{family!r}: recipe auto and the LoRA's header are the family's")
    tree = runtime.check_tree(comfyui_dir)
    base = None
    if base_directory:
        base = Path(base_directory).expanduser().resolve()
        if not (base / "models").is_dir():
            raise ConfigError(f"teacher.base_directory = {base_directory!r} has no models/ folder")
    runtime.start(tree, base, runtime.check_args(comfyui_args))
    runtime.load_pack()
    from comfyui_tdm.nodes import distill_jobs, family_adapters
    from comfyui_tdm.nodes.trainer import GRID_CHOICES

    if settings["grid"] not in GRID_CHOICES:
        raise ConfigError(f"teacher.grid must be one of {', '.join(GRID_CHOICES)}, got {settings['grid']!r}")
    if settings["dtype"] not in distill_jobs.comfy_backend.DTYPES:
        raise ConfigError(f"teacher.dtype must be one of {', '.join(distill_jobs.comfy_backend.DTYPES)}, got "
                          f"{settings['dtype']!r}")
    check_present(files)

    model, clip, vae_model = load(files)
    loaded = family_adapters.model_family(model)
    if loaded != family:
        raise ConfigError(f"family = {family!r}, but the teacher's files hold a {loaded!r} model "
                          f"({family_adapters.describe_model(model)})")
    job = distill_jobs.JobSettings(config, dict(settings, offload="none"))
    try:
        built, _, grid = distill_jobs.job_runtime(model, clip, job, vae_model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.timesteps is None:
        config.timesteps = list(grid.timesteps)
    elif list(config.timesteps) != list(grid.timesteps):
        raise ConfigError(f"timesteps {list(config.timesteps)} are not the grid teacher.grid = "
                          f"{settings['grid']!r} trains on ({list(grid.timesteps)})")
    if not config.sampler_preset:
        config.sampler_preset = grid.preset or ""
    backend = built.backend
    backend.to(built.device)
    decode = built.preview_decode
    if decode is not None:
        backend.preview_image = lambda x0: decode(x0)  # the CLI writes it as a PNG beside each preview's tensors
    return backend
