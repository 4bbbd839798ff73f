"""The TDM trainer on the tiny reference teacher: what one iteration changes, resume, crash safety, export, CLI, DDP."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tdm_core import lora as tdm_lora
from tdm_core.distill import DistillConfig, TDMTrainer, checkpoint
from tdm_core.distill.reference import make_backend
from tdm_devkit.states import equal_states

REPO = Path(__file__).resolve().parents[1]


def _config(**kw):
    base = dict(prompts=["a cat", "a dog", "a bird"], batch_size=4, total_steps=900, lora_rank=4, seed=3)
    base.update(kw)
    return DistillConfig(**base)


def _snapshot(backend):
    return {a: backend.adapter_state_dict(a) for a in ("student", "fake")} | {"teacher": backend.teacher_state_dict()}


def _changed(before, after):
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "parametrisation, overrides",
    [("eps", {}), ("v", {"randmid": True, "cfg": 4.5}), ("flow", {"tau_mode": "shared", "generator_loss": "mse"})],
)
def test_one_iteration_changes_only_the_adapters(parametrisation, overrides):
    backend = make_backend(parametrisation=parametrisation, lora_rank=4)
    trainer = TDMTrainer(backend, _config(**overrides))
    before = _snapshot(backend)
    metrics = trainer.step()
    after = _snapshot(backend)
    assert not _changed(before["teacher"], after["teacher"])
    assert _changed(before["student"], after["student"])
    assert _changed(before["fake"], after["fake"])
    for key in ("loss_fake", "loss_gen", "grad_norm_gen", "is_weight", "w_mean"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["lr_gen"] == pytest.approx(trainer.config.lr / 5)
    assert trainer.opt_gen.param_groups[0]["betas"] == (0.0, 0.95)
    assert trainer.opt_gen.param_groups[0]["weight_decay"] == 1e-2


def test_full_mode_trains_separate_copies():
    backend = make_backend(parametrisation="eps", mode="full")
    trainer = TDMTrainer(backend, _config(mode="full"))
    teacher = backend.teacher_state_dict()
    student = backend.adapter_state_dict("student")
    assert set(student) == set(teacher)  # a whole copy
    trainer.step()
    assert not _changed(teacher, backend.teacher_state_dict())
    assert _changed(student, backend.adapter_state_dict("student"))


def test_fresh_student_samples_like_the_teacher_and_student_changes_after_training():
    backend = make_backend(parametrisation="eps", lora_rank=4)
    trainer = TDMTrainer(backend, _config(lr=1e-2))
    student = trainer.sample(["a cat", "a dog"], seed=7)
    teacher = trainer.sample(["a cat", "a dog"], seed=7, adapter="teacher")
    assert student.shape == (2, *backend.latent_shape)
    torch.testing.assert_close(student, teacher)  # LoRA B = 0 at start: student = teacher
    assert torch.equal(student, trainer.sample(["a cat", "a dog"], seed=7))
    trainer.train(3)
    assert trainer.step_count == 3
    assert not torch.allclose(trainer.sample(["a cat", "a dog"], seed=7), teacher)


def test_many_step_sampling_spreads_its_steps_down_to_the_end():
    """trainer.sample(steps=N) on a grid whose top N does not divide (SD3's release grid starts at 998): the steps
    spread evenly down to t = 19, not the demo rule's t = 67, whose one last jump to x̂0 (σ 0.18 → 0 at shift 3)
    made the SD3 toys' 50-step samples 4.5 % narrower than the teacher's own distribution."""
    backend = make_backend(parametrisation="flow", lora_rank=4)
    trainer = TDMTrainer(backend, _config(timesteps=[998, 856, 665, 399]))
    assert trainer.sample_grid() == [998, 856, 665, 399]
    fine = trainer.sample_grid(50)
    assert (len(fine), fine[0], fine[-1]) == (50, 998, 19)
    assert trainer.sample(["a cat"], steps=50, seed=3).shape == (1, *backend.latent_shape)


def test_an_adapter_state_of_another_shape_is_refused_before_anything_is_written():
    """A checkpoint's adapter of another rank would be broadcast by copy_ into a wrong adapter without a word."""
    backend = make_backend(parametrisation="eps", lora_rank=4)
    before = backend.adapter_state_dict("student")
    narrow = {name: tensor[:1] if name.endswith("lora_A.weight") or ".lora_A." in name else tensor
              for name, tensor in before.items()}
    assert any(narrow[n].shape != before[n].shape for n in before)  # the rank-1 tensors copy_ would broadcast
    with pytest.raises(ValueError, match=r"adapter 'student' state does not match the model: .* has shape"):
        backend.load_adapter_state_dict("student", narrow)
    after = backend.adapter_state_dict("student")
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_generator_gradient_is_clipped_to_one():
    backend = make_backend(parametrisation="eps", lora_rank=4)
    trainer = TDMTrainer(backend, _config(grad_clip=1e-6, generator_loss="mse"))
    norms = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        total = original(params, max_norm, *a, **k)
        norms.append((total.item(), torch.cat([p.grad.flatten() for p in params]).norm().item()))
        return total

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        trainer.step()
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    (before, after), = norms
    assert before > 1e-6 and after == pytest.approx(1e-6, rel=1e-3)


def test_resume_reproduces_an_uninterrupted_run_bit_exactly(tmp_path):
    config = _config(randmid=True, cfg=3.0, lr_warmup_steps=4)
    straight = TDMTrainer(make_backend(parametrisation="v", lora_rank=4), config)
    straight.train(6)

    first = TDMTrainer(make_backend(parametrisation="v", lora_rank=4), config)
    first.train(3)
    first.save_checkpoint(tmp_path)
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint restores it
    resumed = TDMTrainer.resume(tmp_path, make_backend(parametrisation="v", lora_rank=4))
    assert resumed.step_count == 3
    resumed.train(6)
    for adapter in ("student", "fake"):
        a, b = straight.backend.adapter_state_dict(adapter), resumed.backend.adapter_state_dict(adapter)
        assert all(torch.equal(a[k], b[k]) for k in a), adapter
    sa, sb = straight.opt_gen.state_dict()["state"], resumed.opt_gen.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


def test_student_ema_is_what_the_run_samples_and_saves_and_it_resumes_exactly(tmp_path):
    """student_ema d: after the n-th student update the average is d_n·ema + (1 − d_n)·weights with d_n = min(d,
    (n − 1) / n) (the plain average of the first updates); samples and the saved LoRA are the average's, training goes
    on from the weights themselves, and a resumed run continues the same average."""
    config = _config(student_ema=0.6, lr=1e-2)
    trainer = TDMTrainer(make_backend(parametrisation="v", lora_rank=4), config)
    expected = None
    for n in range(1, 5):
        trainer.step()
        weights = [p.detach().clone() for p in trainer.student_params]
        decay = min(0.6, (n - 1) / n)
        expected = weights if expected is None else [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
    assert trainer.student_ema_updates == 4
    for average, want in zip(trainer.student_ema, expected, strict=True):
        torch.testing.assert_close(average, want, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, w) for a, w in zip(trainer.student_ema, weights, strict=True))  # the average is not the weights
    # sampling and the LoRA use the average; the weights are back afterwards
    sampled = trainer.sample(["a cat"], seed=1)
    tensors, _ = checkpoint.student_lora(trainer)
    assert all(torch.equal(p, w) for p, w in zip(trainer.student_params, weights, strict=True))
    with torch.no_grad():
        for p, a in zip(trainer.student_params, trainer.student_ema, strict=True):
            p.copy_(a)
    torch.testing.assert_close(sampled, trainer.sample(["a cat"], seed=1))
    averaged_lora, _ = trainer.backend.export_student_lora()
    assert set(tensors) == set(averaged_lora) and all(torch.equal(tensors[k], averaged_lora[k]) for k in tensors)
    with torch.no_grad():
        for p, w in zip(trainer.student_params, weights, strict=True):
            p.copy_(w)
    assert not all(torch.equal(tensors[k], trainer.backend.export_student_lora()[0][k]) for k in tensors)

    # a resumed run continues the same average, bit for bit
    straight = TDMTrainer(make_backend(parametrisation="v", lora_rank=4), config)
    straight.train(6)
    first = TDMTrainer(make_backend(parametrisation="v", lora_rank=4), config)
    first.train(3)
    first.save_checkpoint(tmp_path)
    resumed = TDMTrainer.resume(tmp_path, make_backend(parametrisation="v", lora_rank=4))
    assert resumed.student_ema_updates == 3
    resumed.train(6)
    assert all(torch.equal(a, b) for a, b in zip(straight.student_ema, resumed.student_ema, strict=True))
    a, b = straight.backend.adapter_state_dict("student"), resumed.backend.adapter_state_dict("student")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a state saved without an average, resumed with one: the average starts at its weights
    plain = TDMTrainer(make_backend(parametrisation="v", lora_rank=4), _config(lr=1e-2))
    plain.train(2)
    plain.save_checkpoint(tmp_path / "plain")
    later = TDMTrainer.resume(tmp_path / "plain", make_backend(parametrisation="v", lora_rank=4), config)
    assert later.student_ema_updates == 0
    assert all(torch.equal(a, p.detach()) for a, p in zip(later.student_ema, later.student_params, strict=True))


def test_checkpoints_keep_last_and_lora_metadata(tmp_path):
    trainer = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4),
                         _config(keep_last=2, family="reference", recommended_strength=0.5, sampler_preset="ddim"))
    for _ in range(3):
        trainer.step()
        trainer.save_checkpoint(tmp_path)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000003"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "student_lora.safetensors"), "pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    assert meta["tdm.steps"] == "4" and meta["tdm.timesteps"] == "899,674,449,224"
    assert meta["tdm.lora_strength"] == "0.5" and "tdm.preset" not in meta and meta["tdm.solver"] == "ddim"  # a solver name is no preset
    assert meta["tdm.family"] == "reference" and meta["tdm.trained_iterations"] == "3"
    assert meta["tdm.solver"] == "ddim"  # a grid of no preset: the step the student was trained with
    assert keys == {f"{m}.lora_{ab}.weight" for m in ("in_proj", "mid", "out_proj") for ab in "AB"}


