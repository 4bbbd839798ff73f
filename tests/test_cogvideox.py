"""CogVideoX at 4 steps: parity with diffusers' CogVideoXPipeline, the trained timesteps, the TDM LoRA, bad input,
and the nodes through the live server."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tdm_core import cogvideox
from tdm_core.lora import LoraMismatchError
from tdm_devkit import cogvideox_tiny, lora_files

GEOMETRY = cogvideox_tiny.tiny_frame_geometry()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return cogvideox_tiny.save_tiny_cogvideox_folder(tmp_path_factory.mktemp("cogvideox") / "tiny-cogvideox")


@pytest.fixture(scope="module")
def pipe(folder):
    # fp32 and no tiling (the loader's defaults are bf16 with tiling and slicing): these tests prove parity with
    # diffusers to fp32 round-off, bit-exact on the trailing grid; test_half_precision runs the shipped defaults.
    return cogvideox.load_pipeline(folder, cogvideox.LoadOptions(dtype="fp32", vae_tiling=False, vae_slicing=False))


def _diffusers_latents(folder, steps, cfg, seed, lora_file=None, strength=1.0):
    from diffusers import CogVideoXPipeline

    reference = CogVideoXPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    if lora_file is not None:
        reference.load_lora_weights(str(lora_file), adapter_name="reference")
        reference.set_adapters(["reference"], [strength])
    return reference(prompt="a red fox running in snow", negative_prompt="blurry", num_frames=GEOMETRY.num_frames,
                     height=GEOMETRY.height, width=GEOMETRY.width, num_inference_steps=steps, guidance_scale=cfg,
                     generator=torch.Generator().manual_seed(seed), output_type="latent").frames


def _ours(pipe, timesteps, cfg=1.0, seed=3):
    return cogvideox.sample_latents(pipe, "a red fox running in snow", "blurry", GEOMETRY.num_frames,
                                    GEOMETRY.height, GEOMETRY.width, timesteps, cfg, seed)


@pytest.mark.parametrize("cfg", [1.0, 6.0])
def test_trailing_grid_equals_diffusers_pipeline(folder, pipe, cfg):
    """TDM's loop on the trailing grid is exactly CogVideoXPipeline + CogVideoXDDIMScheduler (4 steps)."""
    reference = _diffusers_latents(folder, steps=4, cfg=cfg, seed=3)
    ours = _ours(pipe, cogvideox.sampling_timesteps("trailing", 4), cfg)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * reference.abs().max().item())


def test_trained_grid_equals_reference_built_from_diffusers_alphas(folder, pipe):
    """At 999/856/665/399 (which diffusers' scheduler cannot hit), against a loop written from the DDIM formula on
    diffusers' own alphas_cumprod."""
    from diffusers import CogVideoXDDIMScheduler

    timesteps = cogvideox.sampling_timesteps("trained")
    assert timesteps == (999, 856, 665, 399)
    alphas = CogVideoXDDIMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod.double()
    positive, _ = pipe.encode_prompt("a red fox running in snow", do_classifier_free_guidance=False, device="cpu")
    x = cogvideox.initial_latents(pipe, GEOMETRY.num_frames, GEOMETRY.height, GEOMETRY.width, seed=3).double()
    for i, t in enumerate(timesteps):
        v = pipe.transformer(hidden_states=x.float(), encoder_hidden_states=positive,
                             timestep=torch.tensor([t]), return_dict=False)[0].double()
        a_t = alphas[t]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * v
        ratio = ((1 - a_prev) / (1 - a_t)).sqrt()
        x = ratio * x + (a_prev.sqrt() - a_t.sqrt() * ratio) * x0
    ours = _ours(pipe, timesteps)
    torch.testing.assert_close(ours.double(), x, rtol=0, atol=1e-5 * x.abs().max().item())
    # and it is a different trajectory from the trailing grid, or the preset would be pointless
    assert (ours - _ours(pipe, cogvideox.sampling_timesteps("trailing", 4))).abs().max() > 1e-3


