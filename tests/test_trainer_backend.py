"""The ComfyUI teacher backend in-process on the tiny SD1.5 and SD3 models: schedules against model_sampling,
predictions against ComfyUI's own apply_model, the shared frozen weights, the exported LoRA against ComfyUI's LoRA path,
gradient checkpointing, and resume equivalence through the job manager."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from safetensors.torch import load_file

from tdm_core import jobs, schedules

# TDM Distill's inputs with test-sized overrides, each for CPU time only: iterations 6 (node: 500), lora_rank 4 (16),
# 64×64 (512×512), no periodic saves/previews (100/50), keep_last 2 (3), seed 1 (0), offload train_on_cpu (none:
# this machine has no accelerator, so both put the copy on the CPU). dtype auto and every TDM setting are as shipped;
# test_trainer_half_precision runs the bfloat16/float16 choices.
DEFAULTS = dict(steps=4, grid="auto", iterations=6, lora_rank=4, lora_alpha=0.0, learning_rate=1e-4, cfg=2.0,
                batch_size=1, width=64, height=64, save_every=0, keep_last=2, preview_every=0, seed=1,
                gradient_checkpointing=False, dtype="auto", offload="train_on_cpu", unconditional_prompt="")
PROMPTS = ["a cat", "a dog"]


def _nodes_module(pack, name: str):
    return sys.modules[f"{pack.__name__}.nodes.{name}"]


@pytest.fixture(scope="module")
def trainer_module(pack):
    return _nodes_module(pack, "trainer")


@pytest.fixture(scope="module")
def backend_module(pack):
    return _nodes_module(pack, "comfy_backend")


@pytest.fixture(scope="module")
def network_module(pack):
    return _nodes_module(pack, "training_network")


@pytest.fixture(scope="module")
def conditioning_module(pack):
    return _nodes_module(pack, "conditioning")


def _clip(family):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from comfy_test_pack import TinyCLIP

    return TinyCLIP(family)


def _runtime(trainer_module, twin, vae=None, **overrides):
    settings = dict(DEFAULTS, **overrides)
    with torch.inference_mode():  # as ComfyUI executes nodes
        distill_jobs = sys.modules[trainer_module.__package__ + ".distill_jobs"]
        return distill_jobs.build_runtime(twin.comfy, _clip(twin.family), settings, PROMPTS, vae)


def test_sd15_schedule_is_the_models_own(backend_module, sd15_twin):
    model_sampling = sd15_twin.comfy.get_model_object("model_sampling")
    grid = backend_module.training_grid(sd15_twin.comfy, "sd15", "auto", 4)
    assert grid.timesteps == [999, 749, 500, 250] and grid.preset == "dreamshaper"
    s = grid.schedule
    ve = (s.sigmas / s.alphas).float()
    assert torch.allclose(ve, model_sampling.sigmas.float(), rtol=1e-6)
    for t in grid.timesteps:
        assert int(round(float(model_sampling.timestep(model_sampling.sigmas[t])))) == t
    assert torch.equal(s.model_timesteps, torch.arange(1000, dtype=torch.float64))


def test_sd3_grid_is_pinned_to_the_sampler_preset(backend_module, sd3_twin):
    model_sampling = sd3_twin.comfy.get_model_object("model_sampling")
    grid = backend_module.training_grid(sd3_twin.comfy, "sd3", "auto", 4)
    flow = schedules.flow_shift_grid(4, 6.0)
    s = grid.schedule
    assert [float(s.sigmas[i]) for i in grid.timesteps] == list(flow.sigmas[:-1])
    assert [float(s.model_timesteps[i]) for i in grid.timesteps] == [999.0, 947.0, 856.0, 666.0]
    assert torch.all(s.sigmas[1:] > s.sigmas[:-1]) and torch.allclose(s.alphas, 1 - s.sigmas)
    others = [i for i in range(1000) if i not in grid.timesteps]
    assert torch.allclose(s.sigmas[others].float(), model_sampling.sigmas[others].float())
    assert torch.allclose(s.model_timesteps[others], s.sigmas[others] * 1000)
    with pytest.raises(ValueError, match="for eps models"):
        backend_module.training_grid(sd3_twin.comfy, "sd3", "dreamshaper", 4)


def _comfy_x0(model, x_model_space, sigma, context, pooled):
    extra = {} if pooled is None else {"y": pooled}
    with torch.no_grad():
        return model.model.apply_model(x_model_space, torch.tensor([sigma]), c_crossattn=context, **extra).float()


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_teacher_and_exported_student_match_comfyui(trainer_module, family, sd15_twin, sd3_twin, caplog):
    """x̂0 of the backend's teacher equals ComfyUI's own apply_model, and ComfyUI's LoRA path applied to the
    exported student (zero unmatched keys) gives the backend's student prediction."""
    import comfy.lora
    import comfy.model_management

    twin = sd15_twin if family == "sd15" else sd3_twin
    model = twin.comfy
    runtime, teacher, grid = _runtime(trainer_module, twin)
    backend = runtime.backend
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for _, param in backend._params["student"]:  # a non-trivial student (B = 0 at init would hide the mapping)
        param.data = torch.randn(param.shape, generator=generator) * 0.05
    t = 500
    alpha, sigma = float(backend.schedule.alphas[t]), float(backend.schedule.sigmas[t])
    x0 = torch.randn(1, *backend.latent_shape, generator=generator)
    noise = torch.randn(1, *backend.latent_shape, generator=generator)
    x = alpha * x0 + sigma * noise
    cond = backend.encode(["a cat"])
    tt = torch.tensor([t])

    def x0_of(prediction):
        if backend.parametrisation == "eps":
            return (x - sigma * prediction) / alpha
        return x - sigma * prediction

    with torch.no_grad():
        teacher_x0 = x0_of(backend.forward(x, tt, cond, "teacher"))
        student_x0 = x0_of(backend.forward(x, tt, cond, "student"))
    context, pooled = cond["context"], cond.get("y")
    # ComfyUI's view: VE state x/α at σ_ve = σ/α for ε models; the flow state itself for SD3.
    comfy_x, comfy_sigma = (x / alpha, sigma / alpha) if family == "sd15" else (x, sigma)
    assert torch.allclose(teacher_x0, _comfy_x0(model, comfy_x, comfy_sigma, context, pooled), atol=2e-5)

    tensors, metadata = runtime.build(None).lora()
    assert metadata["tdm.preset"] == grid.preset and metadata["tdm.lora_strength"] == "1.0"
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    caplog.set_level(logging.WARNING)
    patches = comfy.lora.load_lora(tensors, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len(tensors) // 3 == len(backend._params["student"]) // 2
    patched = model.clone()
    assert len(patched.add_patches(patches, 1.0)) == len(patches)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    comfy_student = _comfy_x0(patched, comfy_x, comfy_sigma, context, pooled)
    assert torch.allclose(student_x0, comfy_student, atol=2e-5)
    assert not torch.allclose(student_x0, teacher_x0, atol=1e-3)
    comfy.model_management.load_models_gpu([model], force_full_load=True)  # unpatch for the other tests
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "training touched the MODEL's own weights"
    assert teacher["family"] == family and teacher["parameters"] > 0


def test_a_training_step_leaves_the_model_untouched(trainer_module, sd3_twin):
    model = sd3_twin.comfy
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    runtime, _, _ = _runtime(trainer_module, sd3_twin)
    session = runtime.build(None)
    metrics = session.step()
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss_fake", "loss_gen"))
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in runtime.backend.trainable_parameters("student"))
    preview = session.preview()  # latent RGB preview of the two prompts side by side (8×8 latents), at image size
    assert preview.shape == (64, 128, 3) and preview.dtype.name == "uint8"


