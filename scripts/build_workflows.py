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
sys.path.insert(0, str(REPO))

from tdm_core import __version__ as PACK_VERSION  # noqa: E402
from tdm_core.families import distillable_labels_text  # noqa: E402
from tdm_core.presets import PRESETS, get_preset  # noqa: E402
from tdm_core.recipes import family_recipe  # noqa: E402
from tdm_core.recipes import resolve as resolve_recipe  # noqa: E402
from tdm_core.solvers import WIDGET_NAMES  # noqa: E402
from tdm_devkit.workflow_build import Group, Node  # noqa: E402
from tdm_devkit.workflow_build import build as build_ui  # noqa: E402

WORKFLOWS_DIR = REPO / "workflows"
PACK_PROPERTIES = {"cnr_id": "comfyui-tdm", "ver": PACK_VERSION}
CORE_VERSION = "0.3.75"
DOCS_LINE = ("Help: select a node and open its help (the ? / info panel), or read the pack's README and "
             "docs/ folder.")
NOTE_SIZE = (460, 400)
PROMPT = "a photo of a red fox sitting in fresh snow at sunrise, highly detailed"


def _file_line(name: str, folder: str, url: str, page: str, gated: bool = False, how: str = "") -> str:
    """One markdown bullet: the file (a direct download link where there is one), its folder, its page; where there
    is no direct link, `how` says why and where the file comes from."""
    link = f"[{name}]({url})" if url else f"`{name}`"
    line = f"- {link} → `models/{folder}/`"
    repo_name = url.rsplit("/", 1)[-1] if url else ""
    if url and repo_name != name:
        line += f" (the repository calls it `{repo_name}`: save it as `{name}`)"
    if page and page.startswith("https://"):
        line += f" · [model page]({page})"
    # Notes under a file start with a Markdown hard break (two spaces before the newline): the frontends' Markdown
    # drops a soft one, and "model page" ran into "Gated on Hugging Face".
    if gated:
        line += ("  \n  **Gated on Hugging Face**: log in and accept the licence on the model page first, or the "
                 "download is refused.")
    if how and not url:
        line += f"  \n  No direct link: {how}."
    if url.endswith((".pt", ".pth", ".ckpt")):
        # ComfyUI 0.3.75's frontend (1.32) offers only .safetensors-style files in its Missing Models dialog.
        line += "  \n  Older frontends' Missing Models dialog will not fetch a .pt file: download it with the link."
    return line


def _recipe_line(preset) -> str:
    solver = WIDGET_NAMES[preset.solver]
    parts = [f"{preset.steps} steps", f"CFG {preset.cfg:g}",
             f"LoRA strength {preset.lora_strength:g} (TDM LoRA Loader, `strength_mode` auto)"]
    if preset.shift:
        parts.append(f"shift {preset.shift:g} (TDM Scheduler `shift`)")
    parts.append(f"solver {solver} (TDM KSampler applies it; TDM Sampler's `solver` auto picks it)")
    return "**Recipe**: " + ", ".join(parts) + "."


def _note(preset_names: list[str], extra_lines: list[str] = ()) -> str:
    """The workflow's "Read me" (a MarkdownNote: headings render, links are clickable)."""
    lines = []
    for name in preset_names:
        preset = get_preset(name)
        lines += [f"## {preset.display_name}", "",
                  _file_line(preset.base_model_file, preset.base_model_folder, preset.base_model_url,
                             preset.base_model_source, preset.base_model_gated, preset.base_model_how),
                  _file_line(preset.lora_file, "loras", preset.lora_url, preset.lora_source), "",
                  _recipe_line(preset)]
        if preset.notes:
            lines += ["", preset.notes]
        lines.append("")
    lines += [*extra_lines, "", DOCS_LINE]
    return "\n".join(lines).strip()


def _models(*entries: tuple[str, str, str]) -> dict:
    """`properties.models` of a loader node: the file its widget names, where it downloads from, its folder. Newer
    frontends offer "Download" / "Copy URL" for each one that is missing. Entries without a URL are left out."""
    models = [{"name": name, "url": url, "directory": folder} for name, url, folder in entries if url]
    return {"models": models} if models else {}


def _checkpoint_models(preset) -> dict:
    return _models((preset.base_model_file, preset.base_model_url, preset.base_model_folder))


def _lora_models(preset) -> dict:
    return _models((preset.lora_file, preset.lora_url, "loras"))


# Columns of the layout (canvas units): the note and the checkpoint loader first, then one column per stage. Nodes in
# a column stack downwards (tdm_devkit.workflow_build keeps them from overlapping); widths stay inside the columns.
COL = [0, 500, 880, 1260, 1640, 2020, 2400, 2780]
PROMPT_SIZE = (340, 170)
SAVER_SIZE = (400, 440)
# The VAE's link from the loader (top of its column) to the decoder runs straight along the top of the graph ("the
# bus"): the decoder sits ON_BUS so its vae input is level with the loader's VAE output, and every node between them
# starts BELOW_BUS, so the link passes over them instead of under.
ON_BUS = 20
BELOW_BUS = 140
# CreateVideo shows one more widget on newer ComfyUI (bit_depth) than on 0.3.75: sized for it, so the one committed
# file is what the builder writes on either runtime and nothing below it is covered.
CREATE_VIDEO_SIZE = (340, 190)


# The training prompts are TDM Distill's first box, and multiline boxes show no label: the title says what it holds
# (the sampling prompt's node is titled too, so the two boxes of a distil-then-sample graph cannot be confused).
DISTILL_TITLE = "TDM Distill: training prompts, one per line"


def _read_me(text: str, size=NOTE_SIZE) -> Node:
    return Node("note", "MarkdownNote", {"text": text}, pos=(COL[0], 0), size=size, title="Read me")