def test_the_solver_a_distilled_lora_records_is_its_familys_measured_choice():
    """What `tdm.solver` says for each preset's students (bench/student_solver.py measured them): SD1.5 and SDXL
    students by the DDIM step they are trained with, Flux-dev's and SD3's by the flow DPM-Solver++(2M), CogVideoX's by
    v DDIM; a grid of no preset by the trained step."""
    from tdm_core.presets import student_solver

    chosen = {name: student_solver(name, "eps") for name in ("dreamshaper", "sdxl", "flux", "sd3", "sd35", "cogvideox")}
    assert chosen == {"dreamshaper": "ddim", "sdxl": "ddim", "flux": "flow_dpmpp_2m", "sd3": "flow_dpmpp_2m",
                      "sd35": "flow_dpmpp_2m", "cogvideox": "ddim_v"}
    assert student_solver("", "v") == "ddim_v" and student_solver("tdm_ddim_eps", "eps") == "ddim"


@pytest.mark.parametrize("layout", ["headless", "job"])
def test_checkpoints_of_the_layouts_written_before_the_shared_writer_still_resume(tmp_path, layout):
    """What a headless run wrote (`checkpoint-N/state.pt`, config.json, the LoRA) and what a job wrote
    (`checkpoints/step-N/state.tdmckpt` alone), written here by hand as bytes, resume bit-exactly through the
    reader both share."""
    config = _config(randmid=True, cfg=3.0)
    straight = TDMTrainer(make_backend(parametrisation="v", lora_rank=4), config)
    straight.train(4)
    first = TDMTrainer(make_backend(parametrisation="v", lora_rank=4), config)
    first.train(2)
    if layout == "headless":
        folder, name = tmp_path / "checkpoint-00000002", "state.pt"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(first.config.to_dict(), indent=2), encoding="utf-8")
        checkpoint.export_student_lora(first, folder / "student_lora.safetensors")
        source = tmp_path  # a run folder: its newest checkpoint
    else:
        folder, name = tmp_path / ".tdm_jobs" / "0123456789ab" / "checkpoints" / "step-00000002", "state.tdmckpt"
        folder.mkdir(parents=True)
        source = folder
    with open(folder / name, "wb") as handle:
        torch.save(first.state_dict(), handle)
    assert checkpoint.find_checkpoint(source) == folder
    assert equal_states(checkpoint.load_checkpoint(source), first.state_dict())
    resumed = TDMTrainer.resume(source, make_backend(parametrisation="v", lora_rank=4))
    assert resumed.step_count == 2
    resumed.train(4)
    assert equal_states(resumed.state_dict(), straight.state_dict())


