"""tdm_core.lora on its own: safe reading, format/family/rank/alpha detection, conversions, bad inputs, strength."""

from __future__ import annotations

import collections
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tdm_core import families
from tdm_core import lora as tdm_lora
from tdm_core.lora import keys
from tdm_core.lora.parse import key_layout
from tdm_core.presets import PRESETS
from tdm_devkit import lora_files

REPO = Path(__file__).resolve().parents[1]


def _linear_and_conv_names(module):
    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.fixture(scope="module")
def cogvideox_transformer():
    from diffusers import CogVideoXTransformer3DModel

    from tdm_devkit.twins import randomise_

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=8,
    )
    return randomise_(model, 5).eval()


def families_recognising(lora) -> list[str]:
    """Every registry family whose LoRA tests (ComfyUI-native or diffusers paths) recognise `lora`'s layout."""
    layout = key_layout(lora.modules.values())
    return [f.name for f in families.FAMILIES.values() if f.comfy_lora(layout) or f.diffusers_lora(layout)]


def _cogvideox_output(model):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 4, 8, 8, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500])).sample


# ---------------------------------------------------------------------------------------------------------------
# key names


def test_every_key_format_unit_has_a_fixture_writer_and_suffixes_that_cannot_be_confused():
    # A new format is one unit in tdm_core.lora.keys plus its writer in tdm_devkit.lora_files (a reader tested only
    # against files it wrote itself proves nothing).
    assert set(keys.BY_NAME) == set(lora_files.WRITERS)
    # No suffix ends with another, so which one a key has never depends on the order they are tried in.
    suffixes = [suffix for suffix, _, _ in keys.SUFFIXES]
    assert len(set(suffixes)) == len(suffixes)
    assert [(a, b) for a in suffixes for b in suffixes if a != b and a.endswith(b)] == []


def test_kohya_names_round_trip_for_every_module_of_every_family(sd15_twin, sd35_twin, cogvideox_transformer):
    names = (_linear_and_conv_names(sd15_twin.diffusers) + _linear_and_conv_names(sd35_twin.diffusers)
             + _linear_and_conv_names(cogvideox_transformer)
             + _linear_and_conv_names(sd15_twin.comfy.model.diffusion_model)  # SGM names (kohya SDXL files)
             + _linear_and_conv_names(sd35_twin.comfy.model.diffusion_model))
    assert len(names) > 600
    wrong = [n for n in names if tdm_lora.kohya_name_to_path(n.replace(".", "_")) != n]
    assert wrong == []


# ---------------------------------------------------------------------------------------------------------------
# formats, families, rank, alpha