def sd3_workflow(preset_name: str) -> list[Node]:
    """SD3/SD3.5 checkpoint → TDM LoRA Loader (auto strength = preset) → TDM Scheduler + TDM Sampler in
    SamplerCustomAdvanced (CFG 1) → decode → save. Shows the SAMPLER/SIGMAS nodes the way power users wire them."""
    preset = get_preset(preset_name)
    return [
        _read_me(_note([preset_name])),
        Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": preset.base_model_file}, pos=(COL[1], 0),
             properties=_checkpoint_models(preset)),
        Node("lora", "TDMLoraLoader", {"lora_name": preset.lora_file, "strength_mode": "auto"},
             links={"model": ("ckpt", 0)}, pos=(COL[2], BELOW_BUS), properties=_lora_models(preset)),
        Node("positive", "CLIPTextEncode", {"text": PROMPT}, links={"clip": ("ckpt", 1)},
             pos=(COL[2], BELOW_BUS + 400), size=PROMPT_SIZE, title='Prompt'),
        # The five inputs of SamplerCustomAdvanced, stacked in its input order beside it (ids in the order
        # earlier versions saved them, so old files queue the same prompt)
        Node("latent", "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1},
             pos=(COL[3], BELOW_BUS + 1000)),
        Node("noise", "RandomNoise", {"noise_seed": 42}, pos=(COL[3], BELOW_BUS)),
        Node("guider", "BasicGuider", links={"model": ("lora", 0), "conditioning": ("positive", 0)},
             pos=(COL[3], BELOW_BUS + 180)),
        Node("sampler", "TDMSampler", {"solver": "auto"}, pos=(COL[3], BELOW_BUS + 360)),
        Node("sigmas", "TDMScheduler", {"preset": preset_name, "steps": preset.steps, "shift": preset.shift},
             links={"model": ("lora", 0)}, pos=(COL[3], BELOW_BUS + 590)),
        Node("sample", "SamplerCustomAdvanced",
             links={"noise": ("noise", 0), "guider": ("guider", 0), "sampler": ("sampler", 0),
                    "sigmas": ("sigmas", 0), "latent_image": ("latent", 0)}, pos=(COL[4], BELOW_BUS + 500)),
        Node("decode", "VAEDecode", links={"samples": ("sample", 0), "vae": ("ckpt", 2)}, pos=(COL[5], ON_BUS)),
        Node("save", "SaveImage", {"filename_prefix": f"tdm_{preset_name}"}, links={"images": ("decode", 0)},
             pos=(COL[6], 0), size=SAVER_SIZE),
    ]


def dreamshaper_workflow() -> list[Node]:
    """Dreamshaper-7 → TDM LoRA Loader (the .pt release, read safely) → TDM KSampler (all-in-one) → decode → save."""
    preset = get_preset("dreamshaper")
    return [
        _read_me(_note(["dreamshaper"])),
        Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": preset.base_model_file}, pos=(COL[1], 0),
             properties=_checkpoint_models(preset)),
        Node("lora", "TDMLoraLoader", {"lora_name": preset.lora_file, "strength_mode": "auto"},
             links={"model": ("ckpt", 0)}, pos=(COL[2], BELOW_BUS), properties=_lora_models(preset)),
        Node("positive", "CLIPTextEncode", {"text": PROMPT}, links={"clip": ("ckpt", 1)},
             pos=(COL[2], BELOW_BUS + 400), size=PROMPT_SIZE, title='Prompt'),
        Node("latent", "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1},
             pos=(COL[2], BELOW_BUS + 640)),
        Node("sample", "TDMKSampler", {"preset": "dreamshaper", "steps": preset.steps, "seed": 42},
             links={"model": ("lora", 0), "positive": ("positive", 0), "latent_image": ("latent", 0)},
             pos=(COL[3], BELOW_BUS + 300)),
        Node("decode", "VAEDecode", links={"samples": ("sample", 0), "vae": ("ckpt", 2)}, pos=(COL[4], ON_BUS)),
        Node("save", "SaveImage", {"filename_prefix": "tdm_dreamshaper"}, links={"images": ("decode", 0)},
             pos=(COL[5], 0), size=SAVER_SIZE),
    ]


def cogvideox_workflow() -> list[Node]:
    """CogVideoX-2b diffusers folder + TDM LoRA → TDM CogVideoX Sampler (trained timesteps) → CreateVideo →
    SaveVideo (mp4)."""
    preset = get_preset("cogvideox")
    return [
        _read_me(_note(["cogvideox"], [
            f"The whole diffusers repository ([{preset.base_model_source.removeprefix('https://huggingface.co/')}]"
            f"({preset.base_model_source})) goes into `models/diffusers/CogVideoX-2b/` (model_index.json, "
            "transformer/, vae/, text_encoder/, tokenizer/, scheduler/).",
            "",
            "Low VRAM: keep VAE tiling/slicing on and set `offload` to `model` (≈10–12 GB) or `sequential` "
            "(≈4 GB)."]), size=(460, 480)),
        Node("load", "TDMCogVideoXLoader", {"model_folder": preset.base_model_file, "dtype": "bf16",
                                            "lora_name": preset.lora_file, "lora_strength": preset.lora_strength},
             pos=(COL[1], 0), properties=_lora_models(preset)),
        Node("sample", "TDMCogVideoXSampler", {"prompt": "a red fox trotting through fresh snow, cinematic",
                                               "frames": 49, "width": 720, "height": 480, "grid": "trained",
                                               "steps": preset.steps, "cfg": preset.cfg, "seed": 42},
             links={"cogvideox": ("load", 0)}, pos=(COL[2], 0)),
        Node("video", "CreateVideo", links={"images": ("sample", 0), "fps": ("sample", 1)}, pos=(COL[3], 0),
             size=CREATE_VIDEO_SIZE),
        Node("save", "SaveVideo", {"filename_prefix": "video/tdm_cogvideox", "format": "mp4", "codec": "h264"},
             links={"video": ("video", 0)}, pos=(COL[4], 0), size=(400, 400)),
    ]


def cogvideox_native_workflow() -> list[Node]:
    """Newer ComfyUI's native CogVideoX-2B from the core loaders (UNETLoader / CLIPLoader type cogvideox /
    VAELoader) → TDM LoRA Loader → TDM KSampler (trained timesteps on the 2B's schedule) → VAEDecode → CreateVideo →
    SaveVideo. Needs a ComfyUI with native CogVideoX (upstream 2026; not 0.3.75)."""
    preset = get_preset("cogvideox")
    files = preset.extra["native_files"]
    geometry = {"width": 720, "height": 480, "length": 49}  # the 2B's training size (its position table's)

    def file_line(folder):
        name, source = files[folder]
        url = source if source.startswith("https://") and source.endswith(".safetensors") else ""
        return _file_line(name, folder, url, "") + ("" if url else f": {source}")

    def models(folder):
        name, source = files[folder]
        url = source if source.startswith("https://") and source.endswith(".safetensors") else ""
        return _models((name, url, folder))

    text = "\n".join([
        "## CogVideoX-2B (TDM_CogVideoX-2B_LoRA), native ComfyUI nodes", "",
        "Needs a ComfyUI with native CogVideoX (2026 upstream); on older ComfyUI use the "
        f"*{TITLES['tdm_cogvideox_2b_4step']}* workflow.", "",
        *[file_line(folder) for folder in files],
        _file_line(preset.lora_file, "loras", preset.lora_url, preset.lora_source), "",
        f"**Recipe**: {preset.steps} steps at the trained timesteps 999/856/665/399 (TDM KSampler preset "
        f"`cogvideox`), CFG {preset.cfg:g}, LoRA strength {preset.lora_strength:g}; 720×480, 49 frames (the size "
        "the 2B's position table is for).", "", DOCS_LINE])
    return [
        _read_me(text, size=(460, 520)),
        Node("unet", "UNETLoader", {"unet_name": files["diffusion_models"][0], "weight_dtype": "default"},
             pos=(COL[1], 0), properties=models("diffusion_models")),
        Node("clip", "CLIPLoader", {"clip_name": files["text_encoders"][0], "type": "cogvideox"},
             pos=(COL[1], 200), properties=models("text_encoders")),
        Node("lora", "TDMLoraLoader", {"lora_name": preset.lora_file, "strength_mode": "auto"},
             links={"model": ("unet", 0)}, pos=(COL[2], 0), properties=_lora_models(preset)),
        Node("positive", "CLIPTextEncode", {"text": "a red fox trotting through fresh snow, cinematic"},
             links={"clip": ("clip", 0)}, pos=(COL[2], 470), size=PROMPT_SIZE, title="Prompt"),
        Node("latent", "EmptyHunyuanLatentVideo", {**geometry, "batch_size": 1}, pos=(COL[2], 770)),
        Node("vae", "VAELoader", {"vae_name": files["vae"][0]}, pos=(COL[3], 0), properties=models("vae")),
        Node("sample", "TDMKSampler", {"preset": "cogvideox", "steps": preset.steps, "seed": 42},
             links={"model": ("lora", 0), "positive": ("positive", 0), "latent_image": ("latent", 0)},
             pos=(COL[3], 200)),
        Node("decode", "VAEDecode", links={"samples": ("sample", 0), "vae": ("vae", 0)}, pos=(COL[4], 200)),
        Node("video", "CreateVideo", {"fps": 8.0}, links={"images": ("decode", 0)}, pos=(COL[5], 200),
             size=CREATE_VIDEO_SIZE),
        Node("save", "SaveVideo", {"filename_prefix": "video/tdm_cogvideox_native", "format": "mp4",
                                   "codec": "h264"}, links={"video": ("video", 0)}, pos=(COL[6], 0), size=(400, 400)),
    ]


