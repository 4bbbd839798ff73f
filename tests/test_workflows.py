"""The example workflows: generated from the presets, valid against the live server (no missing nodes, no
mistyped links, valid widget values), listed by ComfyUI's template browser, and runnable end to end on tiny models
with real TDM LoRA files under the released names."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tdm_core.presets import PRESETS, get_preset
from tdm_devkit import cogvideox_native, cogvideox_tiny, lora_files, twins
from tdm_devkit.workflow_check import Substitute, check_workflow, to_api
from tdm_devkit.workflow_placeholders import install_placeholders

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import build_workflows  # noqa: E402

WORKFLOW_FAMILY = {  # which tiny twin stands in for each workflow's checkpoint
    "tdm_sd3_4step": "sd3",
    "tdm_sd35_4step": "sd35",
    "tdm_dreamshaper_4step": "sd15",
    "tdm_cogvideox_2b_4step": None,
    "tdm_cogvideox_2b_native_4step": "cogvideox",
    "tdm_sd3_teacher_vs_tdm": "sd3",
    "tdm_distillation": "sd15",
    "tdm_sdxl_distill": "sdxl",
    "tdm_flux_distill": "flux",
    "tdm_wan21_distill": "wan21",
    "tdm_cogvideox_2b_distill": None,  # the real tiny CogVideoX-2b folder, as tdm_cogvideox_2b_4step
}
# The Wan graph saves its video and previews the job's loss curve and student (PreviewImage: PNG).
EXPECTED_SUFFIXES = {"tdm_cogvideox_2b_4step": {".mp4"}, "tdm_cogvideox_2b_native_4step": {".mp4"},
                     "tdm_wan21_distill": {".mp4", ".png"}, "tdm_cogvideox_2b_distill": {".mp4", ".png"}}
NATIVE = cogvideox_native.has_native_cogvideox()
# The two CogVideoX workflows name the same released LoRA, but their tiny stand-in models differ in width (the native
# twin needs ComfyUI's 64-wide heads), so the native run points its loader at a LoRA made for its twin.
NATIVE_TWIN_LORA = "tdm_cogvideox_2b_native_twin.safetensors"
# The LoRA each distillation workflow's job writes (its TDM Distill output_name), checked after its end-to-end run.
DISTILLED_LORA = {"tdm_distillation": "tdm_dreamshaper_distilled.safetensors",
                  "tdm_sdxl_distill": get_preset("sdxl").lora_file, "tdm_flux_distill": get_preset("flux").lora_file,
                  "tdm_wan21_distill": get_preset("wan21").lora_file,
                  "tdm_cogvideox_2b_distill": f"{build_workflows.COGVIDEOX_STUDENT}.safetensors"}


@pytest.fixture(scope="module")
def server(comfy_server, tmp_path_factory):
    """The live server with the released file names present: real tiny LoRAs (made against the twins the
    checkpoints are swapped for) and a real tiny CogVideoX folder; empty stand-ins for the checkpoints."""
    models = comfy_server.base_directory / "models"
    for family, preset_name in (("sd3", "sd3"), ("sd35", "sd35"), ("sd15", "dreamshaper")):
        twin = twins.comfy_twin(family)
        lora = lora_files.synthesise(twin.diffusers, family, rank=4, seed=7)
        target = models / "loras" / get_preset(preset_name).lora_file
        if target.suffix == ".pt":
            lora_files.write_kohya(lora, target)
        else:
            lora_files.write_peft(lora, target)
    cogvideox = get_preset("cogvideox")
    folder = models / "diffusers" / cogvideox.base_model_file
    if not (folder / "transformer").exists():
        shutil.rmtree(folder, ignore_errors=True)
        cogvideox_tiny.save_tiny_cogvideox_folder(folder)
    lora = lora_files.synthesise(cogvideox_tiny.build_tiny_transformer(0), "cogvideox", rank=4, seed=7)
    lora_files.write_peft(lora, models / "loras" / cogvideox.lora_file)
    if NATIVE:
        # newer ComfyUI: a real tiny native CogVideoX-2B under the native workflow's file name, loaded by UNETLoader
        native_file = models / "diffusion_models" / cogvideox.extra["native_files"]["diffusion_models"][0]
        if not native_file.exists():
            cogvideox_native.save_native_file(native_file)
        native_lora = lora_files.synthesise(cogvideox_native.build_diffusers_transformer(0), "cogvideox", rank=4, seed=7)
        lora_files.write_peft(native_lora, models / "loras" / NATIVE_TWIN_LORA, prefix="transformer")
    install_placeholders(comfy_server.base_directory, build_workflows.model_files())
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def committed(name: str) -> dict:
    """A committed workflow by its generator id, or by its file's name (what ALL_WORKFLOW_FILES lists)."""
    file = build_workflows.file_name(name) if name in build_workflows.TITLES else f"{name}.json"
    return json.loads((REPO / "workflows" / file).read_text())