def test_lora_equals_diffusers_load_lora_weights(folder, tmp_path):
    transformer = cogvideox_tiny.build_tiny_transformer(seed=0)
    lora = lora_files.synthesise(transformer, "cogvideox", rank=4, alpha=8.0, seed=1)
    path = lora_files.write_peft(lora, tmp_path / "tdm_cogvideox.safetensors", alpha_in="metadata")
    for strength in (1.0, 0.5):
        # fp32 without tiling, as the `pipe` fixture (fp32 parity); the bf16 default with a LoRA: test_half_precision
        ours_pipe = cogvideox.load_pipeline(folder, cogvideox.LoadOptions(
            dtype="fp32", lora_path=str(path), lora_strength=strength, vae_tiling=False, vae_slicing=False))
        ours = _ours(ours_pipe, cogvideox.sampling_timesteps("trailing", 4))
        reference = _diffusers_latents(folder, 4, 1.0, 3, lora_file=path, strength=strength)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * reference.abs().max().item())
    base = _diffusers_latents(folder, 4, 1.0, 3)
    assert (ours - base).abs().max() > 1e-3  # the LoRA really changed the model


def test_frames_are_comfy_images(pipe):
    frames = cogvideox.decode_frames(pipe, _ours(pipe, cogvideox.sampling_timesteps("trained")))
    assert frames.shape == (GEOMETRY.num_frames, GEOMETRY.height, GEOMETRY.width, 3)
    assert frames.dtype == torch.float32 and frames.min() >= 0 and frames.max() <= 1 and frames.std() > 0


def test_incomplete_folder_lists_what_is_missing(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(cogvideox.CogVideoXError, match=r"missing vae/, tokenizer/.*THUDM/CogVideoX-2b"):
        cogvideox.load_pipeline(broken)


@pytest.mark.parametrize("frames", [0, 8, 50])
def test_frame_count_must_be_4k_plus_1(pipe, frames):
    with pytest.raises(cogvideox.CogVideoXError, match="4k\\+1"):
        cogvideox.sample_latents(pipe, "x", num_frames=frames, height=GEOMETRY.height, width=GEOMETRY.width)


def test_lora_of_another_family_is_refused(folder, tmp_path, sd3_twin):
    lora = lora_files.synthesise(sd3_twin.diffusers, "sd3", rank=2)
    path = lora_files.write_peft(lora, tmp_path / "tdm_sd3.safetensors")
    with pytest.raises(LoraMismatchError, match=r"tdm_sd3.safetensors.*SD3.*not for CogVideoX"):
        cogvideox.load_pipeline(folder, cogvideox.LoadOptions(dtype="fp32", lora_path=str(path)))  # refused before any dtype matters


def test_custom_timesteps_are_validated():
    assert cogvideox.sampling_timesteps("custom", custom="999, 500") == (999, 500)
    with pytest.raises(ValueError, match="descending"):
        cogvideox.sampling_timesteps("custom", custom="500, 999")


def test_video_nodes_in_the_live_server_write_a_video(comfy_server, folder):
    target = comfy_server.base_directory / "models" / "diffusers" / "tiny-cogvideox"
    if not target.exists():
        shutil.copytree(folder, target)
    info = comfy_server.object_info()
    assert "tiny-cogvideox" in info["TDMCogVideoXLoader"]["input"]["required"]["model_folder"][1]["options"]
    # The loader's default dtype (bf16). Tiling and slicing are off: the 2b's tile fractions do not divide the tiny
    # fixture's 32×48 frames (see test_half_precision._tiny_tiles, which runs the tiled path).
    graph = {
        "load": {"class_type": "TDMCogVideoXLoader", "inputs": {
            "model_folder": "tiny-cogvideox", "dtype": "bf16", "lora_name": "none", "lora_strength": 1.0,
            "vae_tiling": False, "vae_slicing": False, "offload": "none"}},
        "sample": {"class_type": "TDMCogVideoXSampler", "inputs": {
            "cogvideox": ["load", 0], "prompt": "a red fox", "negative_prompt": "", "frames": GEOMETRY.num_frames,
            "width": GEOMETRY.width, "height": GEOMETRY.height, "grid": "trained", "steps": 4,
            "custom_timesteps": "999, 856, 665, 399", "cfg": 1.0, "seed": 0}},
        "video": {"class_type": "CreateVideo", "inputs": {"images": ["sample", 0], "fps": ["sample", 1]}},
        "save": {"class_type": "SaveVideo", "inputs": {"video": ["video", 0], "filename_prefix": "video/tdm_cogvideox",
                                                        "format": "mp4", "codec": "h264"}},
        "webp": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["sample", 0], "filename_prefix": "tdm_cogvideox",
                                                              "fps": 8.0, "lossless": False, "quality": 80,
                                                              "method": "default"}},
    }
    entry = comfy_server.run_prompt(graph)
    written = [item for node in ("save", "webp") for key in ("images", "videos", "animated")
               for item in entry["outputs"].get(node, {}).get(key, []) if isinstance(item, dict)]
    paths = [comfy_server.base_directory / "output" / item.get("subfolder", "") / item["filename"] for item in written]
    suffixes = {p.suffix for p in paths}
    assert {".mp4", ".webp"} <= suffixes, entry["outputs"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    import av

    with av.open(str(next(p for p in paths if p.suffix == ".mp4"))) as container:
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == GEOMETRY.num_frames
        assert math.isclose(float(stream.average_rate), 8.0)


def test_bad_frame_count_is_refused_by_the_server(comfy_server, folder):
    target = comfy_server.base_directory / "models" / "diffusers" / "tiny-cogvideox"
    if not target.exists():
        shutil.copytree(folder, target)
    graph = {  # the frame count is refused before the loader's settings matter
        "load": {"class_type": "TDMCogVideoXLoader", "inputs": {
            "model_folder": "tiny-cogvideox", "dtype": "fp32", "lora_name": "none", "lora_strength": 1.0,
            "vae_tiling": False, "vae_slicing": False, "offload": "none"}},
        "sample": {"class_type": "TDMCogVideoXSampler", "inputs": {
            "cogvideox": ["load", 0], "prompt": "", "negative_prompt": "", "frames": 8, "width": GEOMETRY.width,
            "height": GEOMETRY.height, "grid": "trained", "steps": 4, "custom_timesteps": "", "cfg": 1.0, "seed": 0}},
        "webp": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["sample", 0], "filename_prefix": "bad",
                                                              "fps": 8.0, "lossless": False, "quality": 80,
                                                              "method": "default"}},
    }
    from tdm_devkit.server import ServerError

    with pytest.raises(ServerError, match="4k\\+1"):
        comfy_server.run_prompt(graph)


