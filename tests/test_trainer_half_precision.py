"""The TDM trainer over a bf16/fp16 teacher, as GPU users run it: headless (`python -m tdm_core.distill`) and as a
ComfyUI job. What must hold in every dtype: the network is given exactly the schedule's timesteps (float32, never
rounded to the half dtype), adapters, gradients and AdamW state are float32, the base runs in half precision under
autocast, fp16 scales its losses, and a non-finite update never reaches a saved LoRA or checkpoint."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tdm_core.distill import DiscreteSchedule, DistillConfig, TDMTrainer, cli
from tdm_core.distill.backend import diffusers_backend
from tdm_core.distill.trainer import MAX_SKIPPED_IN_A_ROW, NonFiniteTrainingError
from tdm_devkit import twins

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _sd15_backend(seed: int = 0):
    unet = twins.sd15_diffusers_unet(seed)

    def encode(prompts):
        return {"encoder_hidden_states": torch.cat([twins.tiny_text_embedding("sd15", p)[0] for p in prompts])}

    return diffusers_backend(unet, schedule=DiscreteSchedule.scaled_linear(), encode=encode, latent_shape=(4, 8, 8),
                             lora_rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _sd3_backend(seed: int = 0):
    transformer = twins.sd3_diffusers_transformer(seed)

    def encode(prompts):
        pairs = [twins.tiny_text_embedding("sd3", p) for p in prompts]
        return {"encoder_hidden_states": torch.cat([c for c, _ in pairs]),
                "pooled_projections": torch.cat([p for _, p in pairs])}

    # SD3's training table at shift 3: the network is fed σ·1000, which is not an integer (e.g. 947.17…)
    return diffusers_backend(transformer, schedule=DiscreteSchedule.flow(shift=3.0), encode=encode,
                             latent_shape=(twins.SD3_LATENT_CHANNELS, 16, 16), lora_rank=4)


class NetworkCalls:
    """The timesteps (values and dtypes) a module is called with, and the dtype of its first Linear's output (which
    is the autocast dtype when the base runs in half precision)."""

    def __init__(self, network: torch.nn.Module, timestep_kwarg: str | None):
        self.timesteps, self.dtypes, self.linear_dtypes = [], set(), set()

        def record(module, args, kwargs):
            t = kwargs[timestep_kwarg] if timestep_kwarg else args[1]
            self.timesteps.extend(t.reshape(-1).tolist())
            self.dtypes.add(t.dtype)

        network.register_forward_pre_hook(record, with_kwargs=True)
        first_linear = next(m for m in network.modules() if isinstance(m, torch.nn.Linear))
        first_linear.register_forward_hook(lambda m, a, out: self.linear_dtypes.add(out.dtype))


# The SD1.5 UNet's half-precision convolutions and their backward are slow on the CPU (~20 s a step here): it runs
# in bf16, the MMDiT in both dtypes.
@pytest.mark.parametrize("family,dtype_name", [("sd15", "bfloat16"), ("sd3", "bfloat16"), ("sd3", "float16")])
def test_half_precision_teacher_float32_adapters_exact_timesteps(family, dtype_name):
    dtype = HALF[dtype_name]
    backend = _sd15_backend() if family == "sd15" else _sd3_backend()
    calls = NetworkCalls(backend.model, None if family == "sd15" else "timestep")
    config = DistillConfig(prompts=["a cat", "a dog"], dtype=dtype_name, lora_rank=4, cfg=2.0, seed=3,
                           total_steps=900)
    trainer = TDMTrainer(backend, config)
    assert backend.compute_dtype == dtype
    assert all(p.dtype == dtype for n, p in backend.model.named_parameters() if ".lora_" not in n)
    trainable = trainer.student_params + trainer.fake_params
    assert trainable and all(p.dtype == torch.float32 for p in trainable)

    metrics = trainer.step()
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss_fake", "loss_gen", "grad_norm_gen"))
    # the rollout's calls walk the grid, exactly; every other call is a table entry, exactly
    table = backend.schedule.model_timesteps.float()
    grid_values = [float(table[t]) for t in trainer.grid]
    rollout_calls = int(metrics["student_steps"])
    assert 1 <= rollout_calls <= len(grid_values)
    assert calls.timesteps[:rollout_calls] == grid_values[:rollout_calls]
    assert set(calls.timesteps) <= set(table.tolist())
    assert calls.dtypes == {torch.float32}
    if family == "sd15":
        assert grid_values == [899.0, 674.0, 449.0, 224.0]  # bf16 would give 900, 676, 448, 224
    else:
        assert any(v != round(v) for v in grid_values)  # σ·1000 of the flow table, not rounded
    assert calls.linear_dtypes == {dtype}  # the base runs under autocast in the half dtype

    # adapters learned, their gradients and AdamW moments are float32
    assert metrics["skipped_gen"] == 0 and metrics["skipped_fake"] == 0
    for optimizer in (trainer.opt_fake, trainer.opt_gen):
        states = [s for s in optimizer.state.values() if s]
        assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert any(p.abs().sum() > 0 for n, p in backend._params["student"] if ".lora_B." in n)
    assert (metrics.get("loss_scale") is not None) == (dtype == torch.float16)


def test_non_finite_updates_are_skipped_and_never_saved(tmp_path):
    """A poisoned teacher output (NaN in the generator target) skips that update: the student's weights are those of
    the step before, the checkpoint written afterwards holds only finite numbers; too many in a row end training."""
    from tdm_core.distill import checkpoint
    from tdm_core.distill.reference import make_backend

    backend = make_backend(parametrisation="eps")
    config = DistillConfig(prompts=["a cat"], dtype="bfloat16", lora_rank=4, cfg=1.0, seed=5, total_steps=900,
                           keep_last=1)
    trainer = TDMTrainer(backend, config)
    trainer.step()
    call = backend._call

    def nan_teacher(model, x, t, cond):
        out = call(model, x, t, cond)
        return out * float("nan") if backend._active == "teacher" else out

    backend._call = nan_teacher
    before = {n: p.detach().clone() for n, p in backend._params["student"]}
    metrics = trainer.step()
    assert metrics["skipped_gen"] == 1 and metrics["skipped_fake"] == 0
    assert all(torch.equal(before[n], p) for n, p in backend._params["student"])
    path = checkpoint.save_checkpoint(trainer, tmp_path)
    state = torch.load(path / checkpoint.STATE_FILE, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["student"].values())

    with pytest.raises(NonFiniteTrainingError, match="in a row had a non-finite loss"):
        for _ in range(MAX_SKIPPED_IN_A_ROW + 1):
            trainer.step()


def test_adapter_weights_turning_non_finite_end_training_before_any_save(tmp_path):
    """A learning rate that overflows the float32 adapters (finite loss and gradients): the CLI stops with the
    reason, and the files on disk are the last good ones."""
    config = {"prompts": ["a cat"], "dtype": "bfloat16", "iterations": 3, "checkpoint_every": 1, "preview_every": 0,
              "lr": 1e38, "lora_rank": 2, "cfg": 1.0, "output_dir": str(tmp_path / "run"),
              "teacher": {"factory": "tdm_core.distill.reference:make_backend", "parametrisation": "eps"}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    code = cli.main(["--config", str(tmp_path / "run.json"), "--no-progress"])
    assert code == 3
    assert not (tmp_path / "run" / "student_lora.safetensors").exists()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("dtype_name", list(HALF))
def test_headless_cli_trains_in_half_precision(tmp_path, dtype_name, capsys):
    config = {"prompts": ["a cat", "a dog"], "dtype": dtype_name, "iterations": 4, "checkpoint_every": 2,
              "preview_every": 0, "lora_rank": 2, "cfg": 2.0, "output_dir": str(tmp_path / "run"),
              "teacher": {"factory": "tdm_core.distill.reference:make_backend", "parametrisation": "eps"}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert cli.main(["--config", str(tmp_path / "run.json"), "--no-progress"]) == 0
    lora = load_file(tmp_path / "run" / "student_lora.safetensors")
    assert lora and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert ("loss_scale" in logged[-1]) == (dtype_name == "float16")
    # resume in the same dtype continues from the checkpoint (the loss scale included)
    assert cli.main(["--config", str(tmp_path / "run.json"), "--no-progress", "--resume", "--iterations", "6"]) == 0


# --- the ComfyUI job path --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_module(pack):
    return sys.modules[pack.__name__ + ".nodes.trainer"]


@pytest.mark.parametrize("dtype_name", list(HALF))
def test_comfyui_job_in_half_precision_feeds_exact_timesteps(trainer_module, sd3_twin, tmp_path, dtype_name):
    """TDM Distill's `dtype` bfloat16/float16 on an SD3 MODEL: the teacher copy is half, adapters float32, the
    MMDiT receives the pinned grid's integer timesteps 999/947/856/666 in float32, and a job through the job
    manager finishes with a finite LoRA."""
    from test_trainer_backend import _runtime

    from tdm_core import jobs

    runtime, _, _ = _runtime(trainer_module, sd3_twin, dtype=dtype_name)
    network = runtime.backend.model
    assert runtime.backend.compute_dtype == HALF[dtype_name]
    assert all(p.dtype == torch.float32 for p in runtime.backend.trainable_parameters("student"))
    seen = []
    network.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[1].clone()), with_kwargs=True)
    manager = jobs.JobManager(tmp_path / "loras")
    try:
        record = manager.submit("half", runtime, 2, save_every=1, keep_last=1, preview_every=0)
        finished = manager.wait(record.id, timeout=300)
    finally:
        manager.close()
    assert finished.state == "finished", finished.message
    # every call gets an exact float32 entry of the training table, whose grid entries are the sampler's integers;
    # each iteration's rollout starts at the top of the grid
    table = runtime.backend.schedule.model_timesteps.float()
    assert [float(table[t]) for t in runtime.config.timesteps] == [999.0, 947.0, 856.0, 666.0]
    assert {float(t[0]) for t in seen} <= set(table.tolist())
    assert float(seen[0][0]) == 999.0
    assert {t.dtype for t in seen} == {torch.float32}
    lora = load_file(tmp_path / "loras" / "half.safetensors")
    assert all(torch.isfinite(v).all() for v in lora.values())
