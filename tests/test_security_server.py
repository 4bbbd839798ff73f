"""Hostile clients against a live ComfyUI server (issue 13): every combo/path/number input of every TDM node is checked
by the pack (ComfyUI 0.3.75 does not check V3 combos), the /tdm routes validate bodies and survive planted records,
and the server keeps serving prompts after each attack."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save_file
from test_trainer_server import job, sample_graph, start_graph

from tdm_devkit import cogvideox_tiny
from tdm_devkit.server import ComfyServer, ServerError, make_base_directory


@pytest.fixture(scope="module")
def tiny_cogvideox(tmp_path_factory, comfy_server):
    """The tiny CogVideoX folder, also installed in the session server's models/diffusers (a listed folder)."""
    folder = cogvideox_tiny.save_tiny_cogvideox_folder(tmp_path_factory.mktemp("cogvideox_sec") / "tiny-cogvideox")
    target = comfy_server.base_directory / "models" / "diffusers" / "tiny-cogvideox"
    if not target.exists():
        shutil.copytree(folder, target)
    return folder


def _raw(server, method: str, path: str, data: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"error": body.decode(errors="replace")}


def _refused(server, graph, *fragments):
    with pytest.raises(ServerError) as error:
        server.run_prompt(graph)
    text = str(error.value)
    for fragment in fragments:
        assert fragment in text, text
    return text


def _still_serving(server):
    assert server.get("/system_stats")["system"]
    server.run_prompt(sample_graph("sd3", "sd3", 2))


# ---------------------------------------------------------------------------------------------------------------
# Class: folder escape through combo/path inputs


def _video_loader(model_folder, lora_name="none"):
    return {"load": {"class_type": "TDMCogVideoXLoader", "inputs": {
        "model_folder": model_folder, "dtype": "fp32", "lora_name": lora_name, "lora_strength": 1.0,
        "vae_tiling": False, "vae_slicing": False, "offload": "none"}},
        "sample": {"class_type": "TDMCogVideoXSampler", "inputs": {
            "cogvideox": ["load", 0], "prompt": "x", "negative_prompt": "", "frames": 5, "width": 16, "height": 16,
            "grid": "trained", "steps": 4, "custom_timesteps": "", "cfg": 1.0, "seed": 0}},
        "webp": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["sample", 0], "filename_prefix": "esc",
                                                              "fps": 8.0, "lossless": False, "quality": 80,
                                                              "method": "default"}}}


def test_the_cogvideox_loader_never_loads_a_folder_outside_models_diffusers(comfy_server, tiny_cogvideox):
    base = comfy_server.base_directory
    uploaded = base / "input" / "x"  # what a client can put there through /upload/image, as real files
    if not uploaded.exists():
        shutil.copytree(tiny_cogvideox, uploaded)
    for hostile in ("../../input/x", "../input/x", str(uploaded), "tiny-cogvideox/../../../input/x",
                    "not-a-listed-folder"):
        _refused(comfy_server, _video_loader(hostile), "model_folder")
    assert not list((base / "output").glob("esc*"))
    _still_serving(comfy_server)


@pytest.mark.parametrize("node", ["tdm", "video"])
def test_lora_names_outside_models_loras_are_refused(comfy_server, tiny_cogvideox, node):
    base = comfy_server.base_directory
    evil = base / "input" / "evil.safetensors"
    save_file({"diffusion_model.joint_blocks.0.x_block.mlp.fc2.lora_up.weight": torch.ones(128, 4),
               "diffusion_model.joint_blocks.0.x_block.mlp.fc2.lora_down.weight": torch.ones(4, 512)}, str(evil))
    for hostile in ("../input/evil.safetensors", "../../input/evil.safetensors", str(evil), "nope.safetensors"):
        if node == "tdm":
            graph = sample_graph("sd3", "sd3", 2, loader="tdm", lora=hostile)
        else:
            graph = _video_loader("tiny-cogvideox", lora_name=hostile)
        _refused(comfy_server, graph, "lora_name")
    _still_serving(comfy_server)