def test_a_checkpoint_holds_the_whole_trainer_state_in_the_shared_layout(tmp_path):
    """The one writer's folder: the state file (every field the trainer restores), config.json and, for a headless
    run, the student LoRA; nothing else is left behind (no temporary file or folder)."""
    trainer = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4), _config())
    trainer.step()
    path = trainer.save_checkpoint(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "state.tdmckpt", "student_lora.safetensors"]
    state = checkpoint.read_state(path, step=1)
    assert {"format", "step", "config", "student", "fake", "opt_gen", "opt_fake", "lr_schedule", "lr_schedule_fake",
            "generator_rng", "scaler_fake", "scaler_gen", "skipped_in_a_row"} <= set(state)
    assert json.loads((path / "config.json").read_text()) == state["config"] == trainer.config.to_dict()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-") or p.name.endswith(".partial")]
    job = tmp_path / "job" / "step-00000001"
    assert checkpoint.write_checkpoint(job, trainer.state_dict(), state_file=checkpoint.STATE_FILE)
    assert sorted(p.name for p in job.iterdir()) == ["config.json", "state.tdmckpt"]
    assert not checkpoint.write_checkpoint(job, {"step": 5})  # an existing checkpoint is never replaced
    assert equal_states(checkpoint.read_state(job), state)


