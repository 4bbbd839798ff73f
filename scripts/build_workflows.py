"""Generates the example workflows in workflows/ (UI format, what users drag into ComfyUI) from tdm_core.presets.

Widget order, socket types and defaults come from a live ComfyUI's /object_info, so the files always match the real
node schemas; every number (steps, shift, strength, file names, download sources) comes from the presets. Run after
changing a node schema or a preset:  .venv/bin/python scripts/build_workflows.py
A test regenerates them in memory and fails if the committed files differ.
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness.workflow_build import Node  # noqa: E402
from harness.workflow_build import build as build_ui  # noqa: E402
from tdm_core import __version__ as PACK_VERSION  # noqa: E402
from tdm_core.presets import PRESETS, get_preset  # noqa: E402

WORKFLOWS_DIR = REPO / "workflows"
PACK_PROPERTIES = {"cnr_id": "comfyui-tdm", "ver": PACK_VERSION}
CORE_VERSION = "0.3.75"
PROMPT = "a photo of a red fox sitting in fresh snow at sunrise, highly detailed"


def _note(preset_names: list[str], extra_lines: list[str] = ()) -> str:
    lines = []
    for name in preset_names:
        preset = get_preset(name)
        lines += [
            f"## {preset.display_name}",
            f"Base model: {preset.base_model_source}",
            f"  → models/{preset.base_model_folder}/{preset.base_model_file}",
            f"TDM LoRA: {preset.lora_source}",
            f"  → models/loras/{preset.lora_file}",
            f"Recipe: {preset.steps} steps, CFG {preset.cfg:g}, LoRA strength {preset.lora_strength:g}"
            + (f", shift {preset.shift:g}" if preset.shift else "") + f", solver {preset.solver}.",
        ]
        if preset.notes:
            lines.append(preset.notes)
        lines.append("")
    return "\n".join([*lines, *extra_lines]).strip()


def _image_tail(nodes, latent_key, vae_source, x, prefix):
    nodes += [
        Node("decode", "VAEDecode", links={"samples": (latent_key, 0), "vae": vae_source}, pos=(x, 100)),
        Node("save", "SaveImage", {"filename_prefix": prefix}, links={"images": ("decode", 0)}, pos=(x + 380, 100),
             size=(400, 440)),
    ]


def sd3_workflow(preset_name: str) -> list[Node]:
    """SD3/SD3.5 checkpoint → TDM LoRA Loader (auto strength = preset) → TDM Scheduler + TDM Sampler in
    SamplerCustomAdvanced (CFG 1) → decode → save. Shows the SAMPLER/SIGMAS nodes the way power users wire them."""
    preset = get_preset(preset_name)
    nodes = [
        Node("note", "Note", {"text": _note([preset_name])}, pos=(-480, 0), size=(440, 360), title="Read me"),
        Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": preset.base_model_file}, pos=(0, 0)),
        Node("lora", "TDMLoraLoader", {"lora_name": preset.lora_file, "strength_mode": "auto"},
             links={"model": ("ckpt", 0)}, pos=(380, 0)),
        Node("positive", "CLIPTextEncode", {"text": PROMPT}, links={"clip": ("ckpt", 1)}, pos=(380, 260)),
        Node("latent", "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(380, 500)),
        Node("noise", "RandomNoise", {"noise_seed": 42}, pos=(760, 0)),
        Node("guider", "BasicGuider", links={"model": ("lora", 0), "conditioning": ("positive", 0)}, pos=(760, 160)),
        Node("sampler", "TDMSampler", {"solver": "auto"}, pos=(760, 300)),
        Node("sigmas", "TDMScheduler", {"preset": preset_name, "steps": preset.steps, "shift": preset.shift},
             links={"model": ("lora", 0)}, pos=(760, 520)),
        Node("sample", "SamplerCustomAdvanced",
             links={"noise": ("noise", 0), "guider": ("guider", 0), "sampler": ("sampler", 0),
                    "sigmas": ("sigmas", 0), "latent_image": ("latent", 0)}, pos=(1140, 0)),
    ]
    _image_tail(nodes, "sample", ("ckpt", 2), 1500, f"tdm_{preset_name}")
    return nodes


def dreamshaper_workflow() -> list[Node]:
    """Dreamshaper-7 → TDM LoRA Loader (the .pt release, read safely) → TDM KSampler (all-in-one) → decode → save."""
    preset = get_preset("dreamshaper")
    nodes = [
        Node("note", "Note", {"text": _note(["dreamshaper"])}, pos=(-480, 0), size=(440, 360), title="Read me"),
        Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": preset.base_model_file}, pos=(0, 0)),
        Node("lora", "TDMLoraLoader", {"lora_name": preset.lora_file, "strength_mode": "auto"},
             links={"model": ("ckpt", 0)}, pos=(380, 0)),
        Node("positive", "CLIPTextEncode", {"text": PROMPT}, links={"clip": ("ckpt", 1)}, pos=(380, 260)),
        Node("latent", "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, pos=(380, 500)),
        Node("sample", "TDMKSampler", {"preset": "dreamshaper", "steps": preset.steps, "seed": 42},
             links={"model": ("lora", 0), "positive": ("positive", 0), "latent_image": ("latent", 0)},
             pos=(760, 0)),
    ]
    _image_tail(nodes, "sample", ("ckpt", 2), 1140, "tdm_dreamshaper")
    return nodes


def cogvideox_workflow() -> list[Node]:
    """CogVideoX-2b diffusers folder + TDM LoRA → TDM CogVideoX Sampler (trained timesteps) → CreateVideo →
    SaveVideo (mp4)."""
    preset = get_preset("cogvideox")
    return [
        Node("note", "Note", {"text": _note(["cogvideox"], [
            "The whole diffusers repository goes into models/diffusers/CogVideoX-2b/ (model_index.json, "
            "transformer/, vae/, text_encoder/, tokenizer/, scheduler/).",
            "Low VRAM: keep VAE tiling/slicing on and set offload to 'model' (≈10–12 GB) or 'sequential' (≈4 GB)."])},
             pos=(-480, 0), size=(440, 420), title="Read me"),
        Node("load", "TDMCogVideoXLoader", {"model_folder": preset.base_model_file, "dtype": "bf16",
                                            "lora_name": preset.lora_file, "lora_strength": preset.lora_strength},
             pos=(0, 0)),
        Node("sample", "TDMCogVideoXSampler", {"prompt": "a red fox trotting through fresh snow, cinematic",
                                               "frames": 49, "width": 720, "height": 480, "grid": "trained",
                                               "steps": preset.steps, "cfg": preset.cfg, "seed": 42},
             links={"cogvideox": ("load", 0)}, pos=(380, 0)),
        Node("video", "CreateVideo", links={"images": ("sample", 0), "fps": ("sample", 1)}, pos=(800, 0)),
        Node("save", "SaveVideo", {"filename_prefix": "video/tdm_cogvideox", "format": "mp4", "codec": "h264"},
             links={"video": ("video", 0)}, pos=(1100, 0), size=(400, 400)),
    ]


def cogvideox_native_workflow() -> list[Node]:
    """Newer ComfyUI's native CogVideoX-2B from the core loaders (UNETLoader / CLIPLoader type cogvideox /
    VAELoader) → TDM LoRA Loader → TDM KSampler (trained timesteps on the 2B's schedule) → VAEDecode → CreateVideo →
    SaveVideo. Needs a ComfyUI with native CogVideoX (upstream 2026; not 0.3.75)."""
    preset = get_preset("cogvideox")
    files = preset.extra["native_files"]
    geometry = {"width": 720, "height": 480, "length": 49}  # the 2B's training size (its position table's)
    return [
        Node("note", "Note", {"text": "\n".join([
            "## CogVideoX-2B (TDM_CogVideoX-2B_LoRA), native ComfyUI nodes",
            "Needs a ComfyUI with native CogVideoX (2026 upstream); on older ComfyUI use the "
            "tdm_cogvideox_2b_4step workflow (diffusers folder).",
            *[f"{folder}: {name}\n  from {source}\n  → models/{folder}/{name}"
              for folder, (name, source) in files.items()],
            f"TDM LoRA: {preset.lora_source}\n  → models/loras/{preset.lora_file}",
            f"Recipe: {preset.steps} steps at the trained timesteps 999/856/665/399, CFG {preset.cfg:g}, LoRA "
            f"strength {preset.lora_strength:g}; 720×480, 49 frames (the size the 2B's position table is for).",
        ])}, pos=(-480, 0), size=(440, 460), title="Read me"),
        Node("unet", "UNETLoader", {"unet_name": files["diffusion_models"][0], "weight_dtype": "default"},
             pos=(0, 0)),
        Node("clip", "CLIPLoader", {"clip_name": files["text_encoders"][0], "type": "cogvideox"}, pos=(0, 160)),
        Node("vae", "VAELoader", {"vae_name": files["vae"][0]}, pos=(0, 320)),
        Node("lora", "TDMLoraLoader", {"lora_name": preset.lora_file, "strength_mode": "auto"},
             links={"model": ("unet", 0)}, pos=(380, 0)),
        Node("positive", "CLIPTextEncode", {"text": "a red fox trotting through fresh snow, cinematic"},
             links={"clip": ("clip", 0)}, pos=(380, 260)),
        Node("latent", "EmptyHunyuanLatentVideo", {**geometry, "batch_size": 1}, pos=(380, 500)),
        Node("sample", "TDMKSampler", {"preset": "cogvideox", "steps": preset.steps, "seed": 42},
             links={"model": ("lora", 0), "positive": ("positive", 0), "latent_image": ("latent", 0)},
             pos=(760, 0)),
        Node("decode", "VAEDecode", links={"samples": ("sample", 0), "vae": ("vae", 0)}, pos=(1140, 0)),
        Node("video", "CreateVideo", {"fps": 8.0}, links={"images": ("decode", 0)}, pos=(1140, 160)),
        Node("save", "SaveVideo", {"filename_prefix": "video/tdm_cogvideox_native", "format": "mp4",
                                   "codec": "h264"}, links={"video": ("video", 0)}, pos=(1500, 0), size=(400, 400)),
    ]


def sd3_comparison_workflow() -> list[Node]:
    """The same prompt and seed: SD3's own recipe (28 steps, CFG 7 → 56 NFE; Euler on ComfyUI's SD3 flow schedule,
    as diffusers' StableDiffusion3Pipeline samples by default) beside TDM (4 steps, CFG 1 → 4 NFE)."""
    preset = get_preset("sd3")
    teacher = preset.teacher
    nodes = [
        Node("note", "Note", {"text": _note(["sd3"], [
            f"Left: the base model's recipe, {teacher.steps} steps at CFG {teacher.cfg:g} ({teacher.nfe} model "
            f"evaluations). Right: TDM, {preset.steps} steps at CFG 1 ({preset.nfe} evaluations) — same prompt, "
            "same seed."])}, pos=(-480, 0), size=(440, 420), title="Read me"),
        Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": preset.base_model_file}, pos=(0, 0)),
        Node("positive", "CLIPTextEncode", {"text": PROMPT}, links={"clip": ("ckpt", 1)}, pos=(0, 200)),
        Node("negative", "CLIPTextEncode", {"text": ""}, links={"clip": ("ckpt", 1)}, pos=(0, 420)),
        Node("latent", "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(0, 600)),
        Node("teacher", "KSampler", {"seed": 42, "steps": teacher.steps, "cfg": teacher.cfg,
                                     "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0},
             links={"model": ("ckpt", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                    "latent_image": ("latent", 0)}, pos=(400, 0), title=f"Teacher: {teacher.steps} steps, CFG "
                                                                        f"{teacher.cfg:g}"),
        Node("teacher_decode", "VAEDecode", links={"samples": ("teacher", 0), "vae": ("ckpt", 2)}, pos=(780, 0)),
        Node("teacher_save", "SaveImage", {"filename_prefix": "compare/teacher_sd3"},
             links={"images": ("teacher_decode", 0)}, pos=(1160, 0), size=(400, 440)),
        Node("lora", "TDMLoraLoader", {"lora_name": preset.lora_file, "strength_mode": "auto"},
             links={"model": ("ckpt", 0)}, pos=(400, 520)),
        Node("tdm", "TDMKSampler", {"preset": "sd3", "steps": preset.steps, "seed": 42},
             links={"model": ("lora", 0), "positive": ("positive", 0), "latent_image": ("latent", 0)},
             pos=(400, 800), title=f"TDM: {preset.steps} steps, CFG 1"),
        Node("tdm_decode", "VAEDecode", links={"samples": ("tdm", 0), "vae": ("ckpt", 2)}, pos=(780, 800)),
        Node("tdm_save", "SaveImage", {"filename_prefix": "compare/tdm_sd3"}, links={"images": ("tdm_decode", 0)},
             pos=(1160, 520), size=(400, 440)),
    ]
    return nodes


def distillation_workflow() -> list[Node]:
    """Teacher from the standard checkpoint loader → TDM Distill (returns a job id at once; training runs in the
    background) → TDM Distill Status (progress text, loss curve, preview, newest LoRA name). Re-queue to refresh the
    status; the finished LoRA appears in models/loras for the TDM LoRA Loader."""
    preset = get_preset("dreamshaper")
    guide = [
        "## Distill your own 4-step LoRA (TDM)",
        "Queue once: training starts in the background and ComfyUI stays free for other prompts.",
        "Queue again (same settings) to refresh TDM Distill Status; stop with TDM Distill Stop or "
        "POST /tdm/jobs/<name>/stop.",
        "The LoRA is written to models/loras/<output_name>.safetensors every save_every steps; load it with "
        f"TDM LoRA Loader and sample with TDM KSampler, preset '{preset.name}' (SD1.5 teachers) or 'sd3'.",
        f"This example's teacher: {preset.base_model_source} → models/{preset.base_model_folder}/"
        f"{preset.base_model_file}. Any SD1.5- or SD3-family checkpoint works.",
    ]
    return [
        Node("note", "Note", {"text": "\n".join(guide)}, pos=(-480, 0), size=(440, 360), title="Read me"),
        Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": preset.base_model_file}, pos=(0, 0)),
        Node("start", "TDMDistillStart", {
            "prompts": "a photo of a red fox in the snow\na watercolor painting of a lighthouse\n"
                       "a portrait of an old sailor, studio lighting\na bowl of ramen, food photography",
            "output_name": "tdm_dreamshaper_distilled", "steps": preset.steps, "width": 512, "height": 512},
             links={"model": ("ckpt", 0), "clip": ("ckpt", 1)}, pos=(380, 0)),
        Node("status", "TDMDistillStatus", links={"job": ("start", 0)}, pos=(780, 0)),
        Node("status_text", "PreviewAny", links={"source": ("status", 0)}, pos=(1160, 0), size=(400, 200)),
        Node("loss", "PreviewImage", links={"images": ("status", 1)}, pos=(1160, 240), size=(400, 320)),
        Node("preview", "PreviewImage", links={"images": ("status", 2)}, pos=(1580, 240), size=(400, 320)),
    ]


WORKFLOWS = {
    "tdm_sd3_4step": lambda: sd3_workflow("sd3"),
    "tdm_sd35_4step": lambda: sd3_workflow("sd35"),
    "tdm_dreamshaper_4step": dreamshaper_workflow,
    "tdm_cogvideox_2b_4step": cogvideox_workflow,
    "tdm_cogvideox_2b_native_4step": cogvideox_native_workflow,
    "tdm_sd3_teacher_vs_tdm": sd3_comparison_workflow,
    "tdm_distillation": distillation_workflow,
}


# Workflows that need a ComfyUI with native CogVideoX (upstream 2026): on 0.3.75 their loaders lack the "cogvideox"
# text-encoder type, so they cannot validate there.
NEEDS_NATIVE_COGVIDEOX = {"tdm_cogvideox_2b_native_4step"}


def model_files() -> dict[str, list[str]]:
    """The files the workflows name, by ComfyUI model folder (what a user must have; tests place stand-ins)."""
    files: dict[str, set] = {}
    for preset in PRESETS.values():
        files.setdefault(preset.base_model_folder, set()).add(preset.base_model_file)
        files.setdefault("loras", set()).add(preset.lora_file)
        for folder, (name, _source) in preset.extra.get("native_files", {}).items():
            files.setdefault(folder, set()).add(name)
    return {k: sorted(v) for k, v in files.items()}


def build_all(object_info: dict) -> dict[str, dict]:
    return {name: build_ui(make(), object_info, PACK_PROPERTIES, CORE_VERSION,
                           str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tdm/workflows/{name}")))
            for name, make in WORKFLOWS.items()}


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    from harness import comfy_runtime

    comfy_runtime.bootstrap()
    from harness.server import ComfyServer, make_base_directory
    from harness.workflow_placeholders import install_placeholders

    with tempfile.TemporaryDirectory() as tmp:
        base = make_base_directory(Path(tmp))
        install_placeholders(base, model_files())
        with ComfyServer(base) as server:
            workflows = build_all(server.object_info())
    WORKFLOWS_DIR.mkdir(exist_ok=True)
    for name, workflow in workflows.items():
        (WORKFLOWS_DIR / f"{name}.json").write_text(dumps(workflow))
        print(f"wrote workflows/{name}.json")


if __name__ == "__main__":
    main()
