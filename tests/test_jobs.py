"""tdm_core.jobs without ComfyUI: names, lifecycle, stop/resume, queueing, failures, restart, atomic outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, safe_open

from tdm_core import jobs
from tdm_devkit.states import equal_states

EXECUTION_LOG: list = []  # (job tag, step) in execution order, across jobs


class FakeSession:
    """A deterministic 'trainer': its weight after step n is a known function of n, so resumes are checkable."""

    def __init__(self, tag, state=None, delay=0.0, fail_at=None, error=None, nan_at=None):
        self.tag, self.delay, self.fail_at, self.error, self.nan_at = tag, delay, fail_at, error, nan_at
        self.step_count = int(state["step"]) if state else 0
        self.weight = state["weight"].clone() if state else torch.zeros(3)

    def step(self):
        time.sleep(self.delay)
        if self.fail_at is not None and self.step_count + 1 == self.fail_at:
            raise self.error
        self.step_count += 1
        self.weight = self.weight * 0.5 + self.step_count
        EXECUTION_LOG.append((self.tag, self.step_count))
        loss = float("nan") if self.nan_at == self.step_count else 1.0 / self.step_count
        return {"loss_fake": loss, "loss_gen": 2.0 * loss}

    def state_dict(self):
        return {"step": self.step_count, "weight": self.weight.clone()}

    def lora(self):
        return {"diffusion_model.x.lora_up.weight": self.weight.clone()}, {"tdm.test": self.tag}

    def preview(self):
        return torch.full((4, 4, 3), self.step_count % 256, dtype=torch.uint8)


class FakeRuntime:
    def __init__(self, tag="a", **kwargs):
        self.tag, self.kwargs, self.builds, self.offloads = tag, kwargs, [], 0

    def build(self, state, iterations=None):
        self.builds.append(None if state is None else int(state["step"]))
        return FakeSession(self.tag, state, **self.kwargs)

    def offload(self):
        self.offloads += 1


def _manager(tmp_path, events=None):
    return jobs.JobManager(tmp_path / "loras", listener=(lambda e, p: events.append((e, p))) if events is not None
                           else None)


def _weight_after(steps: int) -> torch.Tensor:
    w = torch.zeros(3)
    for n in range(1, steps + 1):
        w = w * 0.5 + n
    return w


# ---- names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd", "C:/x", "C:\\x", "a\\b", "~/x", "",
                                  "  ", ".hidden", "a/.tdm_jobs/x", "a//b", "./a", "bad*name", "x" * 101])
def test_bad_output_names_are_refused(tmp_path, name):
    with pytest.raises(jobs.JobError):
        jobs.validate_output_name(name, tmp_path)


def test_good_output_names_and_symlink_escape(tmp_path):
    assert jobs.validate_output_name("tdm_cat", tmp_path) == "tdm_cat"
    assert jobs.validate_output_name(" tdm/cat v2.safetensors ", tmp_path) == "tdm/cat v2"
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(jobs.JobError, match="outside"):
        jobs.validate_output_name("link/x", tmp_path)


# ---- lifecycle ---------------------------------------------------------------------------------------------------


def test_job_runs_to_the_end_with_atomic_outputs_and_pruning(tmp_path):
    events = []
    manager = _manager(tmp_path, events)
    record = manager.submit("run", FakeRuntime(), 10, save_every=3, keep_last=2, preview_every=4)
    assert record.state in ("queued", "running")
    final = manager.wait(record.id, timeout=30)
    assert final.state == "finished" and final.step == 10 and final.checkpoint_step == 10
    loras = tmp_path / "loras"
    assert torch.equal(load_file(loras / "run.safetensors")["diffusion_model.x.lora_up.weight"], _weight_after(10))
    with safe_open(loras / "run.safetensors", "pt") as handle:
        metadata = handle.metadata()
    assert metadata["tdm.job_id"] == record.id and metadata["tdm.trained_iterations"] == "10"
    # keep_last 2: snapshots of steps 9 and 10 (saved at 3, 6, 9 and the end), checkpoints likewise
    assert sorted(p.name for p in loras.glob("*.safetensors")) == [
        "run-step00000009.safetensors", "run-step00000010.safetensors", "run.safetensors"]
    checkpoints = sorted(p.name for p in (loras / ".tdm_jobs" / record.id / "checkpoints").iterdir())
    assert checkpoints == ["step-00000009", "step-00000010"]
    assert not [p for p in loras.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".tmp")]
    saved = json.loads((loras / ".tdm_jobs" / record.id / "job.json").read_text())
    assert saved["state"] == "finished" and [h[0] for h in saved["history"]] == list(range(1, 11))
    assert manager.preview(record.id)[0, 0, 0] == 10  # the final preview is taken at the end
    steps = [p["step"] for e, p in events if e == "tdm.job.progress"]
    assert steps == list(range(1, 11))
    states = [p["state"] for e, p in events if e == "tdm.job.state"]
    assert states[0] == "queued" and "running" in states and states[-1] == "finished"
    assert "finished, step 10/10" in final.progress_text()
    manager.close()


def test_stop_within_one_iteration_then_resume_is_equivalent(tmp_path):
    manager = _manager(tmp_path)
    runtime = FakeRuntime(delay=0.02)
    stopped_at = {}

    def stop_at_4(event, payload):
        if event == "tdm.job.progress" and payload["step"] == 4:
            stopped_at["record"] = manager.stop(payload["id"])

    manager.listener = stop_at_4
    record = manager.submit("stopme", runtime, 9, save_every=100, keep_last=1, preview_every=0)
    final = manager.wait(record.id, timeout=30)
    assert stopped_at["record"].id == record.id
    assert final.state == "stopped" and final.step == 4 and final.checkpoint_step == 4
    assert runtime.offloads >= 1  # a stopped job parks its model
    manager.listener = None
    manager.resume(record.id)
    final = manager.wait(record.id, timeout=30)
    assert final.state == "finished" and final.step == 9
    assert runtime.builds == [None, 4]
    lora = load_file(tmp_path / "loras" / "stopme.safetensors")["diffusion_model.x.lora_up.weight"]
    assert torch.equal(lora, _weight_after(9))  # same as an uninterrupted run
    assert [h[0] for h in final.history] == list(range(1, 10))
    with pytest.raises(jobs.JobError, match="already finished"):
        manager.resume(record.id)
    with pytest.raises(jobs.JobError, match="finished job frees it"):
        manager.resume(record.id, iterations=11)  # its teacher copy was freed at the end
    manager.resume(record.id, runtime=runtime, iterations=11)
    assert manager.wait(record.id, timeout=30).step == 11
    assert runtime.builds == [None, 4, 9]
    manager.close()


def test_duplicate_names_are_refused_and_resume_mode_continues(tmp_path):
    manager = _manager(tmp_path)
    record = manager.submit("dup", FakeRuntime(), 3, save_every=0)
    manager.wait(record.id, timeout=30)
    with pytest.raises(jobs.JobError, match="already used by TDM job") as error:
        manager.submit("dup", FakeRuntime(), 3)
    assert error.value.status == 409
    (tmp_path / "loras" / "foreign.safetensors").write_bytes(b"not ours")
    with pytest.raises(jobs.JobError, match="already exists"):
        manager.submit("foreign", FakeRuntime(), 3)
    assert (tmp_path / "loras" / "foreign.safetensors").read_bytes() == b"not ours"
    again = manager.submit("dup", FakeRuntime(), 5, if_exists="resume")
    assert again.id == record.id
    assert manager.wait(record.id, timeout=30).step == 5
    assert (again.save_every, again.keep_last, again.preview_every) == (0, 3, 50)  # left out: unchanged
    # the run options a resume gives replace the record's (TDM Distill's save_every / keep_last / preview_every)
    later = manager.submit("dup", FakeRuntime(), 7, if_exists="resume", save_every=2, keep_last=1, preview_every=0)
    assert (later.save_every, later.keep_last, later.preview_every) == (2, 1, 0)
    final = manager.wait(record.id, timeout=30)
    assert final.step == 7 and (final.save_every, final.keep_last) == (2, 1)
    with pytest.raises(jobs.JobError, match="keep_last"):
        manager.submit("dup", FakeRuntime(), 9, if_exists="resume", keep_last=0)
    with pytest.raises(jobs.JobError, match="another teacher"):
        jobs.check_same_teacher(jobs.JobRecord("i", "n", "stopped", 1, teacher={"family": "sd15"}), {"family": "sd3"})
    manager.close()


def test_two_jobs_are_queued_never_interleaved(tmp_path):
    EXECUTION_LOG.clear()
    manager = _manager(tmp_path)
    first = manager.submit("first", FakeRuntime("first", delay=0.01), 6, save_every=0, preview_every=0)
    second = manager.submit("second", FakeRuntime("second", delay=0.01), 4, save_every=0, preview_every=0)
    assert manager.get(second.id).state == "queued"
    assert "one job trains at a time" in manager.get(second.id).message
    manager.wait(first.id, timeout=30)
    manager.wait(second.id, timeout=30)
    tags = [tag for tag, _ in EXECUTION_LOG]
    assert tags == ["first"] * 6 + ["second"] * 4
    # a queued job can be stopped before it starts
    third = manager.submit("third", FakeRuntime("third", delay=0.05), 50, save_every=0)
    fourth = manager.submit("fourth", FakeRuntime("fourth"), 5, save_every=0)
    manager.stop(fourth.id)
    assert manager.get(fourth.id).state == "stopped"
    manager.stop(third.id)
    assert manager.wait(third.id, timeout=30).state == "stopped"
    manager.close()


@pytest.mark.parametrize("kind", ["oom", "nan", "missing_checkpoint", "error"])
def test_failures_mark_the_job_failed_with_the_reason(tmp_path, kind):
    manager = _manager(tmp_path)
    if kind == "oom":
        runtime = FakeRuntime(fail_at=3, error=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
        expected = "out of memory at step 2"
    elif kind == "nan":
        runtime = FakeRuntime(nan_at=3)
        expected = "loss became non-finite at step 3"
    elif kind == "error":
        runtime = FakeRuntime(fail_at=2, error=RuntimeError("shape mismatch"))
        expected = "RuntimeError at step 1: shape mismatch"
    else:
        runtime = FakeRuntime()
        expected = "a file is missing"
    record = manager.submit(f"fail_{kind}", runtime, 6, save_every=2, preview_every=0)
    if kind == "missing_checkpoint":
        manager.wait(record.id, timeout=30)
        for checkpoint in (tmp_path / "loras" / ".tdm_jobs" / record.id / "checkpoints").iterdir():
            for file in checkpoint.iterdir():
                file.unlink()
        manager.resume(record.id, runtime=runtime, iterations=8)
    final = manager.wait(record.id, timeout=30)
    assert final.state == "failed", final.message
    assert expected in final.message
    if kind in ("oom", "nan"):
        assert "resume continues from the checkpoint at step 2" in final.message
        # the failed step's LoRA was never published
        lora = load_file(tmp_path / "loras" / f"fail_{kind}.safetensors")["diffusion_model.x.lora_up.weight"]
        assert torch.equal(lora, _weight_after(2))
    # the worker survives: another job runs to the end
    after = manager.submit(f"after_{kind}", FakeRuntime(), 2, save_every=0)
    assert manager.wait(after.id, timeout=30).state == "finished"
    manager.close()


def test_restart_lists_jobs_and_resumes_from_the_checkpoint(tmp_path):
    manager = _manager(tmp_path)
    record = manager.submit("survivor", FakeRuntime(delay=0.05), 200, save_every=3, preview_every=0)
    manager.wait(record.id, timeout=30, states=("running",))
    deadline = time.monotonic() + 30
    record_file = tmp_path / "loras" / ".tdm_jobs" / record.id / "job.json"
    # the record on disk (written after the lock is released, so it may trail the one in memory) names a checkpoint
    while json.loads(record_file.read_text())["checkpoint_step"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    # Simulate the process dying while running: copy the on-disk state as it is now to a second folder.
    import shutil

    shutil.copytree(tmp_path / "loras", tmp_path / "copy" / "loras")
    manager.stop(record.id)
    manager.wait(record.id, timeout=30)
    manager.close()
    saved = json.loads((tmp_path / "copy" / "loras" / ".tdm_jobs" / record.id / "job.json").read_text())
    assert saved["state"] in ("running", "stopping")

    restarted = jobs.JobManager(tmp_path / "copy" / "loras")
    listed = restarted.get(record.id)
    assert listed.state == "stopped" and "process ended" in listed.message
    assert listed.step == listed.checkpoint_step >= 3
    resumed_from = listed.checkpoint_step
    with pytest.raises(jobs.JobError, match="not in memory") as error:
        restarted.resume(record.id)
    assert error.value.status == 409
    runtime = FakeRuntime()
    restarted.submit("survivor", runtime, 12, if_exists="resume")
    final = restarted.wait(record.id, timeout=30)
    assert final.state == "finished" and runtime.builds == [resumed_from]
    lora = load_file(tmp_path / "copy" / "loras" / "survivor.safetensors")["diffusion_model.x.lora_up.weight"]
    assert torch.equal(lora, _weight_after(12))
    restarted.close()


def test_a_crash_during_a_save_keeps_the_previous_lora(tmp_path, monkeypatch):
    manager = _manager(tmp_path)
    runtime = FakeRuntime()
    record = manager.submit("atomic", runtime, 2, save_every=0)
    manager.wait(record.id, timeout=30)
    path = tmp_path / "loras" / "atomic.safetensors"
    before = path.read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("atomic.safetensors"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    manager.resume(record.id, runtime=runtime, iterations=4)
    final = manager.wait(record.id, timeout=30)
    assert final.state == "failed" and "disk full" in final.message
    assert path.read_bytes() == before
    assert not [p for p in (tmp_path / "loras").rglob("*.partial")]
    manager.close()


def test_stop_and_resume_refusals(tmp_path):
    manager = _manager(tmp_path)
    with pytest.raises(jobs.JobError, match="no TDM job") as error:
        manager.stop("nope")
    assert error.value.status == 404
    record = manager.submit("done", FakeRuntime(), 1, save_every=0)
    manager.wait(record.id, timeout=30)
    with pytest.raises(jobs.JobError, match="not running"):
        manager.stop(record.id)
    assert manager.get("done").id == record.id  # by output name
    manager.close()


def test_listener_failures_do_not_fail_the_job(tmp_path):
    def broken(event, payload):
        raise RuntimeError("listener bug")

    manager = jobs.JobManager(tmp_path / "loras", listener=broken)
    record = manager.submit("robust", FakeRuntime(), 2, save_every=0)
    assert manager.wait(record.id, timeout=30).state == "finished"
    assert threading.active_count() >= 1
    manager.close()


def test_status_wait_honours_the_canvas_cancel_and_the_job_keeps_running(tmp_path, pack):
    """Cancel stops the status node from waiting, never the job; the stop node's wait has a bounded timeout."""
    import comfy.model_management

    job_runtime = pack.nodes.job_runtime
    manager = _manager(tmp_path)
    record = manager.submit("slow", FakeRuntime("slow", delay=0.05), 200, save_every=0, preview_every=0)
    manager.wait(record.id, timeout=10, states=("running",))
    comfy.model_management.interrupt_current_processing(True)
    try:
        started = time.monotonic()
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            job_runtime.wait_for_job(manager, record.id)
        assert time.monotonic() - started < 5
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert manager.get(record.id).state == "running"
    with pytest.raises(ValueError, match=r"did not stop within 1 s; it is running"):
        job_runtime.wait_for_job(manager, record.id, timeout=1)
    manager.stop(record.id)
    assert manager.wait(record.id, timeout=30).state == "stopped"
    manager.close()