class _NotAWeight:
    """Pickled as a class instance: a weights-only load refuses to build it (so its code never runs)."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("bad, message", [
    ([1, 2], "not a training state"),
    ({"weight": torch.zeros(2)}, "has no step"),
    ({"step": True}, "step must be a number"),
    ({"step": -1}, "at least 0"),
    ({"step": 2.5}, "whole number"),
    ({"step": 1, "format": "something-else/9"}, "not a TDM distillation state"),
    ({"step": 1, "format": "tdm-distill-state/1", "student": {}}, "config must be a dict"),
    ("wrong rng", "generator_rng is not a generator state"),
    ("tensor list", "student adapter must map names to tensors"),
    ("other step", "not of step 1"),
    ("code", "Weights only load failed"),
])
def test_a_checkpoint_that_is_not_a_trainer_state_is_refused_before_use(tmp_path, bad, message):
    """A checkpoint file is untrusted input: anything but a trainer's state of the expected step is refused, a
    pickle that builds objects without being run."""
    trainer = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4), _config())
    trainer.step()
    state = trainer.state_dict()
    if bad == "wrong rng":
        bad = state | {"generator_rng": torch.zeros(4)}
    elif bad == "tensor list":
        bad = state | {"student": {"x": [torch.zeros(2)]}}
    elif bad == "other step":
        bad = state = state | {"step": 7}
    elif bad == "code":
        bad = state | {"config": _NotAWeight()}
    folder = tmp_path / "checkpoint-00000001"
    folder.mkdir()
    torch.save(bad, folder / checkpoint.STATE_FILE)
    with pytest.raises(Exception, match=message) as error:
        checkpoint.check_trainer_state(checkpoint.read_state(folder, step=1))
    assert isinstance(error.value, (ValueError, pickle.UnpicklingError))
    if bad is not state:  # a headless resume reads whatever step the state holds
        with pytest.raises(Exception, match=message):
            TDMTrainer.resume(tmp_path, make_backend(parametrisation="eps", lora_rank=4))


def test_exception_between_write_and_rename_keeps_the_previous_state(tmp_path, monkeypatch):
    trainer = TDMTrainer(make_backend(parametrisation="eps", lora_rank=4), _config())
    trainer.step()
    good = trainer.save_checkpoint(tmp_path)
    good_bytes = (good / checkpoint.STATE_FILE).read_bytes()
    trainer.step()

    def crash(tmp, final):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(checkpoint, "_publish", crash)
    with pytest.raises(OSError, match="injected"):
        trainer.save_checkpoint(tmp_path)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-00000001"]
    assert (good / checkpoint.STATE_FILE).read_bytes() == good_bytes
    assert not list(tmp_path.glob(".tmp-*"))
    monkeypatch.undo()
    assert TDMTrainer.resume(tmp_path, make_backend(parametrisation="eps", lora_rank=4)).step_count == 1


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from tdm_core.distill import DistillConfig, TDMTrainer, checkpoint
    from tdm_core.distill.reference import make_backend
    run = sys.argv[1]
    trainer = TDMTrainer(make_backend(lora_rank=4), DistillConfig(prompts=["a"], batch_size=2, total_steps=900, lora_rank=4))
    trainer.step()
    trainer.save_checkpoint(run)
    print("SAVED", flush=True)
    real = checkpoint._publish
    def slow(tmp, final):
        print("PUBLISHING", flush=True)
        time.sleep(60)
        real(tmp, final)
    checkpoint._publish = slow
    trainer.step()
    trainer.save_checkpoint(run)
    """
)


