"""Hostile records, names and crashes against the job manager (issue 13): a job writes and deletes only files its
record names, records on disk are validated, the worker survives its own bookkeeping failing, non-finite weights are
never published, and crash leftovers are cleaned."""

from __future__ import annotations

import errno
import json
import threading

import pytest
import torch
from safetensors.torch import load_file
from test_jobs import FakeRuntime, FakeSession, _weight_after

from tdm_core import jobs
from tdm_core.distill import DistillConfig, checkpoint

WEIGHT = "diffusion_model.x.lora_up.weight"


def _manager(tmp_path, **kwargs):
    return jobs.JobManager(tmp_path / "loras", **kwargs)


def _files(folder) -> dict:
    """Every file under `folder` with its bytes (to prove nothing foreign changed)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Names (Windows device names, trailing dots, snapshot-shaped names)


@pytest.mark.parametrize("name", ["CON", "nul", "COM1", "lpt1", "Aux.safetensors", "prn.v2", "sub/CON", "name.",
                                  "name..", "sub./x", "a-step00000100", "tdm/cat-step00000001.safetensors"])
def test_device_names_trailing_dots_and_snapshot_names_are_refused(tmp_path, name):
    with pytest.raises(jobs.JobError, match="output name"):
        jobs.validate_output_name(name, tmp_path)


def test_names_close_to_the_refused_ones_are_fine(tmp_path):
    for name in ("CONSOLE", "null_v2", "COM10x", "a-step1", "cat.v2", "lpt"):
        assert jobs.validate_output_name(name, tmp_path) == name


# ---------------------------------------------------------------------------------------------------------------
# Class: files of others are never overwritten or deleted


def test_foreign_snapshot_shaped_files_refuse_the_job_at_submit(tmp_path):
    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    (loras / "sub" / "cat-step00000003.safetensors").write_bytes(b"someone else's")
    before = _files(loras)
    manager = _manager(tmp_path)
    with pytest.raises(jobs.JobError, match="cat-step00000003.safetensors") as error:
        manager.submit("sub/cat", FakeRuntime(), 6, save_every=3)
    assert error.value.status == 409
    assert manager.list() == [] and _files(loras) == before
    manager.close()


@pytest.mark.parametrize("planted", ["snapshot", "latest"])
def test_a_file_planted_while_the_job_runs_is_never_overwritten(tmp_path, planted):
    loras = tmp_path / "loras"
    manager = _manager(tmp_path)
    target = loras / ("run-step00000004.safetensors" if planted == "snapshot" else "run.safetensors")

    def plant(event, payload):
        if event == "tdm.job.progress" and payload["step"] == (3 if planted == "snapshot" else 1):
            target.write_bytes(b"not the job's")

    manager.listener = plant
    record = manager.submit("run", FakeRuntime(), 8, save_every=2, keep_last=1, preview_every=0)
    final = manager.wait(record.id, timeout=30)
    assert final.state == "failed" and "was not written by this job" in final.message, final.message
    assert target.read_bytes() == b"not the job's"
    if planted == "snapshot":
        # the step-2 snapshot the job owns was kept: nothing is pruned on a failed save
        assert torch.equal(load_file(loras / "run-step00000002.safetensors")[WEIGHT], _weight_after(2))
    manager.close()


def test_another_jobs_loras_survive_pruning(tmp_path):
    manager = _manager(tmp_path)
    first = manager.submit("a", FakeRuntime(), 4, save_every=1, keep_last=1, preview_every=0)
    manager.wait(first.id, timeout=30)
    second = manager.submit("a2", FakeRuntime(), 4, save_every=1, keep_last=1, preview_every=0)
    manager.wait(second.id, timeout=30)
    names = sorted(p.name for p in (tmp_path / "loras").glob("*.safetensors"))
    assert names == ["a-step00000004.safetensors", "a.safetensors", "a2-step00000004.safetensors",
                     "a2.safetensors"]
    manager.close()


# ---------------------------------------------------------------------------------------------------------------
# Class: job records on disk are validated, never trusted


PLANTED_ID = "0123456789aa"


def _good_record(job_id=PLANTED_ID, name="good", **changes) -> dict:
    record = jobs.JobRecord(id=job_id, name=name, state="stopped", iterations=10, step=4, checkpoint_step=4,
                            loras=[f"{name}-step00000004.safetensors"], latest_lora=f"{name}.safetensors",
                            history=[[1, 0.5, 1.0], [2, 0.4, 0.9]]).to_dict()
    record["checkpoints"] = [4]
    record.update(changes)
    return record


def _write_its_loras(loras, record: dict) -> None:
    for name in (record["latest_lora"], *record["loras"]):
        (loras / name).write_bytes(b"lora")


# A DistillConfig as a job records it, and the settings around it (tdm_core.jobs.records.record_settings)
_CONFIG = DistillConfig(prompts=["a cat", "a dog"], recipe="official_demo", family="sd3").to_dict()


def _settings(**changes) -> dict:
    return dict({"config": _CONFIG, "comfy": {"width": 512, "grid": "auto", "gradient_checkpointing": False,
                                              "recipe_changes": ["cfg 3.5"]},
                 "recipe_description": "official_demo (Official demo script)", "grid_description": "sd3"}, **changes)


PLANTED = {
    "list": "[]",
    "string": '"job"',
    "number": "42",
    "empty-object": "{}",
    "binary": b"\x00\xff\xfe garbage",
    "nested": "[" * 50_000 + "]" * 50_000,
    "id-traversal": _good_record(id="../../../victim"),
    "id-other-folder": _good_record(id="ba9876543210"),
    "id-not-hex": _good_record(id="0123456789AA"),
    "name-traversal": _good_record(name="../victim"),
    "name-absolute": _good_record(name="/tmp/victim"),
    "name-device": _good_record(name="CON"),
    "snapshot-traversal": _good_record(loras=["../victim.safetensors"]),
    "snapshot-of-another-job": _good_record(loras=["victim.safetensors"]),
    "pruning-traversal": _good_record(pruning=["../../victim-step00000001.safetensors"]),
    "latest-other-file": _good_record(latest_lora="victim.safetensors"),
    "iterations-1e400": json.dumps(_good_record()).replace('"iterations": 10', '"iterations": 1e400'),
    "iterations-nan": json.dumps(_good_record()).replace('"iterations": 10', '"iterations": NaN'),
    "iterations-huge": _good_record(iterations=10**15),
    "iterations-text": _good_record(iterations="10"),
    "step-negative": _good_record(step=-3),
    "state-unknown": _good_record(state="exploded"),
    "history-not-points": _good_record(history=[["a", 1, 2]]),
    "history-object": _good_record(history={"x": 1}),
    "settings-list": _good_record(settings=[1, 2]),
    # the settings jobs record now: a DistillConfig checked field by field, plain comfy options, text descriptions
    "config-not-object": _good_record(settings=_settings(config=[1])),
    "config-unknown-field": _good_record(settings=_settings(config=dict(_CONFIG, evil=1))),
    "config-text-number": _good_record(settings=_settings(config=dict(_CONFIG, lr="1e-4"))),
    "config-bool-rank": _good_record(settings=_settings(config=dict(_CONFIG, lora_rank=True))),
    "config-zero-rank": _good_record(settings=_settings(config=dict(_CONFIG, lora_rank=0))),
    "config-huge-seed": _good_record(settings=_settings(config=dict(_CONFIG, seed=2**80))),
    "config-no-prompts": _good_record(settings=_settings(config=dict(_CONFIG, prompts=[]))),
    "config-prompt-object": _good_record(settings=_settings(config=dict(_CONFIG, prompts=[{"a": 1}]))),
    "config-teacher-factory": _good_record(settings=_settings(config=dict(_CONFIG, teacher={"factory": "os:system"}))),
    "config-betas-number": _good_record(settings=_settings(config=dict(_CONFIG, adam_betas=0.9))),
    "config-timesteps-text": _good_record(settings=_settings(config=dict(_CONFIG, timesteps="999"))),
    "config-tau-mode": _good_record(settings=_settings(config=dict(_CONFIG, tau_mode="exploded"))),
    "comfy-object-value": _good_record(settings=_settings(comfy={"width": {"x": 1}})),
    "comfy-list": _good_record(settings=_settings(comfy=[1])),
    "description-object": _good_record(settings=_settings(recipe_description={"html": "<script>"})),
    "checkpoints-bad": _good_record(checkpoints=["../x"]),
    "keep-last-zero": _good_record(keep_last=0),
    "message-object": _good_record(message={"html": "<script>"}),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_planted_or_damaged_records_are_skipped_and_nothing_outside_is_touched(tmp_path, case):
    loras = tmp_path / "loras"
    victim_folder = tmp_path  # files a record could name outside models/loras, and a foreign LoRA inside it
    (loras / ".tdm_jobs").mkdir(parents=True)
    (victim_folder / "victim.safetensors").write_bytes(b"victim")
    (loras / "victim.safetensors").write_bytes(b"victim")
    (victim_folder / "victim-step00000001.safetensors").write_bytes(b"victim")
    good = _good_record("0123456789ab", "good_one")
    (loras / ".tdm_jobs" / good["id"]).mkdir()
    (loras / ".tdm_jobs" / good["id"] / "job.json").write_text(json.dumps(good))
    _write_its_loras(loras, good)  # a good record's files exist (else loading it would rightly drop their names)
    folder = loras / ".tdm_jobs" / PLANTED_ID
    folder.mkdir()
    planted = PLANTED[case]
    data = planted if isinstance(planted, (str, bytes)) else json.dumps(planted)
    (folder / "job.json").write_bytes(data if isinstance(data, bytes) else data.encode())
    before = _files(tmp_path)
    manager = _manager(tmp_path)
    assert [r.id for r in manager.list()] == [good["id"]]  # the good one is listed, the planted one skipped
    with pytest.raises(jobs.JobError) as error:
        manager.get(PLANTED_ID)
    assert error.value.status == 404
    assert _files(tmp_path) == before
    manager.close()


def test_a_good_old_record_without_the_new_fields_still_loads(tmp_path):
    loras = tmp_path / "loras"
    record = _good_record()
    for key in ("checkpoints", "pruning", "pruning_checkpoints"):
        record.pop(key)
    (loras / ".tdm_jobs" / record["id"]).mkdir(parents=True)
    (loras / ".tdm_jobs" / record["id"] / "job.json").write_text(json.dumps(record))
    _write_its_loras(loras, record)
    loaded = _manager(tmp_path).get(record["id"])
    assert loaded.checkpoints == [4] and loaded.loras == ["good-step00000004.safetensors"]


def test_a_record_of_the_current_shape_loads_with_its_config_checked(tmp_path):
    """The settings jobs record now load field by field: the config as a DistillConfig gives it back, the recipe
    kept by name even when no recipe of that name exists any more (the record holds every knob), unknown keys
    dropped."""
    loras = tmp_path / "loras"
    config = dict(_CONFIG, recipe="a_recipe_removed_since", cfg=3)
    record = _good_record(settings=dict(_settings(config=config), extra={"x": 1}))
    (loras / ".tdm_jobs" / record["id"]).mkdir(parents=True)
    (loras / ".tdm_jobs" / record["id"] / "job.json").write_text(json.dumps(record))
    _write_its_loras(loras, record)
    manager = _manager(tmp_path)
    settings = manager.get(record["id"]).settings
    assert settings == dict(_settings(config=dict(config, cfg=3.0)))
    assert isinstance(settings["config"]["cfg"], float)
    manager.close()


def test_every_distill_config_field_has_a_record_check():
    """`record_config` checks a field by its annotation: every field of a DistillConfig, set, comes back equal (a
    field added without a check fails here, not on a user's record)."""
    config = DistillConfig(prompts=["a cat"], timesteps=[999, 749, 500, 250], student_lr=1e-5, grad_clip_fake=2.0,
                           importance_clip=20.0, lora_alpha=8.0, lora_target_modules=["to_q"],
                           preview_prompts=["a dog"], randmid=True, recipe="official_demo", family="sd15")
    assert jobs.record_config(config.to_dict()).to_dict() == config.to_dict()
    assert jobs.record_config(DistillConfig(prompts=["a cat"]).to_dict()).to_dict() == DistillConfig(
        prompts=["a cat"]).to_dict()


# ---------------------------------------------------------------------------------------------------------------
# Class: the worker survives its own bookkeeping failing (a full disk); a job is created fully or not at all


class _FullDisk:
    """Fault injection: writes of job records fail with ENOSPC while `full` is set."""

    def __init__(self, monkeypatch, what=("job.json",)):
        self.full = threading.Event()
        self.what = what
        real = checkpoint.atomic_write_bytes

        def write(path, data):
            if self.full.is_set() and any(str(path).endswith(w) for w in self.what):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, data)

        # the record store writes through the checkpoint module: job.json writes fail, LoRA writes do not
        monkeypatch.setattr(checkpoint, "atomic_write_bytes", write)