# ---- the manager's lock is never held across I/O or a device move ----------------------------------------------


class _Gate:
    """Blocks the calling (worker or command) thread inside an I/O or offload call until the test has read the
    status from another thread, and records whether the manager's lock was held at that moment."""

    def __init__(self, manager):
        self.manager, self.entered, self.release, self.lock_held = manager, threading.Event(), threading.Event(), []

    def __call__(self):
        self.lock_held.append(self.manager.board.lock._is_owned())
        self.entered.set()
        assert self.release.wait(30), "the test never released the gate"


def _status_reads_complete(manager, job_id) -> bool:
    """list/get/preview/has_runtime from a fresh thread (as the HTTP routes do); False if they block on the lock."""
    done = threading.Event()

    def read():
        manager.list(), manager.get(job_id), manager.preview(job_id), manager.has_runtime(job_id)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    return done.wait(10)  # a deadlock detector, not a timing: the reads take microseconds


@pytest.mark.parametrize("blocked", ["record write", "lora write", "offload"])
def test_status_reads_never_wait_for_disk_writes_or_offloads(tmp_path, monkeypatch, blocked):
    manager = _manager(tmp_path)
    gate = _Gate(manager)
    runtime = FakeRuntime(delay=0.01)
    if blocked == "record write":
        real_write = manager.store.write

        def write(snapshot):
            if json.loads(snapshot.data)["step"] >= 2 and not gate.entered.is_set():
                gate()
            return real_write(snapshot)

        manager.store.write = write
    elif blocked == "lora write":
        from tdm_core.jobs import outputs

        real_atomic = outputs.atomic_write_bytes

        def atomic(path, data):
            if str(path).endswith(".safetensors"):
                gate()
            return real_atomic(path, data)

        monkeypatch.setattr(outputs, "atomic_write_bytes", atomic)
    record = manager.submit("gated", runtime, 1000 if blocked == "offload" else 6, save_every=3, preview_every=0)
    if blocked == "offload":
        # a stopped job's teacher leaves the accelerator when its run ends
        runtime.offload = gate
        manager.wait(record.id, timeout=30, states=("running",))
        manager.stop(record.id)
    assert gate.entered.wait(30), f"no {blocked} happened"
    try:
        assert _status_reads_complete(manager, record.id), f"status reads blocked during a {blocked}"
    finally:
        gate.release.set()
    assert manager.wait(record.id, timeout=30).state in ("finished", "stopped")
    assert gate.lock_held and not any(gate.lock_held), f"the manager's lock was held during a {blocked}"
    manager.close()


