"""The TDM sampler nodes in a live ComfyUI server: schemas, graphs with SamplerCustom / SamplerCustomAdvanced and
the all-in-one node, parity of the saved latents with the diffusers recipes, and the preset/model mismatch error."""

from __future__ import annotations

import uuid

import comfy.sample
import pytest
import torch
from safetensors.torch import load_file
from test_sampler_parity import SD3_RTOL, SD15_RTOL, diffusers_sd3, diffusers_sd15

from tdm_core import presets
from tdm_devkit.server import ServerError

TDM_NODES = {
    "TDMSampler": "sampling/custom_sampling/samplers",
    "TDMScheduler": "sampling/custom_sampling/schedulers",
    "TDMKSampler": "TDM/sampling",
}
PROMPT = "a lighthouse at dusk"  # the parity helpers encode the same text
SEED = 42
LATENT_SCALE = {"sd3": (1.5305, 0.0609), "sd15": (0.18215, 0.0)}  # ComfyUI latent formats: stored = x/scale + shift


def test_schemas_have_ids_categories_descriptions_and_tooltips(comfy_server):
    info = comfy_server.object_info()
    for node_id, category in TDM_NODES.items():
        assert node_id in info, f"{node_id} is not registered"
        schema = info[node_id]
        assert schema["category"] == category
        assert schema["description"]
        inputs = {**schema["input"].get("required", {}), **schema["input"].get("optional", {})}
        assert inputs
        for name, (_, options) in ((n, spec if len(spec) > 1 else (spec[0], {})) for n, spec in inputs.items()):
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
    # "auto" first; CogVideoX only where ComfyUI has a native CogVideoX MODEL (the diffusers nodes serve it elsewhere)
    import comfy.model_base

    offered = [p for p in presets.PRESETS if p != "cogvideox" or hasattr(comfy.model_base, "CogVideoX")]
    for node_id in ("TDMScheduler", "TDMKSampler"):
        assert info[node_id]["input"]["required"]["preset"][1]["options"] == ["auto", *offered]
        assert info[node_id]["input"]["required"]["preset"][1]["default"] == "auto"
    outputs = [name for node_id in TDM_NODES for name in info[node_id]["output_name"]]
    assert outputs == ["sampler", "sigmas", "latent"]


def _base_graph(family):
    latent_node = ("EmptySD3LatentImage" if family == "sd3" else "EmptyLatentImage",
                   {"width": 128, "height": 128, "batch_size": 1})
    return {
        "model": {"class_type": "TDMTest_TinyModel", "inputs": {"family": family, "seed": 0}},
        "cond": {"class_type": "TDMTest_TinyConditioning", "inputs": {"family": family, "text": PROMPT}},
        "latent": {"class_type": latent_node[0], "inputs": latent_node[1]},
    }


def _save(graph, source):
    prefix = f"tdm_sampler_test/{uuid.uuid4().hex}"
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": source, "filename_prefix": prefix}}
    return graph


def _run_and_load(server, graph, family):
    entry = server.run_prompt(graph)
    saved = entry["outputs"]["save"]["latents"][0]
    path = server.base_directory / "output" / saved["subfolder"] / saved["filename"]
    stored = load_file(str(path))["latent_tensor"]
    scale, shift = LATENT_SCALE[family]
    return (stored - shift) * scale  # back to the model's latent space, as diffusers holds it


def _tdm_scheduler(preset):
    return {"class_type": "TDMScheduler", "inputs": {
        "model": ["model", 0], "preset": preset, "steps": 4, "shift": 0.0, "grid": "preset", "custom_timesteps": "",
        "demo_total_steps": 800}}


def _tdm_sampler():
    return {"class_type": "TDMSampler", "inputs": {
        "solver": "auto", "gamma": 0.0, "model_timesteps": "integer", "initial_noise": "unit"}}


def test_sd3_samplercustom_graph_equals_the_diffusers_recipe(comfy_server, sd3_twin):
    graph = _base_graph("sd3")
    graph.update({
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["cond", 0]}},
        "sigmas": _tdm_scheduler("sd3"),
        "sampler": _tdm_sampler(),
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": ["model", 0], "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": ["cond", 0],
            "negative": ["neg", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
    })
    ours = _run_and_load(comfy_server, _save(graph, ["sample", 0]), "sd3")
    reference = diffusers_sd3(sd3_twin, comfy.sample.prepare_noise(torch.zeros(ours.shape), SEED), 4, 6.0)
    torch.testing.assert_close(ours, reference, rtol=0, atol=SD3_RTOL * reference.abs().max().item())