def test_preview_is_decoded_by_the_teachers_vae_when_one_is_given(trainer_module, sd3_twin):
    """With a VAE (a real ComfyUI VAE object: TAESD with random weights) the preview is what that VAE decodes from
    the student's samples — the same pixels ComfyUI's own VAE Decode gives for them."""
    from tdm_devkit import twins

    vae = twins.tiny_vae("sd3", seed=3)
    runtime, _, _ = _runtime(trainer_module, sd3_twin, vae=vae)
    session = runtime.build(None)
    preview = session.preview()
    x0 = session.trainer.sample(session.preview_prompts, seed=0)  # what the preview rendered (seeded)
    expected = vae.decode(sd3_twin.comfy.model.process_latent_out(x0.detach().float().cpu()))  # [B, H, W, 3] in 0..1
    expected = (torch.cat(list(expected), dim=1) * 255).round().to(torch.uint8).numpy()
    assert preview.shape == expected.shape == (64, 128, 3)
    assert abs(preview.astype(int) - expected.astype(int)).max() <= 1
    assert preview.std() > 1  # an image, not a flat fill


def test_the_job_trains_on_comfyuis_weights_without_copying_them(trainer_module, sd3_twin, network_module):
    """One teacher in memory: the training tree's frozen weights are ComfyUI's loaded tensors (same memory), while
    the adapters live only in the training tree, so ComfyUI's network (what other prompts sample) has none."""
    model = sd3_twin.comfy
    comfy_network = model.model.diffusion_model
    runtime, _, _ = _runtime(trainer_module, sd3_twin)  # dtype auto; this machine's ComfyUI device is the CPU too
    network = runtime.backend.model
    assert network_module.shares_weights(network, model) == len(list(comfy_network.parameters())) > 0
    assert any("lora_" in name for name, _ in network.named_parameters())
    assert not any("lora_" in name for name, _ in comfy_network.named_parameters())
    runtime.build(None).step()
    assert network_module.shares_weights(network, model) == len(list(comfy_network.parameters()))
    # another dtype is a converted copy: nothing of ComfyUI's memory is aliased (or written) then
    half, _, _ = _runtime(trainer_module, sd3_twin, dtype="bfloat16")
    assert network_module.shares_weights(half.backend.model, model) == 0


