"""A TDM Distill job as a headless run: the teacher's files traced from the queued graph, and the job's record turned
into the config `python -m tdm_core.distill` (or `torchrun`) trains the same job from (tdm_comfy/teacher.py).

At job start the node's graph (ComfyUI's API prompt) is walked upstream from TDM Distill's `model`, `clip` and `vae`
inputs through the core loader nodes: Load Checkpoint, Load Diffusion Model, Load CLIP / Dual / Triple CLIP, Load VAE
and the LoRA loaders between them. What they load is recorded with the job (`settings.teacher_files`); any other node
on those paths (a model patch, another pack's loader) is named instead, since a headless run could not rebuild it.
The export checks that record again (job.json is data on disk) by the headless teacher's own rules.
"""

from __future__ import annotations

import os

from tdm_core import jobs, validation
from tdm_core.cogvideox import CogVideoXError
from tdm_core.distill.teacher_files import FILE_FIELDS, OPTION_DEFAULTS, TeacherFiles

from .cogvideox_teacher import PIPE_INPUT, resolve_folder

# Loader nodes a headless run rebuilds, by ComfyUI class name → the input holding the file name.
_LORA_NODES = {"LoraLoader", "LoraLoaderModelOnly"}
_MAX_DEPTH = 64  # a chain of loaders longer than this is not a teacher graph anyone draws


class NotTraceable(ValueError):
    """A path from TDM Distill's inputs back to the files passes through a node a headless run cannot rebuild."""


def _link(value) -> tuple[str, int] | None:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) and isinstance(value[1], int):
        return str(value[0]), value[1]
    return None


def _node(prompt: dict, link: tuple[str, int]) -> tuple[str, dict]:
    node = prompt.get(link[0])
    if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
        raise NotTraceable(f"node {link[0]} is missing from the graph")
    return str(node.get("class_type")), node["inputs"]


def _widget(inputs: dict, name: str, node_id: str, class_type: str):
    value = inputs.get(name)
    if _link(value) is not None or value is None:
        raise NotTraceable(f"{class_type} (node {node_id}) takes its {name} from another node; a headless config "
                           "needs it written in the loader")
    return value


def _walk(prompt: dict, link, kind: str, found: dict) -> None:
    """Follows a MODEL (`kind` "model") or CLIP ("clip") path back to its loader, filling `found`."""
    for _ in range(_MAX_DEPTH):
        if link is None:
            raise NotTraceable(f"TDM Distill's {kind} input is not connected to a loader")
        class_type, inputs = _node(prompt, link)
        node_id, slot = link
        if class_type in _LORA_NODES:
            name = _widget(inputs, "lora_name", node_id, class_type)
            lora = found["loras"].setdefault(node_id, {"name": name, "strength_model": 0.0, "strength_clip": 0.0})
            strength = "strength_model" if kind == "model" else "strength_clip"
            lora[strength] = float(_widget(inputs, strength, node_id, class_type))
            link = _link(inputs.get(kind))
            continue
        if class_type == "CheckpointLoaderSimple":
            name = _widget(inputs, "ckpt_name", node_id, class_type)
            if found.setdefault("checkpoint", name) != name:
                raise NotTraceable("TDM Distill's model and clip come from two different checkpoints")
            return
        if kind == "model" and class_type == "UNETLoader":
            found["diffusion_model"] = _widget(inputs, "unet_name", node_id, class_type)
            found["weight_dtype"] = _widget(inputs, "weight_dtype", node_id, class_type)
            return
        if kind == "clip" and class_type in ("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader"):
            names = (["clip_name"] if class_type == "CLIPLoader" else
                     ["clip_name1", "clip_name2"] + (["clip_name3"] if class_type == "TripleCLIPLoader" else []))
            found["text_encoders"] = [_widget(inputs, n, node_id, class_type) for n in names]
            if class_type != "TripleCLIPLoader":
                found["clip_type"] = _widget(inputs, "type", node_id, class_type)
            if inputs.get("device", "default") != "default":
                found["note"] = f"{class_type} (node {node_id}) puts the text encoder on the CPU; a headless run " \
                                "keeps ComfyUI's default"
            return
        raise NotTraceable(f"{class_type} (node {node_id}) sits between the loaders and TDM Distill's {kind}; a "
                           "headless run rebuilds only core loaders and LoRA loaders")
    raise NotTraceable(f"TDM Distill's {kind} input passes through more than {_MAX_DEPTH} nodes")


def trace_teacher_files(prompt, node_id) -> dict:
    """The teacher's files as the headless teacher's fields (tdm_comfy/teacher.py), or {"error": why not}."""
    try:
        if not isinstance(prompt, dict) or str(node_id) not in prompt:
            raise NotTraceable("the queued graph was not available to TDM Distill")
        _, inputs = _node(prompt, (str(node_id), 0))
        pipe = _link(inputs.get(PIPE_INPUT))
        if pipe is not None:
            return _trace_cogvideox(prompt, pipe)
        found: dict = {"loras": {}}
        _walk(prompt, _link(inputs.get("model")), "model", found)
        _walk(prompt, _link(inputs.get("clip")), "clip", found)
        vae = _link(inputs.get("vae"))
        if vae is not None:
            class_type, vae_inputs = _node(prompt, vae)
            if class_type == "VAELoader":
                found["vae"] = _widget(vae_inputs, "vae_name", vae[0], class_type)
            elif class_type != "CheckpointLoaderSimple" or vae_inputs.get("ckpt_name") != found.get("checkpoint"):
                raise NotTraceable(f"TDM Distill's vae comes from {class_type} (node {vae[0]}); a headless run "
                                   "loads Load VAE files or the teacher checkpoint's own VAE")
        found["loras"] = list(found["loras"].values())
        return found
    except NotTraceable as error:
        return {"error": str(error)}