def _attention(names):
    return [n for n in names if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")]


FORMAT_CASES = {
    # id: (twin, synthesise options, writer, expected format, family, alpha)
    "sd15-kohya-pt": ("sd15_twin", dict(alpha=2.0), lambda lo, p, tw: lora_files.write_kohya(lo, p / "a.pt"), "kohya", "sd15", 2.0),
    "sd15-kohya-safetensors-no-alpha": ("sd15_twin", dict(), lambda lo, p, tw: lora_files.write_kohya(lo, p / "a.safetensors"), "kohya", "sd15", 4.0),
    "sd15-peft-unet": ("sd15_twin", dict(), lambda lo, p, tw: lora_files.write_peft(lo, p / "a.safetensors"), "peft", "sd15", None),
    "sd15-peft-no-prefix": ("sd15_twin", dict(), lambda lo, p, tw: lora_files.write_peft(lo, p / "a.safetensors", prefix=""), "peft", "sd15", None),
    "sd15-old-attn-procs": ("sd15_twin", dict(targets="attention"), lambda lo, p, tw: lora_files.write_old_diffusers(lo, p / "a.bin"), "diffusers_old", "sd15", None),
    "sd15-old-compatible": ("sd15_twin", dict(), lambda lo, p, tw: lora_files.write_old_diffusers(lo, p / "a.safetensors", style="compatible"), "diffusers_old", "sd15", None),
    "sd15-comfy-native": ("sd15_twin", dict(), lambda lo, p, tw: lora_files.write_comfy_native(lo, p / "a.safetensors", tw), "comfy", "sd15", 4.0),
    "sd3-peft-no-alpha": ("sd3_twin", dict(), lambda lo, p, tw: lora_files.write_peft(lo, p / "a.safetensors"), "peft", "sd3", None),
    "sd3-peft-alpha-keys": ("sd3_twin", dict(alpha=2.0), lambda lo, p, tw: lora_files.write_peft(lo, p / "a.safetensors", alpha_in="keys"), "peft", "sd3", 2.0),
    "sd3-peft-alpha-metadata": ("sd3_twin", dict(alpha=8.0), lambda lo, p, tw: lora_files.write_peft(lo, p / "a.safetensors", alpha_in="metadata"), "peft", "sd3", 8.0),
    "sd35-peft-attn2": ("sd35_twin", dict(), lambda lo, p, tw: lora_files.write_peft(lo, p / "a.safetensors"), "peft", "sd35", None),
    "sd35-comfy-native": ("sd35_twin", dict(), lambda lo, p, tw: lora_files.write_comfy_native(lo, p / "a.safetensors", tw), "comfy", "sd35", None),
    "sd3-kohya-onetrainer": ("sd3_twin", dict(alpha=1.0), lambda lo, p, tw: lora_files.write_kohya(lo, p / "a.safetensors"), "kohya", "sd3", 1.0),
}


@pytest.mark.parametrize("case_id", list(FORMAT_CASES))
def test_format_family_rank_alpha_and_targets_are_detected(case_id, request, tmp_path):
    twin_name, options, write, fmt, family, alpha = FORMAT_CASES[case_id]
    twin = request.getfixturevalue(twin_name)
    targets = lora_files.lora_targets(twin.diffusers, twin.family)
    if options.get("targets") == "attention":
        targets = _attention(targets)
    synthetic = lora_files.synthesise(twin.diffusers, twin.family, targets=targets, rank=4, alpha=options.get("alpha"))
    path = write(synthetic, tmp_path, twin)
    parsed = tdm_lora.load_lora(path)
    assert (parsed.format, parsed.family) == (fmt, family)
    # Detection tries the registry's families in order; each family's tests must say no to every other layout, so
    # that the order does not decide (tdm_core.families).
    assert families_recognising(parsed) == [family]
    if fmt == "comfy":
        # ComfyUI-native SD3 files fuse q/k/v into one qkv module of 3× the rank: compare with the file's own ranks
        raw = _raw_down_ranks(path)
        assert collections.Counter(m.rank for m in parsed.modules.values()) == raw
        assert parsed.rank == raw.most_common(1)[0][0]
    else:
        assert parsed.rank == 4
    if fmt != "comfy":  # native files fuse q/k/v and fold scales: alpha is the fused rank there
        assert parsed.alpha == alpha
        assert {m.name for m in parsed.model_modules} == set(synthetic.modules)
        for module in parsed.model_modules:
            torch.testing.assert_close(module.delta(1.0, synthetic.weight_shapes[module.name]),
                                       synthetic.delta(module.name), rtol=0, atol=1e-6)
    else:
        assert len(parsed.model_modules) == len(lora_files.comfy_native_targets(synthetic, twin))
    assert parsed.unrecognised_keys == []
    assert parsed.text_encoder_modules == []
    if family == "sd35":
        assert any(t.startswith("attn2.") or ".attn2." in t for t in parsed.target_modules)
    assert parsed.target_modules  # e.g. attn.to_q, ff.net.0.proj


@pytest.fixture(scope="module")
def wan_twin():
    from tdm_devkit import twins_wan

    return twins_wan.wan_twin(seed=3)


@pytest.mark.parametrize("writer", ["peft", "comfy"])
def test_wan21_files_are_detected_in_both_layouts_and_no_other_family_claims_them(writer, wan_twin, tmp_path):
    # lora_files.lora_targets knows `transformer_blocks.N` transformers; Wan's diffusers blocks are `blocks.N`
    targets = [n for n, m in wan_twin.diffusers.named_modules()
               if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]
    synthetic = lora_files.synthesise(wan_twin.diffusers, "wan21", targets=targets, rank=4, alpha=2.0)
    if writer == "peft":  # diffusers' layout: transformer.blocks.N.attn1.to_q.lora_A.weight
        path = lora_files.write_peft(synthetic, tmp_path / "a.safetensors", prefix="transformer", alpha_in="keys")
    else:  # native: diffusion_model.blocks.N.self_attn.q.lora_down.weight
        path = lora_files.write_comfy_native(synthetic, tmp_path / "a.safetensors", wan_twin)
    parsed = tdm_lora.load_lora(path)
    assert (parsed.format, parsed.family) == (writer, "wan21")
    assert families_recognising(parsed) == ["wan21"]
    assert parsed.unrecognised_keys == [] and len(parsed.model_modules) == len(targets)
    if writer == "peft":
        assert parsed.alpha == 2.0
        for module in parsed.model_modules:
            torch.testing.assert_close(module.delta(1.0, synthetic.weight_shapes[module.name]),
                                       synthetic.delta(module.name), rtol=0, atol=1e-6)


def test_plain_peft_unet_keys_become_kohya_names_and_transformer_keys_stay(sd15_twin, sd3_twin):
    unet_module = tdm_lora.parse_lora({
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 2),
    }).model_modules[0]
    assert unet_module.comfy_key == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd3_module = tdm_lora.parse_lora({
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 128),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 2),
    }).model_modules[0]
    assert sd3_module.comfy_key == "transformer.transformer_blocks.0.attn.to_q"