def sd3_comparison_workflow() -> list[Node]:
    """The same prompt and seed: SD3's own recipe (28 steps, CFG 7 → 56 NFE; Euler on ComfyUI's SD3 flow schedule,
    as diffusers' StableDiffusion3Pipeline samples by default) beside TDM (4 steps, CFG 1 → 4 NFE)."""
    preset = get_preset("sd3")
    teacher = preset.teacher
    below_both_buses = 300  # the two VAE links to the decoders run above this
    return [
        _read_me(_note(["sd3"], [
            f"Top: the base model's recipe, {teacher.steps} steps at CFG {teacher.cfg:g} ({teacher.nfe} model "
            f"evaluations). Bottom: TDM, {preset.steps} steps at CFG 1 ({preset.nfe} evaluations) — same prompt, "
            "same seed."]), size=(460, 460)),
        Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": preset.base_model_file}, pos=(COL[1], 0),
             properties=_checkpoint_models(preset)),
        # the teacher's MODEL link drops from the loader to the teacher over this column: its nodes start lower
        Node("lora", "TDMLoraLoader", {"lora_name": preset.lora_file, "strength_mode": "auto"},
             links={"model": ("ckpt", 0)}, pos=(COL[2], below_both_buses + 200), properties=_lora_models(preset)),
        Node("positive", "CLIPTextEncode", {"text": PROMPT}, links={"clip": ("ckpt", 1)},
             pos=(COL[2], below_both_buses + 530), size=PROMPT_SIZE, title='Prompt'),
        Node("negative", "CLIPTextEncode", {"text": ""}, links={"clip": ("ckpt", 1)},
             pos=(COL[2], below_both_buses + 770), size=PROMPT_SIZE, title='Negative prompt (teacher only)'),
        Node("latent", "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1},
             pos=(COL[2], below_both_buses + 1010)),
        Node("teacher", "KSampler", {"seed": 42, "steps": teacher.steps, "cfg": teacher.cfg,
                                     "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0},
             links={"model": ("ckpt", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                    "latent_image": ("latent", 0)}, pos=(COL[3], below_both_buses),
             title=f"Teacher: {teacher.steps} steps, CFG {teacher.cfg:g}"),
        Node("tdm", "TDMKSampler", {"preset": "sd3", "steps": preset.steps, "seed": 42},
             links={"model": ("lora", 0), "positive": ("positive", 0), "latent_image": ("latent", 0)},
             pos=(COL[3], below_both_buses + 420), title=f"TDM: {preset.steps} steps, CFG 1"),
        Node("teacher_decode", "VAEDecode", links={"samples": ("teacher", 0), "vae": ("ckpt", 2)},
             pos=(COL[4], ON_BUS)),
        Node("tdm_decode", "VAEDecode", links={"samples": ("tdm", 0), "vae": ("ckpt", 2)}, pos=(COL[4], 170)),
        Node("teacher_save", "SaveImage", {"filename_prefix": "compare/teacher_sd3"},
             links={"images": ("teacher_decode", 0)}, pos=(COL[5], 0), size=SAVER_SIZE),
        Node("tdm_save", "SaveImage", {"filename_prefix": "compare/tdm_sd3"}, links={"images": ("tdm_decode", 0)},
             pos=(COL[5], 520), size=SAVER_SIZE),
    ]


def distillation_workflow() -> list[Node]:
    """Teacher from the standard checkpoint loader → TDM Distill (returns a job id at once; training runs in the
    background) → TDM Distill Status (progress text, loss curve, preview, newest LoRA name). Re-queue to refresh the
    status; the finished LoRA appears in models/loras for the TDM LoRA Loader."""
    preset = get_preset("dreamshaper")
    guide = [
        "## Distill your own 4-step LoRA (TDM)", "",
        "1. **Queue once**: training starts in the background and ComfyUI stays free for other prompts.",
        "2. **Watch it** in the *TDM jobs* sidebar tab (chart icon: loss curve, preview, Stop / Resume), or queue "
        "again with the same settings to refresh TDM Distill Status.",
        "3. **Stop** with TDM Distill Stop, the jobs tab, or `POST /tdm/jobs/<name>/stop`.",
        "4. **Use it**: the LoRA is written to `models/loras/<output_name>.safetensors` every `save_every` steps; "
        "load it with TDM LoRA Loader and sample with TDM KSampler (preset `auto` picks the recipe of the "
        "teacher's family).", "",
        "This example's teacher:",
        _file_line(preset.base_model_file, preset.base_model_folder, preset.base_model_url,
                   preset.base_model_source, preset.base_model_gated, preset.base_model_how),
        f"Any {distillable_labels_text()} checkpoint works.", "", DOCS_LINE,
    ]
    return [
        _read_me("\n".join(guide), size=(460, 480)),
        Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": preset.base_model_file}, pos=(COL[1], 0),
             properties=_checkpoint_models(preset)),
        Node("start", "TDMDistillStart", {
            "prompts": "a photo of a red fox in the snow\na watercolor painting of a lighthouse\n"
                       "a portrait of an old sailor, studio lighting\na bowl of ramen, food photography",
            "output_name": "tdm_dreamshaper_distilled", "steps": preset.steps, "width": 512, "height": 512},
             links={"model": ("ckpt", 0), "clip": ("ckpt", 1)}, pos=(COL[2], 0), title=DISTILL_TITLE),
        Node("status", "TDMDistillStatus", links={"job": ("start", 0)}, pos=(COL[3], 0)),
        Node("status_text", "PreviewAny", links={"source": ("status", 0)}, pos=(COL[4], 0), size=(400, 200)),
        Node("loss", "PreviewImage", links={"images": ("status", 1)}, pos=(COL[4], 270), size=(400, 320)),
        Node("preview", "PreviewImage", links={"images": ("status", 2)}, pos=(COL[4], 660), size=(400, 320)),
    ]


