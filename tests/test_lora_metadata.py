"""The TDM LoRA header schema (tdm_core.lora.metadata): the only product module that spells a `tdm.*` key, what its
writers produce, and that headers written before the schema (one fact under two keys) still read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from tdm_core import lora as tdm_lora
from tdm_core.lora import metadata as schema
from tdm_core.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
# A whole string that is a header key (`tdm.family`), or the `tdm.` piece of an f-string building one. Event names
# (`tdm.job.progress`) have a second dot, module paths (`tdm_core.lora`) no `tdm.` at all: neither matches.
HEADER_KEY = re.compile(r"tdm\.[a-z_]*")


def _key_literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and HEADER_KEY.fullmatch(node.value)]


def test_only_the_schema_module_spells_a_tdm_header_key():
    schema_file = Path(schema.__file__).resolve()
    product = [p for folder in ("nodes", "tdm_core") for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(product) > 20
    found = [hit for path in product if path.resolve() != schema_file for hit in _key_literals(path)]
    assert found == [], "write and read tdm.* header entries through tdm_core.lora.metadata"
    assert len(_key_literals(schema_file)) >= 20  # the scan does see keys where they are


def test_every_key_is_named_once():
    keys = {name: value for name, value in vars(schema).items()
            if name.isupper() and isinstance(value, str) and value.startswith("tdm.")}
    assert len(keys) >= 20 and len(set(keys.values())) == len(keys)
    assert all(HEADER_KEY.fullmatch(value) for value in keys.values())


def _student(**changes) -> dict[str, str]:
    arguments = dict(steps=4, grid="tdm_demo(N=1000,K=4)", timesteps=[999, 749, 500, 250], parametrisation="flow",
                     strength=1.0, preset="sd3", iterations=7, cfg=4.0, schedule_kind="flow", recipe=None,
                     family="sd3")
    return schema.student_metadata(**(arguments | changes))


def test_a_student_header_reads_back_through_the_readers():
    header = _student()
    # one key for the preset: tdm.sampler_preset is only read (older students), never written
    assert header[schema.PRESET] == "sd3" and schema.SAMPLER_PRESET not in header and header[schema.RECIPE] == "custom"
    assert header[schema.SOLVER] == (PRESETS["sd3"].student_solver or PRESETS["sd3"].solver)
    assert schema.trained_here(header) and schema.recorded_preset(header) == "sd3"
    assert schema.recorded_grid(header) == ("preset", "sd3") and schema.recorded_strength(header) == 1.0
    assert schema.recorded_family(header) == "sd3" and schema.recorded_solver(header) == header[schema.SOLVER]
    no_preset = _student(preset="", parametrisation="eps", family=None, timesteps=[799, 599, 399, 199])
    assert schema.PRESET not in no_preset and schema.SAMPLER_PRESET not in no_preset and schema.FAMILY not in no_preset
    assert schema.recorded_solver(no_preset) == "ddim"
    assert schema.recorded_grid(no_preset) == ("timesteps", (799, 599, 399, 199))


def test_the_node_and_job_writers_add_to_the_student_header():
    header = (_student() | schema.tdm_metadata(preset="sd3", family="sd3", strength=1.0,
                                               recipe_changes=["lora_rank 4", "fake_updates 2"])
              | schema.job_metadata("a1b2", "my job", 10))
    assert header[schema.RECIPE_CHANGES] == "lora_rank 4, fake_updates 2"
    assert header[schema.TRAINED_ITERATIONS] == "10" and header[schema.JOB_NAME] == "my job"
    assert schema.tdm_metadata(recipe_changes=["x" * 600])[schema.RECIPE_CHANGES] == "x" * 500
    assert schema.adapter_metadata("sd3", 4, 4.0, comfy_native=True) == {
        "tdm.family": "sd3", "tdm.lora_rank": "4", "tdm.lora_alpha": "4.0", "tdm.format": "comfyui"}


def test_a_header_written_before_the_one_preset_key_still_reads(tmp_path):
    # A student TDM Distill wrote before `tdm.preset` and `tdm.solver` were its keys: only `tdm.sampler_preset`.
    old = {"tdm.format_note": "trained by comfyui-tdm tdm_core.distill", "tdm.parametrisation": "eps",
           "tdm.sampler_preset": "dreamshaper", "tdm.steps": "4"}
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}
    lora = tdm_lora.load_lora(tdm_lora.write_safetensors(tmp_path / "old.safetensors", tensors, old))
    assert lora.recorded_preset == "dreamshaper" and lora.recorded_grid == ("preset", "dreamshaper")
    assert lora.recorded_solver == (PRESETS["dreamshaper"].student_solver or PRESETS["dreamshaper"].solver)
    assert tdm_lora.auto_strength(lora, "sd15") == (PRESETS["dreamshaper"].lora_strength,
                                                     f"{PRESETS['dreamshaper'].display_name} preset (recorded in the "
                                                     "LoRA file)")
    # ... and a released-format save, which records the preset under `tdm.preset` only
    released = schema.tdm_metadata(preset="sd35")
    assert schema.recorded_preset(released) == "sd35" and schema.recorded_grid(released) is None


def test_untrusted_values_read_as_not_recorded():
    hostile = {"tdm.format_note": "trained by comfyui-tdm tdm_core.distill", "tdm.parametrisation": "eps",
               "tdm.solver": "../../ddim", "tdm.sampler_preset": "nope", "tdm.timesteps": "999,999,5000,-1",
               "tdm.recipe": "rm -rf", "tdm.family": "../x", "tdm.lora_strength": "nan"}
    assert schema.recorded_solver(hostile) is None and schema.recorded_grid(hostile) is None
    assert schema.trained_recipe(hostile) is None and schema.recorded_family(hostile) is None
    assert schema.recorded_strength(hostile) is None
    assert not schema.trained_here({"tdm.format_note": "someone else"})