def test_kill_during_save_never_corrupts_the_previous_state(tmp_path):
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(run)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("PUBLISHING") or not line:
                break
        assert "PUBLISHING\n" in lines, lines
        os.kill(proc.pid, signal.SIGKILL)  # mid-save: every file written, not yet renamed
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["checkpoint-00000001"]
    assert list(run.glob(".tmp-checkpoint-*"))  # the interrupted save is left aside, never published
    trainer = TDMTrainer.resume(run, make_backend(lora_rank=4))
    assert trainer.step_count == 1
    trainer.step()
    trainer.save_checkpoint(run)
    assert not list(run.glob(".tmp-checkpoint-*"))
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["checkpoint-00000001", "checkpoint-00000002"]


def test_student_lora_is_read_by_the_lora_module(tmp_path):
    backend = make_backend(parametrisation="eps", lora_rank=4)
    trainer = TDMTrainer(backend, _config(lr=1e-2))
    trainer.train(2)
    path = checkpoint.export_student_lora(trainer, tmp_path / "s.safetensors")
    lora = tdm_lora.load_lora(path)
    assert len(lora.modules) == 3 and not lora.unrecognised_keys
    assert lora.recorded_strength == 1.0
    # the LoRA's ΔW is the student adapter's: W_student = W + scale · B A
    state = backend.adapter_state_dict("student")
    for module in lora.modules.values():
        a, b = state[f"{module.name}.lora_A.student.weight"], state[f"{module.name}.lora_B.student.weight"]
        torch.testing.assert_close(module.delta(), b @ a)


def _write_cli_config(path: Path, out: Path, **kw):
    config = dict(prompts=["a cat", "a dog", "a bird"], batch_size=4, total_steps=900, iterations=4, lora_rank=4,
                  checkpoint_every=2, preview_every=2, output_dir=str(out), cfg=3.0, randmid=True,
                  teacher={"factory": "tdm_core.distill.reference:make_backend", "parametrisation": "eps"})
    config.update(kw)
    path.write_text(json.dumps(config))
    return path