def _training_recipe_phrase(preset) -> str:
    """The training recipe TDM Distill's recipe auto gives `preset`'s family, in a phrase with its main values."""
    recipe, values = resolve_recipe(family_recipe(preset.family), preset.family)
    return (f"`{recipe.name}` ({recipe.title}: teacher CFG {values['cfg'].value:g}, rank {values['lora_rank'].value}, "
            f"learning rates {values['lr'].value:g} / {values['student_lr'].value:g}; see docs/recipes.md)")


# What both distil-then-sample workflows say about the run, and the prompts they train on.
DISTILL_PROMPTS = ("a photo of a red fox in the snow\na watercolor painting of a lighthouse\n"
                   "a portrait of an old sailor, studio lighting\na bowl of ramen, food photography")


def _distill_guide(preset, sampler_line: str, settings_lines: list[str], sampler_node: str = "TDM KSampler",
                   lora_file: str = "", loader: str = "TDM LoRA Loader") -> list[str]:
    """The Read me's guide for a workflow that distils `preset`'s student and samples it in the same graph."""
    return [
        "**How it runs**", "",
        "1. **Queue once.** TDM Distill starts the job in the background and returns its id; *TDM LoRA from Distill "
        "Job* (`use` finished) waits until the job ends, then loads its LoRA and " + sampler_line + " ComfyUI's "
        "Cancel ends the wait, never the job.",
        "2. **Watch it** in the *TDM jobs* sidebar tab (loss curve, preview, Stop / Resume) or on TDM Distill Status "
        "(queue again to refresh it; TDM Distill is cached, so no second job starts). Once the job has ended, "
        "queueing the unchanged graph again is served from ComfyUI's cache.",
        (f"3. **Keep it**: the LoRA is `models/loras/{lora_file}`; load " if lora_file else
         f"3. **Keep it**: the LoRA is `models/loras/{preset.lora_file}` (the `{preset.name}` preset's name); load ")
        + f"it with {loader} in any other workflow. A stopped job's last checkpoint is used and the node says so; "
        "`use` latest samples the newest LoRA saved so far without waiting.",
        "4. **After a restart** TDM Distill runs again and refuses the output name in use: set `if_exists` to resume "
        "and the finished job is reused (nothing retrains; a stopped job continues).", "",
        "**Settings**", "", *settings_lines, "",
        f"**Sampling**: {preset.steps} steps at CFG 1 on the `{preset.name}` preset ({sampler_node}; solver "
        f"{WIDGET_NAMES[preset.solver]}), LoRA strength {preset.lora_strength:g} (`strength_mode` auto: the strength "
        "the distilled file records).",
    ]


# Distil-then-sample graphs have two rows: the sampling branch on top (what the user came for), the job's branch
# (TDM Distill, its status, loss curve and preview) below it; the loader feeds both from the top-left. The student's
# LoRA loader takes the base model along the top of the graph, over the prompt column.
SAMPLE_ROW = 100
JOB_ROW = 900


def _distill_status_nodes(column: int) -> list[Node]:
    """TDM Distill Status (wait off: the sampling branch waits) with its text, loss curve and preview shown."""
    return [
        Node("status", "TDMDistillStatus", links={"job": ("start", 0)}, pos=(COL[column], JOB_ROW)),
        Node("status_text", "PreviewAny", links={"source": ("status", 0)}, pos=(COL[column + 1], JOB_ROW),
             size=(340, 200)),
        Node("loss", "PreviewImage", links={"images": ("status", 1)}, pos=(COL[column + 1], JOB_ROW + 270),
             size=(340, 300)),
        Node("preview", "PreviewImage", links={"images": ("status", 2)}, pos=(COL[column + 1], JOB_ROW + 640),
             size=(340, 300)),
    ]


def sdxl_distill_workflow() -> list[Node]:
    """SDXL base from the checkpoint loader → TDM Distill (background job) → TDM Distill Status; and, in the same
    graph, TDM LoRA from Distill Job (waits for the job) → TDM KSampler preset sdxl, 4 steps → decode → save."""
    preset = get_preset("sdxl")
    size = 1024  # SDXL's native resolution: train at the size you sample at
    guide = [
        f"## {preset.display_name}: distil a 4-step LoRA, then sample it", "",
        _file_line(preset.base_model_file, preset.base_model_folder, preset.base_model_url,
                   preset.base_model_source, preset.base_model_gated),
        f"- `{preset.lora_file}` → `models/loras/`: written by this workflow (no TDM LoRA is released for SDXL).", "",
        *_distill_guide(preset, f"TDM KSampler samples the student in {preset.steps} steps.", [
            f"- {size}×{size}, SDXL's native size, in TDM Distill and in the latent.",
            "- `gradient_checkpointing` **on**: at 1024² the UNet's activations kept for the backward passes (student "
            "and fake score) are the largest memory cost; checkpointing recomputes them instead, for about one more "
            "forward pass per step and the same gradients.",
            "- Everything else is TDM Distill's default: 500 iterations, grid auto = the `sdxl` grid 999/749/500/250, "
            f"and recipe auto = {_training_recipe_phrase(preset)}.",
            "- Memory (an estimate, not measured by this project): roughly 12–16 GB at 1024 px with checkpointing and "
            "bf16 (`dtype`, or load the checkpoint in bf16); lower `width`/`height`, or `offload` "
            "unload_comfy_models, if it runs out.",
        ]), "", DOCS_LINE,
    ]
    return [
        _read_me("\n".join(guide), size=(460, 640)),
        Node("ckpt", "CheckpointLoaderSimple", {"ckpt_name": preset.base_model_file}, pos=(COL[1], 0),
             properties=_checkpoint_models(preset)),
        Node("positive", "CLIPTextEncode", {"text": PROMPT}, links={"clip": ("ckpt", 1)},
             pos=(COL[2], SAMPLE_ROW + 340), size=PROMPT_SIZE, title='Prompt to sample the student with'),
        Node("start", "TDMDistillStart", {"prompts": DISTILL_PROMPTS, "output_name": Path(preset.lora_file).stem,
                                          "width": size, "height": size, "gradient_checkpointing": True},
             links={"model": ("ckpt", 0), "clip": ("ckpt", 1)}, pos=(COL[2], JOB_ROW), title=DISTILL_TITLE),
        Node("lora", "TDMDistillLoraLoader", {"use": "finished", "strength_mode": "auto"},
             links={"model": ("ckpt", 0), "job": ("start", 0)}, pos=(COL[3], SAMPLE_ROW)),
        # the prompt's link to the sampler runs level between the LoRA loader and the latent
        Node("latent", "EmptyLatentImage", {"width": size, "height": size, "batch_size": 1},
             pos=(COL[3], SAMPLE_ROW + 420)),
        *_distill_status_nodes(3),
        Node("sample", "TDMKSampler", {"preset": preset.name, "steps": preset.steps, "seed": 42},
             links={"model": ("lora", 0), "positive": ("positive", 0), "latent_image": ("latent", 0)},
             pos=(COL[4], SAMPLE_ROW + 320)),
        Node("decode", "VAEDecode", links={"samples": ("sample", 0), "vae": ("ckpt", 2)}, pos=(COL[5], ON_BUS)),
        Node("save", "SaveImage", {"filename_prefix": "tdm_sdxl_student"}, links={"images": ("decode", 0)},
             pos=(COL[6], 0), size=SAVER_SIZE),
    ]