def test_sdxl_is_told_from_sd15_by_key_layout_alone():
    def file(*roots):
        tensors = {}
        for root in roots:
            tensors[f"{root}.lora_down.weight"] = torch.zeros(2, 8)
            tensors[f"{root}.lora_up.weight"] = torch.zeros(8, 2)
        return tdm_lora.parse_lora(tensors)

    for root, family in (("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q", "sdxl"),
                         ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "sdxl"),  # SGM names
                         ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "sd15"),
                         ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "sd15")):
        assert file(root).family == family
        assert families_recognising(file(root)) == [family]
    assert file("lora_unet_mid_block_resnets_0_conv1").family == "unet"  # no marker: fits either UNet
    assert file("transformer_blocks_0_attn1_to_q").family == "unknown"  # bare names without a known prefix


def test_text_encoder_modules_are_recognised_separately():
    tensors = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 2),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 2),
    }
    parsed = tdm_lora.parse_lora(tensors)
    assert [m.name for m in parsed.text_encoder_modules] == ["text_model.encoder.layers.0.self_attn.q_proj"]
    assert parsed.family == "sd15"


# ---------------------------------------------------------------------------------------------------------------
# CogVideoX: the same reader feeds peft


def test_cogvideox_peft_file_is_detected_and_to_peft_equals_diffusers_load_lora_adapter(cogvideox_transformer, tmp_path):
    import copy

    from peft import inject_adapter_in_model, set_peft_model_state_dict

    names = [n for n in _linear_and_conv_names(cogvideox_transformer) if n.startswith("transformer_blocks.")]
    # mixed ranks and alphas (rank/alpha patterns), alpha in diffusers' header metadata as a peft trainer saves it
    synthetic = lora_files.synthesise(cogvideox_transformer, "cogvideox", targets=names, rank=4, alpha=2.0, seed=9)
    odd = names[0]
    synthetic.modules[odd] = lora_files.synthesise(cogvideox_transformer, "cogvideox", targets=[odd], rank=8,
                                                   alpha=2.0, seed=10).modules[odd]
    tensors = {}
    for name, factors in synthetic.modules.items():
        tensors[f"transformer.{name}.lora_A.weight"] = factors.down
        tensors[f"transformer.{name}.lora_B.weight"] = factors.up
    metadata = {"lora_adapter_metadata": json.dumps({
        "transformer.r": 4, "transformer.lora_alpha": 2.0, "transformer.target_modules": names,
        "transformer.rank_pattern": {f"^{odd}": 8}})}
    path = tdm_lora.write_safetensors(tmp_path / "tdm_cogvideox_like.safetensors", tensors, metadata)

    parsed = tdm_lora.load_lora(path)
    assert (parsed.format, parsed.family, parsed.rank, parsed.alpha) == ("peft", "cogvideox", 4, 2.0)
    assert families_recognising(parsed) == ["cogvideox"]
    assert parsed.unrecognised_keys == []
    assert sorted(parsed.target_modules) == sorted({"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                    "ff.net.0.proj", "ff.net.2", "norm1.linear", "norm2.linear"})

    adapter = tdm_lora.to_peft(parsed, "transformer")
    ours = copy.deepcopy(cogvideox_transformer)
    inject_adapter_in_model(adapter.lora_config(), ours, adapter_name="tdm")
    result = set_peft_model_state_dict(ours, adapter.state_dict, adapter_name="tdm")
    assert result.unexpected_keys == [] and not [k for k in result.missing_keys if ".lora_" in k]

    # the official recipe: CogVideoXPipeline.load_lora_weights + set_adapters (the model-level
    # `load_lora_adapter(path)` of diffusers 0.42.1 drops the header's lora_alpha; the pipeline reads it)
    from diffusers import CogVideoXPipeline

    reference = copy.deepcopy(cogvideox_transformer)
    pipeline = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=reference, scheduler=None)
    pipeline.load_lora_weights(str(path), adapter_name="tdm")
    pipeline.set_adapters(["tdm"], [1.0])
    merged = copy.deepcopy(cogvideox_transformer)
    merged.load_state_dict(synthetic.merged_state_dict(cogvideox_transformer.state_dict()))
    expected = _cogvideox_output(reference)
    got = _cogvideox_output(ours)
    assert (expected - _cogvideox_output(cogvideox_transformer)).abs().max() > 1e-2
    tolerance = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    torch.testing.assert_close(got, _cogvideox_output(merged), rtol=0, atol=tolerance)


# ---------------------------------------------------------------------------------------------------------------
# safety


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: the shape of a real malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _malicious_state_dict(marker):
    return {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
            "lora_unet_mid_block_attentions_0_proj_in.alpha": _Payload(marker)}


@pytest.mark.parametrize("layout", ["torch-zip", "torch-legacy", "bare-pickle"])
def test_a_pickle_carrying_code_is_refused_and_its_payload_never_runs(layout, tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "tdm_dreamshaper.pt"
    if layout == "torch-zip":
        torch.save(_malicious_state_dict(marker), path)
    elif layout == "torch-legacy":
        torch.save(_malicious_state_dict(marker), path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"lora_unet_x.alpha": _Payload(marker)}, protocol=2))
    with pytest.raises(tdm_lora.LoraFileError, match=r"Refused 'tdm_dreamshaper.pt'.*names code") as error:
        tdm_lora.load_lora(path)
    assert "`exec`" in str(error.value)
    assert not marker.exists()


