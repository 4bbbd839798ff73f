"""The TDM LoRA Loader node on the ComfyUI twins: schema, strength, messages, errors that patch nothing, other LoRAs,
the file cache, and a live-server graph whose output moves by exactly what the in-process run predicts."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from tdm_core import lora as tdm_lora
from tdm_core.presets import PRESETS
from tdm_devkit import lora_files


@pytest.fixture(scope="module")
def loader(pack):
    return sys.modules[f"{pack.__name__}.nodes.lora_loader"]


@pytest.fixture
def loras_dir(tmp_path, monkeypatch, loader):
    """models/loras for direct node calls: the node lists files through `_lora_files` (it refuses any other name)
    and resolves them through `_lora_path`."""
    monkeypatch.setattr(loader, "_lora_path", lambda name: str(tmp_path / name))
    monkeypatch.setattr(loader, "_lora_files", lambda: sorted(p.relative_to(tmp_path).as_posix()
                                                               for p in tmp_path.rglob("*")))
    sys.modules[f"{loader.__package__}.lora_patching"]._last_lora.update(key=None, lora=None)
    return tmp_path


def patched_weights(patcher, keys):
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        state = patcher.model.diffusion_model.state_dict()
        return {k: state[k].clone() for k in keys}
    finally:
        comfy.model_management.unload_all_models()


def base_fingerprint(twin):
    state = twin.comfy.model.diffusion_model.state_dict()
    return {k: v.clone() for k, v in state.items()}, dict(twin.comfy.patches)


def assert_unchanged(twin, before):
    weights, patches = before
    assert dict(twin.comfy.patches) == patches
    state = twin.comfy.model.diffusion_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def sd3_lora_file(twin, path, targets=None, alpha=None, seed=0):
    synthetic = lora_files.synthesise(twin.diffusers, twin.family, targets=targets, alpha=alpha, seed=seed)
    return synthetic, lora_files.write_peft(synthetic, path)


# ---------------------------------------------------------------------------------------------------------------


def test_schema_is_a_v3_loader_with_tooltips(pack, loader):
    from comfyui_tdm.nodes import NODE_CLASSES

    assert loader.TDMLoraLoader in NODE_CLASSES
    schema = loader.TDMLoraLoader.define_schema()
    assert (schema.node_id, schema.display_name, schema.category) == ("TDMLoraLoader", "TDM LoRA Loader", "TDM/loaders")
    assert schema.description
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    inputs = {i.id: i for i in schema.inputs}
    assert inputs["clip"].optional and inputs["strength_mode"].default == "auto"
    assert [o.io_type for o in schema.outputs] == ["MODEL", "CLIP"]


def test_auto_strength_is_the_sd3_preset_and_manual_overrides(sd3_twin, loras_dir, loader):
    synthetic, _ = sd3_lora_file(sd3_twin, loras_dir / "tdm_sd3.safetensors")
    out = loader.TDMLoraLoader.execute(sd3_twin.comfy, "tdm_sd3.safetensors", "auto", 1.0)
    model, clip = out.result
    strengths = {patch[0] for patches in model.patches.values() for patch in patches}
    assert strengths == {PRESETS["sd3"].lora_strength}
    text = out.ui.as_dict()["text"][0]
    assert f"matched {len(synthetic.modules)}/{len(synthetic.modules)} modules" in text
    assert f"strength {PRESETS['sd3'].lora_strength:g}" in text and "peft LoRA for SD3 MMDiT" in text
    assert clip is None
    manual = loader.TDMLoraLoader.execute(sd3_twin.comfy, "tdm_sd3.safetensors", "manual", 0.7).result[0]
    assert {p[0] for ps in manual.patches.values() for p in ps} == {0.7}
    assert sd3_twin.comfy.patches == {}


def test_plain_peft_sd15_keys_are_what_comfyui_itself_drops(sd15_twin, tmp_path, loader):
    """ComfyUI 0.3.75's own loader maps none of the attention modules of a plain peft SD1.5 file; TDM maps all."""
    import comfy.sd

    names = [n for n in lora_files.lora_targets(sd15_twin.diffusers, "sd15") if n.endswith(("to_q", "to_k"))]
    synthetic = lora_files.synthesise(sd15_twin.diffusers, "sd15", targets=names)
    path = lora_files.write_peft(synthetic, tmp_path / "peft_sd15.safetensors")
    core_model, _ = comfy.sd.load_lora_for_models(sd15_twin.comfy, None, tdm_lora.read_lora_file(path)[0], 1.0, 0)
    assert len(core_model.patches) == 0
    ours = loader.apply_tdm_lora(sd15_twin.comfy, None, tdm_lora.load_lora(path), 1.0)
    assert len(ours.model.patches) == len(names) and ours.match.unmatched == {}