@pytest.mark.parametrize("node,field,value", [
    ("start", "prompts_file", "../user/secret.txt"),
    ("start", "prompts_file", "/etc/passwd"),
    ("start", "dtype", "float64"),
    ("start", "grid", "../x"),
    ("start", "offload", 1),
    ("start", "iterations", 10**12),
    ("start", "learning_rate", float("inf")),
    ("start", "width", 2**40),  # ComfyUI coerces "512" and "yes" itself; ranges are the pack's to check
    ("start", "seed", -1),
    ("sampler", "preset", "nope"),
    ("sampler", "steps", -1),
    ("video", "width", 100_000),  # ComfyUI's own max check (the node declares only frames to validate_inputs)
    ("video", "grid", "trained; rm -rf"),
    ("video", "cfg", -1e30),
])
def test_combo_and_number_inputs_are_checked_by_the_pack(comfy_server, tiny_cogvideox, node, field, value):
    if node == "start":
        graph = start_graph("sd3", "tdm_hostile_input", iterations=1)
        graph["start"]["inputs"][field] = value
        node_id = "start"
    elif node == "sampler":
        graph = sample_graph("sd3", "sd3", 2)
        graph["sample"]["inputs"][field] = value
        node_id = "sample"
    else:
        graph = _video_loader("tiny-cogvideox")
        graph["sample"]["inputs"][field] = value
        node_id = "sample"
    assert node_id in graph
    _refused(comfy_server, graph, field)
    code, listed = _raw(comfy_server, "GET", "/tdm/jobs")
    assert code == 200 and "tdm_hostile_input" not in {r["name"] for r in listed["jobs"]}


@pytest.mark.parametrize("name", ["CON", "nul", "COM1", "LPT1", "tdm_dot.", "sub/aux.safetensors",
                                  "tdm_x-step00000001"])
def test_output_names_windows_cannot_hold_are_refused(comfy_server, name):
    _refused(comfy_server, start_graph("sd3", name, iterations=1), "output name")
    loras = comfy_server.base_directory / "models" / "loras"
    # A device name is the part before the first dot (CON, con.safetensors); a job's own checkpoint config.json
    # only begins with the same letters.
    assert not [p for p in loras.rglob("*") if p.name.lower().split(".")[0] in ("con", "nul", "com1", "lpt1", "aux")]


# ---------------------------------------------------------------------------------------------------------------
# Class: routes with planted records and hostile bodies


def _record(job_id: str, name: str, **changes) -> dict:
    record = {"id": job_id, "name": name, "state": "stopped", "iterations": 10, "step": 2, "checkpoint_step": 2,
              "message": "", "created": 1.0, "updated": 1.0, "started": None, "save_every": 2, "keep_last": 2,
              "preview_every": 0, "settings": {}, "teacher": {}, "history": [[1, 0.5, 0.5], [2, 0.4, 0.4]],
              "it_per_s": 0.0, "eta_s": None, "loras": [f"{name}-step00000002.safetensors"],
              "latest_lora": f"{name}.safetensors", "has_preview": False}
    record.update(changes)
    return record