def test_a_start_on_a_full_disk_creates_nothing(tmp_path, monkeypatch):
    disk = _FullDisk(monkeypatch)
    disk.full.set()
    manager = _manager(tmp_path)
    with pytest.raises(jobs.JobError, match="No space left on device") as error:
        manager.submit("full", FakeRuntime(), 3)
    assert error.value.status == 507 and "Free disk space" in str(error.value)
    assert manager.list() == []
    assert not list((tmp_path / "loras" / ".tdm_jobs").iterdir())
    disk.full.clear()
    record = manager.submit("full", FakeRuntime(), 3, save_every=0)  # the same name works once there is space
    assert manager.wait(record.id, timeout=30).state == "finished"
    manager.close()


def test_the_worker_survives_record_writes_failing_and_runs_the_next_jobs(tmp_path, monkeypatch):
    disk = _FullDisk(monkeypatch)
    manager = _manager(tmp_path)
    first = manager.submit("first", FakeRuntime(delay=0.02), 6, save_every=2, preview_every=0)
    second = manager.submit("second", FakeRuntime(), 3, save_every=0, preview_every=0)
    manager.wait(first.id, timeout=30, states=("running",))
    disk.full.set()  # from now on no job.json can be written: not the running state, not the final ones
    one = manager.wait(first.id, timeout=30)
    two = manager.wait(second.id, timeout=30)
    assert one.state == "failed" and "No space left on device" in one.message, one.message
    assert two.state in ("finished", "failed") and "job.json could not be written" in two.message, two.message
    disk.full.clear()
    third = manager.submit("third", FakeRuntime(), 2, save_every=0)
    assert manager.wait(third.id, timeout=30).state == "finished"
    assert manager.worker.thread.is_alive()
    manager.close()


