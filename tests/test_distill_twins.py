"""One TDM iteration on the twin tiny models (SD1.5 ε, SD3 flow, CogVideoX v) through the diffusers backend, and the
student LoRA loaded by ComfyUI with zero unmatched keys."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tdm_core import lora as tdm_lora
from tdm_core.distill import DiscreteSchedule, DistillConfig, TDMTrainer, checkpoint, diffusers_backend


def _encoder(family: str):
    from tdm_devkit import twins

    def encode(prompts):
        parts = [twins.tiny_text_embedding(family, p) for p in prompts]
        out = {"encoder_hidden_states": torch.cat([c for c, _ in parts])}
        if parts[0][1] is not None:
            out["pooled_projections"] = torch.cat([p for _, p in parts])
        return out

    return encode


def _config(**kw):
    base = dict(prompts=["a cat", "a dog"], batch_size=2, total_steps=1000, lora_rank=4, lr=1e-3, cfg=3.0)
    base.update(kw)
    return DistillConfig(**base)


def _check_one_iteration(backend, config):
    trainer = TDMTrainer(backend, config)
    teacher = backend.teacher_state_dict()
    adapters = {a: backend.adapter_state_dict(a) for a in ("student", "fake")}
    metrics = trainer.step()
    assert all(torch.equal(teacher[k], v) for k, v in backend.teacher_state_dict().items()), "teacher changed"
    for adapter, before in adapters.items():
        after = backend.adapter_state_dict(adapter)
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{adapter} unchanged"
    assert torch.isfinite(torch.tensor([metrics["loss_fake"], metrics["loss_gen"]])).all()
    return trainer


def _sd15_backend(sd15_twin):
    return diffusers_backend(copy.deepcopy(sd15_twin.diffusers), schedule=DiscreteSchedule.scaled_linear(),
                             encode=_encoder("sd15"), latent_shape=(4, 16, 16), lora_rank=4)


def _sd3_backend(sd3_twin):
    return diffusers_backend(copy.deepcopy(sd3_twin.diffusers), schedule=DiscreteSchedule.flow(shift=3.0),
                             encode=_encoder("sd3"), latent_shape=(16, 8, 8), lora_rank=4)


def _comfy_unmatched(twin, lora_sd, caplog):
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(twin.comfy.model, {})
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patches = comfy.lora.load_lora(lora_sd, key_map)
    return [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()], patches


def test_sd15_one_iteration_and_comfy_loads_the_student(sd15_twin, tmp_path, caplog):
    backend = _sd15_backend(sd15_twin)
    trainer = _check_one_iteration(backend, _config(family="sd15", sampler_preset="dreamshaper"))
    path = checkpoint.export_student_lora(trainer, tmp_path / "student.safetensors")
    from safetensors.torch import load_file

    lora_sd = load_file(str(path))
    assert all(k.startswith("lora_unet_") for k in lora_sd)
    unmatched, patches = _comfy_unmatched(sd15_twin, lora_sd, caplog)
    assert unmatched == []
    assert len(patches) == len(lora_sd) // 3  # down, up, alpha per module
    # ComfyUI's patched weights equal the student adapter merged into the diffusers twin.
    import comfy.model_management

    clone = sd15_twin.comfy.clone()
    clone.add_patches(patches, 1.0)
    comfy.model_management.load_models_gpu([clone], force_full_load=True)
    comfy_sd = clone.model.state_dict()
    state = backend.adapter_state_dict("student")
    base = sd15_twin.diffusers.state_dict()
    checked = 0
    for name in state:
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        merged = base[f"{module}.weight"] + state[f"{module}.lora_B.student.weight"] @ state[name]
        comfy_weight = comfy_sd["diffusion_model." + sd15_twin.key_map[f"{module}.weight"]]
        torch.testing.assert_close(comfy_weight.reshape(merged.shape), merged, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == len(patches)
    comfy.model_management.unload_all_models()


def test_sd3_one_iteration_and_comfy_loads_the_student(sd3_twin, tmp_path, caplog):
    backend = _sd3_backend(sd3_twin)
    trainer = _check_one_iteration(backend, _config(family="sd3", tau_mode="shared", randmid=True))
    path = checkpoint.export_student_lora(trainer, tmp_path / "student.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    lora_sd = load_file(str(path))
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in lora_sd)
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert meta["tdm.family"] == "sd3" and meta["tdm.steps"] == "4" and meta["tdm.parametrisation"] == "flow"
    unmatched, patches = _comfy_unmatched(sd3_twin, lora_sd, caplog)
    assert unmatched == []
    assert patches


def test_cogvideox_one_iteration_v_prediction(tmp_path):
    cogvideox_tiny = pytest.importorskip("tdm_devkit.cogvideox_tiny")
    from diffusers import CogVideoXDDIMScheduler

    transformer = cogvideox_tiny.build_tiny_transformer(seed=0)
    scheduler = CogVideoXDDIMScheduler(**cogvideox_tiny.COGVIDEOX_2B_SCHEDULER_CONFIG)
    schedule = DiscreteSchedule.from_diffusers_scheduler(scheduler)
    assert schedule.alphas[999] == 0  # zero terminal SNR: x0 = −v at t = 999
    torch.testing.assert_close(DiscreteSchedule.cogvideox().alphas, schedule.alphas, rtol=0, atol=1e-6)

    def encode(prompts):
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(len(p) * 7919 + sum(map(ord, p)))
            rows.append(torch.randn(1, cogvideox_tiny.MAX_TEXT_SEQ_LENGTH, cogvideox_tiny.T5_D_MODEL, generator=g))
        return {"encoder_hidden_states": torch.cat(rows)}

    backend = diffusers_backend(transformer, schedule=schedule, encode=encode, lora_rank=4)
    assert backend.parametrisation == "v" and backend.latent_shape == (3, 16, 4, 6)
    trainer = _check_one_iteration(backend, _config(family="cogvideox", timesteps=[999, 856, 665, 399]))
    path = checkpoint.export_student_lora(trainer, tmp_path / "student.safetensors")
    lora = tdm_lora.load_lora(path)
    assert lora.family == "cogvideox" and not lora.unrecognised_keys