def test_works_on_a_model_already_patched_by_another_lora(sd15_twin, loras_dir, loader):
    import comfy.sd

    attention = [n for n in lora_files.lora_targets(sd15_twin.diffusers, "sd15") if n.endswith(("attn1.to_q", "ff.net.2"))]
    other = lora_files.synthesise(sd15_twin.diffusers, "sd15", targets=attention, alpha=1.0, seed=1)
    other_path = lora_files.write_kohya(other, loras_dir / "style.safetensors")
    first, _ = comfy.sd.load_lora_for_models(sd15_twin.comfy, None, tdm_lora.read_lora_file(other_path)[0], 0.5, 0)
    ours = lora_files.synthesise(sd15_twin.diffusers, "sd15", targets=attention, alpha=2.0, seed=2)
    lora_files.write_kohya(ours, loras_dir / "tdm_dreamshaper.pt")
    both = loader.TDMLoraLoader.execute(first, "tdm_dreamshaper.pt", "manual", 1.0).result[0]
    keys = {name: sd15_twin.key_map[f"{name}.weight"] for name in attention}
    got = patched_weights(both, keys.values())
    base = sd15_twin.diffusers.state_dict()
    for name, comfy_key in keys.items():
        expected = base[f"{name}.weight"] + other.delta(name, 0.5) + ours.delta(name, 1.0)
        torch.testing.assert_close(got[comfy_key], expected.reshape(got[comfy_key].shape), rtol=0, atol=1e-6)
    assert first.patches.keys() == both.patches.keys() and all(len(both.patches[k]) == 2 for k in both.patches)


def test_partial_match_gives_one_warning_listing_modules(sd3_twin, loras_dir, loader, caplog):
    synthetic, _ = sd3_lora_file(sd3_twin, loras_dir / "unused.safetensors")
    tensors = {}
    for name, factors in synthetic.modules.items():
        tensors[f"transformer.{name}.lora_A.weight"] = factors.down
        tensors[f"transformer.{name}.lora_B.weight"] = factors.up
    # SD3-medium has 24 blocks, the tiny twin 2: blocks 5 and 7 are what a full-size LoRA brings along
    for block in (5, 7):
        for proj in ("to_q", "to_k", "to_v"):
            tensors[f"transformer.transformer_blocks.{block}.attn.{proj}.lora_A.weight"] = torch.randn(4, 128)
            tensors[f"transformer.transformer_blocks.{block}.attn.{proj}.lora_B.weight"] = torch.randn(128, 4)
    tdm_lora.write_safetensors(loras_dir / "bigger.safetensors", tensors)
    with caplog.at_level(logging.WARNING):
        out = loader.TDMLoraLoader.execute(sd3_twin.comfy, "bigger.safetensors", "auto", 1.0)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "'bigger.safetensors'" in message and "6 of " in message
    assert "transformer.transformer_blocks.*.attn.to_q (×2, no such module)" in message
    assert message.count("to_q") == 1  # grouped by module kind, not listed per key
    text = out.ui.as_dict()["text"][0]
    n = len(synthetic.modules)
    assert f"matched {n}/{n + 6} modules" in text and "WARNING" in text


def test_shape_mismatch_is_reported_not_applied(sd3_twin, tmp_path, loader):
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 128),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4),
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(4, 1536),  # SD3-medium width
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(1536, 4),
    }
    parsed = tdm_lora.parse_lora(tensors, name="wide.safetensors")
    application = loader.apply_tdm_lora(sd3_twin.comfy, None, parsed, 1.0)
    assert list(application.match.unmatched) == ["transformer.transformer_blocks.0.attn.to_k"]
    assert "shape 1536x1536 vs weight 128x128" in application.match.warning()
    assert len(application.model.patches) == 1