# TDM CogVideoX Loader's dtype names → the diffusers-folder teacher's (DistillConfig's dtype names)
_PIPE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _trace_cogvideox(prompt: dict, link: tuple[str, int]) -> dict:
    """A teacher on TDM Distill's cogvideox input: the diffusers folder TDM CogVideoX Loader loads, which the headless
    diffusers-folder teacher loads the same way."""
    class_type, inputs = _node(prompt, link)
    if class_type != "TDMCogVideoXLoader":
        raise NotTraceable(f"TDM Distill's cogvideox comes from {class_type} (node {link[0]}); a headless run loads "
                           "the folder of a TDM CogVideoX Loader")
    folder = _widget(inputs, "model_folder", link[0], class_type)
    dtype = _widget(inputs, "dtype", link[0], class_type)
    if not isinstance(folder, str) or dtype not in _PIPE_DTYPES:
        raise NotTraceable(f"{class_type} (node {link[0]}) holds no folder name and dtype a headless run can use")
    return {"diffusers_folder": folder, "dtype": _PIPE_DTYPES[dtype]}


def _folder_teacher(record: jobs.JobRecord, files: dict, comfy: dict) -> dict:
    """The diffusers-folder teacher of a job on TDM CogVideoX Loader's pipeline: the folder as this ComfyUI resolves
    it (the loader's own rule: a CogVideoX folder it lists under models/diffusers), the job's size and dtype."""
    name, dtype = files.get("diffusers_folder"), files.get("dtype")
    who = f"TDM job {record.id} '{record.name}'"
    try:
        validation.lexical_relative(name, "teacher_files.diffusers_folder")
    except validation.ValidationError as error:
        raise ValueError(f"{who} holds an unusable teacher record: {error}") from None
    if dtype not in _PIPE_DTYPES.values():
        raise ValueError(f"{who} holds an unusable teacher record: dtype {str(dtype)[:40]!r}")
    try:
        candidate = os.path.realpath(resolve_folder(name))
    except CogVideoXError:
        raise ValueError(f"{who}: its teacher folder {name!r} is no longer under models/diffusers") from None
    if comfy.get("dtype") in _PIPE_DTYPES.values():  # TDM Distill's own dtype wins over the loader's, as in the job
        dtype = comfy["dtype"]
    teacher = {"factory": "tdm_core.distill.diffusers_folder:make_backend", "folder": candidate, "dtype": dtype}
    for key in ("width", "height", "frames"):
        if isinstance(comfy.get(key), int):
            teacher[key] = comfy[key]
    return teacher


def headless_config(record: jobs.JobRecord, comfyui_dir: str, output_dir: str) -> dict:
    """The run config of `record`'s job: its DistillConfig as recorded, the teacher built from the traced files with
    the job's ComfyUI options, written to `output_dir`. Raises ValueError when the job cannot run headless."""
    settings = record.settings if isinstance(record.settings, dict) else {}
    if "config" not in settings:
        raise ValueError(f"TDM job {record.id} '{record.name}' was started by an older version of this pack; "
                         "resume it once in ComfyUI to export it")
    config = jobs.record_config(settings["config"])  # checked field by field
    comfy = settings.get("comfy") if isinstance(settings.get("comfy"), dict) else {}
    files = settings.get("teacher_files")
    if not isinstance(files, dict):
        raise ValueError(f"TDM job {record.id} '{record.name}' has no record of its teacher's files (it started "
                         "before jobs recorded them); queue its workflow again with if_exists = resume")
    if "error" in files:
        raise ValueError(f"TDM job {record.id} '{record.name}' cannot run headless: {str(files['error'])[:300]}")
    if "diffusers_folder" in files:
        teacher = _folder_teacher(record, files, comfy)
    else:
        fields = {k: files[k] for k in FILE_FIELDS if k in files}
        try:
            TeacherFiles(**fields)  # the headless teacher's own checks, on data read back from disk
        except (TypeError, ValueError) as error:
            raise ValueError(f"TDM job {record.id} '{record.name}' holds an unusable teacher record: {error}") from None
        teacher = {"factory": "tdm_comfy.teacher:make_backend", "comfyui_dir": comfyui_dir, **fields}
        for key in OPTION_DEFAULTS:
            if key in comfy:
                teacher[key] = comfy[key]
    data = config.to_dict()
    data.update(output_dir=output_dir, checkpoint_every=record.save_every or data["checkpoint_every"],
                preview_every=record.preview_every, keep_last=config.keep_last, teacher=teacher)
    return data