def flux_distill_workflow() -> list[Node]:
    """Flux-dev from the split-file loaders (UNETLoader, DualCLIPLoader clip_l + t5xxl type flux, VAELoader) → TDM
    Distill at cfg 1 → status; TDM LoRA from Distill Job → CLIPTextEncode → FluxGuidance 3.5 → TDM KSampler preset
    flux (μ from the latent's size, so no ModelSamplingFlux) on EmptySD3LatentImage → decode → save."""
    preset = get_preset("flux")
    size = 1024  # the flux grid's shift depends on the size: TDM Distill and the latent must agree
    files = preset.extra["split_files"]
    guidance = preset.extra["guidance"]
    guide = [
        f"## {preset.display_name}: distil a 4-step LoRA, then sample it", "",
        _file_line(preset.base_model_file, preset.base_model_folder, preset.base_model_url,
                   preset.base_model_source, preset.base_model_gated),
        *[_file_line(name, folder, url, "") for folder, name, url in files],
        f"- `{preset.lora_file}` → `models/loras/`: written by this workflow (no TDM LoRA is released for Flux).", "",
        *_distill_guide(preset, f"TDM KSampler samples the student in {preset.steps} steps at FluxGuidance "
                                f"{guidance:g}.", [
            "- `cfg` **1**: Flux-dev is guidance-distilled, its guidance is an input, not a second pass (TDM Distill "
            "refuses other values).",
            f"- Guidance {guidance:g}: the job encodes its prompts without FluxGuidance, so they carry ComfyUI's "
            f"default {guidance:g}; the student is sampled with the same FluxGuidance {guidance:g}.",
            f"- {size}×{size} in TDM Distill **and** in the latent: Flux's shift depends on the image size, so "
            "train at the size you sample at (change both together). TDM KSampler's `flux` preset takes the shift "
            "from the latent, so no ModelSamplingFlux is needed.",
            "- `gradient_checkpointing` **on**: Flux's double/single blocks are recomputed in the backward passes "
            "instead of stored (same gradients, about one more forward pass per step).",
            "- Memory (an estimate, not measured by this project): the bf16 weights alone are ~24 GB, so plan on a "
            "40–80 GB card; otherwise load the model in fp8 (UNETLoader `weight_dtype`) and lower `width`/`height` "
            "(and the latent's) to 512.",
        ]), "", DOCS_LINE,
    ]
    clip_names = [name for folder, name, _ in files if folder == "text_encoders"]
    vae_name = next(name for folder, name, _ in files if folder == "vae")

    def models(*names):
        return _models(*[(name, url, folder) for folder, name, url in files if name in names])

    return [
        _read_me("\n".join(guide), size=(460, 760)),
        Node("unet", "UNETLoader", {"unet_name": preset.base_model_file, "weight_dtype": "default"},
             pos=(COL[1], 0), properties=_checkpoint_models(preset)),
        Node("clip", "DualCLIPLoader", {"clip_name1": clip_names[0], "clip_name2": clip_names[1], "type": "flux"},
             pos=(COL[1], 200), properties=models(*clip_names)),
        Node("positive", "CLIPTextEncode", {"text": PROMPT}, links={"clip": ("clip", 0)},
             pos=(COL[2], SAMPLE_ROW + 340), size=PROMPT_SIZE, title='Prompt to sample the student with'),
        Node("start", "TDMDistillStart", {"prompts": DISTILL_PROMPTS, "output_name": Path(preset.lora_file).stem,
                                          "cfg": 1.0, "width": size, "height": size,
                                          "gradient_checkpointing": True},
             links={"model": ("unet", 0), "clip": ("clip", 0)}, pos=(COL[2], JOB_ROW), title=DISTILL_TITLE),
        Node("lora", "TDMDistillLoraLoader", {"use": "finished", "strength_mode": "auto"},
             links={"model": ("unet", 0), "job": ("start", 0)}, pos=(COL[3], SAMPLE_ROW)),
        Node("guidance", "FluxGuidance", {"guidance": guidance}, links={"conditioning": ("positive", 0)},
             pos=(COL[3], SAMPLE_ROW + 360)),
        Node("latent", "EmptySD3LatentImage", {"width": size, "height": size, "batch_size": 1},
             pos=(COL[3], SAMPLE_ROW + 540)),
        *_distill_status_nodes(3),
        # next to the one node that uses it, so no link crosses the graph for it
        Node("vae", "VAELoader", {"vae_name": vae_name}, pos=(COL[4], 0), properties=models(vae_name)),
        Node("sample", "TDMKSampler", {"preset": preset.name, "steps": preset.steps, "seed": 42},
             links={"model": ("lora", 0), "positive": ("guidance", 0), "latent_image": ("latent", 0)},
             pos=(COL[4], SAMPLE_ROW + 320)),
        Node("decode", "VAEDecode", links={"samples": ("sample", 0), "vae": ("vae", 0)}, pos=(COL[5], 200)),
        Node("save", "SaveImage", {"filename_prefix": "tdm_flux_student"}, links={"images": ("decode", 0)},
             pos=(COL[6], 0), size=SAVER_SIZE),
    ]



# Wan's own negative prompt: Wan2.1's `sample_neg_prompt` (wan/configs/shared_config.py), the one its generate.py
# samples with and ComfyUI's own Wan 2.1 text-to-video template puts in its negative CLIPTextEncode (checked
# identical to that template in comfyui-workflow-templates-media-video 0.3.12, text_to_video_wan.json). TDM Distill
# takes it as the unconditional side of the teacher's CFG target, as Wan's own sampling does.
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
                       "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
                       "三条腿，背景人很多，倒着走")