ERROR_CASES = {
    "sd15-lora-on-sd3": r"'sd15\.pt' is a LoRA for SD1\.5 UNet .* but this MODEL is SD3 MMDiT",
    "sd35-lora-on-sd3": r"'sd35\.safetensors' is a LoRA for SD3\.5 MMDiT \(dual attention\).* this MODEL is SD3 MMDiT",
    "nothing-matches": r"'foreign\.safetensors' matched 0 of 2 modules of this MODEL \(SD3 MMDiT\)",
    "empty": r"'empty\.safetensors' is empty",
    "truncated": r"'truncated\.safetensors' is truncated",
    "directory": r"'a_folder' is a directory",
    "not-a-lora": r"'checkpoint\.safetensors' contains no LoRA weights",
    "malicious-pickle": r"Refused 'evil\.pt'",
}


def _make_bad_file(case, folder, sd15_twin, sd35_twin):
    if case == "sd15-lora-on-sd3":
        synthetic = lora_files.synthesise(sd15_twin.diffusers, "sd15", alpha=1.0)
        return lora_files.write_kohya(synthetic, folder / "sd15.pt").name
    if case == "sd35-lora-on-sd3":
        synthetic = lora_files.synthesise(sd35_twin.diffusers, "sd35")
        return lora_files.write_peft(synthetic, folder / "sd35.safetensors").name
    if case == "nothing-matches":
        tensors = {f"transformer.pos_embed.extra_{i}.lora_A.weight": torch.zeros(2, 8) for i in range(2)}
        tensors.update({f"transformer.pos_embed.extra_{i}.lora_B.weight": torch.zeros(8, 2) for i in range(2)})
        return tdm_lora.write_safetensors(folder / "foreign.safetensors", tensors).name
    if case == "empty":
        (folder / "empty.safetensors").write_bytes(b"")
        return "empty.safetensors"
    if case == "truncated":
        _, path = sd3_lora_file(sd35_twin, folder / "full.safetensors")
        (folder / "truncated.safetensors").write_bytes(path.read_bytes()[:-1000])
        return "truncated.safetensors"
    if case == "directory":
        (folder / "a_folder").mkdir()
        return "a_folder"
    if case == "not-a-lora":
        weights = {f"model.diffusion_model.{k}": v for k, v in list(sd35_twin.comfy.model.diffusion_model.state_dict().items())[:5]}
        return tdm_lora.write_safetensors(folder / "checkpoint.safetensors", weights).name
    if case == "malicious-pickle":
        import pickle

        class Payload:
            def __reduce__(self):
                return (exec, (f"open({str(folder / 'ran')!r}, 'w').close()",))

        (folder / "evil.pt").write_bytes(pickle.dumps({"lora_unet_x.alpha": Payload()}, protocol=2))
        return "evil.pt"
    raise ValueError(case)


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_problem_and_patch_nothing(case, sd3_twin, sd15_twin, sd35_twin, loras_dir, loader):
    name = _make_bad_file(case, loras_dir, sd15_twin, sd35_twin)
    before = base_fingerprint(sd3_twin)
    with pytest.raises(ValueError, match=ERROR_CASES[case]):
        loader.TDMLoraLoader.execute(sd3_twin.comfy, name, "auto", 1.0)
    assert_unchanged(sd3_twin, before)
    assert not (loras_dir / "ran").exists()


def test_the_last_file_is_cached_until_it_changes(sd3_twin, loras_dir, loader, monkeypatch):
    import os

    calls = []
    real = tdm_lora.load_lora
    patching = sys.modules[f"{loader.__package__}.lora_patching"]  # where the loader's file cache lives
    monkeypatch.setattr(patching.tdm_lora, "load_lora", lambda path: calls.append(path) or real(path))
    _, path = sd3_lora_file(sd3_twin, loras_dir / "cached.safetensors")
    for _ in range(3):
        loader.TDMLoraLoader.execute(sd3_twin.comfy, "cached.safetensors", "auto", 1.0)
    assert len(calls) == 1
    sd3_lora_file(sd3_twin, path, seed=5)  # replaced under the same name
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    loader.TDMLoraLoader.execute(sd3_twin.comfy, "cached.safetensors", "auto", 1.0)
    assert len(calls) == 2
    assert loader.TDMLoraLoader.fingerprint_inputs("cached.safetensors") == loader.file_key(str(path))