def test_a_record_lists_only_files_that_exist_after_a_kill_between_naming_and_writing(tmp_path):
    """A save names its snapshot and checkpoint in job.json before writing them (so no file of ours is ever
    unowned); a kill -9 in between left names of files that never came to exist. Reconciled when the record is
    loaded again: the names go, the files that exist stay named."""
    manager = _manager(tmp_path)
    record = manager.submit("killed", FakeRuntime(), 2, save_every=1, keep_last=3)
    manager.wait(record.id, timeout=30)
    manager.close()
    job_json = tmp_path / "loras" / jobs.JOBS_FOLDER / record.id / "job.json"
    data = json.loads(job_json.read_text())
    existing = list(data["loras"])
    # what the kill left: the names of step 3's snapshot and checkpoint, written ahead, and neither file
    data["loras"].append("killed-step00000003.safetensors")
    data["checkpoints"].append(3)
    job_json.write_text(json.dumps(data))
    restarted = _manager(tmp_path)
    listed = restarted.get(record.id)
    assert listed.loras == existing and 3 not in listed.checkpoints and listed.latest_lora == "killed.safetensors"
    assert json.loads(job_json.read_text())["loras"] == existing  # durable, not just in memory
    restarted.close()


def test_leftover_cleaning_spares_the_temporary_files_of_live_writes(tmp_path):
    """Two submits of one output name at once: the accepted job's record write lost its temporary file to the other
    thread's crash-leftover cleaning. A temporary file of this process is another thread's write in progress; only
    those of other (dead) processes are leftovers."""
    manager = _manager(tmp_path)
    record = manager.submit("tidy", FakeRuntime(), 1, save_every=0)
    manager.wait(record.id, timeout=30)
    folder = tmp_path / "loras" / jobs.JOBS_FOLDER / record.id
    live = folder / f".job.json.{os.getpid()}.{threading.get_ident()}.partial"
    dead = folder / f".job.json.{os.getpid() + 100000}.1.partial"
    beside = tmp_path / "loras" / f".tidy.safetensors.{os.getpid() + 100000}.7.partial"
    for path in (live, dead, beside):
        path.write_bytes(b"x")
    manager.outputs.clean_leftovers(manager.get(record.id))
    assert live.exists() and not dead.exists() and not beside.exists()
    manager.close()