def test_planted_records_and_hostile_bodies_never_break_the_routes(tmp_path):
    base = make_base_directory(tmp_path / "base")
    loras = base / "models" / "loras"
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"victim")
    plants = {
        "aaaaaaaaaaaa": "[]",
        "bbbbbbbbbbbb": json.dumps(_record("bbbbbbbbbbbb", "../../../victim")),
        "cccccccccccc": json.dumps(_record("cccccccccccc", "ok", loras=["../../../victim.safetensors"])),
        "dddddddddddd": json.dumps(_record("../../victim", "ok2")),
        "eeeeeeeeeeee": "{" * 100_000,
        "ffffffffffff": json.dumps(_record("ffffffffffff", "ok3")).replace('"iterations": 10', '"iterations": 1e400'),
        "012345678901": json.dumps(_record("012345678901", "tdm_good")),
    }
    for job_id, text in plants.items():
        (loras / ".tdm_jobs" / job_id).mkdir(parents=True)
        (loras / ".tdm_jobs" / job_id / "job.json").write_text(text)
    with ComfyServer(base) as server:
        code, listed = _raw(server, "GET", "/tdm/jobs")
        assert code == 200 and [r["id"] for r in listed["jobs"]] == ["012345678901"]
        for job_id in plants:
            code, answer = _raw(server, "GET", f"/tdm/jobs/{job_id}")
            assert code == (200 if job_id == "012345678901" else 404), (job_id, answer)
            for action in ("stop", "resume"):
                code, answer = _raw(server, "POST", f"/tdm/jobs/{job_id}/{action}", b"{}")
                assert code in ((409,) if job_id == "012345678901" else (404,)), (job_id, action, code, answer)
        code, _ = _raw(server, "GET", "/tdm/jobs/012345678901/preview.png")
        assert code == 404
        bodies = {
            b'{"iterations": 1e400}': (400, "finite"),
            b'{"iterations": NaN}': (400, "NaN"),
            b'{"iterations": Infinity}': (400, "Infinity"),
            b'{"iterations": 1000000000000}': (400, "at most"),
            b'{"iterations": 0}': (400, "at least"),
            b'{"iterations": 2.5}': (400, "whole"),
            b'{"iterations": "12"}': (400, "number"),
            b'{"iterations": true}': (400, "number"),
            b'{"iterations": [12]}': (400, "number"),
            b'{"iterations": 12, "id": "../x"}': (400, "unknown keys"),
            b"[]": (400, "JSON object"),
            b'"12"': (400, "JSON object"),
            b"not json": (400, "not valid JSON"),
            b"\xff\xfe": (400, "not valid JSON"),
            b"[" * 10_000: (400, "levels deep"),
            b" " * 70_000: (413, "body"),
            b'{"iterations": 12}': (409, "not in memory"),  # valid: the teacher is not loaded after a restart
        }
        for body, (status, fragment) in bodies.items():
            code, answer = _raw(server, "POST", "/tdm/jobs/012345678901/resume", body)
            assert code == status and fragment in answer["error"], (body[:40], code, answer)
        assert job(server, "012345678901")["state"] == "stopped"
        assert victim.read_bytes() == b"victim"
        # the server serves prompts and starts jobs after all of it
        server.run_prompt(start_graph("sd3", "tdm_after_attacks", iterations=1, save_every=0, preview_every=0))
        assert job(server, "tdm_after_attacks")["state"] in ("queued", "running", "finished")


# ---------------------------------------------------------------------------------------------------------------
# One mistake, one error (issue 27): a missing file is reported once, on its own input, with where to get it


def _validation_errors(server, graph) -> dict:
    code, body = _raw(server, "POST", "/prompt", json.dumps({"prompt": graph}).encode())
    assert code == 400, body
    return body["node_errors"]


@pytest.fixture(scope="module")
def server_with_two_loras(tmp_path_factory):
    """A server of its own (the session's gathers the files other tests write, the released names among them), whose
    models/loras holds two files the error must not list."""
    base = make_base_directory(tmp_path_factory.mktemp("one_error"))
    for name in ("tdm_listed_one.safetensors", "tdm_listed_two.safetensors"):
        save_file({"x": torch.zeros(1)}, str(base / "models" / "loras" / name))
    with ComfyServer(base) as server:
        yield server


@pytest.mark.parametrize("missing,expected", [
    # a released LoRA the example workflows load: its direct download and the name to save it under
    ("tdm_sd3.safetensors", "download https://huggingface.co/Luo-Yihong/TDM_sd3_lora/resolve/main/"
                            "pytorch_lora_weights.safetensors and save it as models/loras/tdm_sd3.safetensors"),
    # the student the SDXL distil-then-sample workflow writes: nothing to download
    ("tdm_sdxl_student.safetensors", "run that workflow (or TDM Distill) to make it"),
    ("my_own_lora.safetensors", "Put it there, or pick a file that is, from the list"),
])
def test_a_missing_lora_is_one_error_on_lora_name_saying_where_to_get_it(server_with_two_loras, missing, expected):
    server = server_with_two_loras
    listed = sorted(p.name for p in (server.base_directory / "models" / "loras").iterdir() if p.is_file())
    assert len(listed) == 2, listed
    errors = _validation_errors(server, sample_graph("sd3", "sd3", 2, loader="tdm", lora=missing))
    assert list(errors) == ["lora"], errors  # only the loader, and nothing downstream of it
    found = errors["lora"]["errors"]
    assert [e["extra_info"]["input_name"] for e in found] == ["lora_name"], found
    details = found[0]["details"]
    assert f"{missing!r} is not in models/loras" in details and expected in details, details
    assert not [name for name in listed if name in details], f"the error lists the folder: {details}"