@pytest.mark.parametrize("path", ["advanced", "all_in_one"])
def test_sd15_graphs_equal_the_diffusers_recipe(comfy_server, sd15_twin, path):
    graph = _base_graph("sd15")
    if path == "advanced":
        graph.update({
            "sigmas": _tdm_scheduler("dreamshaper"),
            "sampler": _tdm_sampler(),
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
            "guider": {"class_type": "BasicGuider", "inputs": {"model": ["model", 0], "conditioning": ["cond", 0]}},
            "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                "latent_image": ["latent", 0]}},
        })
    else:
        graph["sample"] = {"class_type": "TDMKSampler", "inputs": {
            "model": ["model", 0], "positive": ["cond", 0], "latent_image": ["latent", 0], "preset": "dreamshaper",
            "steps": 4, "seed": SEED}}
    ours = _run_and_load(comfy_server, _save(graph, ["sample", 0]), "sd15")
    reference = diffusers_sd15(sd15_twin, comfy.sample.prepare_noise(torch.zeros(ours.shape), SEED), 4)
    torch.testing.assert_close(ours, reference, rtol=0, atol=SD15_RTOL * reference.abs().max().item())


def test_mismatched_preset_fails_the_prompt_naming_both(comfy_server):
    graph = _base_graph("sd15")
    graph["sample"] = {"class_type": "TDMKSampler", "inputs": {
        "model": ["model", 0], "positive": ["cond", 0], "latent_image": ["latent", 0], "preset": "sd3",
        "steps": 4, "seed": SEED}}
    with pytest.raises(ServerError) as error:
        comfy_server.run_prompt(_save(graph, ["sample", 0]))
    message = str(error.value)
    assert "'sd3'" in message and "SD15" in message and "does not fit this MODEL" in message
    assert "use preset 'auto' (it picks 'dreamshaper' for this MODEL)" in message  # the fix, in one word