def _run(cmd, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # A session of its own, so that a timeout ends torchrun's workers too (by the group id of this child only).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    # stdout says how far the run got (its summary line is the last thing a finished run prints)
    assert proc.returncode == 0, f"stdout: {stdout[-1000:]}\nstderr: {stderr[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_cli_writes_metrics_previews_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "out"
    cfg = _write_cli_config(tmp_path / "run.json", out)
    _run([sys.executable, "-m", "tdm_core.distill", "--config", str(cfg), "--no-progress"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"loss_fake", "loss_gen", "grad_norm_gen", "seconds"} <= set(lines[0])
    assert sorted(p.name for p in (out / "previews").glob("*.pt")) == [
        "step_00000000.pt", "step_00000002.pt", "step_00000004.pt"]
    assert (out / "student_lora.safetensors").is_file()
    proc = _run([sys.executable, "-m", "tdm_core.distill", "--config", str(cfg), "--no-progress", "--resume",
                 "--iterations", "6"])
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 6
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-2:] == [5, 6]


# The official draws, and Flow-Factory's (every step of each sample, two fake updates, clipped fake gradients and
# importance weights, logit-normal τ up to full noise): each process must take its own samples' rows.
@pytest.mark.parametrize("recipe", [{}, {"recipe": "flow_factory_sd35", "fake_updates": 2, "lora_alpha": None}],
                         ids=["official", "flow_factory"])
def test_ddp_two_processes_match_one_process_on_the_combined_batch(tmp_path, recipe):
    settings = dict(preview_every=0, checkpoint_every=0, lora_rank=4, **recipe)
    cfg_one = _write_cli_config(tmp_path / "one.json", tmp_path / "one", **settings)
    cfg_two = _write_cli_config(tmp_path / "two.json", tmp_path / "two", **settings)
    _run([sys.executable, "-m", "tdm_core.distill", "--config", str(cfg_one), "--no-progress"])
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(port),
                 "-m", "tdm_core.distill", "--config", str(cfg_two), "--no-progress"])
    assert '"world_size": 2' in proc.stdout
    one = checkpoint.load_checkpoint(tmp_path / "one")
    two = checkpoint.load_checkpoint(tmp_path / "two")
    assert one["step"] == two["step"] == 4
    for adapter in ("student", "fake"):
        for key in one[adapter]:
            torch.testing.assert_close(two[adapter][key], one[adapter][key], rtol=0, atol=1e-6)
        assert any(not torch.equal(one[adapter][k], torch.zeros_like(one[adapter][k])) for k in one[adapter])
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2, strict=True):
        assert a["loss_gen"] == pytest.approx(b["loss_gen"], rel=1e-4)


def test_owned_adapter_switch_equals_peft_public_switch():
    """`switch_adapter` (two attributes per layer) gives exactly the outputs of peft's public per-layer switch, for
    every adapter, and leaves both adapters trainable."""
    from tdm_core.distill.backend import switch_adapter

    backend = make_backend(parametrisation="eps", lora_rank=4)
    with torch.no_grad():  # distinct, non-zero adapters so that every switch changes the output
        for name, param in backend._params["student"] + backend._params["fake"]:
            param.copy_(torch.randn_like(param) * (0.3 if ".student." in name else -0.2))
    x = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 200])
    cond = backend.encode(["a cat", "a dog"])
    model = backend.model
    outputs = {}
    for adapter in ("student", "teacher", "fake", "student", "fake", "teacher"):
        switch_adapter(backend._layers, adapter)
        backend._active = adapter
        with torch.no_grad():
            ours = backend._call(model, x, backend.schedule.model_timesteps[t].float(), cond)
        for layer in backend._layers:  # peft's public path
            if adapter == "teacher":
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(adapter)
        with torch.no_grad():
            public = backend._call(model, x, backend.schedule.model_timesteps[t].float(), cond)
        assert torch.equal(ours, public), adapter
        outputs[adapter] = ours
    assert not torch.equal(outputs["student"], outputs["teacher"])
    assert not torch.equal(outputs["fake"], outputs["student"])
    backend._active = None
    trainer = TDMTrainer(backend, _config())
    for _, param in backend._params["student"] + backend._params["fake"]:
        param.requires_grad_(True)  # the public path above froze some; the trainer's own switch never does
    metrics = trainer.step()
    assert all(p.grad is None for p in trainer.student_params)  # zeroed after the step
    assert metrics["skipped_gen"] == 0