def test_aliases_of_inference_weights_train():
    """ComfyUI loads weights under inference_mode; autograd refuses to save such a tensor for backward. The alias the
    training tree uses is a plain tensor on the same memory, and gradients flow through it."""
    with torch.inference_mode():
        weight = torch.randn(3, 4)
    from tdm_core.distill import backend as core_backend  # the alias every shared training tree uses

    alias = core_backend._alias(weight)
    assert weight.is_inference() and not alias.is_inference() and alias.data_ptr() == weight.data_ptr()
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        torch.nn.functional.linear(x, weight).sum().backward()
    torch.nn.functional.linear(x, alias).sum().backward()
    assert torch.equal(x.grad, weight.sum(0).expand(2, 4))


@pytest.mark.parametrize("family", ["sd15", "sd3", "sdxl", "flux"])
def test_gradient_checkpointing_gives_the_same_gradients(trainer_module, family, sd15_twin, sd3_twin, network_module):
    from tdm_devkit import twins_xl_flux

    twin = {"sd15": sd15_twin, "sd3": sd3_twin}.get(family) or getattr(twins_xl_flux, f"{family}_twin")(0)
    wrapped = []
    real = network_module._wrap_checkpoint
    network_module._wrap_checkpoint = lambda block, *args: (wrapped.append(block), real(block, *args))
    grads = []
    try:
        for checkpointing in (False, True):
            # cfg: Flux-dev takes 1 (it is refused otherwise); the others keep DEFAULTS' 2
            runtime, _, _ = _runtime(trainer_module, twin, gradient_checkpointing=checkpointing,
                                     **({"cfg": 1.0} if family == "flux" else {}))
            backend = runtime.backend
            for _, param in backend._params["student"]:
                param.data = torch.full_like(param, 0.01)
            x = torch.randn(1, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
            out = backend.forward(x, torch.tensor([700]), backend.encode(["a dog"]), "student")
            out.square().mean().backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in backend.trainable_parameters("student")]))
    finally:
        network_module._wrap_checkpoint = real
    # every repeated block of the layout is recomputed: the UNets' input, middle and output blocks (SD1.5: 12, 1,
    # 12); the MMDiT's joint blocks; Flux's double and single blocks
    network = twin.comfy.model.diffusion_model
    expected = sum(len(getattr(network, name)) if isinstance(getattr(network, name), torch.nn.ModuleList) else 1
                   for name in network_module.CHECKPOINTED_BLOCKS if hasattr(network, name))
    if family == "sd15":
        assert expected == 25
    assert len(wrapped) == expected
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_gradient_checkpointing_refuses_a_network_it_does_not_know(network_module):
    with pytest.raises(ValueError, match="gradient_checkpointing does not know the blocks of Sequential"):
        network_module.enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_bfloat16_teacher_trains_float32_adapters(trainer_module, sd3_twin):
    runtime, _, _ = _runtime(trainer_module, sd3_twin, dtype="bfloat16")
    assert next(runtime.backend.model.parameters()).dtype == torch.bfloat16
    metrics = runtime.build(None).step()
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss_fake", "loss_gen"))
    assert all(p.dtype == torch.float32 for p in runtime.backend.trainable_parameters("fake"))