# Clips, not stills: prompts with motion in them, since the student learns the teacher's motion as well.
WAN_DISTILL_PROMPTS = ("a red fox trotting through fresh snow, tracking camera\n"
                       "waves rolling onto a rocky beach at sunset, slow pan\n"
                       "an old sailor lighting a pipe on the deck of a ship, close-up\n"
                       "steam rising from a bowl of ramen as chopsticks lift the noodles")
WAN_PROMPT = "a red fox running through a snowy forest at sunrise, tracking camera"
WAN_FPS = 16.0  # Wan 2.1's frame rate (shared_config sample_fps; ComfyUI's Wan template's CreateVideo)


def wan_distill_workflow() -> list[Node]:
    """Wan 2.1 T2V 1.3B from the split-file loaders (UNETLoader, CLIPLoader umt5 type wan, VAELoader) → TDM Distill
    at 832×480, 33 frames, Wan's negative prompt → status; TDM LoRA from Distill Job → TDM KSampler preset wan21 on
    EmptyHunyuanLatentVideo (ComfyUI's Wan latent: 16 channels, (frames − 1)/4 + 1 latent frames) → VAEDecode →
    CreateVideo (16 fps) → SaveVideo."""
    preset = get_preset("wan21")
    width, height, frames = 832, 480, 33  # the 1.3B's 480p size; 33 frames, ComfyUI's own Wan template's length
    files = preset.extra["split_files"]
    clip_name = next(name for folder, name, _ in files if folder == "text_encoders")
    vae_name = next(name for folder, name, _ in files if folder == "vae")
    guide = [
        "## Wan 2.1 text-to-video: distil a 4-step LoRA, then sample it", "",
        _file_line(preset.base_model_file, preset.base_model_folder, preset.base_model_url,
                   preset.base_model_source, preset.base_model_gated),
        *[_file_line(name, folder, url, "") for folder, name, url in files],
        f"- `{preset.lora_file}` → `models/loras/`: written by this workflow (no TDM LoRA is released for Wan).", "",
        *_distill_guide(preset, f"TDM KSampler samples the student in {preset.steps} steps.", [
            f"- {width}×{height}, {frames} frames in TDM Distill **and** in the latent: the 1.3B's 480p size; frames "
            "are 4k + 1 (Wan's VAE keeps the first frame and packs 4 per latent frame; 81 is Wan's full length, "
            "at about 2.4× the tokens).",
            "- `unconditional_prompt`: Wan's own negative prompt (the Wan 2.1 release's `sample_neg_prompt`, which "
            "ComfyUI's Wan 2.1 text-to-video template uses too): the teacher's CFG target pushes away from it, as "
            "Wan samples.",
            "- `gradient_checkpointing` **on**: Wan's transformer blocks are recomputed in the backward passes instead "
            "of stored (same gradients, about one more forward pass per step).",
            "- Everything else is TDM Distill's default: 500 iterations, grid auto = the `wan21` grid (shift "
            f"{preset.shift:g}), and recipe auto = {_training_recipe_phrase(preset)}.",
            "- Wan 2.1 T2V 14B works the same (load its file instead, and 1280×720 in both places). Image-to-video, "
            "VACE, Fun, camera and Wan 2.2 models are not supported (a Wan 2.2 A14B expert would be trained alone).",
            "- Memory (an estimate, not measured by this project): the 1.3B's bf16 weights are ~2.8 GB; one 480p "
            "33-frame clip with checkpointing should fit a 24 GB card. Fewer `frames` (and the latent's `length`) "
            "or a smaller size if it runs out.",
            "- The *TDM jobs* tab's preview shows four frames of each preview clip, first to last, top to bottom.",
        ]), "", DOCS_LINE,
    ]

    def models(*names):
        return _models(*[(name, url, folder) for folder, name, url in files if name in names])

    return [
        _read_me("\n".join(guide), size=(460, 860)),
        Node("unet", "UNETLoader", {"unet_name": preset.base_model_file, "weight_dtype": "default"},
             pos=(COL[1], 0), properties=_checkpoint_models(preset)),
        Node("clip", "CLIPLoader", {"clip_name": clip_name, "type": "wan"}, pos=(COL[1], 200),
             properties=models(clip_name)),
        Node("positive", "CLIPTextEncode", {"text": WAN_PROMPT}, links={"clip": ("clip", 0)},
             pos=(COL[2], SAMPLE_ROW + 340), size=PROMPT_SIZE, title="Prompt to sample the student with"),
        Node("start", "TDMDistillStart", {"prompts": WAN_DISTILL_PROMPTS, "output_name": Path(preset.lora_file).stem,
                                          "unconditional_prompt": WAN_NEGATIVE_PROMPT, "width": width,
                                          "height": height, "gradient_checkpointing": True, "frames": frames},
             links={"model": ("unet", 0), "clip": ("clip", 0)}, pos=(COL[2], JOB_ROW), title=DISTILL_TITLE),
        Node("lora", "TDMDistillLoraLoader", {"use": "finished", "strength_mode": "auto"},
             links={"model": ("unet", 0), "job": ("start", 0)}, pos=(COL[3], SAMPLE_ROW)),
        Node("latent", "EmptyHunyuanLatentVideo", {"width": width, "height": height, "length": frames,
                                                   "batch_size": 1}, pos=(COL[3], SAMPLE_ROW + 420)),
        *_distill_status_nodes(3),
        # next to the one node that uses it, so no link crosses the graph for it
        Node("vae", "VAELoader", {"vae_name": vae_name}, pos=(COL[4], 0), properties=models(vae_name)),
        Node("sample", "TDMKSampler", {"preset": preset.name, "steps": preset.steps, "seed": 42},
             links={"model": ("lora", 0), "positive": ("positive", 0), "latent_image": ("latent", 0)},
             pos=(COL[4], SAMPLE_ROW + 320)),
        Node("decode", "VAEDecode", links={"samples": ("sample", 0), "vae": ("vae", 0)}, pos=(COL[5], 200)),
        Node("video", "CreateVideo", {"fps": WAN_FPS}, links={"images": ("decode", 0)}, pos=(COL[6], 200),
             size=CREATE_VIDEO_SIZE),
        Node("save", "SaveVideo", {"filename_prefix": "video/tdm_wan21_student", "format": "mp4", "codec": "h264"},
             links={"video": ("video", 0)}, pos=(COL[7], 0), size=(400, 400)),
    ]


# CogVideoX-2b's own clip: 49 frames (6 s at 8 fps) at 720×480, the size its positions and the TDM release were made at.
COGVIDEOX_CLIP = {"frames": 49, "width": 720, "height": 480}
COGVIDEOX_STUDENT = "tdm_cogvideox_2b_student"
COGVIDEOX_DISTILL_PROMPTS = ("a red fox trotting through fresh snow, tracking shot\n"
                             "waves rolling onto a rocky beach at sunset, slow pan\n"
                             "an old sailor lighting a pipe on the deck of a ship, close-up\n"
                             "steam rising from a bowl of ramen as chopsticks lift the noodles")