def test_every_workflow_is_committed_and_current(object_info):
    """The files in workflows/ are exactly what the generator makes from today's presets and node schemas."""
    generated = build_workflows.build_all(object_info)
    assert set(generated) == set(WORKFLOW_FAMILY) == set(build_workflows.TITLES)
    assert sorted(p.name for p in (REPO / "workflows").glob("*.json")) == \
        sorted(build_workflows.file_name(name) for name in generated)
    for name, workflow in generated.items():
        assert build_workflows.dumps(workflow) == (REPO / "workflows" / build_workflows.file_name(name)).read_text(), (
            f"workflows/{build_workflows.file_name(name)} is stale: run .venv/bin/python scripts/build_workflows.py")


def test_template_titles_are_human_and_safe_as_file_names():
    """The template browser shows the file name as the title (and, dashes and underscores as spaces, as the
    description): words a user reads, in a name every OS can store and a URL can carry."""
    for title in build_workflows.TITLES.values():
        assert 10 <= len(title) <= 90 and title[0].isupper() and "_" not in title, title
        assert not set(title) & set('<>:"/\\|?*#%&'), title
    assert len(set(build_workflows.TITLES.values())) == len(build_workflows.TITLES)
    native = build_workflows.TITLES["tdm_cogvideox_2b_native_4step"]
    assert "0.3.75" in native  # listed on 0.3.75 as well, where it cannot run: the title says so


@pytest.mark.parametrize("name", sorted(WORKFLOW_FAMILY))
def test_workflow_is_valid_for_the_server(object_info, name):
    workflow = committed(name)
    if name in build_workflows.NEEDS_NATIVE_COGVIDEOX and not NATIVE:
        # known to need a ComfyUI with native CogVideoX: here it is refused, for that reason
        assert any("'cogvideox' is not one of the options" in p for p in check_workflow(workflow, object_info))
        return
    assert check_workflow(workflow, object_info) == []
    tdm_nodes = [n for n in workflow["nodes"] if n["type"].startswith("TDM")]
    assert tdm_nodes and all(n["properties"]["cnr_id"] == "comfyui-tdm" and n["properties"]["ver"] for n in tdm_nodes)
    notes = [n for n in workflow["nodes"] if n["type"] == "MarkdownNote"]
    assert notes and "](https://huggingface.co/" in notes[0]["widgets_values"][0]
    assert "models/loras/" in notes[0]["widgets_values"][0]


# Every workflow file, the ones other presets add included: checked from the saved JSON alone (no server).
ALL_WORKFLOW_FILES = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))


