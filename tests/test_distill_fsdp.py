"""FSDP (`parallel = "fsdp"`, torch's `fully_shard`) for the headless trainer, on the CPU with gloo at 2 processes.

Tolerances: two processes reduce the gradients in another order than one process sums its batch (FSDP's
reduce-scatter averages two half-batch means; the gradient norm is summed over shards), so the numbers are the
one-process run's up to float32 round-off, carried through 4 AdamW updates: adapters atol 1e-6 on weights of ~0.13
(up to 1 % of a tensor's entries may take a round-off-decided step, within 1e-5: FLIP_SHARE below), losses rel 5e-4.
Measured on AVX2 CPUs: 2e-8 to 3e-7 on the adapters, 4e-6 relative on the losses; on AVX-512 (AMD EPYC) the figures
next to the constants. The optimiser's moments are compared more loosely (`OPT_STATE_TOL` of the largest moment of
that kind in the optimiser): with betas (0, 0.95) the first moment is the last clipped gradient itself, and the
pseudo-Huber loss with c = 1e-3 has a gradient whose slope reaches 1/c = 1000 at small residuals, so a 1e-8
round-off in a residual moves a gradient entry by 1e-5 (measured 2e-5 on entries up to 0.02 — exactly what a
2-process DDP run shows against one process). A resume on the same process count is bit-exact.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from test_distill_trainer import _run, _write_cli_config

from tdm_core.distill import DistillConfig, TDMTrainer, checkpoint, sharding
from tdm_core.distill.reference import TinyDenoiser, make_backend
from tdm_devkit.states import equal_states

ADAPTER_ATOL = 1e-6
# Round-off that decides an update: pseudo-Huber's slope reaches 1/c = 1000 at small residuals and AdamW's first steps
# with beta1 = 0 move each entry by about lr · sign(gradient), so an entry whose gradient is round-off-sized can take a
# different step when the sums run in another order. On AVX2 CPUs the DDP/FSDP runs were bit-equal; on an AMD EPYC
# with AVX-512 2 of 512 entries of one adapter differed by 4.5e-6. So at most FLIP_SHARE of a tensor's entries may
# exceed ADAPTER_ATOL, and none FLIP_ATOL.
FLIP_SHARE = 0.01
FLIP_ATOL = 1e-5
# Both tolerances were measured at the official demo's student rate; that update moves each entry by about lr, so a
# round-off-sized difference grows with it: a student at a higher rate (recipe auto trains Flux-dev's at the fake
# score's 1e-4) gets them scaled by its rate over this one (measured: the Flux run below, its student at 1e-4, had 2 of
# 128 entries of one adapter beyond 1e-6; the same run with the student at 2e-5 passed the unscaled check).
CALIBRATED_STUDENT_LR = 2e-5
# The generator loss is a pseudo-Huber of f − r, two nearly equal predictions (the fake score is the teacher plus a
# young adapter), so its relative round-off is theirs times |r| / |f − r|: measured 4e-6 on AVX2, 1.8e-4 on AVX-512
# (one process's checkpoint resumed sharded). A wrong computation moves it by orders of magnitude more.
LOSS_RTOL = 5e-4
OPT_STATE_TOL = 5e-3


def _assert_adapter_close(got: torch.Tensor, want: torch.Tensor, name: str, scale: float = 1.0) -> None:
    """Every entry within FLIP_ATOL, all but FLIP_SHARE of them within ADAPTER_ATOL (both times `scale`)."""
    torch.testing.assert_close(got, want, rtol=0, atol=FLIP_ATOL * scale, msg=lambda m: f"{name}: {m}")
    atol = ADAPTER_ATOL * scale
    beyond = int(((got - want).abs() > atol).sum())
    assert beyond <= FLIP_SHARE * want.numel(), f"{name}: {beyond} of {want.numel()} entries differ by > {atol}"


def _torchrun(config: Path, *extra: str):
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                 "127.0.0.1", "--master_port", str(port), "-m", "tdm_core.distill", "--config", str(config),
                 "--no-progress", *extra])


def _one_process(config: Path, *extra: str):
    return _run([sys.executable, "-m", "tdm_core.distill", "--config", str(config), "--no-progress", *extra])


def _summary(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _assert_close_states(got: dict, want: dict) -> None:
    """Adapters and optimiser states of two checkpoints agree within round-off, in one format (full tensors of the
    same names, indices and shapes)."""
    student_lr = DistillConfig.from_dict(want["config"]).student_learning_rate()
    scales = {"student": max(1.0, student_lr / CALIBRATED_STUDENT_LR), "fake": 1.0}
    scales["student_ema"] = scales["student"]
    assert ("student_ema" in got) == ("student_ema" in want)
    for adapter in ("student", "fake", *(("student_ema",) if "student_ema" in want else ())):
        assert got[adapter].keys() == want[adapter].keys()
        for key in want[adapter]:
            _assert_adapter_close(got[adapter][key], want[adapter][key], f"{adapter}.{key}", scales[adapter])
        assert any(not torch.equal(t, torch.zeros_like(t)) for t in want[adapter].values())  # trained, not B = 0
    for name in ("opt_gen", "opt_fake"):
        assert got[name]["param_groups"] == want[name]["param_groups"]
        assert got[name]["state"].keys() == want[name]["state"].keys()
        scales: dict[str, float] = {}
        for entries in want[name]["state"].values():
            for key, value in entries.items():
                if value.dim():
                    scales[key] = max(scales.get(key, 0.0), float(value.abs().max()))
        for index, entries in want[name]["state"].items():
            for key, value in entries.items():
                if not value.dim():  # AdamW's step count: exact
                    assert got[name]["state"][index][key] == value, (name, index, key)
                    continue
                # against the largest moment of that kind in the optimiser: round-off follows the magnitudes summed,
                # and a tensor whose gradient is itself round-off-sized (~1e-10 beside 1e-2) has no digits to compare
                atol = OPT_STATE_TOL * scales[key]
                torch.testing.assert_close(got[name]["state"][index][key], value, rtol=0, atol=atol,
                                           msg=lambda m, where=(name, index, key): f"{where}: {m}")


def _assert_close_losses(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want, strict=True):
        for key in ("loss_gen", "loss_fake"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), (a["step"], key)


# The data-parallel test's two recipes (tests/test_distill_trainer.py): the official draws, and Flow-Factory's (every
# step of each sample, two fake updates, clipped fake gradients and importance weights, logit-normal τ). The official
# one also previews and checkpoints mid-run, both collective under FSDP, and clips the student's gradient where it
# binds (its norm is about 0.5 here), so that the clipping of the sharded gradients is checked; it keeps a moving
# average of the student (each process of its shards), which the previews, the checkpoints and the LoRA use.
@pytest.mark.parametrize("recipe", [{"preview_every": 2, "checkpoint_every": 2, "grad_clip": 0.1, "student_ema": 0.5},
                                    {"recipe": "flow_factory_sd35", "fake_updates": 2, "lora_alpha": None,
                                     "preview_every": 0, "checkpoint_every": 0}],
                         ids=["official", "flow_factory"])
def test_fsdp_two_processes_match_one_process_on_the_combined_batch(tmp_path, recipe):
    settings = dict(lora_rank=4, parallel="fsdp", **recipe)
    one_summary = _summary(_one_process(_write_cli_config(tmp_path / "one.json", tmp_path / "one", **settings)))
    two_summary = _summary(_torchrun(_write_cli_config(tmp_path / "two.json", tmp_path / "two", **settings)))
    assert one_summary["world_size"] == 1 and one_summary["sharded"] is False  # one process: unsharded (config.py)
    assert two_summary["world_size"] == 2 and two_summary["sharded"] is True
    # the sharding is real: each process holds about half of the frozen teacher, the two halves make it whole
    (total,) = one_summary["local_base_parameters"]
    halves = two_summary["local_base_parameters"]
    assert len(halves) == 2 and sum(halves) == total, halves
    assert all(0.4 * total <= h <= 0.6 * total for h in halves), halves
    one, two = checkpoint.load_checkpoint(tmp_path / "one"), checkpoint.load_checkpoint(tmp_path / "two")
    assert one["step"] == two["step"] == 4
    _assert_close_states(two, one)
    _assert_close_losses(_metrics(tmp_path / "two"), _metrics(tmp_path / "one"))
    # the LoRA file process 0 wrote after gathering the sharded student is the whole adapter
    lora = tmp_path / "two" / "student_lora.safetensors"
    from safetensors.torch import load_file

    assert {k: v.shape for k, v in load_file(lora).items()} == {
        k: v.shape for k, v in load_file(tmp_path / "one" / "student_lora.safetensors").items()}
    if recipe.get("preview_every"):
        for run in ("one", "two"):
            assert sorted(p.name for p in (tmp_path / run / "previews").glob("*.pt")) == [
                "step_00000000.pt", "step_00000002.pt", "step_00000004.pt"]
        torch.testing.assert_close(torch.load(tmp_path / "two" / "previews" / "step_00000004.pt")["x0"],
                                   torch.load(tmp_path / "one" / "previews" / "step_00000004.pt")["x0"],
                                   rtol=1e-4, atol=1e-5)


def test_fsdp_in_passes_matches_one_process_in_one_pass(tmp_path):
    """`micro_batch` under FSDP: each process runs its rows of every update in passes of 3 (Flow-Factory's recipe, all
    four steps per sample: 8 rows a process, passes of 3, 3 and 2, each forward and backward collective), and the run
    is the one-process run with every update in one pass, up to the tolerances above."""
    settings = dict(lora_rank=4, parallel="fsdp", recipe="flow_factory_sd35", fake_updates=2, lora_alpha=None,
                    preview_every=0, checkpoint_every=0)
    _one_process(_write_cli_config(tmp_path / "one.json", tmp_path / "one", **settings))
    two_summary = _summary(_torchrun(_write_cli_config(tmp_path / "two.json", tmp_path / "two", micro_batch=3,
                                                       **settings)))
    assert two_summary["world_size"] == 2 and two_summary["sharded"] is True
    one, two = checkpoint.load_checkpoint(tmp_path / "one"), checkpoint.load_checkpoint(tmp_path / "two")
    assert one["step"] == two["step"] == 4 and two["config"]["micro_batch"] == 3
    _assert_close_states(two, one)
    _assert_close_losses(_metrics(tmp_path / "two"), _metrics(tmp_path / "one"))


def test_fsdp_shards_a_diffusers_unet_with_gradient_checkpointing_by_its_blocks(tmp_path):
    """A diffusers UNet (SD1.5's layout, tiny, float32; tdm_devkit.bench_teachers) with gradient checkpointing: its
    down/mid/up blocks are the units, and recomputing a checkpointed block in the backward pass gathers it again. Equal
    to one process within 3e-6 (measured 6e-7; data parallelism 3e-7: its convolutions sum many more products)."""
    settings = dict(lora_rank=4, parallel="fsdp", preview_every=0, checkpoint_every=0, iterations=2,
                    teacher={"factory": "tdm_devkit.bench_teachers:sd15_unet", "size": "tiny", "dtype": "float32"})
    one_summary = _summary(_one_process(_write_cli_config(tmp_path / "one.json", tmp_path / "one", **settings)))
    two_summary = _summary(_torchrun(_write_cli_config(tmp_path / "two.json", tmp_path / "two", **settings)))
    (total,) = one_summary["local_base_parameters"]
    assert sum(two_summary["local_base_parameters"]) == total
    assert all(0.4 * total <= h <= 0.6 * total for h in two_summary["local_base_parameters"])
    one, two = checkpoint.load_checkpoint(tmp_path / "one"), checkpoint.load_checkpoint(tmp_path / "two")
    for adapter in ("student", "fake"):
        for key in one[adapter]:
            torch.testing.assert_close(two[adapter][key], one[adapter][key], rtol=0, atol=3e-6)
    _assert_close_losses(_metrics(tmp_path / "two"), _metrics(tmp_path / "one"))


def test_fsdp_over_a_bfloat16_teacher_computes_what_data_parallelism_does(tmp_path):
    """bf16 base, float32 adapters in the same units: FSDP all-gathers the unit's mixed dtypes as bytes. Against
    data parallelism on the same 2 processes (the same half-batches, so the same bf16 matmuls; one process on the
    whole batch differs by bf16 round-off, ~2e-4 here), within float32 round-off (measured: bit-equal)."""
    settings = dict(lora_rank=4, dtype="bfloat16", preview_every=0, checkpoint_every=0)
    _torchrun(_write_cli_config(tmp_path / "ddp.json", tmp_path / "ddp", **settings))
    assert _summary(_torchrun(_write_cli_config(tmp_path / "fsdp.json", tmp_path / "fsdp", parallel="fsdp",
                                                **settings)))["sharded"]
    _assert_close_states(checkpoint.load_checkpoint(tmp_path / "fsdp"), checkpoint.load_checkpoint(tmp_path / "ddp"))
    _assert_close_losses(_metrics(tmp_path / "fsdp"), _metrics(tmp_path / "ddp"))


def _assert_fsdp_is_ddp_with_half_the_teacher(tmp_path: Path, settings: dict) -> None:
    """The same run on 2 processes, data-parallel and sharded: each rank holds about half of the teacher, and the
    adapters, optimiser states and losses agree within round-off."""
    ddp = _summary(_torchrun(_write_cli_config(tmp_path / "ddp.json", tmp_path / "ddp", **settings)))
    fsdp = _summary(_torchrun(_write_cli_config(tmp_path / "fsdp.json", tmp_path / "fsdp", parallel="fsdp",
                                                **settings)))
    whole = ddp["local_base_parameters"][0]
    assert fsdp["sharded"] and sum(fsdp["local_base_parameters"]) == whole
    assert all(0.4 * whole <= h <= 0.6 * whole for h in fsdp["local_base_parameters"])
    _assert_close_states(checkpoint.load_checkpoint(tmp_path / "fsdp"), checkpoint.load_checkpoint(tmp_path / "ddp"))
    _assert_close_losses(_metrics(tmp_path / "fsdp"), _metrics(tmp_path / "ddp"))


def test_fsdp_on_comfyui_files_computes_what_data_parallelism_does(tmp_path):
    """The teacher most headless runs train: ComfyUI model files (a tiny SD3 MMDiT and a random CLIP-L, tdm_comfy's
    backend, ComfyUI's own network with its gradient checkpointing), sharded by its joint blocks. Against data
    parallelism on the same 2 processes within float32 round-off (measured: bit-equal; one process on the whole
    batch differs from both by ~1.5e-6, ComfyUI's attention rounding by batch)."""
    from tdm_devkit import comfy_files, comfy_runtime

    base = comfy_files.write_models(tmp_path / "base")
    settings = dict(prompts=["a cat", "a dog"], family="sd3", recipe="auto", iterations=2, lora_rank=4,
                    batch_size=2, preview_every=0, checkpoint_every=0,
                    teacher={"factory": "tdm_comfy.teacher:make_backend", "comfyui_dir": str(comfy_runtime.comfyui_dir()),
                             "base_directory": str(base), "comfyui_args": {"use_pytorch_cross_attention": True},
                             "diffusion_model": comfy_files.TINY_SD3_FILE, "text_encoders": [comfy_files.CLIP_L_FILE],
                             "clip_type": "sd3", "width": 64, "height": 64, "gradient_checkpointing": True})
    _assert_fsdp_is_ddp_with_half_the_teacher(tmp_path, settings)


def test_fsdp_on_a_flux_folder_computes_what_data_parallelism_does(tmp_path):
    """Flux-dev (a diffusers folder): its double and single blocks as FSDP units, latents packed in the teacher's call,
    guidance as an input. Against data parallelism on the same 2 processes (measured: bit-equal; one process on the
    whole batch differs from both by ~2.4e-5 on the student, pseudo-Huber's c = 1e-3 amplifying round-off)."""
    from tdm_devkit import diffusers_image_tiny

    folder = diffusers_image_tiny.save_flux_folder(tmp_path / "flux")
    # cfg 1: Flux-dev's (recipe auto's), over _write_cli_config's 3 for the reference network. fake_samples "step" and
    # no average: the draws these tolerances were measured with. Recipe auto's own (the fake score on the output) put
    # more of the student's residuals at round-off size, where pseudo-Huber's slope turns that into a whole AdamW step
    # (measured: 3 of 128 entries of one adapter beyond 5e-6, the largest 1.35e-4 at lr 1e-4; with the MSE loss, at
    # most 3.9e-6); the output draws under FSDP are checked bit for bit by the resume test below.
    settings = dict(prompts=["a cat", "a dog"], family="flux", recipe="auto", cfg=1.0, iterations=2, lora_rank=4,
                    batch_size=2, preview_every=0, checkpoint_every=0, fake_samples="step", student_ema=0.0,
                    teacher={"factory": "tdm_core.distill.diffusers_folder:make_backend", "folder": str(folder),
                             "device": "cpu", "height": 16, "width": 16})
    _assert_fsdp_is_ddp_with_half_the_teacher(tmp_path, settings)


def test_fsdp_resume_equals_an_uninterrupted_run_and_moves_between_process_counts(tmp_path):
    """A 2-process FSDP run stopped at step 2 and resumed to step 4 is bit for bit the uninterrupted run (with the
    student's average and the fake score fitted to the output); its step-2 checkpoint (full tensors) continued in one
    process ends within round-off of it."""
    settings = dict(lora_rank=4, parallel="fsdp", preview_every=0, checkpoint_every=2, iterations=4, student_ema=0.5,
                    fake_samples="output")
    straight = _write_cli_config(tmp_path / "straight.json", tmp_path / "straight", **settings)
    _torchrun(straight)
    stopped = _write_cli_config(tmp_path / "stopped.json", tmp_path / "stopped", **(settings | {"iterations": 2}))
    _torchrun(stopped)
    assert checkpoint.load_checkpoint(tmp_path / "stopped")["step"] == 2
    assert _summary(_torchrun(stopped, "--resume", "--iterations", "4"))["step"] == 4
    want, got = checkpoint.load_checkpoint(tmp_path / "straight"), checkpoint.load_checkpoint(tmp_path / "stopped")
    for name in ("student", "fake", "opt_gen", "opt_fake", "lr_schedule", "lr_schedule_fake", "generator_rng",
                 "student_ema", "student_ema_updates"):
        assert equal_states(got[name], want[name]), name
    timeless = [[{k: v for k, v in m.items() if k != "seconds"} for m in _metrics(tmp_path / run)]
                for run in ("straight", "stopped")]
    assert timeless[1] == timeless[0] and len(timeless[0]) == 4
    # the sharded run's step-2 checkpoint, continued by one process
    middle = tmp_path / "middle"
    shutil.copytree(tmp_path / "straight" / "checkpoint-00000002", middle)
    _one_process(straight, "--resume", str(middle), "--output-dir", str(tmp_path / "single"))
    single = checkpoint.load_checkpoint(tmp_path / "single")
    assert single["step"] == 4
    _assert_close_states(single, want)
    _assert_close_losses(_metrics(tmp_path / "single"), _metrics(tmp_path / "straight")[2:])


def test_a_one_process_checkpoint_resumes_sharded(tmp_path):
    """A checkpoint of one process (a ComfyUI job's layout is the same format) resumes under FSDP at 2 processes and
    ends within round-off of the one-process run."""
    settings = dict(lora_rank=4, parallel="fsdp", preview_every=0, checkpoint_every=2, iterations=4, cfg=1.0)
    config = _write_cli_config(tmp_path / "one.json", tmp_path / "one", **settings)
    _one_process(config)
    middle = tmp_path / "middle"
    shutil.copytree(tmp_path / "one" / "checkpoint-00000002", middle)
    assert _summary(_torchrun(config, "--resume", str(middle), "--output-dir", str(tmp_path / "two")))["sharded"]
    _assert_close_states(checkpoint.load_checkpoint(tmp_path / "two"), checkpoint.load_checkpoint(tmp_path / "one"))
    _assert_close_losses(_metrics(tmp_path / "two"), _metrics(tmp_path / "one")[2:])


def test_fsdp_in_one_process_trains_unsharded_exactly_as_ddp():
    """No process group: nothing to shard across, so "fsdp" is the data-parallel trainer, bit for bit."""
    config = dict(prompts=["a cat", "a dog"], batch_size=2, total_steps=900, lora_rank=4, seed=1, cfg=3.0)
    plain = TDMTrainer(make_backend(lora_rank=4), DistillConfig(**config))
    fsdp = TDMTrainer(make_backend(lora_rank=4), DistillConfig(parallel="fsdp", **config))
    assert not fsdp.sharded and not any(sharding.is_sharded(p) for p in fsdp.student_params)
    plain.train(2)
    fsdp.train(2)
    assert equal_states(fsdp.state_dict() | {"config": None}, plain.state_dict() | {"config": None})


def test_the_sharding_plan_takes_repeated_blocks_else_the_top_level_children():
    """Each element of a known block list is a unit (diffusers' and ComfyUI's names), a network without any has its
    parameter-holding children as units; the root holds what is left."""
    tiny = TinyDenoiser()
    assert sharding.shard_units(tiny) == [tiny.in_proj, tiny.mid, tiny.out_proj]

    class Flux(torch.nn.Module):  # ComfyUI's Flux layout: two block lists and loose layers
        def __init__(self):
            super().__init__()
            self.img_in = torch.nn.Linear(4, 4)
            self.double_blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
            self.single_blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    flux = Flux()
    assert sharding.shard_units(flux) == [*flux.double_blocks, *flux.single_blocks]

    class UNet(torch.nn.Module):  # diffusers' UNet2DConditionModel layout: a single mid block among the lists
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(4, 4, 1)
            self.down_blocks = torch.nn.ModuleList(torch.nn.Conv2d(4, 4, 1) for _ in range(2))
            self.mid_block = torch.nn.Conv2d(4, 4, 1)
            self.up_blocks = torch.nn.ModuleList([torch.nn.Conv2d(4, 4, 1), torch.nn.Identity()])

    unet = UNet()
    assert sharding.shard_units(unet) == [*unet.down_blocks, unet.mid_block, unet.up_blocks[0]]
    assert sharding.shard_units(flux, ("single_blocks",)) == list(flux.single_blocks)  # a backend's own names


def test_a_full_optimiser_state_is_sharded_as_its_parameters_and_left_alone_unsharded():
    """Without a process group the parameters are plain tensors: the full state is the state (the sharded path is
    the 2-process tests')."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert equal_states(sharding.full_optimizer_state(optimizer), state)
    assert equal_states(sharding.sharded_optimizer_state(state, params), state)