def test_text_encoder_modules_without_a_clip_are_named_in_the_warning(sd15_twin, tmp_path, loader):
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    synthetic = lora_files.synthesise(sd15_twin.diffusers, "sd15", targets=names)
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": synthetic.modules[names[0]].down,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": synthetic.modules[names[0]].up,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 64),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 2),
    }
    application = loader.apply_tdm_lora(sd15_twin.comfy, None, tdm_lora.parse_lora(tensors, name="te.pt"), 1.0)
    assert application.match.status_line() == "matched 1/1 modules, text encoder 0/1"
    assert "connect a CLIP to apply" in application.match.warning()


# ---------------------------------------------------------------------------------------------------------------
# live server


def _graph(lora_name=None):
    graph = {
        "model": {"class_type": "TDMTest_TinyModel", "inputs": {"family": "sd3", "seed": 0}},
        "positive": {"class_type": "TDMTest_TinyConditioning", "inputs": {"family": "sd3", "text": "a cat"}},
        "negative": {"class_type": "TDMTest_TinyConditioning", "inputs": {"family": "sd3", "text": ""}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "tdm_lora"}},
    }
    if lora_name:
        graph["lora"] = {"class_type": "TDMLoraLoader", "inputs": {
            "model": ["model", 0], "lora_name": lora_name, "strength_mode": "auto", "strength": 1.0}}
        graph["sampler"]["inputs"]["model"] = ["lora", 0]
        graph["save"]["inputs"]["filename_prefix"] = "tdm_lora_with"
    return graph


def _saved_latent(server, entry):
    from safetensors.torch import load_file

    (output,) = entry["outputs"]["save"]["latents"]
    return load_file(str(server.base_directory / "output" / output["subfolder"] / output["filename"]))["latent_tensor"]


def _in_process(model):
    import nodes
    from tdm_devkit import twins

    positive = twins.tiny_conditioning("sd3", "a cat")
    negative = twins.tiny_conditioning("sd3", "")
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    return nodes.common_ksampler(model, 3, 2, 1.0, "euler", "simple", positive, negative, latent)[0]["samples"]


def test_live_server_graph_with_the_loader_moves_the_output_as_predicted(comfy_server, sd3_twin, loader):
    synthetic = lora_files.synthesise(sd3_twin.diffusers, "sd3", seed=21)
    lora_files.write_peft(synthetic, comfy_server.base_directory / "models" / "loras" / "tdm_live_sd3.safetensors")
    info = comfy_server.object_info()["TDMLoraLoader"]
    assert info["category"] == "TDM/loaders" and info["display_name"] == "TDM LoRA Loader"
    spec = info["input"]["required"]["lora_name"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 combos: ["COMBO", {"options": [...]}]
    assert "tdm_live_sd3.safetensors" in options

    with_lora = comfy_server.run_prompt(_graph("tdm_live_sd3.safetensors"))
    without = comfy_server.run_prompt(_graph())
    served_with, served_without = _saved_latent(comfy_server, with_lora), _saved_latent(comfy_server, without)
    assert "matched" in with_lora["outputs"]["lora"]["text"][0]

    predicted_with = _in_process(loader.apply_tdm_lora(sd3_twin.comfy, None, tdm_lora.load_lora(
        comfy_server.base_directory / "models" / "loras" / "tdm_live_sd3.safetensors")).model)
    predicted_without = _in_process(sd3_twin.comfy)
    import comfy.model_management

    comfy.model_management.unload_all_models()
    scale = predicted_with.abs().max().item()
    assert (predicted_with - predicted_without).abs().max().item() > 1e-3 * scale  # the LoRA changes the result
    # the server uses ComfyUI's default CPU attention, the test process PyTorch attention: ~1e-6 apart
    torch.testing.assert_close(served_without, predicted_without, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(served_with - served_without, predicted_with - predicted_without, rtol=0,
                               atol=1e-4 * scale)