@pytest.mark.parametrize("name", ALL_WORKFLOW_FILES)
def test_workflow_opens_readable_with_the_read_me_and_loaders_on_screen_and_no_overlaps(name):
    """The saved view (extra.ds) is at a zoom where the frontend draws text at its default level of detail
    (tdm_devkit.workflow_build.MIN_READABLE_ZOOM; workflows once opened at 0.46–0.57 as blank boxes) and shows the Read me
    and every loader whole inside a 1920×1080 window clear of the toolbar and sidebar; no two saved node boxes (title
    bars included) intersect. The real-browser check repeats this with live node sizes and default settings."""
    from tdm_devkit.workflow_build import (
        MIN_READABLE_ZOOM,
        VIEW,
        bounding_box,
        group_problems,
        links_under_nodes,
        must_be_on_screen,
        overlaps,
    )

    workflow = committed(name)
    assert overlaps(workflow["nodes"]) == []
    # core-style numbered frames around whole nodes, and no link drawn under a node it does not end at
    assert len(workflow["groups"]) >= 3 and all(g["title"][0].isdigit() for g in workflow["groups"])
    assert group_problems(workflow) == []
    assert links_under_nodes(workflow) == []
    scale, (dx, dy) = workflow["extra"]["ds"]["scale"], workflow["extra"]["ds"]["offset"]
    assert MIN_READABLE_ZOOM <= scale <= 1.0
    off_screen = []
    for node in filter(must_be_on_screen, workflow["nodes"]):
        left, top, right, bottom = ((v + d) * scale for v, d in zip(bounding_box(node), (dx, dy, dx, dy), strict=True))
        if left < VIEW["left"] - 1 or top < VIEW["top"] - 1 or right > VIEW["width"] - VIEW["right"] + 1 \
                or bottom > VIEW["height"] - VIEW["bottom"] + 1:
            off_screen.append((node["id"], node["type"], (round(left), round(top), round(right), round(bottom))))
    assert off_screen == []


def test_thumbnails_tell_the_templates_apart():
    """The template browser shows each workflow's `<name>.jpg`: every pair of thumbnails differs visibly (mean
    colour difference at 64×48 pixels). The graph screenshots alone looked alike (the SD3 and SD3.5 ones differed by
    0.1 of 255); the banner with the title, coloured by what the workflow makes, tells them apart."""
    import itertools

    import numpy as np
    from PIL import Image

    thumbnails = {name: np.asarray(Image.open(REPO / "workflows" / f"{name}.jpg").convert("RGB").resize((64, 48)),
                                   dtype=float) for name in ALL_WORKFLOW_FILES}
    close = [(a, b, round(float(np.abs(thumbnails[a] - thumbnails[b]).mean()), 1))
             for a, b in itertools.combinations(thumbnails, 2) if np.abs(thumbnails[a] - thumbnails[b]).mean() < 8]
    assert close == []