def test_a_resume_on_a_full_disk_is_refused_and_changes_nothing(tmp_path, monkeypatch):
    disk = _FullDisk(monkeypatch)
    manager = _manager(tmp_path)
    runtime = FakeRuntime()
    record = manager.submit("res", runtime, 2, save_every=0)
    manager.wait(record.id, timeout=30)
    disk.full.set()
    with pytest.raises(jobs.JobError, match="No space left on device"):
        manager.resume(record.id, runtime=runtime, iterations=5)
    now = manager.get(record.id)
    assert (now.state, now.iterations, now.step) == ("finished", 2, 2)
    disk.full.clear()
    manager.close()


def test_an_offload_that_raises_does_not_leave_the_job_running_or_stop_the_next(tmp_path):
    class BrokenOffload(FakeRuntime):
        def offload(self):
            raise RuntimeError("CUDA error: device lost")

    manager = _manager(tmp_path)

    def stop_at_2(event, payload):
        if event == "tdm.job.progress" and payload["step"] == 2 and payload["name"] == "off":
            manager.stop(payload["id"])

    manager.listener = stop_at_2
    record = manager.submit("off", BrokenOffload(), 50, save_every=0, preview_every=0)
    final = manager.wait(record.id, timeout=30)
    assert final.state == "stopped" and "device lost" in final.message, final.message
    after = manager.submit("after", FakeRuntime(), 2, save_every=0)  # offloads the broken one first
    assert manager.wait(after.id, timeout=30).state == "finished"
    manager.close()


