"""The workflow checker must accept a sound workflow and reject what a user would see break."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tdm_devkit.workflow_check import Substitute, WorkflowError, check_workflow, to_api

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    # The workflow names a checkpoint; a user who has the file sees it in the combo. An empty placeholder is enough
    # for validation: the checkpoint is substituted by the tiny injector before anything loads it.
    (comfy_server.base_directory / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (comfy_server.base_directory / "models" / "checkpoints" / "harness_checkpoint.safetensors").touch()
    return comfy_server.object_info()


@pytest.fixture
def workflow():
    return json.loads((DATA / "ui_txt2img.json").read_text())


TINY_SD15 = {
    "CheckpointLoaderSimple": {
        0: Substitute("TDMTest_TinyModel", {"family": "sd15", "seed": 0}),
        2: Substitute("TDMTest_TinyVAE", {"family": "sd15", "seed": 0}),
    },
    "CLIPTextEncode": {0: Substitute("TDMTest_TinyConditioning", lambda inputs: {"family": "sd15", "text": inputs["text"]})},
}


def test_sound_workflow_passes_converts_and_runs(comfy_server, object_info, workflow):
    assert check_workflow(workflow, object_info) == []
    api = to_api(workflow, object_info, TINY_SD15)
    assert {entry["class_type"] for entry in api.values()} == {
        "TDMTest_TinyModel", "TDMTest_TinyVAE", "TDMTest_TinyConditioning", "EmptyLatentImage", "KSampler",
        "VAEDecode", "SaveImage"}
    assert api["3"]["inputs"]["seed"] == 42 and api["3"]["inputs"]["steps"] == 3  # control value skipped
    texts = sorted(e["inputs"]["text"] for e in api.values() if e["class_type"] == "TDMTest_TinyConditioning")
    assert texts == ["", "a photo of a cat"]
    entry = comfy_server.run_prompt(api)
    assert entry["outputs"]["9"]["images"][0]["filename"].startswith("harness_checker")


def test_missing_node_type_is_reported(object_info, workflow):
    broken = copy.deepcopy(workflow)
    broken["nodes"][4]["type"] = "TDMNodeThatDoesNotExist"
    problems = check_workflow(broken, object_info)
    assert any("missing node type" in p and "TDMNodeThatDoesNotExist" in p for p in problems), problems
    with pytest.raises(WorkflowError):
        to_api(broken, object_info)


def test_mistyped_link_is_reported(object_info, workflow):
    broken = copy.deepcopy(workflow)
    # the VAE output wired into KSampler's model input
    broken["links"][0] = [1, 4, 2, 3, 0, "VAE"]
    problems = check_workflow(broken, object_info)
    assert any("link 1" in p and "VAE" in p and "MODEL" in p for p in problems), problems


@pytest.mark.parametrize(
    ("node_index", "values", "needle"),
    [
        (4, [42, "fixed", 0, 2.0, "euler", "simple", 1.0], "below the minimum"),  # steps 0
        (4, [42, "fixed", 3, 2.0, "no_such_sampler", "simple", 1.0], "not one of the options"),
        (4, [42, "sometimes", 3, 2.0, "euler", "simple", 1.0], "control value"),
        (4, [42, 3, 2.0, "euler", "simple", 1.0], "widget values"),  # a value missing
        (0, ["a_checkpoint_the_user_lacks.safetensors"], "not one of the options"),
        (3, [128.5, 128, 1], "not an integer"),
    ],
)
def test_bad_widget_values_are_reported(object_info, workflow, node_index, values, needle):
    broken = copy.deepcopy(workflow)
    broken["nodes"][node_index]["widgets_values"] = values
    problems = check_workflow(broken, object_info)
    assert any(needle in p for p in problems), problems


def test_substitution_must_cover_every_used_output(object_info, workflow):
    partial = {"CheckpointLoaderSimple": {0: Substitute("TDMTest_TinyModel", {"family": "sd15", "seed": 0})}}
    with pytest.raises(WorkflowError, match="without a substitute: .*CheckpointLoaderSimple 4 output 1"):
        to_api(workflow, object_info, partial)


def test_non_string_workflow_id_is_reported(object_info, workflow):
    broken = copy.deepcopy(workflow)
    broken["id"] = None  # what the frontend rejects with "Expected string, received null at id"
    assert any("workflow id must be a string" in p for p in check_workflow(broken, object_info))