@pytest.mark.parametrize("name", ALL_WORKFLOW_FILES)
def test_workflow_note_and_download_entries(name):
    """A MarkdownNote (headings render, links click) whose solver names are the widget's options, and a
    `properties.models` entry (name, url, directory) on every loader node whose widget names a file the presets
    give a download for: what the newer frontend turns into a Download / Copy URL offer."""
    from tdm_core.solvers import WIDGET_NAMES

    workflow = committed(name)
    notes = [n for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert [n["type"] for n in notes] == ["MarkdownNote"]
    text = notes[0]["widgets_values"][0]
    assert text.startswith("## ") and "](https://" in text
    for internal in ("flow_dpmpp_2m", "ddim_v"):  # tdm_core's names, not what the solver widget offers
        assert internal not in text
    assert "solver" not in text or any(f"solver {o}" in text or f"`solver` {o}" in text
                                       for o in set(WIDGET_NAMES.values()))
    downloads = build_workflows.downloads()
    missing = []
    for node in workflow["nodes"]:
        entries = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
        for value in node.get("widgets_values", []):
            if isinstance(value, str) and value in downloads:
                url, folder = downloads[value]
                if entries.get(value) != {"name": value, "url": url, "directory": folder}:
                    missing.append((node["type"], value))
    assert missing == []
    gated = [p for p in PRESETS.values() if p.base_model_gated and p.base_model_file in json.dumps(workflow)]
    for preset in gated:
        assert "Gated on Hugging Face" in text, preset.name


LEGACY_WORKFLOWS = REPO / "tests" / "data" / "legacy_workflows"  # as comfyui-tdm 0.1.0 shipped them (before denoise,
# preset auto, the shift value and the TDM categories): what users have saved


@pytest.mark.parametrize("name", sorted(p.stem for p in LEGACY_WORKFLOWS.glob("*.json")))
def test_workflows_saved_by_the_previous_version_load_and_queue_the_same_prompt(object_info, pack, name):
    """Widget values are stored by position: the inputs added since (denoise, an optional VAE socket, TDM Distill's
    recipe and its knobs) went last, so an old file validates and queues the prompt today's file queues (which the
    end-to-end test runs). TDM Distill's older training inputs now default to -1, "the recipe's": an old file's
    explicit numbers must train exactly as today's file does with its teacher's recipe."""
    recipe_inputs = sys.modules[f"{pack.__name__}.nodes.recipe_inputs"]
    legacy = json.loads((LEGACY_WORKFLOWS / f"{name}.json").read_text())
    assert check_workflow(legacy, object_info) == []

    def prompt(workflow):
        nodes = {node_id: {"class_type": e["class_type"], "inputs": dict(e["inputs"])}
                 for node_id, e in to_api(workflow, object_info, {}).items()}
        for node in nodes.values():
            if node["class_type"] == "TDMDistillStart":  # the example's teacher is SD1.5 (the dreamshaper grid)
                knobs = recipe_inputs.distill_settings(node["inputs"], "sd15")[0]
                for key in ("learning_rate", "cfg", "lora_rank", "lora_alpha", "batch_size"):
                    node["inputs"].pop(key)
                node["inputs"]["training"] = knobs
        return nodes

    assert prompt(legacy) == prompt(committed(name))


def test_solver_names_in_notes_are_the_widget_options(object_info):
    """The notes name solvers by tdm_core.solvers.WIDGET_NAMES: those are exactly TDM Sampler's solver options."""
    from tdm_core.solvers import WIDGET_NAMES

    options = object_info["TDMSampler"]["input"]["required"]["solver"]
    options = options[1]["options"] if options[0] == "COMBO" else options[0]
    assert set(WIDGET_NAMES.values()) | {"auto"} == set(options)


def test_template_browser_lists_the_workflows_under_their_titles_and_serves_them(server):
    """What the frontend's template browser does with a pack's templates: list the names, then fetch
    `/api/workflow_templates/<pack>/<name>.json` and the `<name>.jpg` thumbnail (the browser percent-encodes the
    spaces and parentheses of the titles)."""
    import urllib.parse
    import urllib.request

    templates = server.get("/workflow_templates")
    assert sorted(templates.get("comfyui-tdm", [])) == sorted(build_workflows.TITLES.values())
    for title in templates["comfyui-tdm"]:
        for suffix in (".json", ".jpg"):
            url = f"{server.url}/api/workflow_templates/comfyui-tdm/{urllib.parse.quote(title)}{suffix}"
            with urllib.request.urlopen(url, timeout=30) as response:
                body = response.read()
            assert body == (REPO / "workflows" / f"{title}{suffix}").read_bytes(), url


def _substitutions(family: str) -> dict:
    if family == "cogvideox":
        # native CogVideoX: the real tiny model file goes through UNETLoader; text encoder and VAE are stand-ins
        return {
            "CLIPLoader": {0: Substitute("TDMTest_TinyCLIP", {"family": family})},
            "CLIPTextEncode": {0: Substitute("TDMTest_TinyConditioning",
                                             lambda inputs: {"family": family, "text": inputs["text"]})},
            "VAELoader": {0: Substitute("TDMTest_TinyVAE", {"family": family, "seed": 0})},
        }
    if family == "wan21":
        # Wan 2.1 from split files: the diffusion model, umt5 and the VAE become the tiny Wan twin, its conditioning
        # and a narrow real ComfyUI Wan 2.1 VAE (VAEDecode, CreateVideo and SaveVideo stay the real ones)
        return {
            "UNETLoader": {0: Substitute("TDMTest_TinyModel", {"family": family, "seed": 0})},
            "CLIPLoader": {0: Substitute("TDMTest_TinyCLIP", {"family": family})},
            "CLIPTextEncode": {0: Substitute("TDMTest_TinyConditioning",
                                             lambda inputs: {"family": family, "text": inputs["text"]})},
            "VAELoader": {0: Substitute("TDMTest_TinyVAE", {"family": family, "seed": 0})},
        }
    if family == "flux":
        # Flux-dev from split files: the diffusion model, both text encoders and the VAE become the tiny Flux twin's
        return {
            "UNETLoader": {0: Substitute("TDMTest_TinyModel", {"family": family, "seed": 0})},
            "DualCLIPLoader": {0: Substitute("TDMTest_TinyCLIP", {"family": family})},
            "CLIPTextEncode": {0: Substitute("TDMTest_TinyConditioning",
                                             lambda inputs: {"family": family, "text": inputs["text"]})},
            "VAELoader": {0: Substitute("TDMTest_TinyVAE", {"family": family, "seed": 0})},
        }
    return {
        "CheckpointLoaderSimple": {0: Substitute("TDMTest_TinyModel", {"family": family, "seed": 0}),
                                   1: Substitute("TDMTest_TinyCLIP", {"family": family}),
                                   2: Substitute("TDMTest_TinyVAE", {"family": family, "seed": 0})},
        "CLIPTextEncode": {0: Substitute("TDMTest_TinyConditioning",
                                         lambda inputs: {"family": family, "text": inputs["text"]})},
    }


# Every value an end-to-end run sends that differs from the committed workflow, and why. A test compares each
# workflow with what its run sends and fails on any difference not listed here; a dtype, a sampler setting or a
# preset is never on this list, so the runs use exactly what a user who opens the workflow gets.
_GEOMETRY = cogvideox_tiny.tiny_frame_geometry()
TINY_MODEL_OVERRIDES = {
    # the tiny models' position tables cover small latents only; real resolutions are far beyond them
    ("EmptySD3LatentImage", "width"): 128, ("EmptySD3LatentImage", "height"): 128,
    ("EmptyLatentImage", "width"): 128, ("EmptyLatentImage", "height"): 128,
    ("EmptyHunyuanLatentVideo", "width"): _GEOMETRY.width, ("EmptyHunyuanLatentVideo", "height"): _GEOMETRY.height,
    ("EmptyHunyuanLatentVideo", "length"): _GEOMETRY.num_frames,
    ("TDMCogVideoXSampler", "frames"): _GEOMETRY.num_frames,
    ("TDMCogVideoXSampler", "width"): _GEOMETRY.width, ("TDMCogVideoXSampler", "height"): _GEOMETRY.height,
    ("TDMDistillStart", "width"): 64, ("TDMDistillStart", "height"): 64,
    # a test-sized job: two iterations, a LoRA and a preview after each (CPU time, not behaviour)
    ("TDMDistillStart", "iterations"): 2, ("TDMDistillStart", "save_every"): 1,
    ("TDMDistillStart", "preview_every"): 1,
    # the prompt returns when the background job has finished, so the test can check the LoRA it wrote
    ("TDMDistillStatus", "wait"): True,
}
# The checkpoint, text-encoder and VAE nodes are swapped for test injectors that build tiny models (`_substitutions`).
SUBSTITUTED_NODES = {"CheckpointLoaderSimple", "CLIPLoader", "CLIPTextEncode", "VAELoader", "UNETLoader",
                     "DualCLIPLoader"}


# The native CogVideoX run points its LoRA loader at a LoRA made for its twin (see NATIVE_TWIN_LORA).
NATIVE_TWIN_OVERRIDES = {("TDMLoraLoader", "lora_name"): NATIVE_TWIN_LORA}


def _shrink_for_tiny_models(api: dict, overrides: dict = TINY_MODEL_OVERRIDES) -> None:
    for entry in api.values():
        for (class_type, name), value in overrides.items():
            if entry["class_type"] == class_type:
                entry["inputs"][name] = value


# The distil-then-sample workflows train and sample at one size (Flux's grid depends on it): their runs sample at the
# tiny training size above too, instead of the other workflows' 128.
SAMPLE_AT_TRAINING_SIZE = {
    (latent, side): TINY_MODEL_OVERRIDES[("TDMDistillStart", side)]
    for latent in ("EmptyLatentImage", "EmptySD3LatentImage") for side in ("width", "height")}


# The Wan graph samples its video latent at the tiny training size as well; its length stays the committed 33 frames,
# the TDM Distill `frames` it trains at (the tiny twin's 9 latent frames of 8×8 cost little), instead of the
# CogVideoX twin's length the other video overrides set.
WAN_OVERRIDES = {key: value for key, value in TINY_MODEL_OVERRIDES.items()
                 if key[0] != "EmptyHunyuanLatentVideo"} | {
    ("EmptyHunyuanLatentVideo", side): TINY_MODEL_OVERRIDES[("TDMDistillStart", side)] for side in ("width", "height")}


# The CogVideoX distillation's loader offloads by model (T5 off the GPU while the job trains); accelerate's model offload
# needs an accelerator, which this machine lacks, so the run keeps the pipeline on the CPU (where it is anyway).
COGVIDEOX_DISTILL_OVERRIDES = TINY_MODEL_OVERRIDES | {("TDMCogVideoXLoader", "offload"): "none"}


def _overrides(name: str) -> dict:
    if name == "tdm_wan21_distill":
        return WAN_OVERRIDES
    if name == "tdm_cogvideox_2b_distill":
        return COGVIDEOX_DISTILL_OVERRIDES
    if name in build_workflows.NEEDS_NATIVE_COGVIDEOX:
        return TINY_MODEL_OVERRIDES | NATIVE_TWIN_OVERRIDES
    if name in ("tdm_sdxl_distill", "tdm_flux_distill"):
        return TINY_MODEL_OVERRIDES | SAMPLE_AT_TRAINING_SIZE
    return TINY_MODEL_OVERRIDES


def as_sent(name: str, object_info: dict) -> dict:
    """The API graph `test_workflow_runs_end_to_end` queues for a committed workflow."""
    family = WORKFLOW_FAMILY[name]
    api = to_api(committed(name), object_info, _substitutions(family) if family else {})
    _shrink_for_tiny_models(api, _overrides(name))
    return api


@pytest.mark.parametrize("name", sorted(WORKFLOW_FAMILY))
def test_end_to_end_runs_send_the_committed_values(object_info, name):
    """What `test_workflow_runs_end_to_end` queues differs from the committed workflow only by the listed
    overrides and the substituted loader nodes."""
    if name in build_workflows.NEEDS_NATIVE_COGVIDEOX and not NATIVE:
        pytest.skip(cogvideox_native.SKIP_REASON)
    as_committed = to_api(committed(name), object_info, {})
    sent = as_sent(name, object_info)
    allowed = _overrides(name)

    def original_id(node_id: str) -> str:  # a substituted node with several outputs becomes "<id>_sub<slot>"
        return node_id.split("_sub")[0]

    def as_link_to_original(value):
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and "_sub" in value[0]:
            return [original_id(value[0]), int(value[0].split("_sub")[1])]
        return value

    assert {original_id(i) for i in sent} == set(as_committed)
    unexpected = []
    for node_id, entry in sent.items():
        original = as_committed[original_id(node_id)]
        entry = dict(entry, inputs={k: as_link_to_original(v) for k, v in entry["inputs"].items()})
        if entry["class_type"] != original["class_type"]:
            if original["class_type"] not in SUBSTITUTED_NODES:
                unexpected.append(f"node {node_id}: {original['class_type']} replaced by {entry['class_type']}")
            continue
        for key in entry["inputs"].keys() | original["inputs"].keys():
            if entry["inputs"].get(key) != original["inputs"].get(key) and (entry["class_type"], key) not in allowed:
                unexpected.append(f"node {node_id} ({entry['class_type']}).{key}: committed "
                                  f"{original['inputs'].get(key)!r}, sent {entry['inputs'].get(key)!r}")
    assert unexpected == []
    if name == "tdm_cogvideox_2b_4step":  # the loader's shipped default, which the run keeps
        loader = next(e for e in sent.values() if e["class_type"] == "TDMCogVideoXLoader")
        assert loader["inputs"]["dtype"] == "bf16"


@pytest.mark.parametrize("name", sorted(WORKFLOW_FAMILY))
def test_workflow_runs_end_to_end(server, object_info, name):
    if name in build_workflows.NEEDS_NATIVE_COGVIDEOX and not NATIVE:
        pytest.skip(cogvideox_native.SKIP_REASON)
    api = as_sent(name, object_info)
    entry = server.run_prompt(api, timeout=600)
    files = [item for outputs in entry["outputs"].values() for items in outputs.values() if isinstance(items, list)
             for item in items if isinstance(item, dict) and "filename" in item]
    paths = [server.base_directory / f.get("type", "output") / f.get("subfolder", "") / f["filename"] for f in files]
    savers = [e for e in api.values() if e["class_type"] in ("SaveImage", "SaveVideo", "PreviewImage")]
    assert len(paths) == len(savers) and all(p.is_file() and p.stat().st_size > 0 for p in paths), entry["outputs"]
    assert {p.suffix for p in paths} == EXPECTED_SUFFIXES.get(name, {".png"})
    log = server.log_tail(400_000)
    assert "lora key not loaded" not in log
    if name in DISTILLED_LORA:
        status_id = next(i for i, e in api.items() if e["class_type"] == "TDMDistillStatus")
        status = entry["outputs"][status_id]["text"]
        assert "finished" in str(status), status
        assert (server.base_directory / "models" / "loras" / DISTILLED_LORA[name]).is_file()
    job_loras = [i for i, e in api.items() if e["class_type"] == "TDMDistillLoraLoader"]
    for node_id in job_loras:  # the 4-step sample (checked above: saved) used the job's final LoRA
        report = "\n".join(entry["outputs"][node_id]["text"])
        iterations = TINY_MODEL_OVERRIDES[("TDMDistillStart", "iterations")]
        assert f"{DISTILLED_LORA[name]}, its final LoRA (step {iterations} of {iterations})" in report, report
        assert "strength 1 (recorded in the LoRA file)" in report and "WARNING" not in report, report
    for node_id in [i for i, e in api.items() if e["class_type"] == "TDMCogVideoXDistillLora"]:
        report = "\n".join(entry["outputs"][node_id]["text"])
        iterations = TINY_MODEL_OVERRIDES[("TDMDistillStart", "iterations")]
        assert report.startswith(f"{DISTILLED_LORA[name]} at strength 1 (recorded in the LoRA file)"), report
        assert f"its final LoRA (step {iterations} of {iterations})" in report, report
    if name in ("tdm_sdxl_distill", "tdm_flux_distill"):
        assert job_loras and any(e["class_type"] == "SaveImage" for e in api.values())
    if name == "tdm_wan21_distill":  # the student's clip: every frame of the 33 the latent holds, decoded and saved
        import av

        video = next(p for p in paths if p.suffix == ".mp4")
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            assert (sum(1 for _ in container.decode(stream)), stream.width, stream.height) == (33, 64, 64)


def test_every_seed_has_control_after_generate(object_info):
    """Newer frontends add a "control after generate" widget to any INT named seed that lacks one, which shifts
    every saved value after it: each seed of this pack declares it."""
    seeds = [(node, name) for node, info in object_info.items() if node.startswith("TDM")
             for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()
             if name in ("seed", "noise_seed")]
    assert seeds
    missing = [f"{node}.{name}" for node, name in seeds
               if not (object_info[node]["input"].get("required", {}).get(name)
                       or object_info[node]["input"]["optional"][name])[1].get("control_after_generate")]
    assert missing == []


def test_readme_table_is_generated_from_the_presets():
    sys.path.insert(0, str(REPO / "scripts"))
    import readme_table

    assert readme_table.table() in (REPO / "README.md").read_text(), (
        "README's model table is stale: paste the output of .venv/bin/python scripts/readme_table.py")


def test_every_single_file_a_workflow_loads_has_a_direct_link_or_says_where_it_comes_from():
    """Issue 27: dreamshaper_7 had no download entry and its page is the diffusers release, with no word on where the
    single file comes from. A file a loader takes (not a diffusers folder) has a direct link, or its Read me says why
    not and where to get it; a .pt link warns that older Missing Models dialogs will not fetch it."""
    from tdm_core.presets import PRESETS

    silent = [p.name for p in PRESETS.values()
              if p.base_model_file and p.base_model_folder != "diffusers" and not p.base_model_url
              and not p.base_model_how]
    assert silent == [], f"presets whose base model has no direct link and no explanation: {silent}"
    note = next(n for n in committed("tdm_dreamshaper_4step")["nodes"] if n["type"] == "MarkdownNote")
    text = note["widgets_values"][0]
    assert f"No direct link: {PRESETS['dreamshaper'].base_model_how}." in text, text
    assert "will not fetch a .pt file" in text, text
    # and the error a node gives for that name says the same, not "download the whole repository into a .safetensors"
    from tdm_core.presets import where_to_get

    assert PRESETS["dreamshaper"].base_model_how in where_to_get(PRESETS["dreamshaper"].base_model_file)


@pytest.mark.parametrize("name", ALL_WORKFLOW_FILES)
def test_every_prompt_box_is_titled(name):
    """Issue 27: multiline boxes show no label, and a distil-then-sample graph has two (the training prompts and the
    prompt the student samples): every node holding a prompt box carries a title that says which it is."""
    untitled = [f"{n['id']} {n['type']}" for n in committed(name)["nodes"]
                if n["type"] in ("CLIPTextEncode", "TDMDistillStart") and not n.get("title")]
    assert untitled == []


def test_wan_workflow_trains_against_wans_own_negative_prompt(object_info):
    """The Wan graph's TDM Distill takes Wan's standard negative prompt as its unconditional prompt: the one ComfyUI's
    own Wan 2.1 text-to-video template (comfyui-workflow-templates, installed with ComfyUI) samples with, read from
    that template here rather than typed twice; and it trains at the size and length its latent samples at."""
    import importlib.util

    spec = importlib.util.find_spec("comfyui_workflow_templates_media_video")
    if spec is None:
        pytest.skip("comfyui-workflow-templates-media-video (ComfyUI's own templates) is not installed")
    template = json.loads((Path(spec.origin).parent / "templates" / "text_to_video_wan.json").read_text())
    [negative] = [n["widgets_values"][0] for n in template["nodes"]
                  if n["type"] == "CLIPTextEncode" and "Negative" in n.get("title", "")]
    api = to_api(committed("tdm_wan21_distill"), object_info, {})
    [start] = [e["inputs"] for e in api.values() if e["class_type"] == "TDMDistillStart"]
    [latent] = [e["inputs"] for e in api.values() if e["class_type"] == "EmptyHunyuanLatentVideo"]
    assert start["unconditional_prompt"] == negative and negative.startswith("色调艳丽")
    assert (start["width"], start["height"], start["frames"], start["gradient_checkpointing"]) == (832, 480, 33, True)
    assert (latent["width"], latent["height"], latent["length"]) == (832, 480, 33)


@pytest.mark.parametrize("name", ["tdm_distillation", "tdm_sdxl_distill", "tdm_flux_distill", "tdm_wan21_distill"])
def test_every_shipped_distillation_graph_can_go_headless(object_info, pack, name):
    """What TDM Distill records from each example graph's queued prompt is a teacher the headless run rebuilds (the
    jobs panel's Headless button): core loaders only, the workflow's own file names, accepted by the headless
    teacher's own checks."""
    from tdm_core.distill.teacher_files import FILE_FIELDS, TeacherFiles

    trace = sys.modules[f"{pack.__name__}.nodes.headless_export"].trace_teacher_files
    api = to_api(committed(name), object_info, {})
    start = next(node_id for node_id, e in api.items() if e["class_type"] == "TDMDistillStart")
    files = trace(api, start)
    assert "error" not in files, files
    TeacherFiles(**{k: v for k, v in files.items() if k in FILE_FIELDS})
    loaders = {e["class_type"]: e["inputs"] for e in api.values()}
    named = files.get("checkpoint") or files.get("diffusion_model")
    assert named in (loaders.get("CheckpointLoaderSimple", {}).get("ckpt_name"),
                     loaders.get("UNETLoader", {}).get("unet_name"))
    if files.get("diffusion_model"):  # Flux's and Wan's text encoders come from their own loader
        assert files["text_encoders"] and files["clip_type"]