# ---------------------------------------------------------------------------------------------------------------
# Class: request values (iterations) are typed, finite and bounded


@pytest.mark.parametrize("iterations", [float("inf"), float("nan"), 1e400, 10**12, 0, -5, 2.5, True, "10", [3]])
def test_hostile_iterations_are_refused(tmp_path, iterations):
    manager = _manager(tmp_path)
    runtime = FakeRuntime()
    record = manager.submit("it", runtime, 1, save_every=0)
    manager.wait(record.id, timeout=30)
    with pytest.raises(jobs.JobError, match="iterations") as error:
        manager.resume(record.id, runtime=runtime, iterations=iterations)
    assert error.value.status == 400
    with pytest.raises(jobs.JobError, match="iterations"):
        manager.submit("it2", runtime, iterations)
    assert manager.get(record.id).state == "finished"
    manager.close()


# ---------------------------------------------------------------------------------------------------------------
# Class: non-finite weights are never published


class NaNSession(FakeSession):
    """Its weights turn non-finite at `bad_at` while the loss stays finite (what a broken optimiser state does)."""

    def __init__(self, tag, state=None, bad_at=3, value=float("nan"), where="lora", **kwargs):
        super().__init__(tag, state, **kwargs)
        self.bad_at, self.value, self.where = bad_at, value, where

    def step(self):
        metrics = super().step()
        if self.step_count >= self.bad_at and self.where == "lora":
            self.weight[1] = self.value
        return metrics

    def state_dict(self):
        state = super().state_dict()
        if self.step_count >= self.bad_at and self.where == "optimiser":
            state["optimiser"] = {"exp_avg": torch.tensor([1.0, self.value])}
        return state