# ---- concurrent commands never lose a record write ---------------------------------------------------------------


def _on_disk(loras, job_id):
    path = loras / jobs.JOBS_FOLDER / job_id / jobs.RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _race_on_one_output_name(loras, rng) -> None:
    """Four threads submit one output name at once while three others stop, resume and remove it, then checks what
    memory and disk hold once every job is over."""
    manager = jobs.JobManager(loras)
    name, accepted, removed = "race", [], []
    start = threading.Barrier(7)

    def submit():
        start.wait()
        try:
            accepted.append(manager.submit(name, FakeRuntime(delay=0.002), 6, save_every=2, keep_last=2,
                                           preview_every=3).id)
        except jobs.JobError as error:
            assert error.status == 409, error

    def repeatedly(command, pauses):
        def run():
            start.wait()
            for pause in pauses:
                time.sleep(pause)
                try:
                    result = command(name)
                except jobs.JobError as error:
                    assert error.status in (404, 409), error
                else:
                    if command == manager.remove:
                        removed.append(result.id)
        return run

    threads = [threading.Thread(target=submit) for _ in range(4)]
    threads += [threading.Thread(target=repeatedly(command, [rng.uniform(0, 0.006) for _ in range(6)]))
                for command in (manager.stop, manager.resume, manager.remove)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert accepted, "no submit was accepted"
    kept = manager.list()
    for record in kept:
        manager.wait(record.id, timeout=30)
    manager.close()
    assert len([r for r in manager.list() if r.name == name]) <= 1, "two jobs hold one output name"
    assert {r.id for r in kept} | set(removed) == set(accepted)
    for record in kept:
        assert record.state in ("stopped", "finished"), record.progress_text()
        assert _on_disk(loras, record.id) == json.loads(json.dumps(record.to_dict())), record.progress_text()
    for job_id in removed:
        assert not (loras / jobs.JOBS_FOLDER / job_id).exists(), "a removed job came back"
    restarted = jobs.JobManager(loras)
    assert [r.to_dict() for r in restarted.list()] == [r.to_dict() for r in kept]  # read back as written
    restarted.close()


def test_concurrent_submits_stops_resumes_and_removes_never_lose_a_record_write(tmp_path, capsys):
    """Commands race the worker and each other (the panel's buttons, a re-queued workflow). Every job that was
    accepted and not removed has its record on disk equal to the one in memory (and read back unchanged by a
    restart), at most one job holds the name, a removed job leaves no folder behind, and no write ever failed for a
    folder a removal took away."""
    import random

    rng = random.Random(0)  # the pauses; the threads' interleaving still varies from run to run
    for trial in range(30):
        _race_on_one_output_name(tmp_path / f"trial{trial}", rng)
    printed = capsys.readouterr()
    for warning in ("FileNotFoundError", "kept in memory only", "TDM job worker:", "failed"):
        assert warning not in printed.out + printed.err


# ---- a job's checkpoint is the one checkpoint format ---------------------------------------------------------------


def _trainer_config(**kw):
    from tdm_core.distill import DistillConfig

    return DistillConfig(prompts=["a cat", "a dog"], batch_size=2, total_steps=900, lora_rank=4, seed=3, **kw)


class TrainerRuntime:
    """Builds a real `TDMTrainer` on the reference teacher, as the ComfyUI nodes build one on a ComfyUI model."""

    def __init__(self, config):
        self.config, self.sessions = config, []

    def build(self, state, iterations=None):
        from tdm_core.distill import DistillConfig
        from tdm_core.distill.reference import make_backend

        config = DistillConfig.from_dict(self.config.to_dict())
        self.sessions.append(jobs.TDMSession.create(make_backend(config, parametrisation="eps"), config, state,
                                                    iterations=iterations))
        return self.sessions[-1]


def test_a_job_checkpoint_resumes_a_headless_run_into_an_equal_trainer_state(tmp_path):
    """The job writer's checkpoint folder, given to the CLI's `--resume`, restores the trainer the job had: every
    adapter, optimiser, schedule, scaler and RNG tensor and the step equal; the CLI saves that state again."""
    from tdm_core.distill import checkpoint, cli

    manager = _manager(tmp_path)
    runtime = TrainerRuntime(_trainer_config(randmid=True, cfg=3.0))
    record = manager.submit("shared", runtime, 3, save_every=3, preview_every=0)
    final = manager.wait(record.id, timeout=120)
    manager.close()
    assert final.state == "finished" and final.checkpoint_step == 3
    job_state = runtime.sessions[-1].state_dict()
    folder = tmp_path / "loras" / jobs.JOBS_FOLDER / record.id / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", jobs.CHECKPOINT_FILE]
    assert json.loads((folder / "config.json").read_text()) == job_state["config"]

    out = tmp_path / "headless"
    headless = _trainer_config(randmid=True, cfg=3.0, iterations=3, preview_every=0, checkpoint_every=0,
                               output_dir=str(out),
                               teacher={"factory": "tdm_core.distill.reference:make_backend", "parametrisation": "eps"})
    headless.save(tmp_path / "run.json")
    assert cli.main(["--config", str(tmp_path / "run.json"), "--resume", str(folder), "--no-progress"]) == 0
    assert (out / "metrics.jsonl").read_text() == ""  # resumed at step 3 of 3: not a new run trained anew
    resumed = checkpoint.load_checkpoint(out)  # the resumed trainer's state, saved at the same step
    assert resumed["step"] == 3
    assert equal_states({k: v for k, v in resumed.items() if k != "config"},
                         {k: v for k, v in job_state.items() if k != "config"})
    assert equal_states(checkpoint.load_checkpoint(folder), job_state)


def test_a_job_resumes_from_a_checkpoint_of_the_layout_jobs_wrote_before_the_shared_writer(tmp_path):
    """Jobs wrote `checkpoints/step-N/state.tdmckpt` alone (no config.json): such a folder, written here by hand as
    the bytes of a `torch.save`, resumes the job bit-exactly (the same trainer as one that never stopped)."""
    import io

    from tdm_core.distill import TDMTrainer
    from tdm_core.distill.reference import make_backend

    config = _trainer_config()
    # the job's trainer runs for the job's iterations (2, then 4 once resumed for them): the straight run is as long
    straight = TDMTrainer(make_backend(config, parametrisation="eps"), dataclasses.replace(config, iterations=4))
    straight.train(4)
    manager = _manager(tmp_path)
    runtime = TrainerRuntime(config)
    record = manager.submit("old", runtime, 2, save_every=2, preview_every=0)
    assert manager.wait(record.id, timeout=120).checkpoint_step == 2
    folder = tmp_path / "loras" / jobs.JOBS_FOLDER / record.id / "checkpoints" / "step-00000002"
    buffer = io.BytesIO()
    torch.save(runtime.sessions[-1].state_dict(), buffer)
    for file in folder.iterdir():
        file.unlink()
    (folder / "state.tdmckpt").write_bytes(buffer.getvalue())
    manager.resume(record.id, runtime=runtime, iterations=4)
    final = manager.wait(record.id, timeout=120)
    manager.close()
    assert final.state == "finished" and final.step == 4, final.message
    assert equal_states(runtime.sessions[-1].state_dict(), straight.state_dict())
