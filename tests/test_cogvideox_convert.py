"""tdm_core.cogvideox_convert: the diffusers CogVideoX-2B transformer written as the file newer ComfyUI's native
CogVideoX (UNETLoader) loads — the source the native workflow's Read me names for `cogvideox_2b.safetensors`.

Checked against the test harness's own diffusers→native mapping (tdm_devkit/cogvideox_native.py, written from the
two module lists independently of the converter), against the LoRA loader's native→diffusers names, and, where the
runtime has native CogVideoX, through upstream's real file loader and detection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tdm_core import cogvideox_convert
from tdm_core.cogvideox_names import cogvideox_diffusers_name
from tdm_devkit import cogvideox_native

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """A tiny CogVideoX-2B transformer (the 2B's layout and sample size) saved as a diffusers pipeline folder's
    transformer/, and the model itself."""
    transformer = cogvideox_native.build_diffusers_transformer(seed=3, full_sample_size=True)
    folder = tmp_path_factory.mktemp("diffusers") / "CogVideoX-2b"
    transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    return folder, transformer


def _run(*args):
    return subprocess.run([sys.executable, "-m", "tdm_core.cogvideox_convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_converted_file_is_the_native_layout_with_the_2bs_position_table(twin, tmp_path):
    folder, transformer = twin
    target = tmp_path / "diffusion_models" / "cogvideox_2b.safetensors"
    result = _run(folder, target)
    assert result.returncode == 0, result.stderr
    assert "with the 2B's position table" in result.stdout
    written = load_file(str(target))
    expected = cogvideox_native.native_state_dict(transformer)
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        assert written[key].dtype == (torch.float32 if key == cogvideox_convert.POS_EMBEDDING_KEY else tensor.dtype)
        torch.testing.assert_close(written[key], tensor.to(written[key].dtype), rtol=0, atol=0, msg=key)
    assert list(target.parent.iterdir()) == [target]  # no .partial left behind


def test_the_converter_and_the_lora_loader_agree_on_every_name(twin):
    _, transformer = twin
    for key in transformer.state_dict():
        if key == cogvideox_convert.POS_EMBEDDING_KEY:
            continue
        module, parameter = key.rsplit(".", 1)
        native_module = cogvideox_convert.native_name(key).rsplit(".", 1)[0]
        assert cogvideox_diffusers_name(native_module) == module, key


def test_upstreams_unet_loader_reads_the_converted_file_as_the_2b(twin, tmp_path):
    if not cogvideox_native.has_native_cogvideox():
        pytest.skip(cogvideox_native.SKIP_REASON)
    folder, transformer = twin
    target = tmp_path / "cogvideox_2b.safetensors"
    assert cogvideox_convert.main([str(folder), str(target)]) == 0
    model = cogvideox_native.load_native_file(target)
    config = model.model.model_config.unet_config
    assert config["use_learned_positional_embeddings"] is True  # the stored table: sin-cos, not the 5B's rotary
    assert config["num_layers"] == transformer.config.num_layers
    loaded = model.model.diffusion_model.state_dict()
    for key, tensor in cogvideox_native.native_state_dict(transformer).items():
        torch.testing.assert_close(loaded[key].float(), tensor.float(), rtol=0, atol=0, msg=key)


def test_refusals_name_the_problem_and_write_nothing(twin, tmp_path):
    folder, _ = twin
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"a user's file")
    result = _run(folder, existing)
    assert result.returncode == 2 and "exists: pass --overwrite" in result.stderr
    assert existing.read_bytes() == b"a user's file"

    not_cogvideox = tmp_path / "sd3" / "transformer"
    not_cogvideox.mkdir(parents=True)
    (not_cogvideox / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    result = _run(not_cogvideox.parent, tmp_path / "out.safetensors")
    assert result.returncode == 2 and "'SD3Transformer2DModel', not a CogVideoXTransformer3DModel" in result.stderr

    result = _run(tmp_path / "nowhere", tmp_path / "out.safetensors")
    assert result.returncode == 2 and "has no transformer/config.json" in result.stderr

    odd = tmp_path / "odd" / "transformer"
    odd.mkdir(parents=True)
    (odd / "config.json").write_text((folder / "transformer" / "config.json").read_text())
    save_file({"transformer_blocks.0.attn1.to_q.weight": torch.zeros(2, 2), "unexpected.weight": torch.zeros(1)},
              str(odd / "diffusion_pytorch_model.safetensors"))
    result = _run(odd.parent, tmp_path / "out.safetensors")
    assert result.returncode == 2 and "'unexpected.weight' is not a CogVideoX transformer weight" in result.stderr
    assert not list(tmp_path.glob("out.safetensors*"))