def cogvideox_distill_workflow() -> list[Node]:
    """CogVideoX-2b diffusers folder (TDM CogVideoX Loader, no LoRA, model offload) → TDM Distill on its cogvideox
    input at 720×480, 49 frames → status; TDM CogVideoX LoRA from Distill Job → TDM CogVideoX Sampler (trained
    timesteps) → CreateVideo → SaveVideo: the ComfyUI 0.3.75 way (no native CogVideoX there)."""
    preset = get_preset("cogvideox")
    guide = [
        "## CogVideoX-2B: distil a 4-step LoRA, then sample it (any ComfyUI, through diffusers)", "",
        f"- The whole diffusers repository ([{preset.base_model_source.removeprefix('https://huggingface.co/')}]"
        f"({preset.base_model_source})) → `models/diffusers/CogVideoX-2b/` (model_index.json, transformer/, vae/, "
        "text_encoder/, tokenizer/, scheduler/).",
        f"- `{COGVIDEOX_STUDENT}.safetensors` → `models/loras/`: written by this workflow (the released TDM LoRA "
        f"is `{preset.lora_file}`; this one is your own).", "",
        *_distill_guide(preset, "TDM CogVideoX Sampler samples the student in "
                        f"{preset.steps} steps.", [
            "- One loader serves both branches: TDM Distill trains on its weights (shared, not copied) and the job's "
            "LoRA goes onto a copy that shares them too, so CogVideoX is loaded once. Its `lora_name` stays none: a "
            "teacher is the base model.",
            "- `offload` model on the loader: the T5 encoder (≈9.5 GB in bf16) leaves the GPU once the prompts are "
            "encoded; the job trains its own copy of the transformer on the GPU.",
            f"- {COGVIDEOX_CLIP['width']}×{COGVIDEOX_CLIP['height']}, {COGVIDEOX_CLIP['frames']} frames in TDM "
            "Distill **and** in the sampler: CogVideoX-2b's own clip (6 s at 8 fps); frames are 4k + 1. Fewer frames "
            "train faster and use less memory.",
            "- `unconditional_prompt` empty (CogVideoX's own sampling uses an empty negative prompt); "
            "`gradient_checkpointing` on: the transformer's blocks are recomputed in the backward passes.",
            "- Everything else is TDM Distill's default: 500 iterations, grid auto = the released LoRA's timesteps "
            "999/856/665/399 on the 2B's own schedule (v-prediction, SNR shift 3, zero terminal SNR), and recipe "
            f"auto = {_training_recipe_phrase(preset)}.",
            "- The *TDM jobs* tab's preview shows four frames of each preview clip (decoded by the pipeline's VAE), "
            "first to last, top to bottom.",
            "- On a ComfyUI with native CogVideoX, Load Diffusion Model + Load CLIP (cogvideox) + Load VAE feed TDM "
            "Distill's model and clip instead (docs/headless.md shows the files).",
        ], sampler_node="TDM CogVideoX Sampler, grid trained", lora_file=f"{COGVIDEOX_STUDENT}.safetensors",
           loader="TDM CogVideoX Loader (`lora_name`)"), "", DOCS_LINE,
    ]
    return [
        _read_me("\n".join(guide), size=(460, 860)),
        Node("load", "TDMCogVideoXLoader", {"model_folder": preset.base_model_file, "dtype": "bf16",
                                            "lora_name": "none", "offload": "model"},
             pos=(COL[1], 0), properties=_checkpoint_models(preset)),
        Node("start", "TDMDistillStart", {"prompts": COGVIDEOX_DISTILL_PROMPTS, "output_name": COGVIDEOX_STUDENT,
                                          "gradient_checkpointing": True, **COGVIDEOX_CLIP},
             links={"cogvideox": ("load", 0)}, pos=(COL[2], JOB_ROW), title=DISTILL_TITLE),
        Node("lora", "TDMCogVideoXDistillLora", {"use": "finished", "strength_mode": "auto"},
             links={"cogvideox": ("load", 0), "job": ("start", 0)}, pos=(COL[3], SAMPLE_ROW)),
        *_distill_status_nodes(3),
        Node("sample", "TDMCogVideoXSampler", {"prompt": "a red fox trotting through fresh snow, cinematic",
                                               "grid": "trained", "steps": preset.steps, "cfg": preset.cfg,
                                               "seed": 42, **COGVIDEOX_CLIP},
             links={"cogvideox": ("lora", 0)}, pos=(COL[4], SAMPLE_ROW)),
        Node("video", "CreateVideo", links={"images": ("sample", 0), "fps": ("sample", 1)}, pos=(COL[5], SAMPLE_ROW),
             size=CREATE_VIDEO_SIZE),
        Node("save", "SaveVideo", {"filename_prefix": f"video/{COGVIDEOX_STUDENT}", "format": "mp4",
                                   "codec": "h264"},
             links={"video": ("video", 0)}, pos=(COL[6], SAMPLE_ROW), size=(400, 400)),
    ]


WORKFLOWS = {
    "tdm_sd3_4step": lambda: sd3_workflow("sd3"),
    "tdm_sd35_4step": lambda: sd3_workflow("sd35"),
    "tdm_dreamshaper_4step": dreamshaper_workflow,
    "tdm_cogvideox_2b_4step": cogvideox_workflow,
    "tdm_cogvideox_2b_native_4step": cogvideox_native_workflow,
    "tdm_sd3_teacher_vs_tdm": sd3_comparison_workflow,
    "tdm_distillation": distillation_workflow,
    "tdm_sdxl_distill": sdxl_distill_workflow,
    "tdm_flux_distill": flux_distill_workflow,
    "tdm_wan21_distill": wan_distill_workflow,
    "tdm_cogvideox_2b_distill": cogvideox_distill_workflow,
}


# The file name of each workflow, by its id (the keys above, which tests and the layout use). Both frontends' template
# browsers take a pack's template title and description from its file name alone (custom-node templates have no
# index; checked in frontend 1.32.9 and 1.49.6), so the names are the titles a user reads there and on the tab.
TITLES = {
    "tdm_sd3_4step": "SD3 Medium in 4 steps (TDM LoRA)",
    "tdm_sd35_4step": "SD3.5 Medium in 4 steps (TDM LoRA)",
    "tdm_dreamshaper_4step": "Dreamshaper 7 (SD1.5) in 4 steps (TDM LoRA)",
    "tdm_cogvideox_2b_4step": "CogVideoX-2B video in 4 steps (TDM LoRA, diffusers folder)",
    # 0.3.75 lists it too (it lists every file); the title says it is not for that ComfyUI
    "tdm_cogvideox_2b_native_4step": "CogVideoX-2B video in 4 steps (native nodes, needs a ComfyUI newer than 0.3.75)",
    "tdm_sd3_teacher_vs_tdm": "SD3 Medium, 28-step teacher beside 4-step TDM",
    "tdm_distillation": "Distil your own 4-step LoRA (SD1.5 teacher)",
    "tdm_sdxl_distill": "SDXL, distil a 4-step LoRA then sample it",
    "tdm_flux_distill": "Flux-dev, distil a 4-step LoRA then sample it",
    "tdm_wan21_distill": "Wan 2.1 video, distil a 4-step LoRA then sample it",
    "tdm_cogvideox_2b_distill": "CogVideoX-2B video, distil a 4-step LoRA then sample it (diffusers folder)",
}