def test_rollout_runs_only_the_steps_an_iteration_uses():
    """The truncated rollout gives the full rollout's states, x̂0 and ε̂ up to where it stops, and one iteration
    runs max(j_fake + 1, j_gen) student evaluations."""
    backend = make_backend(parametrisation="v", lora_rank=4)
    trainer = TDMTrainer(backend, _config(batch_size=2))
    noise = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = backend.encode(["a cat", "a dog"])
    full = trainer.rollout(noise, cond)
    for forwards in range(1, len(trainer.grid) + 1):
        part = trainer.rollout(noise, cond, forwards=forwards)
        assert len(part[1]) == forwards and len(part[0]) == min(forwards + 1, len(trainer.grid))
        expected = full[0][: len(part[0])] + full[1][:forwards] + full[2][:forwards]
        for got, want in zip(part[0] + part[1] + part[2], expected, strict=True):
            assert torch.equal(got, want)
    calls = []
    original = backend.forward
    backend.forward = lambda x, t, c, adapter: calls.append(adapter) or original(x, t, c, adapter)
    steps = [int(trainer.step()["student_steps"]) for _ in range(12)]
    assert all(1 <= s <= len(trainer.grid) for s in steps) and min(steps) < len(trainer.grid)
    assert calls.count("student") == sum(steps) + 12  # the rollout's evaluations plus one generator forward each


def test_training_saving_and_resuming_leave_the_process_rng_alone(tmp_path):
    """ComfyUI samples with the process-wide RNG while a job trains: a step, a checkpoint and a resume neither draw
    from it nor rewind it (the trainer's own generator carries the run's randomness, resume stays bit-exact)."""
    torch.manual_seed(1234)
    expected = torch.rand(8)
    torch.manual_seed(1234)
    backend = make_backend(parametrisation="eps", lora_rank=4)
    trainer = TDMTrainer(backend, _config(keep_last=1))
    trainer.step()
    path = checkpoint.save_checkpoint(trainer, tmp_path)
    resumed = TDMTrainer.resume(path, make_backend(parametrisation="eps", lora_rank=4))
    resumed.step()
    assert torch.equal(torch.rand(8), expected)
    assert "torch_rng" not in trainer.state_dict()


def test_lora_file_is_written_and_never_replaces_a_file_the_run_did_not_write(tmp_path):
    """`lora_file` (e.g. a ComfyUI models/loras path): written with the student; a fresh run refuses an existing file,
    a resumed run replaces only a TDM student."""
    from safetensors.torch import load_file, save_file

    from tdm_core.lora.files import safetensors_metadata
    from tdm_core.lora.metadata import FORMAT_NOTE, TRAINED_HERE_NOTE

    target = tmp_path / "loras" / "mine.safetensors"
    target.parent.mkdir()
    cfg = _write_cli_config(tmp_path / "run.json", tmp_path / "out", iterations=2, preview_every=0,
                            lora_file=str(target))
    _run([sys.executable, "-m", "tdm_core.distill", "--config", str(cfg), "--no-progress"])
    assert safetensors_metadata(target)[FORMAT_NOTE] == TRAINED_HERE_NOTE
    assert load_file(str(target)).keys() == load_file(str(tmp_path / "out" / "student_lora.safetensors")).keys()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    fresh = subprocess.run([sys.executable, "-m", "tdm_core.distill", "--config", str(cfg), "--no-progress"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert fresh.returncode == 2 and "already exists" in fresh.stderr
    _run([sys.executable, "-m", "tdm_core.distill", "--config", str(cfg), "--no-progress", "--resume",
          "--iterations", "3"])
    assert safetensors_metadata(target)["tdm.trained_iterations"] == "3"
    save_file({"x": torch.zeros(1)}, str(target))  # someone else's file under that name
    other = subprocess.run([sys.executable, "-m", "tdm_core.distill", "--config", str(cfg), "--no-progress",
                            "--resume", "--iterations", "4"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=180)
    assert other.returncode == 2 and "not a TDM student LoRA" in other.stderr
    assert list(load_file(str(target))) == ["x"]  # untouched