def _stopping_at(manager: jobs.JobManager, step: int) -> jobs.JobManager:
    """`manager`, stopping each job as soon as it reports `step` (a stop at a known step, for resume tests)."""

    def stop(event, payload):
        if event == "tdm.job.progress" and payload["step"] == step:
            manager.stop(payload["id"])

    manager.listener = stop
    return manager


def test_resume_after_a_restart_reaches_the_same_lora(trainer_module, sd3_twin, tmp_path):
    """Uninterrupted 6 iterations vs. 3, a 'restart' (new manager, new training tree) and a resume to 6."""
    straight = jobs.JobManager(tmp_path / "a")
    runtime, _, _ = _runtime(trainer_module, sd3_twin)
    record = straight.submit("tiny", runtime, 6, save_every=2, keep_last=1, preview_every=0)
    assert straight.wait(record.id, timeout=300).state == "finished"
    straight.close()

    first = _stopping_at(jobs.JobManager(tmp_path / "b"), 3)
    runtime, _, _ = _runtime(trainer_module, sd3_twin)
    interrupted = first.submit("tiny", runtime, 6, save_every=2, keep_last=1, preview_every=0)
    stopped = first.wait(interrupted.id, timeout=300)
    assert stopped.state == "stopped" and stopped.checkpoint_step == 3
    first.close()
    del runtime

    second = jobs.JobManager(tmp_path / "b")
    runtime, teacher, _ = _runtime(trainer_module, sd3_twin)
    second.submit("tiny", runtime, 6, if_exists="resume", teacher=teacher)
    resumed = second.wait(interrupted.id, timeout=300)
    assert resumed.state == "finished" and resumed.step == 6
    second.close()

    a = load_file(tmp_path / "a" / "tiny.safetensors")
    b = load_file(tmp_path / "b" / "tiny.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA differs from the uninterrupted one"
    assert [h[1:] for h in resumed.history] == [h[1:] for h in straight.get(record.id).history]
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_up.weight"))


def test_comfyui_cancel_neither_stops_nor_is_swallowed_by_training(trainer_module, sd15_twin):
    """comfy.ops layers raise (and clear) the global interrupt flag; the training copy must do neither."""
    import comfy.model_management

    runtime, _, _ = _runtime(trainer_module, sd15_twin)
    backend = runtime.backend
    x = torch.randn(1, *backend.latent_shape)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with torch.no_grad():
            backend.forward(x, torch.tensor([500]), backend.encode(["a cat"]), "student")
        assert comfy.model_management.processing_interrupted(), "the training thread swallowed a Cancel"
    finally:
        comfy.model_management.interrupt_current_processing(False)
    with pytest.raises(comfy.model_management.InterruptProcessingException):  # the MODEL itself still obeys
        comfy.model_management.interrupt_current_processing(True)
        _comfy_x0(sd15_twin.comfy, x, 1.0, backend.encode(["a cat"])["context"], None)
    comfy.model_management.interrupt_current_processing(False)


def test_prompts_come_from_the_text_and_a_file_in_input(trainer_module, tmp_path, monkeypatch):
    import folder_paths

    distill_jobs = sys.modules[trainer_module.__package__ + ".distill_jobs"]  # where TDM Distill reads its prompts

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    (tmp_path / "more.txt").write_text("a bird\n\n# a comment\na fish\n", encoding="utf-8")
    assert distill_jobs.read_prompts(" a cat \n\na dog", "more.txt") == ["a cat", "a dog", "a bird", "a fish"]
    assert distill_jobs.input_text_files() == ["(none)", "more.txt"]
    with pytest.raises(FileNotFoundError, match="'gone.txt' does not exist in ComfyUI's input folder"):
        distill_jobs.read_prompts("a cat", "gone.txt")
    with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
        distill_jobs.read_prompts("a cat", "../secret.txt")
    with pytest.raises(ValueError, match="no training prompts"):
        distill_jobs.read_prompts("\n# only a comment", "(none)")


def test_text_encoders_leave_comfyuis_device_after_encoding(conditioning_module):
    """A real ComfyUI CLIP (SD1.5's text model and tokenizer, weights left as constructed: only residency matters):
    encoding loads it through ComfyUI's memory manager, and the job's release takes it off the loaded list, where a
    later prompt's encode loads it again."""
    import comfy.model_management
    import comfy.sd
    import comfy.supported_models

    clip = comfy.sd.CLIP(comfy.supported_models.SD15({}).clip_target())

    def loaded():
        return [m for m in comfy.model_management.current_loaded_models if m.model is clip.patcher]

    with torch.inference_mode():
        conds = conditioning_module.encode_prompts(clip, ["a cat"])
    assert conds["a cat"]["context"].shape[1:] == (77, 768)
    assert loaded(), "encoding did not load the text encoder through ComfyUI's memory manager"
    assert conditioning_module.release_text_encoders(clip) == 1
    assert not loaded()
    with torch.inference_mode():
        clip.encode_from_tokens_scheduled(clip.tokenize("a dog"))  # ComfyUI loads it again when a prompt needs it
    assert loaded()
    assert conditioning_module.release_text_encoders(clip) == 1


def test_parking_a_job_moves_only_what_comfyui_does_not_hold(trainer_module, sd3_twin, network_module):
    """A waiting or stopped job parks its network off the device, except the weights it shares with ComfyUI's loaded
    model (moving those frees nothing and would add a copy). This machine's only device is the CPU, so the test asks
    what parking on another device would move."""
    runtime, _, _ = _runtime(trainer_module, sd3_twin)
    comfy_network = sd3_twin.comfy.model.diffusion_model
    assert runtime.shared_network is comfy_network
    in_use = network_module.weight_memory(comfy_network)
    elsewhere = torch.device("meta")
    moved = {id(t) for _, _, t in runtime.backend.tensors_to_move(elsewhere, keep=in_use)}
    named = dict(runtime.backend.model.named_parameters())
    assert {n for n, p in named.items() if id(p) in moved} == {n for n in named if ".lora_" in n}  # the job's own
    # once ComfyUI holds them no more (unloaded, replaced), the job's aliases are their only holder: they move too
    everything = {id(t) for _, _, t in runtime.backend.tensors_to_move(elsewhere)}
    assert everything == {id(t) for t in [*named.values(), *runtime.backend.model.buffers()]}
    assert not list(runtime.backend.tensors_to_move(torch.device("cpu")))  # nothing to do where it already is


# ---------------------------------------------------------------------------------------------------------------
# The job's record: its DistillConfig and ComfyUI options, one vocabulary (issue 24, item 3)


def _start_job(trainer_module, monkeypatch, manager, twin, **changes):
    """TDM Distill's `start_job` on `manager` with DEFAULTS (output "tiny"), as the node runs it."""
    import functools

    values = dict(DEFAULTS, prompts="\n".join(PROMPTS), prompts_file="(none)", output_name="tiny",
                  if_exists="refuse")
    values.update(changes)
    with torch.inference_mode():  # as ComfyUI executes nodes
        distill_jobs = sys.modules[trainer_module.__name__.rsplit(".", 1)[0] + ".distill_jobs"]
        check = functools.partial(sys.modules[trainer_module.__package__ + ".inputs"].check_inputs,
                                  trainer_module.TDMDistillStart)
        return distill_jobs.start_job(manager, twin.comfy, _clip(twin.family), values, check_record=check)


def _recording_runtimes(trainer_module, monkeypatch) -> list:
    """The (runtime, teacher, grid) of every job runtime start_job builds from here on, in order."""
    built = []
    distill_jobs = sys.modules[trainer_module.__package__ + ".distill_jobs"]  # where start_job builds the runtime
    real = distill_jobs.job_runtime
    monkeypatch.setattr(distill_jobs, "job_runtime",
                        lambda *args, **kwargs: built.append(real(*args, **kwargs)) or built[-1])
    return built


def _old_settings(values: dict, record_settings: dict) -> dict:
    """job.json's settings as TDM Distill wrote them before jobs recorded their DistillConfig: its widget values (the
    inputs but the prompt sources), the prompt list, the recipe auto resolved, the two descriptions."""
    old = {k: v for k, v in values.items() if k not in ("prompts", "prompts_file")}
    return dict(old, prompt_list=list(PROMPTS), recipe_used=record_settings["config"]["recipe"],
                recipe_description=record_settings["recipe_description"],
                grid_description=record_settings["grid_description"])


def test_a_job_records_its_config_and_a_resume_keeps_it_when_the_recipe_changes(trainer_module, sd3_twin, tmp_path,
                                                                              monkeypatch):
    """job.json holds the DistillConfig the job learns (the one its checkpoint holds) and the ComfyUI-only options.
    A resume rebuilds from them: a recipe changed since changes nothing of the job, while an edit on the node (even
    to the recipe's new value) is still refused."""
    from tdm_core import recipes

    manager = jobs.JobManager(tmp_path)
    record = _start_job(trainer_module, monkeypatch, manager, sd3_twin, iterations=2, save_every=1)
    assert manager.wait(record.id, timeout=300).state == "finished"
    settings = manager.get(record.id).settings
    assert set(settings) == {"config", "comfy", "recipe_description", "grid_description"}
    assert settings["comfy"] == {"width": 64, "height": 64, "grid": "auto", "unconditional_prompt": "", "dtype": "auto",
                                 "offload": "train_on_cpu", "gradient_checkpointing": False, "frames": 33,
                                 # DEFAULTS' alpha 0 (= rank) is a change from the SD3 recipe's 64
                                 "recipe_changes": ["lora_rank 4", "lora_alpha None"]}  # frames: the node's default
    # recipe auto on an SD3 teacher: its family's (tdm_core/families.py)
    assert settings["recipe_description"].startswith("official_demo_ff_tau_lora_last_cosine_ema (")
    assert settings["grid_description"]
    checkpoint = tmp_path / jobs.JOBS_FOLDER / record.id / "checkpoints" / "step-00000002"
    assert json.loads((checkpoint / "config.json").read_text()) == settings["config"]  # one config, both places
    on_disk = json.loads((tmp_path / jobs.JOBS_FOLDER / record.id / jobs.RECORD_FILE).read_text())["settings"]
    assert on_disk == settings

    decay = settings["config"]["weight_decay"]
    monkeypatch.setitem(recipes.RECIPES[settings["config"]["recipe"]].values, "weight_decay",
                        recipes.Value(decay * 10, "demo"))
    built = _recording_runtimes(trainer_module, monkeypatch)
    _start_job(trainer_module, monkeypatch, manager, sd3_twin, iterations=3, save_every=1, if_exists="resume")
    assert built[0][0].config.weight_decay == decay
    resumed = manager.wait(record.id, timeout=300)
    assert resumed.state == "finished" and resumed.step == 3 and resumed.settings["config"]["weight_decay"] == decay
    with pytest.raises(ValueError, match=f"weight_decay {decay} → {decay * 10}"):
        _start_job(trainer_module, monkeypatch, manager, sd3_twin, iterations=4, weight_decay=decay * 10,
                   if_exists="resume")
    manager.close()


def test_micro_batch_is_how_a_job_runs_not_what_it_learns(trainer_module, sd3_twin, tmp_path, monkeypatch):
    """TDM Distill's micro_batch reaches the job's config and the runtime it trains with (the passes themselves:
    tests/test_micro_batch.py); a resume may change it (a memory setting, like gradient_checkpointing) and runs with
    the new value, and a workflow saved before the input existed (no
    micro_batch among its values) starts a job that runs every update in one pass."""
    manager = jobs.JobManager(tmp_path)
    built = _recording_runtimes(trainer_module, monkeypatch)
    record = _start_job(trainer_module, monkeypatch, manager, sd3_twin, iterations=2, save_every=1, batch_size=3,
                        micro_batch=2)
    assert manager.wait(record.id, timeout=300).state == "finished"
    assert manager.get(record.id).settings["config"]["micro_batch"] == 2
    assert built[-1][0].config.micro_batch == 2
    _start_job(trainer_module, monkeypatch, manager, sd3_twin, iterations=3, save_every=1, batch_size=3, micro_batch=1,
               if_exists="resume")
    assert built[-1][0].config.micro_batch == 1
    resumed = manager.wait(record.id, timeout=300)
    assert resumed.state == "finished" and resumed.step == 3 and resumed.settings["config"]["micro_batch"] == 1
    distill_jobs = sys.modules[trainer_module.__package__ + ".distill_jobs"]
    values = dict(DEFAULTS, prompts="\n".join(PROMPTS), output_name="tiny")
    values.pop("micro_batch", None)
    assert distill_jobs.settings_from_inputs(values, list(PROMPTS), "sd3").config.micro_batch == 0
    manager.close()


def test_a_record_written_before_the_config_was_recorded_still_resumes(trainer_module, sd3_twin, tmp_path,
                                                                     monkeypatch):
    """A stopped job's job.json in the shape written before (TDM Distill's widget values), written by hand beside its
    checkpoint: it is listed, an edit is refused by name, and the resume reaches the LoRA of a run that never
    stopped, its record written back in the current shape, equal to that run's."""
    straight = jobs.JobManager(tmp_path / "a")
    record = _start_job(trainer_module, monkeypatch, straight, sd3_twin, iterations=6, keep_last=1, save_every=2)
    assert straight.wait(record.id, timeout=300).state == "finished"
    expected = straight.get(record.id)
    straight.close()

    first = _stopping_at(jobs.JobManager(tmp_path / "b"), 3)
    values = dict(DEFAULTS, prompts="\n".join(PROMPTS), prompts_file="(none)", output_name="tiny",
                  if_exists="refuse", iterations=6, keep_last=1, save_every=2)
    interrupted = _start_job(trainer_module, monkeypatch, first, sd3_twin, **values)
    stopped = first.wait(interrupted.id, timeout=300)
    assert stopped.state == "stopped" and stopped.checkpoint_step == 3
    first.close()
    path = tmp_path / "b" / jobs.JOBS_FOLDER / interrupted.id / jobs.RECORD_FILE
    data = json.loads(path.read_text())
    data["settings"] = _old_settings(values, data["settings"])
    path.write_text(json.dumps(data))

    second = jobs.JobManager(tmp_path / "b")
    listed = second.list()
    assert [r.id for r in listed] == [interrupted.id] and listed[0].settings == data["settings"]
    assert "recipe: official_demo_ff_tau_lora_last_cosine_ema (" in listed[0].progress_text()
    with pytest.raises(ValueError, match="started with other settings: cfg 2.0 → 3.5"):
        _start_job(trainer_module, monkeypatch, second, sd3_twin, **dict(values, cfg=3.5, if_exists="resume"))
    _start_job(trainer_module, monkeypatch, second, sd3_twin, **dict(values, if_exists="resume"))
    resumed = second.wait(interrupted.id, timeout=300)
    assert resumed.state == "finished" and resumed.step == 6
    assert resumed.settings == expected.settings
    assert json.loads(path.read_text())["settings"] == expected.settings
    second.close()
    a = load_file(tmp_path / "a" / "tiny.safetensors")
    b = load_file(tmp_path / "b" / "tiny.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA differs"
    assert [h[1:] for h in resumed.history] == [h[1:] for h in expected.history]