def file_name(workflow_id: str) -> str:
    return f"{TITLES[workflow_id]}.json"


# Workflows that need a ComfyUI with native CogVideoX (upstream 2026): on 0.3.75 their loaders lack the "cogvideox"
# text-encoder type, so they cannot validate there.
NEEDS_NATIVE_COGVIDEOX = {"tdm_cogvideox_2b_native_4step"}


def model_files() -> dict[str, list[str]]:
    """The files the workflows name, by ComfyUI model folder (what a user must have; tests place stand-ins)."""
    files: dict[str, set] = {}
    for preset in PRESETS.values():
        files.setdefault(preset.base_model_folder, set()).add(preset.base_model_file)
        if preset.lora_source:  # an unreleased LoRA is the output of a distill workflow: a stand-in would block it
            files.setdefault("loras", set()).add(preset.lora_file)
        for folder, (name, _source) in preset.extra.get("native_files", {}).items():
            files.setdefault(folder, set()).add(name)
        for folder, name, _url in preset.extra.get("split_files", ()):
            files.setdefault(folder, set()).add(name)
    return {k: sorted(v) for k, v in files.items()}


def downloads() -> dict[str, tuple[str, str]]:
    """Every file the presets give a direct download for: name → (url, model folder). Each loader node that names
    one must carry it in `properties.models` (a test checks every workflow file)."""
    found = {}
    for preset in PRESETS.values():
        if preset.lora_url:
            found[preset.lora_file] = (preset.lora_url, "loras")
        if preset.base_model_url:
            found[preset.base_model_file] = (preset.base_model_url, preset.base_model_folder)
        for folder, (name, source) in preset.extra.get("native_files", {}).items():
            if source.startswith("https://") and source.endswith(".safetensors"):
                found[name] = (source, folder)
        for folder, name, url in preset.extra.get("split_files", ()):
            found[name] = (url, folder)
    return found


# Core-style numbered frames (title, node keys): the steps a user goes through. A test holds every frame to whole
# nodes only (LiteGraph moves what lies inside a frame with it) and frames to not overlap.
LOAD = "1 Load models"
DISTIL, SAMPLE_STUDENT = "2 Distil the student (a background job)", "3 Sample the student in 4 steps"
GROUPS = {
    "tdm_sd3_4step": [Group(LOAD, ["ckpt", "lora"]), Group("2 Prompt", ["positive"]),
                      Group("3 Sample and save", ["noise", "guider", "sampler", "sigmas", "latent", "sample",
                                                  "decode", "save"])],
    "tdm_dreamshaper_4step": [Group(LOAD, ["ckpt", "lora"]), Group("2 Prompt and size", ["positive", "latent"]),
                              Group("3 Sample and save", ["sample", "decode", "save"])],
    "tdm_cogvideox_2b_4step": [Group("1 Load the model and the TDM LoRA", ["load"]),
                               Group("2 Prompt and sample", ["sample"]), Group("3 Save the video", ["video", "save"])],
    "tdm_cogvideox_2b_native_4step": [
        Group(LOAD, ["unet", "clip", "lora"]), Group("2 Prompt and size", ["positive", "latent"]),
        Group("3 Sample, decode and save", ["vae", "sample", "decode", "video", "save"])],
    "tdm_sd3_teacher_vs_tdm": [
        Group(LOAD, ["ckpt"]), Group("2 Prompts, size and the TDM LoRA", ["lora", "positive", "negative", "latent"]),
        Group("3 Teacher (top) and TDM (bottom), same seed",
              ["teacher", "tdm", "teacher_decode", "tdm_decode", "teacher_save", "tdm_save"])],
    "tdm_distillation": [Group("1 Load the teacher", ["ckpt"]), Group("2 Distil (a background job)", ["start"]),
                         Group("3 Watch the job", ["status", "status_text", "loss", "preview"])],
    "tdm_sdxl_distill": [Group("1 Load the teacher", ["ckpt"]),
                         Group(DISTIL, ["start", "status", "status_text", "loss", "preview"]),
                         Group(SAMPLE_STUDENT, ["lora", "positive", "latent", "sample", "decode", "save"])],
    "tdm_flux_distill": [Group("1 Load the teacher", ["unet", "clip"]),
                         Group(DISTIL, ["start", "status", "status_text", "loss", "preview"]),
                         Group(SAMPLE_STUDENT, ["lora", "positive", "guidance", "latent", "vae", "sample", "decode",
                                                "save"])],
    "tdm_wan21_distill": [Group("1 Load the teacher", ["unet", "clip"]),
                          Group(DISTIL, ["start", "status", "status_text", "loss", "preview"]),
                          Group(SAMPLE_STUDENT, ["lora", "positive", "latent", "vae", "sample", "decode", "video",
                                                 "save"])],
    "tdm_cogvideox_2b_distill": [Group("1 Load the teacher", ["load"]),
                                 Group(DISTIL, ["start", "status", "status_text", "loss", "preview"]),
                                 Group(SAMPLE_STUDENT, ["lora", "sample", "video", "save"])],
}
GROUPS["tdm_sd35_4step"] = GROUPS["tdm_sd3_4step"]


def build_one(name: str, object_info: dict) -> dict:
    return build_ui(WORKFLOWS[name](), object_info, PACK_PROPERTIES, CORE_VERSION,
                    str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tdm/workflows/{name}")), groups=GROUPS.get(name, ()))


def build_all(object_info: dict) -> dict[str, dict]:
    return {name: build_one(name, object_info) for name in WORKFLOWS}


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    from tdm_devkit import comfy_runtime

    comfy_runtime.bootstrap()
    from tdm_devkit.server import ComfyServer, make_base_directory
    from tdm_devkit.workflow_placeholders import install_placeholders

    with tempfile.TemporaryDirectory() as tmp:
        base = make_base_directory(Path(tmp))
        install_placeholders(base, model_files())
        with ComfyServer(base) as server:
            workflows = build_all(server.object_info())
    WORKFLOWS_DIR.mkdir(exist_ok=True)
    for name, workflow in workflows.items():
        (WORKFLOWS_DIR / file_name(name)).write_text(dumps(workflow))
        print(f"wrote workflows/{file_name(name)}")


if __name__ == "__main__":
    main()