def _custom_sampling_with_lora(solver: str, preset: str = "dreamshaper", **scheduler_inputs) -> dict:
    """SamplerCustomAdvanced on the LoRA'd model ("lora") with TDM Sampler's `solver` and TDM Scheduler's `preset`
    (and `scheduler_inputs`): the nodes for `_sample_with_lora`."""
    scheduler = _tdm_scheduler(preset)
    scheduler["inputs"].update(model=["lora", 0], **scheduler_inputs)
    sampler = _tdm_sampler()
    sampler["inputs"]["solver"] = solver
    return {"sigmas": scheduler, "sampler": sampler,
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
            "guider": {"class_type": "BasicGuider", "inputs": {"model": ["lora", 0], "conditioning": ["cond", 0]}},
            "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
                "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}}}


def _sample_with_lora(server, lora_name: str, nodes: dict):
    """Runs the SD1.5 twin with `lora_name` through TDM LoRA Loader (strength 1) and `nodes`, whose "sample" makes
    the latent: (the saved latent, every report text of the run)."""
    graph = _base_graph("sd15")
    graph["lora"] = {"class_type": "TDMLoraLoader", "inputs": {
        "model": ["model", 0], "lora_name": lora_name, "strength_mode": "manual", "strength": 1.0}}
    graph.update(nodes)
    entry = server.run_prompt(_save(graph, ["sample", 0]))
    saved = entry["outputs"]["save"]["latents"][0]
    texts = " ".join(" ".join(out.get("text", [])) for out in entry["outputs"].values())
    return load_file(str(server.base_directory / "output" / saved["subfolder"] / saved["filename"]))[
        "latent_tensor"], texts


def test_auto_samples_a_distilled_student_with_the_solver_its_lora_records(comfy_server, sd15_twin):
    """TDM Distill records in a student's LoRA the solver its family's students are sampled with (`tdm.solver`;
    SD1.5: DDIM, measured closer to the teacher than the Dreamshaper release's DPM-Solver++(2M)). TDM LoRA Loader
    puts it on the MODEL; `auto` (TDM KSampler's preset, TDM Sampler's solver) follows it. A released LoRA, which
    records nothing, and a record that names no solver keep the release recipe; a named preset is that preset's."""
    from tdm_devkit import lora_files

    loras = comfy_server.base_directory / "models" / "loras"
    lora = lora_files.synthesise(sd15_twin.diffusers, "sd15", rank=4, seed=7)
    files = {"student": {"tdm.solver": "ddim", "tdm.sampler_preset": "dreamshaper"}, "release": {},
             "hostile": {"tdm.solver": "../../ddim; rm -rf"},
             # a student written before `tdm.solver` existed: its family's choice from what it does record
             "older": {"tdm.format_note": "trained by comfyui-tdm tdm_core.distill", "tdm.parametrisation": "eps",
                       "tdm.sampler_preset": "dreamshaper"}}
    for name, metadata in files.items():
        lora_files.write_peft(lora, loras / f"tdm_solver_record_{name}.safetensors", metadata=metadata)

    def run(lora_name, sample):
        return _sample_with_lora(comfy_server, lora_name, sample)

    def ksampler(preset):
        return {"sample": {"class_type": "TDMKSampler", "inputs": {
            "model": ["lora", 0], "positive": ["cond", 0], "latent_image": ["latent", 0], "preset": preset,
            "steps": 4, "seed": SEED}}}

    def advanced(solver):
        return _custom_sampling_with_lora(solver)

    student = "tdm_solver_record_student.safetensors"
    ddim, _ = run(student, advanced("ddim"))
    two_m, _ = run(student, advanced("dpmpp_2m"))
    assert (ddim - two_m).abs().max() > 1e-3  # the two solvers differ here, so the checks below can fail
    auto, report = run(student, ksampler("auto"))
    torch.testing.assert_close(auto, ddim, rtol=0, atol=1e-6)
    assert "solver ddim, as the distilled LoRA records" in report, report
    torch.testing.assert_close(run(student, advanced("auto"))[0], ddim, rtol=0, atol=1e-6)
    torch.testing.assert_close(run("tdm_solver_record_older.safetensors", ksampler("auto"))[0], ddim, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(student, ksampler("dreamshaper"))[0], two_m, rtol=0, atol=1e-6)
    for other in ("tdm_solver_record_release.safetensors", "tdm_solver_record_hostile.safetensors"):
        torch.testing.assert_close(run(other, ksampler("auto"))[0], run(other, advanced("dpmpp_2m"))[0], rtol=0,
                                   atol=1e-6)


def test_auto_samples_a_student_of_a_grid_of_no_preset_on_the_grid_its_lora_records(comfy_server, sd15_twin):
    """A student TDM Distill trained on the training demo's grid records it (`tdm.timesteps`; its sampler preset is
    no preset's); TDM KSampler's and TDM Scheduler's preset auto sample it there, at its K steps. Other step counts,
    a released LoRA and an unreadable record keep the family preset's grid."""
    from tdm_devkit import lora_files

    loras = comfy_server.base_directory / "models" / "loras"
    lora = lora_files.synthesise(sd15_twin.diffusers, "sd15", rank=4, seed=7)
    trained = {"tdm.format_note": "trained by comfyui-tdm tdm_core.distill", "tdm.parametrisation": "eps",
               "tdm.sampler_preset": "tdm_ddim_eps", "tdm.solver": "ddim"}
    files = {"demo": trained | {"tdm.timesteps": "799,599,399,199"},
             "hostile": trained | {"tdm.timesteps": "999,999,5000,-1"}}
    for name, metadata in files.items():
        lora_files.write_peft(lora, loras / f"tdm_grid_record_{name}.safetensors", metadata=metadata)

    def run(lora_name, nodes):
        return _sample_with_lora(comfy_server, lora_name, nodes)

    def ksampler(steps=4):
        return {"sample": {"class_type": "TDMKSampler", "inputs": {
            "model": ["lora", 0], "positive": ["cond", 0], "latent_image": ["latent", 0], "preset": "auto",
            "steps": steps, "seed": SEED}}}

    def advanced(preset="dreamshaper", custom="", steps=4):
        return _custom_sampling_with_lora("ddim", preset, custom_timesteps=custom, steps=steps)

    demo = "tdm_grid_record_demo.safetensors"
    on_demo_grid, _ = run(demo, advanced(custom="799, 599, 399, 199"))
    on_preset_grid, _ = run(demo, advanced())
    assert (on_demo_grid - on_preset_grid).abs().max() > 1e-3  # the grids differ here, so the checks can fail
    auto, report = run(demo, ksampler())
    torch.testing.assert_close(auto, on_demo_grid, rtol=0, atol=1e-6)
    assert "timesteps 799, 599, 399, 199, as the distilled LoRA records" in report, report
    scheduled, report = run(demo, advanced(preset="auto"))
    torch.testing.assert_close(scheduled, on_demo_grid, rtol=0, atol=1e-6)
    assert "as the distilled LoRA records" in report, report
    # two steps: not the recorded K, so the preset's grid at 2 steps
    torch.testing.assert_close(run(demo, ksampler(steps=2))[0], run(demo, advanced(steps=2))[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(run("tdm_grid_record_hostile.safetensors", ksampler())[0],
                               run("tdm_grid_record_hostile.safetensors", advanced())[0], rtol=0, atol=1e-6)