def test_the_malicious_pickle_is_live(tmp_path):
    """The payload above really runs under plain unpickling (in a child process), so the refusal test can fail."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save(_malicious_state_dict(marker), path)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   check=True, capture_output=True, timeout=120)
    assert marker.exists()


def test_a_plain_tensor_pickle_with_a_state_dict_wrapper_is_read(tmp_path, sd15_twin):
    synthetic = lora_files.synthesise(sd15_twin.diffusers, "sd15", targets=["mid_block.attentions.0.proj_in"], alpha=1.0)
    lora_files.write_kohya(synthetic, tmp_path / "plain.pt")
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": torch.load(tmp_path / "plain.pt", weights_only=True)}, wrapped)
    parsed = tdm_lora.load_lora(wrapped)
    assert parsed.format == "kohya" and len(parsed.modules) == 1 and parsed.alpha == 1.0


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: each its own clear message


def _good_safetensors(tmp_path):
    return tdm_lora.write_safetensors(tmp_path / "good.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 128),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4),
    })


def _truncated(tmp_path):
    data = _good_safetensors(tmp_path).read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 100])
    return path


def _truncated_header(tmp_path):
    data = _good_safetensors(tmp_path).read_bytes()
    path = tmp_path / "cut_header.safetensors"
    path.write_bytes(data[:40])
    return path


def _corrupt_header(tmp_path):
    data = bytearray(_good_safetensors(tmp_path).read_bytes())
    data[9:20] = b"\xff" * 11
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    return path


def _renamed_html(tmp_path):
    path = tmp_path / "download.safetensors"
    path.write_bytes(b"<!DOCTYPE html><html>Access denied</html>")
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    return path


def _directory(tmp_path):
    path = tmp_path / "TDM_sd3_lora"
    path.mkdir()
    return path


def _checkpoint(tmp_path):
    return tdm_lora.write_safetensors(tmp_path / "sd15_full.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
    })


def _random_bytes(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(7, 250)))
    return path


BAD_INPUTS = {
    "missing": (lambda p: p / "nope.safetensors", r"'nope.safetensors' does not exist"),
    "empty": (_empty, r"'empty.safetensors' is empty \(0 bytes\)"),
    "directory": (_directory, r"'TDM_sd3_lora' is a directory, not a LoRA file"),
    "truncated-data": (_truncated, r"'truncated.safetensors' is truncated: its tensors need \d+ bytes"),
    "truncated-header": (_truncated_header, r"'cut_header.safetensors' is truncated: its safetensors header needs"),
    "corrupt-header": (_corrupt_header, r"'corrupt.safetensors' is corrupt: its safetensors header is not valid JSON"),
    "html-renamed": (_renamed_html, r"'download.safetensors' is not a valid safetensors file"),
    "full-checkpoint": (_checkpoint, r"'sd15_full.safetensors' contains no LoRA weights.*full model checkpoint"),
    "random-bytes": (_random_bytes, r"'noise.pt' is neither a safetensors file nor a PyTorch"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_each_give_their_own_clear_error(name, tmp_path):
    make, message = BAD_INPUTS[name]
    path = make(tmp_path)
    with pytest.raises(tdm_lora.LoraFileError, match=message):
        tdm_lora.load_lora(path)


def test_the_good_file_behind_the_bad_inputs_reads(tmp_path):
    assert tdm_lora.load_lora(_good_safetensors(tmp_path)).family == "sd3"


# ---------------------------------------------------------------------------------------------------------------
# strength "auto" and TDM metadata


def _sd3_lora_file(tmp_path, name="x.safetensors", metadata=None):
    tensors = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 128),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4)}
    return tdm_lora.load_lora(tdm_lora.write_safetensors(tmp_path / name, tensors, metadata))


def test_auto_strength_follows_presets_then_metadata(tmp_path):
    sd3 = _sd3_lora_file(tmp_path)
    assert tdm_lora.auto_strength(sd3, "sd3")[0] == PRESETS["sd3"].lora_strength
    assert tdm_lora.auto_strength(sd3, "sd35")[0] == PRESETS["sd3"].lora_strength  # the LoRA's family decides
    sd15 = tdm_lora.parse_lora({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
                                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)})
    assert tdm_lora.auto_strength(sd15, "sd15")[0] == PRESETS["dreamshaper"].lora_strength
    recorded = _sd3_lora_file(tmp_path, "r.safetensors", tdm_lora.tdm_metadata(strength=0.3))
    assert tdm_lora.auto_strength(recorded, "sd3") == (0.3, "recorded in the LoRA file")
    preset = _sd3_lora_file(tmp_path, "p.safetensors", tdm_lora.tdm_metadata(preset="sd35"))
    assert tdm_lora.auto_strength(preset, "sd3")[0] == PRESETS["sd35"].lora_strength


def test_save_peft_lora_round_trips_and_diffusers_reads_the_same_alpha(tmp_path, sd3_twin):
    import copy

    from diffusers import StableDiffusion3Pipeline

    synthetic = lora_files.synthesise(sd3_twin.diffusers, "sd3", alpha=2.0, seed=2)
    peft_sd = {}
    for name, factors in synthetic.modules.items():
        peft_sd[f"{name}.lora_A.weight"] = factors.down
        peft_sd[f"{name}.lora_B.weight"] = factors.up
    path = tdm_lora.save_peft_lora(tmp_path / "trained.safetensors", peft_sd, lora_alpha=2.0, preset="sd3",
                                   family="sd3", strength=0.25)
    parsed = tdm_lora.load_lora(path)
    assert (parsed.family, parsed.alpha, parsed.recorded_strength, parsed.recorded_preset) == ("sd3", 2.0, 0.25, "sd3")
    assert all(m.scale == 0.5 for m in parsed.modules.values())
    module = copy.deepcopy(sd3_twin.diffusers)
    state_dict, metadata = StableDiffusion3Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(state_dict, module, adapter_name="t", metadata=metadata)
    assert (module.peft_config["t"].r, module.peft_config["t"].lora_alpha) == (4, 2.0)


def test_tdm_core_lora_never_imports_comfyui():
    code = ("import sys; import tdm_core.lora as l; import tdm_core.lora.matching; "
            "assert not [m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'folder_paths'))], "
            "sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def _raw_down_ranks(path) -> collections.Counter:
    """The rank of every `lora_down` tensor in the file, read without the reader under test."""
    tensors = torch.load(path, weights_only=True) if str(path).endswith(".pt") else safetensors.torch.load_file(path)
    return collections.Counter(int(v.shape[0]) for k, v in tensors.items() if k.endswith("lora_down.weight"))