def test_sampler_node_reports_progress_every_step_and_cancels(pack, folder, pipe):
    """The node drives ComfyUI's progress bar once per step, and the canvas Cancel stops it between steps."""
    import comfy.model_management
    import comfy.utils

    video = pack.nodes.video
    inputs = dict(cogvideox=pipe, prompt="a red fox", negative_prompt="", frames=GEOMETRY.num_frames,
                  width=GEOMETRY.width, height=GEOMETRY.height, grid="trained", steps=4, custom_timesteps="",
                  cfg=1.0, seed=0)
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        frames, fps = video.TDMCogVideoXSampler.execute(**inputs).result
        if hasattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL"):
            # Newer ComfyUI's ProgressBar drops updates that come < 100 ms after the last one (tiny steps here do);
            # the first and the final update always arrive, in order.
            values = [value for value, _ in updates]
            assert updates[0] == (1, 4) and updates[-1] == (4, 4) and values == sorted(set(values))
        else:
            assert updates == [(1, 4), (2, 4), (3, 4), (4, 4)]
        assert frames.shape == (GEOMETRY.num_frames, GEOMETRY.height, GEOMETRY.width, 3) and fps == 8.0

        calls = []
        original = pipe.transformer.forward

        def counting_forward(*args, **kwargs):
            calls.append(1)
            comfy.model_management.interrupt_current_processing(True)  # the user presses Cancel mid-run
            return original(*args, **kwargs)

        pipe.transformer.forward = counting_forward
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                video.TDMCogVideoXSampler.execute(**inputs)
        finally:
            del pipe.transformer.forward
            comfy.model_management.interrupt_current_processing(False)
        assert len(calls) == 1  # stopped after the step in flight, not after all four
    finally:
        comfy.utils.set_progress_bar_global_hook(None)


def test_out_of_memory_names_the_memory_options(pipe, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipe.transformer, "forward", out_of_memory)
    with pytest.raises(cogvideox.CogVideoXError, match=r"(?s)Out of memory during CogVideoX sampling.*tiling.*offload"):
        _ours(pipe, cogvideox.sampling_timesteps("trained"))