class NaNRuntime(FakeRuntime):
    def build(self, state, iterations=None):
        self.builds.append(None if state is None else int(state["step"]))
        return NaNSession(self.tag, state, **self.kwargs)


@pytest.mark.parametrize("value,where", [(float("nan"), "lora"), (float("inf"), "lora"), (float("-inf"), "lora"),
                                         (float("nan"), "optimiser")])
def test_non_finite_weights_with_a_finite_loss_are_never_published(tmp_path, value, where):
    loras = tmp_path / "loras"
    manager = _manager(tmp_path)
    record = manager.submit("nanw", NaNRuntime(bad_at=3, value=value, where=where), 8, save_every=2, keep_last=5,
                            preview_every=0)
    final = manager.wait(record.id, timeout=30)
    assert final.state == "failed" and "NaN or infinite values at step 4" in final.message, final.message
    assert "the LoRA and checkpoint of step 2 are kept" in final.message
    assert torch.equal(load_file(loras / "nanw.safetensors")[WEIGHT], _weight_after(2))
    assert not (loras / "nanw-step00000004.safetensors").exists()
    checkpoints = sorted(p.name for p in (loras / ".tdm_jobs" / record.id / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002"] and final.checkpoint_step == 2
    manager.close()


def test_the_final_save_of_a_stop_refuses_non_finite_weights_too(tmp_path):
    loras = tmp_path / "loras"
    manager = _manager(tmp_path)
    record = manager.submit("nanstop", NaNRuntime(bad_at=1), 3, save_every=0, preview_every=0)
    final = manager.wait(record.id, timeout=30)
    assert final.state == "failed" and "no LoRA had been written yet" in final.message
    assert not list(loras.glob("*.safetensors"))
    manager.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_cli_checkpoint_writer_refuses_non_finite_loras(tmp_path, value):
    good = checkpoint.write_lora(tmp_path / "student.safetensors", {"w": torch.ones(2)}, {})
    before = good.read_bytes()
    with pytest.raises(checkpoint.NonFiniteWeightsError, match="student.safetensors"):
        checkpoint.write_lora(good, {"w": torch.tensor([1.0, value])}, {})
    assert good.read_bytes() == before and not list(tmp_path.glob(".*partial"))


# ---------------------------------------------------------------------------------------------------------------
# Class: crash leftovers are cleaned, a record never names a pruned file, history never repeats


def test_a_kill_between_the_durable_record_and_the_deletion_finishes_the_deletion(tmp_path):
    loras = tmp_path / "loras"
    manager = _manager(tmp_path)
    record = manager.submit("crash", FakeRuntime(), 4, save_every=1, keep_last=2, preview_every=0)
    manager.wait(record.id, timeout=30)
    manager.close()
    # the state a kill right after the record was made durable leaves: the dropped snapshot still on disk
    path = loras / ".tdm_jobs" / record.id / "job.json"
    saved = json.loads(path.read_text())
    (loras / "crash-step00000001.safetensors").write_bytes(b"stale snapshot of ours")
    (loras / ".tdm_jobs" / record.id / "checkpoints" / "step-00000001").mkdir()
    saved["pruning"], saved["pruning_checkpoints"] = ["crash-step00000001.safetensors"], [1]
    path.write_text(json.dumps(saved))
    restarted = _manager(tmp_path)
    assert not (loras / "crash-step00000001.safetensors").exists()
    assert not (loras / ".tdm_jobs" / record.id / "checkpoints" / "step-00000001").exists()
    assert restarted.get(record.id).pruning == []
    assert json.loads(path.read_text())["pruning"] == []
    restarted.close()


def test_partial_files_and_temporary_folders_of_the_job_are_cleaned_and_only_those(tmp_path):
    loras = tmp_path / "loras"
    manager = _manager(tmp_path)
    record = manager.submit("left", FakeRuntime(), 2, save_every=1, keep_last=2, preview_every=0)
    manager.wait(record.id, timeout=30)
    manager.close()
    own = loras / ".tdm_jobs" / record.id
    ours = [loras / ".left.safetensors.4242.1.partial", loras / ".left-step00000002.safetensors.4242.1.partial",
            own / ".job.json.4242.7.partial", own / "checkpoints" / "step-00000002" / ".state.tdmckpt.1.2.partial"]
    for path in ours:
        path.write_bytes(b"half")
    (own / "checkpoints" / ".tmp-step-00000003-4242").mkdir()
    (own / "checkpoints" / ".tmp-step-00000003-4242" / "state.tdmckpt").write_bytes(b"half")
    foreign = [loras / ".other.safetensors.1.2.partial", loras / ".left.safetensors.notes",
               loras / "left.safetensors.partial"]
    for path in foreign:
        path.write_bytes(b"not ours")
    _manager(tmp_path).close()
    assert not [p for p in ours if p.exists()]
    assert not (own / "checkpoints" / ".tmp-step-00000003-4242").exists()
    assert all(p.read_bytes() == b"not ours" for p in foreign)


def test_a_failed_record_write_after_the_snapshot_leaves_a_consistent_resumable_job(tmp_path, monkeypatch):
    """The record written before the snapshot names it: whatever the crash point, every snapshot on disk is one the
    record owns, and every file the durable record names as kept exists."""
    loras = tmp_path / "loras"
    disk = _FullDisk(monkeypatch)
    manager = _manager(tmp_path)
    def fill_disk(event, payload):
        if event == "tdm.job.progress" and payload["step"] == 5:
            disk.full.set()

    manager.listener = fill_disk
    runtime = FakeRuntime()
    record = manager.submit("wal", runtime, 8, save_every=2, keep_last=2, preview_every=0)
    final = manager.wait(record.id, timeout=30)
    assert final.state == "failed" and "No space left on device" in final.message
    disk.full.clear()
    manager.close()
    saved = json.loads((loras / ".tdm_jobs" / record.id / "job.json").read_text())
    on_disk = sorted(p.name for p in loras.glob("wal-step*.safetensors"))
    assert set(on_disk) <= set(saved["loras"]) | set(saved["pruning"])
    restarted = _manager(tmp_path)
    restarted.submit("wal", runtime, 8, if_exists="resume")
    done = restarted.wait(record.id, timeout=30)
    assert done.state == "finished"
    assert sorted(p.name for p in loras.glob("wal-step*.safetensors")) == sorted(done.loras) == [
        "wal-step00000006.safetensors", "wal-step00000008.safetensors"]
    assert torch.equal(load_file(loras / "wal.safetensors")[WEIGHT], _weight_after(8))
    restarted.close()


def test_the_loss_history_never_repeats_steps_after_a_resume(tmp_path):
    manager = _manager(tmp_path)
    record = manager.submit("hist", FakeRuntime(fail_at=7, error=RuntimeError("boom")), 10, save_every=4,
                            preview_every=0)
    failed = manager.wait(record.id, timeout=30)
    assert failed.state == "failed" and [h[0] for h in failed.history] == [1, 2, 3, 4, 5, 6]
    manager.resume(record.id, runtime=FakeRuntime(), iterations=10)
    done = manager.wait(record.id, timeout=30)
    assert done.state == "finished" and [h[0] for h in done.history] == list(range(1, 11))
    saved = json.loads((tmp_path / "loras" / ".tdm_jobs" / record.id / "job.json").read_text())
    assert [h[0] for h in saved["history"]] == list(range(1, 11))
    manager.close()


def test_a_preview_file_that_is_not_an_rgb_preview_is_not_served(tmp_path):
    import numpy as np

    manager = _manager(tmp_path)
    record = manager.submit("prev", FakeRuntime(), 1, save_every=0, preview_every=0)
    manager.wait(record.id, timeout=30)
    manager.close()
    path = tmp_path / "loras" / ".tdm_jobs" / record.id / "preview.npy"
    for bad in (np.zeros((4, 4), dtype=np.uint8), np.zeros((4, 4, 3), dtype=np.float64)):
        np.save(path, bad)
        assert _manager(tmp_path).preview(record.id) is None
    path.write_bytes(b"\x93NUMPY garbage")
    assert _manager(tmp_path).preview(record.id) is None
    np.save(path, np.full((4, 4, 3), 7, dtype=np.uint8))
    assert _manager(tmp_path).preview(record.id)[0, 0, 0] == 7


def test_a_non_finite_teacher_checksum_keeps_the_record_strict_json_and_readable(tmp_path):
    manager = _manager(tmp_path)
    record = manager.submit("nant", FakeRuntime(), 1, save_every=0, teacher={"checksum": float("nan")})
    manager.wait(record.id, timeout=30)
    manager.close()
    text = (tmp_path / "loras" / ".tdm_jobs" / record.id / "job.json").read_text()
    assert "NaN" not in text and '"nan"' in text
    assert _manager(tmp_path).get(record.id).state == "finished"


# ---------------------------------------------------------------------------------------------------------------
# The CLI's run folder: only checkpoints the run's manifest records are ever deleted


@pytest.mark.parametrize("manifest", [None, "[]", "{" * 1000, json.dumps({
    "checkpoints": ["../../victim", "../victim", "/abs/checkpoint-00000001"],
    "temporary": ["../victim", ".tmp-checkpoint-00000009-1/../../victim", "checkpoint-00000001/.."]})])
def test_cli_pruning_deletes_only_checkpoints_the_run_wrote(tmp_path, manifest):
    from tdm_core.distill import DistillConfig, TDMTrainer
    from tdm_core.distill.reference import make_backend

    run = tmp_path / "run"
    foreign = [run / "checkpoint-00000001", run / ".tmp-checkpoint-00000009-1", tmp_path / "victim"]
    for folder in foreign:
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"another tool's")
    if manifest is not None:
        (run / ".tdm_run.json").write_text(manifest)
    trainer = TDMTrainer(make_backend(lora_rank=4), DistillConfig(prompts=["a"], batch_size=2, total_steps=900,
                                                                  lora_rank=4, keep_last=1))
    for _ in range(3):
        trainer.step()
        trainer.save_checkpoint(run)
    assert all((folder / "state.pt").read_bytes() == b"another tool's" for folder in foreign)
    assert sorted(p.name for p in checkpoint.list_checkpoints(run)) == ["checkpoint-00000001", "checkpoint-00000003"]


def test_a_replaced_compressed_checkpoint_fails_the_resume_before_inflating(tmp_path):
    import io
    import zipfile

    manager = _manager(tmp_path)
    runtime = FakeRuntime()
    record = manager.submit("bombck", runtime, 2, save_every=2, preview_every=0)
    manager.wait(record.id, timeout=30)
    state = tmp_path / "loras" / ".tdm_jobs" / record.id / "checkpoints" / "step-00000002" / "state.tdmckpt"
    buffer = io.BytesIO()
    torch.save({"step": 2, "weight": torch.zeros(8 * 1024 * 1024)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(state, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    manager.resume(record.id, runtime=runtime, iterations=4)
    final = manager.wait(record.id, timeout=30)
    assert final.state == "failed" and "state.tdmckpt" in final.message and "compressed" in final.message
    assert runtime.builds == [None]  # never built from it
    manager.close()
